"""``keepbits explain``: the single-image look. Per image: the kept pixels over the frame, ẑ,
x̃ as the receiver decodes it from the payload, the label and its score (PNGs + ``explain.json``).

Example:
    keepbits explain --model bundle.zip --data photo.jpg --out look/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "explain single images with a bundle: mask overlay, ẑ, decoded x̃, label and score (PNG + JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli._common import SEED, add_user_images_options, non_negative_int, number
    from keepbits.cli.run import add_codec_arguments
    from keepbits.runtime.sinks import MAX_SIDE

    parser.add_argument("--model", required=True, help="model bundle folder or .zip")
    add_user_images_options(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and explain.json")
    parser.add_argument("--num-images", type=non_negative_int, default=16,
                        help="explain a random sample of N images (seeded by --seed, class-balanced when labelled); 0: all")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the image sample")
    parser.add_argument("--min-side", type=number(int, minimum=1, maximum=MAX_SIDE), default=224,
                        help=f"enlarge small images (whole factors, nearest) to this side, the long side within {MAX_SIDE} pixels")
    add_codec_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from keepbits.cli._common import existing_path, output_folder
    from keepbits.cli.run import codec_options
    from keepbits.data.images import load_images
    from keepbits.runtime import Pipeline
    from keepbits.runtime.explain import explain_images

    output_folder(args.out, writes=("explain.json",))
    pipeline = Pipeline.from_bundle(existing_path(args.model, "model bundle"), backend=args.backend, threads=args.threads,
                                    **codec_options(args))
    images = load_images(args.data, num_images=args.num_images or None, seed=args.seed, frame_step=args.frame_step)
    report = explain_images(pipeline, images.images, images.names, args.out, args.min_side, images.source)
    if not args.quiet:
        for r in report["images"]:
            kept = "" if r["kept_fraction"] is None else f", kept {100 * r['kept_fraction']:.1f}%"
            print(f"keepbits: {r['name']}: {r['label']} {r['score']:.3f}{kept}, payload {r['payload_bytes']} B", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0
