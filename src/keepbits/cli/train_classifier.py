"""``keepbits train classifier``: train a registered classifier on an image data set."""
from __future__ import annotations

import argparse
import json
import os

from keepbits.cli._common import (
    POSITIVE_LR, SEED, add_argument, add_device_option, add_force_option, add_precision_option, add_threads_option, command_line,
    existing_path, non_negative_float, non_negative_int, number, positive_int,
)

HELP = "train a registered classifier (lenet5, resnet20, resnet20_scan, resnet18, vgg16_bn, nf_wrn16_2, convnet3); runs under torchrun too"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".npz file, idx folder, split folder (train.npz/test.npz) or class-folder tree")
    p.add_argument("--arch", required=True, help="classifier name in the registry (e.g. lenet5, resnet20)")
    p.add_argument("--out", required=True, help="output folder for last.pt / best.pt")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="per process")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd uses Nesterov momentum")
    p.add_argument("--lr", type=POSITIVE_LR, default=None, help="peak learning rate (default: 0.1 for sgd, 1e-3 for adamw)")
    p.add_argument("--momentum", type=number(float, minimum=0, maximum=1), default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="weight decay of the optimizer")
    p.add_argument("--schedule", choices=["cosine", "step", "none"], default="cosine", help="learning-rate schedule after the warm-up")
    p.add_argument("--step-epochs", type=positive_int, nargs="*", default=[], help="epochs where a step schedule multiplies the lr by --step-gamma")
    p.add_argument("--step-gamma", type=number(float, above=0), default=0.1, help="lr factor at each --step-epochs epoch")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=0, help="epochs of linear lr warm-up")
    p.add_argument("--label-smoothing", type=number(float, minimum=0, maximum=1), default=0.0, help="label smoothing of the cross-entropy")
    p.add_argument("--augment", choices=["auto", "crop-flip", "crop", "none"], default="auto", help="auto: crop+flip for colour images, crop for gray")
    p.add_argument("--crop-padding", type=non_negative_int, default=4, help="padding (px) of the random-crop augmentation")
    p.add_argument("--image-size", type=positive_int, nargs=2, default=[224, 224], metavar=("H", "W"),
                   help="size images in class-folder trees are brought to (arrays keep their size)")
    p.add_argument("--resize-policy", choices=["resize", "center-crop", "letterbox"], default="center-crop",
                   help="how class-folder images reach --image-size: stretch, crop the middle, or pad black")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation split held out of the train split "
                   "(seed --seed): best.pt is the epoch best on it, never on test; 0: no selection, no best.pt")
    add_argument(p, "--num-train-images", type=int, default=None, deprecated=["--max-train"],
                 help="train on a random class-balanced sample of N training images (seed --seed), drawn after the "
                      "validation hold-out (default: all)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the validation split, the image sample, initialisation and batches")
    add_force_option(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with the same settings (only run control such as --epochs may change)")
    p.add_argument("--init", default=None, help="start from this classifier checkpoint's weights and normalisation "
                   "(same parameter names and shapes, e.g. a CIFAR-10 resnet20 for resnet20_scan; default: random initialisation)")
    add_device_option(p)
    add_precision_option(p)
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    if args.init:
        existing_path(args.init, "--init checkpoint")
    from keepbits.training.classifier import ClassifierConfig, train_classifier

    cfg = ClassifierConfig(
        data=args.data, arch=args.arch, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        schedule=args.schedule, step_epochs=args.step_epochs, step_gamma=args.step_gamma,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, augment=args.augment,
        crop_padding=args.crop_padding, val_fraction=args.val_fraction,
        image_size=tuple(args.image_size), resize_policy=args.resize_policy, max_train=args.num_train_images,
        seed=args.seed, resume=args.resume, overwrite=args.force, init=args.init, device=args.device, precision=args.precision, threads=args.threads, progress=not args.quiet, command=command_line(),
    )
    summary = train_classifier(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(json.dumps({"best": summary["best"], "wall_time_s": summary["wall_time_s"], "checkpoints": summary["checkpoints"]}, indent=2))
    return 0
