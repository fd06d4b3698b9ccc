"""Custom-op benchmark (issue 4): native C++ kernels vs the ONNX function bodies (standard ops,
both in ONNX Runtime) vs torch eager (keepbits.training.functional), per op and fused, at
1×3×256×256 and 8×3×224×224, block size b = 8. Median of ``--repeat`` timed runs after warm-up,
all in one process and run; ratios are computed from the same run. ONNX Runtime runs use IO
binding to preallocated output arrays, so the numbers measure the graphs, not the conversion
of fresh outputs to numpy (which costs the same for both and page-faults on every run).

    python bench/export_ops.py [--threads 1] [--repeat 60] [--burst 50]
    python bench/export_ops.py --burst 1 --name export_ops_interleaved   # cold variant

Default timing is steady state: each variant runs in bursts of 50 consecutive calls, as the op
runs in a deployed graph right after the generator that wrote its input. Bursts of 10 were too
short: after other work (the standard-op graph, torch, Python) the native op's first calls are
up to ~2.8× slower and recover only over ~10 calls (~3 ms), consistent with a warm-up of the
vector units / power state, not with cache eviction (touching 64 MB between calls does not
reproduce it), so at
8×3×224×224 10-call bursts had not reached steady state. ``--burst 1`` interleaves single
calls, so each call meets caches and a core state that the previous variant left: the
memory-bound native kernel loses most there. Writes ``bench/results/NAME.json``.
Target: native fused ≥ 5× the standard-op graph.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from keepbits import native
from _results import write_result
from keepbits.export import ops
from keepbits.training import functional as KF

SHAPES = {"1x3x256x256": (1, 3, 256, 256), "8x3x224x224": (8, 3, 224, 224)}
OPS = ("HardConcreteMask", "MixedResCompose", "MaskCompose")


def op_graph(op: str, block_size: int) -> bytes:
    """A one-node graph of ``op`` (inputs log_alpha and/or x and/or mask), function bodies attached."""
    vi = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c, "H", "W"])  # noqa: E731
    gate = ops.gate_attrs()
    if op == "HardConcreteMask":
        node, ins, outs = helper.make_node(op, ["log_alpha"], ["mask"], domain="keepbits", **gate), [vi("log_alpha", 1)], [vi("mask", 1)]
    elif op == "MixedResCompose":
        node = helper.make_node(op, ["x", "mask"], ["mixed"], domain="keepbits", block_size=block_size)
        ins, outs = [vi("x", "C"), vi("mask", 1)], [vi("mixed", "C")]
    else:
        node = helper.make_node(op, ["log_alpha", "x"], ["mask", "mixed"], domain="keepbits", block_size=block_size, **gate)
        ins, outs = [vi("log_alpha", 1), vi("x", "C")], [vi("mask", 1), vi("mixed", "C")]
    model = helper.make_model(helper.make_graph([node], op, ins, outs), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("keepbits", 1)])
    ops.attach_function_bodies(model)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def torch_fn(op: str, block_size: int) -> Callable[[dict[str, torch.Tensor]], object]:
    if op == "HardConcreteMask":
        return lambda f: KF.deterministic_mask(f["log_alpha"])
    if op == "MixedResCompose":
        return lambda f: KF.mixed_resolution(f["x"], f["mask"], block_size)
    return lambda f: KF.mixed_resolution(f["x"], KF.deterministic_mask(f["log_alpha"]), block_size)


def timed(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 3, burst: int = 50) -> dict[str, dict[str, float]]:
    """Round-robin timing: each round runs every variant ``burst`` times in a row, so that load
    changes on a shared machine hit every variant alike, while each variant meets the caches as a
    pipeline leaves them for it (the round-robin with single calls measured each op just after
    another variant had evicted its data). ``repeat`` timed calls per variant; median and min."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeat // burst)):
        for name, fn in fns.items():
            for _ in range(burst):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def bound_run(session, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """``session`` run with inputs and preallocated outputs bound once (shapes as the first run gives)."""
    outputs = [np.empty_like(o) for o in session.run(None, feed)]
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for meta, out in zip(session.get_outputs(), outputs):
        binding.bind_output(meta.name, "cpu", element_type=out.dtype, shape=out.shape, buffer_ptr=out.ctypes.data)
    return lambda: (session.run_with_iobinding(binding), outputs)  # the closure keeps the buffers alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op and torch threads (same for all)")
    parser.add_argument("--repeat", type=int, default=60, help="timed calls per variant")
    parser.add_argument("--burst", type=int, default=50, help="consecutive calls of one variant per round (1: interleaved single calls)")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--name", default="export_ops", help="result name (bench/results/NAME.json)")
    args = parser.parse_args()
    if native.library_path() is None:
        print("native library not built: run native/build.sh first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results: dict[str, dict] = {}
    for shape_name, (n, c, h, w) in SHAPES.items():
        feeds = {"log_alpha": rng.normal(0, 3, (n, 1, h, w)).astype(np.float32), "x": rng.random((n, c, h, w), dtype=np.float32)}
        feeds["mask"] = np.clip(rng.random((n, 1, h, w), dtype=np.float32) * 1.2 - 0.1, 0, 1)
        torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
        for op in OPS:
            model = op_graph(op, args.block_size)
            native_s = native.make_session(model, threads=args.threads)
            std_s = native.make_session(model, native=False, threads=args.threads)
            feed = {i.name: feeds[i.name] for i in native_s.get_inputs()}
            fn = torch_fn(op, args.block_size)
            with torch.inference_mode():
                row = timed({
                    "native": bound_run(native_s, feed),
                    "standard_ops": bound_run(std_s, feed),
                    "torch_eager": lambda: fn(torch_feeds),
                }, args.repeat, burst=args.burst)
            for other in ("standard_ops", "torch_eager"):
                row[f"speedup_native_vs_{other}"] = row[other]["median_ms"] / row["native"]["median_ms"]
                # min: the least-disturbed run of each, robust on a shared machine
                row[f"speedup_native_vs_{other}_min"] = row[other]["min_ms"] / row["native"]["min_ms"]
            results[f"{op}@{shape_name}"] = row
            print(f"{op:17s} {shape_name:12s} native {row['native']['median_ms']:8.3f} ms  standard {row['standard_ops']['median_ms']:8.3f} ms"
                  f"  torch {row['torch_eager']['median_ms']:8.3f} ms  ×{row['speedup_native_vs_standard_ops']:.1f} vs standard"
                  f" (min-based ×{row['speedup_native_vs_standard_ops_min']:.1f})")
    fused = {k: v["speedup_native_vs_standard_ops"] for k, v in results.items() if k.startswith("MaskCompose@")}
    fused_min = {k: v["speedup_native_vs_standard_ops_min"] for k, v in results.items() if k.startswith("MaskCompose@")}
    payload = {
        "settings": {"threads": args.threads, "repeat": args.repeat, "burst": args.burst, "block_size": args.block_size, "library": str(native.library_path())},
        "results": results,
        "target": {"native_fused_vs_standard_min": 5.0, "achieved_median_based": min(fused.values()),
                   "achieved_min_based": min(fused_min.values()), "met": min(fused.values()) >= 5.0},
    }
    print(f"wrote {write_result(args.name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
