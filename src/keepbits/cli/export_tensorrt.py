"""``keepbits export tensorrt``: a bundle -> a TensorRT engine (plugins, profiles, cache, parity check)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from keepbits.cli._common import add_argument, existing_path, number, positive_int

HELP = "build a TensorRT engine for a bundle (fp32/fp16, dynamic profiles, cached) and check it against ONNX Runtime"


def _triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}")
    return values  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_argument(p, "--model", required=True, deprecated=["bundle"], help="bundle folder or .zip from `keepbits export onnx`")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="TensorRT engine precision")
    p.add_argument("--batch", type=_triple, default="1,1,8", help="optimisation profile MIN,OPT,MAX batch")
    p.add_argument("--height", type=_triple, default=None, help="MIN,OPT,MAX image height (default: the training size)")
    p.add_argument("--width", type=_triple, default=None, help="MIN,OPT,MAX image width (default: the training size)")
    p.add_argument("--cache", default=str(Path("~/.cache/keepbits/tensorrt")), help="engine cache folder")
    p.add_argument("--samples", type=positive_int, default=4, help="random batches in the parity check (default: %(default)s)")
    p.add_argument("--tolerance", type=number(float, above=0), default=None,
                   help="max abs error on mask and mixed/scale (default: 1e-4 fp32, 2e-2 fp16)")


def run(args: argparse.Namespace) -> int:
    existing_path(args.model, "bundle")
    from keepbits.export.tensorrt import EngineSpec, build_engine

    report = build_engine(args.model, EngineSpec(args.precision, args.batch, args.height, args.width), args.cache,
                          samples=args.samples, tolerance=args.tolerance)
    print(json.dumps(asdict(report), indent=2))
    return 0
