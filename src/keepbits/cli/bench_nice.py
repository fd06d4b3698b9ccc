"""``keepbits bench nice``: accuracy and bytes of NICE mixed-resolution images vs baselines."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keepbits._fs import writable_file, write_text_atomic
from keepbits.cli._common import SEED, add_argument, existing_path
from keepbits.errors import InputError

HELP = ("evaluate a NICE checkpoint: binary mask (ẑ > 0.5) vs random, saliency and SIS pixels at the same per-image count, "
        "the soft ẑ apart, PNG/JPEG/WebP and keepbits payload bytes")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_argument(p, "--model", required=True, deprecated=["--checkpoint"], help="NICE checkpoint (from `keepbits train nice`)")
    p.add_argument("--data", required=True, help="data set; its test split is used when present")
    p.add_argument("--block-sizes", "-b", type=int, nargs="+", default=None, help="b values to evaluate (default: the trained b)")
    p.add_argument("--qualities", type=int, nargs="+", default=[10, 30, 50, 75, 90], help="JPEG/WebP qualities")
    add_argument(p, "--num-images", type=int, default=None, deprecated=["--max-images"],
                 help="evaluate a random class-balanced sample of N images (seed --seed; default or 0: all)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image sample and the random-pixel baseline")
    p.add_argument("--sis-k", type=int, default=None,
                   help="add the SIS baseline: Batched Gradient BackSelect masking K pixels per iteration (off by default)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.model, "NICE checkpoint")
    existing_path(args.data, "data path")
    if any(b < 1 for b in args.block_sizes or []):
        raise InputError(f"block sizes must be >= 1, got {args.block_sizes}")
    if args.sis_k is not None and args.sis_k < 1:
        raise InputError(f"--sis-k must be >= 1, got {args.sis_k}")
    if any(not 1 <= q <= 100 for q in args.qualities):
        raise InputError(f"qualities must be in [1, 100], got {args.qualities}")
    if args.out:  # checked before the benchmark: an earlier result is never replaced, a folder is no file
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise InputError(f"--out {args.out}: holds an earlier result; choose another name or remove it")
        writable_file(args.out, "--out")
    from keepbits.data import has_split, load_dataset
    from keepbits.training.data import TensorImages
    from keepbits.training.nice import load_nice
    from keepbits.training.nice_eval import backselect_ranks, benchmark_nice

    generator, classifier, ckpt = load_nice(args.model)
    pre = ckpt.preprocessing_record()  # class-folder images reach the classifier's size as its preprocessing says
    dataset = load_dataset(args.data, "test" if has_split(args.data, "test") else "train", pre.input_size, pre.resize_policy, pre.crop_fraction,
                           ckpt.input_shape[0])
    if list(dataset.shape_chw) != ckpt.input_shape:
        raise InputError(f"{args.data}: images are {list(dataset.shape_chw)} (C,H,W), the checkpoint expects {ckpt.input_shape}")
    dataset = dataset.sample(args.num_images or None, args.seed)
    block_sizes = args.block_sizes or [ckpt.settings["block_size"]]
    ranks = None
    if args.sis_k:
        ranks = backselect_ranks(classifier, TensorImages(dataset, ckpt.normalization.mean, ckpt.normalization.std), args.sis_k)
    result = benchmark_nice(generator, classifier, ckpt, dataset, block_sizes, args.qualities, seed=args.seed, sis_ranks=ranks)
    result = {"checkpoint": str(args.model), "data": str(args.data), "settings": ckpt.settings, **result}
    text = json.dumps(result, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    else:
        print(text)
    if not args.quiet:
        for line in headline(result):
            print(f"keepbits: bench nice: {line}" + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def headline(result: dict) -> list[str]:
    """One line per block size: top-1 of the binary NICE mask against the baselines at its pixel
    budget, and the lossless payload against PNG of the whole image, per image."""
    lines = []
    full = result["original"]
    png = next(c["bytes_per_image"] for c in full["codecs"] if c["codec"] == "png")
    for row in result["per_block_size"]:
        methods = [(name, row[key]["accuracy"]) for name, key in (("NICE", "nice"), ("random", "random"),
                                                                  ("saliency", "saliency_topk"), ("SIS", "sis_backselect")) if key in row]
        payload = next(p["bytes_per_image"] for p in row["nice"]["payloads"] if p["codec"] == "png")
        lines.append(f"{result['num_images']} images, NICE keeps {result['kept_fraction']:.1%} of the pixels; b = {row['block_size']}: top-1 "
                     + ", ".join(f"{name} {acc:.1%}" for name, acc in methods) + f" (full image {full['accuracy']:.1%}); "
                     f"lossless payload {payload:,.0f} B vs PNG {png:,.0f} B per image")
    return lines
