"""``keepbits train nice``: learn a NICE mask generator against a classifier."""
from __future__ import annotations

import argparse
import json
import os

from keepbits.cli._common import (
    CLASSIFIER_SPEC_HELP, POSITIVE_LR, SEED, add_argument, add_classifier_options, add_device_option, add_force_option,
    add_frame_step_option, add_precision_option, add_threads_option, classifier_options, command_line, existing_path, json_object,
    non_negative_float, non_negative_int, number, positive_int,
)
from keepbits.errors import InputError

HELP = ("train a NICE mask generator (L = L_D + λ1 L0 + λ2 smoothness) against any classifier, on a data set or on "
        "unlabelled footage; runs under torchrun too")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True, help=f"the classifier to explain: {CLASSIFIER_SPEC_HELP} "
                   "(named by its role, not --model: this command trains a generator)")
    add_classifier_options(p)
    p.add_argument("--data", default=None, help="a data set read into memory (.npz, split folder, class folders brought to the "
                   "classifier's size by its preprocessing); or give --footage")
    p.add_argument("--footage", nargs="+", default=None, metavar="PATH",
                   help="footage streamed from disk instead of --data: image folders of any nesting, videos, .npz")
    p.add_argument("--val-footage", nargs="+", default=[], metavar="PATH",
                   help="footage evaluated after every epoch (no augmentation; with --footage)")
    add_frame_step_option(p)
    p.add_argument("--workers", type=non_negative_int, default=0, help="footage reader processes (0: read in the training process)")
    p.add_argument("--min-crop-area", type=float, default=0.25, help="footage: random crops keep at least this share of the frame")
    p.add_argument("--labels", choices=["auto", "true", "predicted"], default="auto",
                   help="L_D's target: the data's labels (true), the classifier's prediction on the unmasked image (predicted), "
                        "or true where the data has labels (auto)")
    p.add_argument("--out", required=True, help="output folder: OUT/last.pt after every epoch, OUT/nice.pt at the end")
    p.add_argument("--generator", default="auto", help="auto (nice_unet up to 64 px, nice_fast above), nice_unet, "
                   "nice_fast (cheapest, for deployment), nice_taps (a head on EfficientNet-Lite0's own features: "
                   "shares its pass in the bundle; --mode fixed), nice_mnist, nice_caltech or package.module:factory")
    p.add_argument("--generator-kwargs", default="{}", help='JSON options of the generator, e.g. \'{"widths": [8, 16, 32]}\'')
    p.add_argument("--mode", choices=["fixed", "finetuned"], default="fixed", help="fixed: classifier frozen; finetuned: --train-blocks train too")
    p.add_argument("--train-blocks", nargs="*", default=[], help="finetuned mode: classifier modules to train (e.g. layer3 fc); none given: all")
    p.add_argument("--block-size", "-b", type=int, default=8, help="b of the mixed-resolution image (NICE Eq. 12)")
    p.add_argument("--lambda-l0", type=non_negative_float, default=1.0, help="λ1, weight of the expected L0 per pixel (start value with --target-fraction)")
    p.add_argument("--lambda-smooth", type=non_negative_float, default=0.0, help="λ2, weight of the smoothness loss per pixel")
    p.add_argument("--target-fraction", type=float, default=None, help="adapt λ1 during training so ẑ > 0.5 keeps this fraction of pixels (default: λ1 fixed)")
    p.add_argument("--target-rate", type=number(float, above=0), default=0.05, help="η of the dual update λ1 += η·(kept − target)/target in target mode")
    p.add_argument("--warmup-steps", type=int, default=0, help="saliency warm start: fit the mask to the classifier's most salient "
                   "pixels for this many steps before NICE training (0: off)")
    p.add_argument("--warmup-fraction", type=float, default=None, help="fraction of pixels the warm start keeps (default: "
                   "--target-fraction, else 0.1)")
    p.add_argument("--warmup-smooth", type=int, default=9, help="box filter (px) on the saliency map of the warm start")
    p.add_argument("--warmup-lr", type=POSITIVE_LR, default=1e-2, help="Adam learning rate of the warm start")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam: lr ×0.1 every --step-epochs; sgd: momentum 0.9, cosine")
    p.add_argument("--lr", type=POSITIVE_LR, default=1e-3, help="learning rate of the generator")
    p.add_argument("--classifier-lr", type=POSITIVE_LR, default=None, help="learning rate of the classifier in finetuned mode (default: --lr)")
    p.add_argument("--step-epochs", type=int, default=5, help="adam: lr ×0.1 every N epochs")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs")
    p.add_argument("--max-minutes", type=number(float, above=0), default=None, help="stop after the epoch in which this much wall time has passed "
                   "(the lr schedule still spans --epochs; default: no limit)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step and process")
    add_argument(p, "--num-train-images", type=int, default=None, deprecated=["--max-train"],
                 help="--data: train on a random class-balanced sample of N training images (seed --seed; default: all)")
    add_argument(p, "--num-test-images", type=int, default=None, deprecated=["--max-test"],
                 help="--data: evaluate on a random class-balanced sample of N test images (seed --seed; default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="--data: stratified validation split held out of the training data "
                   "(seed --seed; pass the classifier's own --val-fraction and --seed): evaluated every epoch, the split to "
                   "choose settings on; the test split is evaluated once, after training")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the validation split, image samples, initialisation, batches, crops and gates")
    add_device_option(p)
    add_precision_option(p)
    add_force_option(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt with the same settings (only run control such as --epochs may change)")
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    if bool(args.data) == bool(args.footage):
        raise InputError("give --data (a data set) or --footage (paths streamed from disk), one of them")
    for path in [args.data] if args.data else [*args.footage, *args.val_footage]:
        existing_path(path, "data path")
    gen_kwargs = json_object(args.generator_kwargs, "--generator-kwargs")
    options = classifier_options(args)
    from keepbits.training.nice import NiceConfig, train_nice

    cfg = NiceConfig(
        out=args.out, classifier=args.classifier, data=args.data or "", footage=list(args.footage or []), frame_step=args.frame_step,
        workers=args.workers, val_footage=list(args.val_footage), min_crop_area=args.min_crop_area, labels=args.labels,
        classifier_weights=options["weights"], classifier_kwargs=options["kwargs"], preprocessing=options["preprocessing"],
        generator=args.generator, generator_kwargs=gen_kwargs,
        mode=args.mode, train_blocks=args.train_blocks, block_size=args.block_size, lambda_l0=args.lambda_l0,
        lambda_smooth=args.lambda_smooth, target_fraction=args.target_fraction, target_rate=args.target_rate,
        warmup_steps=args.warmup_steps, warmup_fraction=args.warmup_fraction, warmup_smooth=args.warmup_smooth,
        warmup_lr=args.warmup_lr, optimizer=args.optimizer, lr=args.lr, classifier_lr=args.classifier_lr, step_epochs=args.step_epochs,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size, max_train=args.num_train_images, max_test=args.num_test_images,
        val_fraction=args.val_fraction, seed=args.seed, device=args.device, precision=args.precision, resume=args.resume, overwrite=args.force, threads=args.threads,
        progress=not args.quiet, command=command_line(),
    )
    summary = train_nice(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        keys = ("final", "final_split", "lambda_l0_final", "checkpoint", "wall_time_s", "world_size", "device", "precision", "footage")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0
