"""Exact-SIS audit at scale (issue 21): ``keepbits audit sis`` (exact BackSelect, method auto,
τ = 0.9) of CIFAR-10 test images under ``torchrun --nproc-per-node 2`` (one thread each),
killed once mid-way and resumed.

The images are a seeded class-balanced draw from the test split (written to
``OUT/images.npz``). The first run is killed after ``--kill-after`` seconds; the second run
reuses the chunk files the first one finished (checked by their modification times) and
completes the audit. The JSON records both wall times, the per-image BackSelect seconds,
and the extrapolation of the measured time to ``--target-images`` images on 2 processes.

    python bench/sis_audit.py --model runs/r20_cifar10_e20/best.pt --images 20 --kill-after 900
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _results import default_data_dir, write_result
from keepbits.data import load_dataset, sample_indices


def audit_command(model: Path, data: Path, out: Path, threshold: float, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", "29561",
            "-m", "keepbits", "-q", "audit", "sis", "--model", str(model), "--data", str(data), "--out", str(out),
            "--images", "0", "--threshold", str(threshold)]


def chunk_times(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in sorted(folder.glob("chunk_*.json"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="CIFAR-10 classifier checkpoint")
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding cifar10/ (default ../shared/data)")
    parser.add_argument("--images", type=int, default=20, help="class-balanced test images audited")
    parser.add_argument("--target-images", type=int, default=1000, help="audit size the measured time is extrapolated to")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--kill-after", type=float, default=900.0, help="seconds before the first run is killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sis_audit_cifar10"))
    args = parser.parse_args()
    if args.data is None or not (args.data / "cifar10").is_dir():
        parser.error(f"CIFAR-10 not found under {args.data} (pass --data)")
    test = load_dataset(args.data / "cifar10", "test")
    pick = sample_indices(test.y, args.images, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sample = args.out / "images.npz"
    np.savez(sample, x=test.x[pick], y=test.y[pick], class_names=np.array(test.class_names))
    report = args.out / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = audit_command(args.model, sample, report, args.threshold, args.processes)

    started = time.time()
    first = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        first.wait(timeout=args.kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)  # the whole torchrun process group, as a crash or an out-of-time job would end
        first.wait()
        killed = True
    first_wall = time.time() - started
    before = chunk_times(report / "orders")
    print(f"first run: {first_wall:.0f} s, killed={killed}, {len(before)} of {args.images} chunks done", file=sys.stderr)

    started = time.time()
    subprocess.run(command, env=env, check=True)
    second_wall = time.time() - started
    after = chunk_times(report / "orders")
    reused = sum(1 for name, mtime in before.items() if after.get(name) == mtime)
    data = json.loads((report / "report.json").read_text())["data"]
    seconds = np.array([row["seconds"] for row in data["images"]], float)
    per_image = (first_wall + second_wall) / args.images
    payload = {
        "model": str(args.model), "images": args.images, "draw": f"class-balanced from the CIFAR-10 test split, seed {args.seed}",
        "threshold": args.threshold, "processes": args.processes, "torch_threads_per_process": 1,
        "command": " ".join(command[1:]),
        "first_run": {"wall_s": round(first_wall, 1), "killed": killed, "chunks_finished": len(before)},
        "second_run": {"wall_s": round(second_wall, 1), "chunks_reused": reused, "chunks_computed": len(after) - reused},
        "resumed": killed and reused == len(before) and len(after) == args.images,
        "backselect_s_per_image": {"mean": round(float(seconds.mean()), 1), "min": round(float(seconds.min()), 1),
                                   "max": round(float(seconds.max()), 1)},
        "wall_s_per_image_both_runs": round(per_image, 1),
        "extrapolated_wall_h_for_target": round(args.target_images * per_image / 3600, 1),
        "target_images": args.target_images,
        "extrapolation": f"{args.target_images} images × the measured wall seconds per image of both runs together "
                         f"({args.processes} processes); an extrapolation, not a measured {args.target_images}-image run",
        "summary": data["summary"],
        "load_average_at_end": [float(v) for v in open("/proc/loadavg").read().split()[:3]],
    }
    print(write_result("sis_audit_cifar10", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
