"""``keepbits doctor``: is this install usable, and on what?

Python, keepbits and ONNX Runtime versions and providers, the native kernels (found, loaded, or
why not), OpenCV's video back-ends (FFmpeg, GStreamer, V4L2) and H.264 writer, torch and CUDA
when installed, the optional packages, and a self-test on the shipped demo bundle. JSON on
stdout, one line per check on stderr. Exit 1 when something this install promises is broken
(a check with status ``problem``), else 0.

Example:
    keepbits doctor
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "check this install: versions, ONNX Runtime providers, native kernels, OpenCV video back-ends, torch/CUDA; exit 1 if broken"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-self-test", action="store_true", help="skip running the shipped demo bundle on one frame")


def run(args: argparse.Namespace) -> int:
    from keepbits.runtime.doctor import diagnose

    report = diagnose(self_test=not args.no_self_test)
    if not args.quiet:
        for name, check in report["checks"].items():
            print(f"keepbits doctor: {check['status']:7s} {name}: {check['detail']}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0
