"""Could a bfloat16 screen speed up exact BackSelect on ResNet-20 (issue 21)? A probe on CPUs with
bfloat16 hardware (AMX / AVX-512 BF16).

Exact BackSelect screens every candidate in float32 and re-scores in float64 only the winner set
``{i : m_i ≥ max m − 2ε}``, ε = ``SCREEN_SAFETY`` × the largest screen error seen
(:mod:`keepbits.audit.sis`). A bfloat16 screen is cheaper per candidate, but only pays when its
winner set stays small. This takes finished BackSelect orders of a running or finished
``keepbits audit sis`` (``--audit``: its chunk files; ``--runs`` of them, a seeded draw), rebuilds
the image at several steps of each order, and over all remaining candidates there compares the
target margins of a float64 model with those of a bfloat16 (autocast, channels-last) and a float32
screen: the screens' largest error, the spread of the float64 margins (best − median), and the
share of candidates in the bfloat16 winner set at safety factors 2, 4 and 8 (the audit uses 8);
plus the CPU seconds per 256 candidates of each screen (1 thread, best of 3).

    OMP_NUM_THREADS=1 python bench/sis_bf16_screen.py --data ../shared/data --audit runs/sis_audit_1000 \\
        --model runs/nice/cifar10_resnet20/best.pt --num-images 1000

Writes ``bench/results/sis_bf16_screen.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np

from _results import add_data_argument, parse_args_with_data, write_result
from sis_audit import audit_draw

STEPS = (0, 256, 512, 768, 960)
SAFETIES = (2, 4, 8)


def cpu_flags() -> list[str]:
    """The bfloat16-related CPU flags of this machine (Linux ``/proc/cpuinfo``)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def main() -> None:
    import torch

    from keepbits.audit import load_model
    from keepbits.core import target_margin

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "cifar10/")
    p.add_argument("--audit", type=Path, required=True, help="the OUT folder of a keepbits audit sis run (its orders/ chunks)")
    p.add_argument("--model", type=Path, required=True, help="the audited checkpoint")
    p.add_argument("--num-images", type=int, required=True, help="the audit's --num-images (its draw)")
    p.add_argument("--seed", type=int, default=0, help="the audit's --seed")
    p.add_argument("--runs", type=int, default=4, help="finished BackSelect runs probed (a seeded draw of the chunks)")
    args = parse_args_with_data(p, "cifar10")
    torch.set_num_threads(1)
    adapter = load_model(str(args.model))
    fingerprint = adapter.fingerprint()
    chunks = [json.loads(c.read_text()) for c in sorted((args.audit / "orders").glob("chunk_*.json"))]
    chunks = [c for c in chunks if c.get("model") == fingerprint and c["results"]]
    if len(chunks) < args.runs:
        p.error(f"{args.audit} holds {len(chunks)} finished runs of this model, fewer than --runs {args.runs}")
    picked = [chunks[i] for i in sorted(np.random.default_rng(0).choice(len(chunks), args.runs, replace=False))]
    xs = adapter.prepare(audit_draw(args.model, args.data / "cifar10", args.num_images, args.seed).x)
    net = adapter.torch_module.eval()
    screen = copy.deepcopy(net).to(memory_format=torch.channels_last)
    exact = copy.deepcopy(net).double()
    c, h, w = xs.shape[1:]

    def margins(candidates: np.ndarray, target: int) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x32 = torch.from_numpy(candidates).float().contiguous(memory_format=torch.channels_last)
            logits = {"float32": screen(x32).double().numpy()}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits["bfloat16"] = screen(x32).double().numpy()
            logits["float64"] = exact(torch.from_numpy(candidates)).numpy()
        return {k: target_margin(v, np.full(len(v), target)) for k, v in logits.items()}

    rows = []
    for chunk in picked:
        result = chunk["results"][0]
        order, target = np.asarray(result["order"]), int(result["target"])
        image = xs[chunk["start"]].astype(np.float64).reshape(c, -1)
        for step in STEPS:
            if step >= len(order):
                continue
            base = image.copy()
            base[:, order[:step]] = 0.0
            remaining = order[step:]
            candidates = np.repeat(base[None], len(remaining), 0)
            candidates[np.arange(len(remaining)), :, remaining] = 0.0
            m = margins(candidates.reshape(-1, c, h, w), target)
            error = float(np.abs(m["bfloat16"] - m["float64"]).max())
            rows.append({
                "image": int(chunk["start"]), "step": step, "candidates": len(remaining),
                "float32_error": float(np.abs(m["float32"] - m["float64"]).max()), "bfloat16_error": error,
                "float64_spread": float(m["float64"].max() - np.median(m["float64"])),
                "bfloat16_winner_set_share": {str(s): float(np.mean(m["bfloat16"] >= m["bfloat16"].max() - 2 * s * error)) for s in SAFETIES},
            })
            print(rows[-1], flush=True)

    def cpu_seconds(run) -> float:
        run()
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            run()
            best = min(best, time.process_time() - started)
        return best

    batch = torch.from_numpy(np.random.default_rng(0).normal(size=(256, c, h, w))).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        float32_s = cpu_seconds(lambda: screen(batch))

        def bf16() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                screen(batch)
        bfloat16_s = cpu_seconds(bf16)
    share8 = [r["bfloat16_winner_set_share"]["8"] for r in rows]
    print(write_result("sis_bf16_screen", {
        "model": str(args.model), "audit": str(args.audit), "runs": [int(ch["start"]) for ch in picked], "steps": list(STEPS),
        "cpu_flags_bf16": cpu_flags(), "processor": platform.processor(),
        "cpu_seconds_per_256_candidates": {"float32_channels_last": float32_s, "bfloat16_autocast_channels_last": bfloat16_s,
                                           "bfloat16_speedup": float32_s / bfloat16_s},
        "rows": rows,
        "summary": {"bfloat16_error_median": float(np.median([r["bfloat16_error"] for r in rows])),
                    "float32_error_max": float(max(r["float32_error"] for r in rows)),
                    "float64_spread_median": float(np.median([r["float64_spread"] for r in rows])),
                    "winner_set_share_at_safety_8_median": float(np.median(share8))},
    }))


if __name__ == "__main__":
    main()
