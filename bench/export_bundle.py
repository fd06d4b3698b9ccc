"""Whole-bundle benchmark (issue 4): ResNet-18 classifier + NICE generator at 224×224, uint8 input.

For each generator (``nice_unet``, NICE's ``nice_caltech`` and the cheap ``nice_fast``), exports a random-init
NICE checkpoint to a bundle and times, in one ONNX Runtime process and run (median of
``--repeat`` after warm-up):

* ``classifier_only``: the same uint8 input, in-graph normalisation and ResNet-18 (logits only)
* ``bundle_native``: the bundle with the native kernels registered
* ``bundle_standard_ops``: the bundle with the ONNX function bodies

and reports the explain+compose overhead (bundle_native − classifier_only) / classifier_only,
plus the share of the fused MaskCompose kernel alone, from ONNX Runtime's node profile.

    nice -n 5 python bench/export_bundle.py [--batch 1] [--threads 1] [--repeat 20]

Writes ``bench/results/export_bundle.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from keepbits import native, registry
from _results import write_result
from keepbits.export import export_onnx
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

SIZE = 224
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class ClassifierOnly(nn.Module):
    """uint8 NHWC -> normalise -> classifier: the baseline the bundle adds explain+compose to."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.register_buffer("mul", 1.0 / (255.0 * torch.tensor(STD).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("add", (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(image.permute(0, 3, 1, 2).to(torch.float32) * self.mul + self.add)


def timed(sessions: dict[str, ort.InferenceSession], feed: dict, repeat: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Round-robin timing (one run of each session per round), so that load changes on a shared
    machine hit every variant alike; median and min per session."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def kernel_ms(model_path: Path, feed: dict, threads: int, repeat: int, tmp: Path) -> float:
    """Median per-run time of the keepbits nodes, from ONNX Runtime's profile."""
    options = native.session_options(threads=threads)
    options.enable_profiling, options.profile_file_prefix = True, str(tmp / "profile")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(repeat):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    durations = [e["dur"] / 1e3 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                 and e["args"].get("op_name") in ("MaskCompose", "HardConcreteMask", "MixedResCompose")]
    return statistics.median(durations[-repeat:]) if durations else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generators", default="nice_unet,nice_caltech,nice_fast")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=8)
    args = parser.parse_args()
    if native.library_path() is None:
        print("native library not built: run native/build.sh first", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    classifier = registry.build("resnet18", in_channels=3, num_classes=10).eval()
    feed = {"image": np.random.default_rng(0).integers(0, 256, (args.batch, SIZE, SIZE, 3), dtype=np.uint8)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline = torch.onnx.export(ClassifierOnly(classifier), (torch.from_numpy(feed["image"]),), dynamo=True,
                                     input_names=["image"], output_names=["logits"], opset_version=18, external_data=False, verbose=False)
        clf_session = ort.InferenceSession(baseline.model_proto.SerializeToString(), native.session_options(native=False, threads=args.threads),
                                           providers=["CPUExecutionProvider"])
        for name in args.generators.split(","):
            generator = registry.build(name, in_channels=3).eval()
            ckpt = save_checkpoint(tmp / f"{name}.pt", Checkpoint(
                kind="nice",
                models={"generator": ModelEntry.of(name, {"in_channels": 3}, generator),
                        "classifier": ModelEntry.of("resnet18", {"in_channels": 3, "num_classes": 10}, classifier)},
                input_shape=[3, SIZE, SIZE], normalization=Normalization(MEAN, STD), class_names=[str(i) for i in range(10)],
                settings={"block_size": args.block_size, "mask_threshold": 0.5}, command="bench",
            ))
            bundle = export_onnx(ckpt, tmp / f"{name}.bundle")
            native_s = native.make_session(bundle.model_path, threads=args.threads)
            std_s = native.make_session(bundle.model_path, native=False, threads=args.threads)
            row = timed({"classifier_only": clf_session, "bundle_native": native_s, "bundle_standard_ops": std_s}, feed, args.repeat)
            row["mask_compose_kernel_ms"] = kernel_ms(bundle.model_path, feed, args.threads, args.repeat, tmp)
            clf = row["classifier_only"]["median_ms"]
            row["explain_compose_overhead"] = row["bundle_native"]["median_ms"] / clf - 1.0
            row["explain_compose_overhead_standard_ops"] = row["bundle_standard_ops"]["median_ms"] / clf - 1.0
            row["mask_compose_kernel_share_of_classifier"] = row["mask_compose_kernel_ms"] / clf
            results[name] = row
            print(f"{name:13s} classifier {clf:8.2f} ms  bundle native {row['bundle_native']['median_ms']:8.2f} ms"
                  f" (+{100 * row['explain_compose_overhead']:.1f}%)  standard {row['bundle_standard_ops']['median_ms']:8.2f} ms"
                  f"  MaskCompose kernel {row['mask_compose_kernel_ms']:.3f} ms ({100 * row['mask_compose_kernel_share_of_classifier']:.2f}%)")
    payload = {
        "settings": {"batch": args.batch, "size": SIZE, "threads": args.threads, "repeat": args.repeat,
                     "block_size": args.block_size, "classifier": "resnet18"},
        "results": results,
        "target": {"explain_compose_overhead_max": 0.05,
                   "met_by": sorted(k for k, v in results.items() if v["explain_compose_overhead"] <= 0.05)},
    }
    print(f"wrote {write_result('export_bundle', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
