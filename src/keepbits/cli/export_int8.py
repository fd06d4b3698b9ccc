"""``keepbits export int8``: a float bundle -> an INT8 bundle (ONNX Runtime static quantisation),
with its cost in accuracy and masks recorded in the manifest and printed.

Example:
    keepbits export int8 --model nice.bundle --data mnist/ --out nice-int8.bundle
"""
from __future__ import annotations

import argparse
import json
import sys

from keepbits.cli._common import add_frame_step_option, command_line, existing_path
from keepbits.errors import InputError

HELP = ("quantise a bundle to INT8 (ONNX Runtime static QDQ, calibrated on training images) and compare it with the "
        "float bundle on test images: accuracy, argmax and mask agreement")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="float bundle folder or .zip from `keepbits export onnx` (target onnxruntime)")
    p.add_argument("--data", required=True, help="data set with a train split (calibration) and ideally a test split (comparison; "
                   "else the train split), or your unlabelled footage (image folders of any nesting, videos): calibration and "
                   "comparison then are disjoint parts of one seeded draw, compared by agreement")
    add_frame_step_option(p)
    p.add_argument("--out", required=True, help="INT8 bundle folder, or a .zip file for a one-file bundle")
    p.add_argument("--num-images", type=int, default=256,
                   help="calibration images: a random class-balanced sample of the train split (seed 0)")
    p.add_argument("--num-test-images", type=int, default=1000,
                   help="comparison images: a random class-balanced sample of the test split (seed 0)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--activations", default="uint8",
                   help="activation type: uint8 (ONNX Runtime's fast x86 path) or int8 (TensorRT, ARM); weights are always int8")
    p.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="how activation ranges are calibrated: the extremes seen, the 99.999th percentile, or the range "
                        "keeping the most information (KL) (default: minmax)")
    p.add_argument("--float-ends", action="store_true",
                   help="leave the classifier's first convolution and the last Gemm/MatMul in float32")
    p.add_argument("--force", action="store_true", help="replace an existing keepbits bundle at --out (never another file or folder)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.model, "bundle")
    existing_path(args.data, "data path")
    if args.num_images < 1 or args.num_test_images < 1:
        raise InputError(f"--num-images and --num-test-images must be >= 1, got {args.num_images}, {args.num_test_images}")
    from keepbits.export.quantize import quantize_bundle

    bundle, report = quantize_bundle(args.model, args.out, args.data, calibration_images=args.num_images,
                                     eval_images=args.num_test_images, per_channel=not args.per_tensor, overwrite=args.force,
                                     activations=args.activations, frame_step=args.frame_step, calibration=args.calibration,
                                     float_ends=args.float_ends, command=command_line())
    if not args.quiet:
        print(f"keepbits: wrote {bundle.source}: {_headline(report)}", file=sys.stderr)
    print(json.dumps({"bundle": str(bundle.source), "digest": bundle.digest, **report}, indent=2))
    return 0


def _headline(report: dict) -> str:
    """INT8 against float32 in one line: agreement on the comparison images, and top-1 where labelled."""
    line = (f"INT8 vs float32 on {report['images']} comparison images: argmax agreement {report['argmax_agreement']:.1%}, "
            f"mask agreement {report['mask_agreement']:.1%}")
    if report.get("accuracy_reference") is not None:
        line += f"; top-1 {report['accuracy_candidate']:.1%} (float32 {report['accuracy_reference']:.1%})"
    return line
