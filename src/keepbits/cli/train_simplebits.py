"""``keepbits train simplebits``: jointly train a SimpleBits simplifier and a classifier."""
from __future__ import annotations

import argparse
import json
import os

from keepbits.cli._common import (
    CLASSIFIER_SPEC_HELP, POSITIVE_LR, SEED, add_argument, add_classifier_options, add_device_option, add_force_option, add_threads_option,
    classifier_options, command_line, existing_path, non_negative_float, positive_int,
)

HELP = "train a SimpleBits simplifier jointly with a classifier (L = λ_sim·bpd + L_cls, unrolled step)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".npz file, idx folder, split folder (train.npz/test.npz) or class-folder tree")
    p.add_argument("--out", required=True, help="output checkpoint (.pt, kind 'simplebits')")
    p.add_argument("--density", default=None, help="density checkpoint for L_sim (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--arch", default="nf_wrn16_2", help="classifier trained from scratch (registry name)")
    p.add_argument("--classifier", default=None, help=f"finetune this classifier instead of training --arch from scratch: "
                   f"{CLASSIFIER_SPEC_HELP} (default: from scratch)")
    add_classifier_options(p)
    p.add_argument("--lambda-sim", type=non_negative_float, default=1.0, help="weight of L_sim (bpd of the simplified image)")
    p.add_argument("--inner-lr", type=POSITIVE_LR, default=None, help="learning rate of the unrolled step of the classifier's AdamW "
                   "(default: the classifier's --lr, as in the paper)")
    p.add_argument("--lr", type=POSITIVE_LR, default=5e-4, help="AdamW learning rate (both networks)")
    p.add_argument("--sim-lr", type=POSITIVE_LR, default=None, help="AdamW learning rate of the simplifier (default: --lr, as in the paper)")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-5, help="AdamW weight decay")
    p.add_argument("--steps", type=positive_int, default=500, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    p.add_argument("--unet-base", type=positive_int, default=16, help="channels of the U-Net's first level (doubling per downsampling)")
    add_argument(p, "--num-train-images", type=int, default=None, deprecated=["--max-train"],
                 help="train on a random class-balanced sample of N training images (seed 0; default: all)")
    add_argument(p, "--num-test-images", type=positive_int, default=1000, deprecated=["--max-test"],
                 help="evaluate on a random class-balanced sample of N test images (seed 0)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of initialisation and batches (the image samples use seed 0)")
    add_device_option(p)
    add_threads_option(p)
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between saves of the resumable state, OUT's stem + .last.pt")
    add_force_option(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT's .last.pt with the same settings (only run control such as "
                   "--steps may change)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    if args.density is not None:
        existing_path(args.density, "density checkpoint")
    options = classifier_options(args)
    from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits

    cfg = SimpleBitsConfig(
        data=args.data, out=args.out, density=args.density, arch=args.arch, classifier=args.classifier,
        classifier_weights=options["weights"], classifier_kwargs=options["kwargs"], preprocessing=options["preprocessing"],
        lambda_sim=args.lambda_sim, inner_lr=args.inner_lr, lr=args.lr, sim_lr=args.sim_lr, weight_decay=args.weight_decay,
        steps=args.steps, batch_size=args.batch_size, unet_base=args.unet_base, max_train=args.num_train_images,
        max_test=args.num_test_images, seed=args.seed, device=args.device, threads=args.threads, checkpoint_every=args.checkpoint_every,
        resume=args.resume, overwrite=args.force, command=command_line(),
    )
    summary = train_simplebits(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns it: one JSON on stdout
        print(json.dumps(summary, indent=2))
    return 0
