"""``keepbits train nice``: learn a NICE mask generator against a trained classifier."""
from __future__ import annotations

import argparse
import json

from keepbits.cli._common import add_argument, command_line, existing_path
from keepbits.errors import InputError

HELP = "train a NICE mask generator (L = L_D + λ1 L0 + λ2 smoothness) against a classifier checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set the classifier was trained on (.npz, split folder, ...)")
    p.add_argument("--classifier", required=True, help="the classifier to explain: checkpoint from `keepbits train classifier` "
                   "(named by its role, not --model: this command trains a generator)")
    p.add_argument("--out", required=True, help="output folder; the checkpoint is OUT/nice.pt")
    p.add_argument("--generator", default="auto", help="auto (nice_unet up to 64 px, nice_fast above), nice_unet, "
                   "nice_fast (cheapest, for deployment), nice_mnist or nice_caltech")
    p.add_argument("--generator-kwargs", default="{}", help='JSON options of the generator, e.g. \'{"widths": [8, 16, 32]}\'')
    p.add_argument("--mode", choices=["fixed", "finetuned"], default="fixed", help="fixed: classifier frozen; finetuned: --train-blocks train too")
    p.add_argument("--train-blocks", nargs="*", default=[], help="finetuned mode: classifier modules to train (e.g. layer3 fc); none given: all")
    p.add_argument("--block-size", "-b", type=int, default=8, help="b of the mixed-resolution image (NICE Eq. 12)")
    p.add_argument("--lambda-l0", type=float, default=1.0, help="λ1, weight of the expected L0 per pixel (start value with --target-fraction)")
    p.add_argument("--lambda-smooth", type=float, default=0.0, help="λ2, weight of the smoothness loss per pixel")
    p.add_argument("--target-fraction", type=float, default=None, help="adapt λ1 during training so ẑ > 0.5 keeps this fraction of pixels (default: λ1 fixed)")
    p.add_argument("--target-rate", type=float, default=0.05, help="η of the dual update λ1 += η·(kept − target)/target in target mode")
    p.add_argument("--warmup-steps", type=int, default=0, help="saliency warm start: fit the mask to the classifier's most salient "
                   "pixels for this many steps before NICE training (0: off)")
    p.add_argument("--warmup-fraction", type=float, default=None, help="fraction of pixels the warm start keeps (default: "
                   "--target-fraction, else 0.1)")
    p.add_argument("--warmup-smooth", type=int, default=9, help="box filter (px) on the saliency map of the warm start")
    p.add_argument("--warmup-lr", type=float, default=1e-2, help="Adam learning rate of the warm start")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam: lr ×0.1 every --step-epochs; sgd: momentum 0.9, cosine")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the generator")
    p.add_argument("--classifier-lr", type=float, default=None, help="learning rate of the classifier in finetuned mode (default: --lr)")
    p.add_argument("--step-epochs", type=int, default=5, help="adam: lr ×0.1 every N epochs")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    add_argument(p, "--num-train-images", type=int, default=None, deprecated=["--max-train"],
                 help="train on a random class-balanced sample of N training images (seed --seed; default: all)")
    add_argument(p, "--num-test-images", type=int, default=None, deprecated=["--max-test"],
                 help="evaluate on a random class-balanced sample of N test images (seed --seed; default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation split held out of the training data "
                   "(seed --seed; pass the classifier's own --val-fraction and --seed): evaluated every epoch, the split to "
                   "choose settings on; the test split is evaluated once, after training")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split, the image samples, initialisation and batches")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    existing_path(args.classifier, "classifier checkpoint")
    try:
        gen_kwargs = json.loads(args.generator_kwargs)
    except json.JSONDecodeError as exc:
        raise InputError(f"--generator-kwargs is not JSON: {exc}") from None
    if not isinstance(gen_kwargs, dict):
        raise InputError("--generator-kwargs must be a JSON object")
    from keepbits.training.nice import NiceConfig, train_nice

    cfg = NiceConfig(
        data=args.data, classifier=args.classifier, out=args.out, generator=args.generator, generator_kwargs=gen_kwargs,
        mode=args.mode, train_blocks=args.train_blocks, block_size=args.block_size, lambda_l0=args.lambda_l0,
        lambda_smooth=args.lambda_smooth, target_fraction=args.target_fraction, target_rate=args.target_rate,
        warmup_steps=args.warmup_steps, warmup_fraction=args.warmup_fraction, warmup_smooth=args.warmup_smooth,
        warmup_lr=args.warmup_lr, optimizer=args.optimizer, lr=args.lr, classifier_lr=args.classifier_lr, step_epochs=args.step_epochs,
        epochs=args.epochs, batch_size=args.batch_size, max_train=args.num_train_images, max_test=args.num_test_images, val_fraction=args.val_fraction,
        seed=args.seed, threads=args.threads, progress=not args.quiet, command=command_line(),
    )
    summary = train_nice(cfg)
    print(json.dumps({k: summary[k] for k in ("final", "final_split", "lambda_l0_final", "checkpoint", "wall_time_s")}, indent=2))
    return 0
