"""``keepbits eval``: rate–accuracy of a bundle on your images through the real payload.

Every image is classified whole, then at each operating point (mask threshold × block size ×
foreground codec/quality) encoded, decoded and classified again; baselines are the same
model-size frame as one PNG/JPEG/WebP file per quality. Labelled data: top-1 accuracy;
unlabelled images (your footage: image folders, videos), or class folders that are not the
model's classes: agreement with the full-frame prediction. Writes
``rate_accuracy.png``, ``eval.html`` (self-contained) and ``eval.json`` (with ``data_counts`` for footage:
pictures and frames read, files skipped) into ``--out`` and prints
the JSON (protocol: :mod:`keepbits.runtime.evaluate`).

Example:
    keepbits eval --model bundle.zip --data photos/ --num-images 200 --out eval/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from keepbits.errors import InputError

HELP = "rate–accuracy of a bundle on your images through the real payload, vs JPEG/WebP/PNG of the whole frame"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli._common import SEED, add_user_images_options, non_negative_float
    from keepbits.cli.run import add_backend_arguments

    parser.add_argument("--model", required=True, help="model bundle folder or .zip")
    add_user_images_options(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for rate_accuracy.png, eval.html and eval.json")
    parser.add_argument("--num-images", type=int, default=500,
                        help="evaluate a random sample of N images (seeded by --seed, class-balanced when labelled); 0: all")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the image sample")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None, help="mask thresholds (default: the bundle's)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=None, help="payload block sizes (default: the bundle's)")
    parser.add_argument("--modes", nargs="+", choices=["blocks", "mixed"], default=["blocks", "mixed"],
                        help="payload modes (NICE bundles): blocks (kept blocks as one mosaic image) and/or mixed (x̃ as one image)")
    parser.add_argument("--codecs", nargs="+", choices=["png", "jpeg", "webp"], default=["png", "jpeg", "webp"],
                        help="payload codecs: of the kept blocks, x̃ or the simplified image (webp is left out for grey bundles)")
    parser.add_argument("--qualities", type=int, nargs="+", default=[50, 75, 90], help="JPEG/WebP qualities of the payload")
    parser.add_argument("--baselines", nargs="*", choices=["png", "jpeg", "webp"], default=["png", "jpeg", "webp"],
                        help="whole-frame formats to compare with; give no value for none")
    parser.add_argument("--baseline-qualities", type=int, nargs="+", default=[10, 30, 50, 75, 90], help="JPEG/WebP qualities of the baselines")
    parser.add_argument("--tolerance", type=non_negative_float, default=0.01,
                        help="'smallest within tolerance' in the report: score at least the full frame's minus this")
    parser.add_argument("--examples", type=int, default=6, help="example images in the report")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    add_backend_arguments(parser)


def within_line(best: dict[str, Any], points: int) -> str:
    """:func:`keepbits.runtime.evaluate.smallest_within` in one line: the smallest payload and
    whole-frame file within tolerance of the full frame, and how many bytes the file takes per
    payload byte."""
    def point(row: dict[str, Any] | None, none: str) -> str:
        if row is None:
            return none
        quality = f" q{row['quality']}" if row.get("quality") else ""
        return f"{row['series']}{quality} {row['bytes_per_image']:,.0f} B"

    ratio = best["baseline_over_payload"]
    return (f"smallest with {best['metric']} >= {best['target']:.4f} (full frame - {best['tolerance']:g}): "
            f"{point(best['payload'], f'payload: none of {points} points')}; {point(best['baseline'], 'whole frame: none')}"
            + (f" ({ratio:.2f}x the payload's bytes)" if ratio else ""))


def run(args: argparse.Namespace) -> int:
    from keepbits._json import jsonable
    from keepbits.cli._common import command_line, existing_path, output_folder
    from keepbits.data.images import load_images
    from keepbits.runtime import Pipeline
    from keepbits.runtime.evaluate import labels_for_model, rate_accuracy, write_report
    from keepbits.runtime.explain import look

    if args.num_images < 0 or args.examples < 0 or args.batch_size < 1:
        raise InputError("--num-images and --examples must be >= 0, --batch-size >= 1")
    output_folder(args.out, writes=("eval.json", "eval.html", "rate_accuracy.png"))
    pipeline = Pipeline.from_bundle(existing_path(args.model, "model bundle"), backend=args.backend, threads=args.threads)
    images = load_images(args.data, num_images=args.num_images or None, seed=args.seed, frame_step=args.frame_step)
    labels, matched = labels_for_model(images.labels, images.class_names, pipeline.class_names, str(args.data))
    result = rate_accuracy(pipeline, images.images, labels, thresholds=args.thresholds, block_sizes=args.block_sizes,
                           codecs=args.codecs, qualities=args.qualities, modes=args.modes, baselines=args.baselines,
                           baseline_qualities=args.baseline_qualities, batch_size=args.batch_size)
    result.update(data=images.source, data_counts=images.counts or None, labels_matched=matched, command=command_line())
    examples = [look(pipeline, images.images[i], images.names[i]) for i in range(min(args.examples, len(images)))]
    written = write_report(result, args.out, title=f"keepbits eval: {Path(args.model).name} on {Path(args.data).name}",
                 meta={"model": args.model, "digest": pipeline.bundle.digest, "data": images.source, "command": result["command"]},
                 examples=examples, tolerance=args.tolerance)
    if not args.quiet:
        full = result["full_frame"]
        score = f"full-frame accuracy {full['accuracy']}" if labels is not None else "unlabelled: payloads scored by agreement with the full frame"
        print(f"keepbits: {len(images)} images ({images.source}), {score}; wrote {args.out / 'eval.html'}", file=sys.stderr)
        print(f"keepbits: {within_line(written['smallest_within'], len(result['payload']))}", file=sys.stderr)
    print(json.dumps(jsonable(written), indent=2))
    return 0
