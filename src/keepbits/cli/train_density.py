"""``keepbits train density``: train a Glow normalising flow and report bits per dimension."""
from __future__ import annotations

import argparse
import json
import os

from keepbits.cli._common import (
    POSITIVE_LR, SEED, add_argument, add_device_option, add_force_option, add_threads_option, command_line, existing_path, non_negative_int,
    number, positive_int,
)

HELP = "train a Glow density model (bits per dimension, SimpleBits L_sim)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".npz file, idx folder, split folder (train.npz/test.npz) or class-folder tree")
    p.add_argument("--out", required=True, help="output checkpoint file (.pt, kind 'density')")
    p.add_argument("--levels", type=positive_int, default=3, help="multi-scale levels (image sides must be divisible by 2**levels)")
    p.add_argument("--depth", type=positive_int, default=8, help="flow steps per level")
    p.add_argument("--hidden", type=positive_int, default=128, help="channels of the coupling networks")
    p.add_argument("--gray", choices=["replicate", "native"], default="replicate", help="gray images: replicate to 3 channels or train a 1-channel flow")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize images to this square size (e.g. 32 for MNIST with 3 levels; default: keep)")
    p.add_argument("--steps", type=positive_int, default=2000, help="Adam steps")
    p.add_argument("--max-minutes", type=number(float, above=0), default=None, help="stop earlier after this wall time (steps run are recorded; default: no limit)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (drawn with replacement)")
    p.add_argument("--lr", type=POSITIVE_LR, default=1e-3, help="Adam learning rate after the warm-up")
    p.add_argument("--warmup-steps", type=non_negative_int, default=200, help="steps of linear lr warm-up")
    add_argument(p, "--num-train-images", type=int, default=None, deprecated=["--max-train"],
                 help="train on a random class-balanced sample of N training images (seed --seed; default: all)")
    add_argument(p, "--num-test-images", type=positive_int, default=2000, deprecated=["--eval-images"],
                 help="final bpd on a random class-balanced sample of N test images (seed --seed; the train split when there is no test split)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image samples, initialisation and batches")
    add_device_option(p)
    add_threads_option(p)
    p.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps between saves of the resumable state, OUT's stem + .last.pt")
    add_force_option(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT's .last.pt with the same settings (only run control such as "
                   "--steps may change)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    from keepbits.training.density import DensityConfig, train_density

    cfg = DensityConfig(
        data=args.data, out=args.out, levels=args.levels, depth=args.depth, hidden=args.hidden, gray=args.gray,
        image_size=args.image_size, steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, max_train=args.num_train_images, eval_images=args.num_test_images,
        seed=args.seed, device=args.device, threads=args.threads, log_every=50, checkpoint_every=args.checkpoint_every,
        resume=args.resume, overwrite=args.force, command=command_line(),
    )
    summary = train_density(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
