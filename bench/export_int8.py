"""INT8 benchmark (issue 4, optional part): export a trained NICE checkpoint, quantise the bundle
statically (ONNX Runtime QDQ, calibration on the train split) and compare it with the float
bundle on the test split: accuracy, argmax and mask agreement, ẑ / x̃ deviations, latency.

    nice -n 5 python bench/export_int8.py --checkpoint runs/nice/nice.pt --data ../shared/data/mnist

Writes ``bench/results/export_int8[_TAG].json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import default_data_dir, write_result
from keepbits.bundle import sha256_file
from keepbits.data import load_dataset
from keepbits.export import export_onnx
from keepbits.export.quantize import ACTIVATION_TYPES, quantize_bundle
from keepbits.native import make_session
from keepbits.runtime.pipeline import bundle_inputs


def latency_ms(paths: dict[str, Path], image: np.ndarray, name: str, repeat: int) -> dict[str, float]:
    """Median batch-1 latency per bundle, round-robin, one thread."""
    sessions = {k: make_session(p, threads=1) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, {name: image})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeat):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {name: image})
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained nice checkpoint")
    shared = default_data_dir()
    parser.add_argument("--data", type=Path, default=shared / "mnist" if shared else None, help="data set (default ../shared/data/mnist)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--activations", choices=ACTIVATION_TYPES, default="uint8")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args()
    if args.data is None or not args.data.exists():
        parser.error(f"data not found: {args.data} (pass --data)")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(args.checkpoint, Path(tmp) / "fp32")
        int8, report = quantize_bundle(fp32.source, Path(tmp) / "int8", args.data, args.calibration_images, args.eval_images,
                                      activations=args.activations)
        m = fp32.manifest
        image = bundle_inputs(m, load_dataset(args.data, "test", size=tuple(m.input_shape[1:])).x[:1])
        latency = latency_ms({"fp32": fp32.model_path, "int8": int8.model_path}, image, m.input_name, args.repeat)
        sizes = {"fp32": fp32.model_path.stat().st_size, "int8": int8.model_path.stat().st_size}
    payload = {
        "checkpoint": {"path": str(args.checkpoint), "sha256": sha256_file(args.checkpoint), "generator": m.generator,
                       "classifier": m.classifier, "block_size": m.block_size, "input_shape": m.input_shape},
        "data": str(args.data),
        "settings": {"calibration_images": args.calibration_images, "eval_images": args.eval_images, "repeat": args.repeat,
                     "activations": args.activations},
        "int8_vs_fp32": report,
        "latency_batch1_ms": latency,
        "model_bytes": sizes,
    }
    print(payload)
    print(f"wrote {write_result('export_int8' + (f'_{args.tag}' if args.tag else ''), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
