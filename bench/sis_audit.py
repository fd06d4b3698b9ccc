"""Exact-SIS audit at scale (issue 21): the real ``keepbits audit sis`` command (exact
BackSelect, method auto, τ = 0.9) on a seeded class-balanced sample of CIFAR-10 test images
(``--num-images``/``--seed``, keepbits' sampler), under ``torchrun --nproc-per-node 2`` (one
thread each), run twice on the same images into two folders:

1. uninterrupted: its wall time gives the measured rate (BackSelect runs per second, 2 processes);
2. killed (the whole process group, SIGKILL) as soon as ``--kill-after-chunks`` chunk files
   exist, then the same command again: it must reuse those chunk files (unchanged modification
   times) and its orders, scores and SIS must equal the uninterrupted run's.

The audit BackSelects only the images whose confidence reaches the smallest τ it reports
(``--thresholds``; others have no SIS at any τ). The JSON holds both runs, the per-image
BackSelect seconds the audit recorded, and the wall time of a ``--target-images`` audit
extrapolated from the measured rate per BackSelect run times the number of runs that audit
needs (counted by one forward pass over its seeded draw; labelled as such: the full audit is
not run here).

    python bench/sis_audit.py --model runs/nice/cifar10_resnet20/best.pt --images 8 --thresholds 0.9
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _results import add_data_argument, parse_args_with_data, write_result


def audit_command(model: Path, data: Path, out: Path, images: int, seed: int, threshold: float, thresholds: list[float] | None,
                  processes: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(port),
            "-m", "keepbits", "-q", "audit", "sis", "--model", str(model), "--data", str(data), "--out", str(out),
            "--num-images", str(images), "--seed", str(seed), "--threshold", str(threshold),
            *(["--thresholds", *map(str, thresholds)] if thresholds else [])]


def audit_draw(model: Path, data: Path, images: int, seed: int) -> Any:
    """The audit's seeded class-balanced draw of ``images`` test images, at the model's input size and
    resize policy (what ``keepbits audit sis --num-images images --seed seed`` audits)."""
    from keepbits.audit import load_model
    from keepbits.data import load_dataset

    pre = load_model(str(model)).preprocessing
    size = dict(size=pre.input_size, policy=pre.resize_policy, crop_fraction=pre.crop_fraction) if pre is not None else {}
    return load_dataset(str(data), "test", **size).sample(images, seed)


def runs_needed(model: Path, data: Path, images: int, seed: int, smallest_tau: float) -> int:
    """How many of the audit's seeded draw of ``images`` test images it BackSelects (one forward pass)."""
    from keepbits.audit import load_model
    from keepbits.audit.sis_report import CONFIDENCE_SLACK

    adapter = load_model(str(model))
    x = audit_draw(model, data, images, seed).x
    return int((adapter.probabilities(adapter.prepare(x)).max(1) >= smallest_tau - CONFIDENCE_SLACK).sum())


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children before grandchildren."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def chunk_times(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in sorted(folder.glob("chunk_*.json"))}


def orders(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("chunk_*.json")) for r in json.loads(p.read_text())["results"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="CIFAR-10 classifier checkpoint")
    add_data_argument(parser, "cifar10/")
    parser.add_argument("--images", type=int, default=4, help="class-balanced test images audited (each run)")
    parser.add_argument("--target-images", type=int, default=1000, help="audit size the measured rate is extrapolated to")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="τ values of the size curves (default: the audit's own, 0.5 … 0.99)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--kill-after-chunks", type=int, default=1, help="kill the second run once this many chunks are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sis_audit_cifar10"))
    parser.add_argument("--no-resume-check", action="store_true", help="only the uninterrupted run (the measured rate)")
    parser.add_argument("--name", default="sis_audit_cifar10", help="results name (bench/results/<name>.json)")
    args = parse_args_with_data(parser, "cifar10")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    data = args.data / "cifar10"
    whole, resumed = args.out / "uninterrupted", args.out / "resumed"
    for folder in (whole, resumed):  # this bench's own scratch: a stale chunk would be "resumed" and fake the rate
        shutil.rmtree(folder, ignore_errors=True)

    def command(out: Path) -> list[str]:
        return audit_command(args.model, data, out, args.images, args.seed, args.threshold, args.thresholds, args.processes, 29561)

    started = time.time()
    subprocess.run(command(whole), env=env, check=True, stdout=subprocess.DEVNULL)
    whole_wall = time.time() - started
    print(f"uninterrupted: {whole_wall:.0f} s", file=sys.stderr)
    reference = orders(whole / "orders")
    seconds = np.array([r["seconds"] for r in reference], float)
    report = json.loads((whole / "report.json").read_text())["data"]
    runs = report["summary"]["backselect_runs"]
    if not runs:
        raise SystemExit(f"none of the {args.images} images reaches the smallest τ: no BackSelect rate measured (audit more images)")
    rate = runs / whole_wall
    smallest = min([args.threshold, *(args.thresholds or [0.5])])
    target_runs = runs_needed(args.model, data, args.target_images, args.seed, smallest)
    payload = {
        "model": str(args.model), "images": args.images, "draw": f"keepbits.data.sample_indices on the CIFAR-10 test split, seed {args.seed}",
        "threshold": args.threshold, "processes": args.processes, "torch_threads_per_process": 1,
        "audit_command": " ".join(command(Path("OUT"))[1:]),
        "methods": sorted({r["method"] for r in reference}),
        "thresholds": report["thresholds"],
        "uninterrupted": {"wall_s": round(whole_wall, 1), "backselect_runs": runs, "backselect_runs_per_hour": round(3600 * rate, 2)},
        "backselect_s_per_image_per_process": {"mean": round(float(seconds.mean()), 1), "min": round(float(seconds.min()), 1),
                                               "max": round(float(seconds.max()), 1)},
        "target_images": args.target_images,
        "target_backselect_runs": target_runs,
        "target_backselect_runs_counted": f"images of the {args.target_images}-image draw (seed {args.seed}) whose confidence reaches "
                                          f"τ = {smallest} (one forward pass); the others need no BackSelect",
        "extrapolated_wall_h_for_target": round(target_runs / rate / 3600, 1),
        "extrapolation": f"EXTRAPOLATED, not measured: {target_runs} BackSelect runs at the uninterrupted run's measured rate "
                         f"({runs} runs in {whole_wall:.0f} s wall, {args.processes} processes, this shared machine's load)",
        "summary": report["summary"],
    }
    if not args.no_resume_check:
        payload.update(kill_and_resume(command(resumed), resumed, env, args.kill_after_chunks, runs, reference, report))
    payload["load_average_at_end"] = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    print(write_result(args.name, payload))
    return 0


def kill_and_resume(command: list[str], out: Path, env: dict, kill_after: int, runs: int, reference: list[dict], report: dict) -> dict:
    """Run ``command``, kill its process group once ``kill_after`` chunk files exist, run it
    again; compare with the uninterrupted run's ``reference`` orders and ``report``."""
    started = time.time()
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    while first.poll() is None and len(chunk_times(out / "orders")) < kill_after:
        time.sleep(2)
    killed, tree = first.poll() is None, []
    if killed:
        # torchrun starts each worker in a session of its own: killing its process group alone
        # leaves the workers running (and writing chunks); take the whole tree, as a crash or an
        # out-of-time job's cgroup kill does
        tree = [first.pid, *descendants(first.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while any(alive(pid) for pid in tree[1:]):
            time.sleep(0.2)
    first.wait()
    first_wall = time.time() - started
    before = chunk_times(out / "orders")
    print(f"killed={killed} after {first_wall:.0f} s, {len(before)} of {runs} chunks written", file=sys.stderr)
    started = time.time()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    second_wall = time.time() - started
    after = chunk_times(out / "orders")
    reused = sum(1 for name, mtime in before.items() if after.get(name) == mtime)
    got = orders(out / "orders")
    same = len(reference) == len(got) == runs and all(x["order"] == y["order"] and x["scores"] == y["scores"] for x, y in zip(reference, got))
    resumed = json.loads((out / "report.json").read_text())["data"]
    return {"killed_run": {"wall_s": round(first_wall, 1), "killed": killed, "processes_killed": len(tree),
                           "chunks_written_before_kill": len(before)},
            "resumed_run": {"wall_s": round(second_wall, 1), "chunks_reused": reused, "chunks_computed": len(after) - reused},
            "resumed_equals_uninterrupted": {"orders_and_scores": same,
                                             "sis": [r.get("sis") for r in report["images"]] == [r.get("sis") for r in resumed["images"]]}}


if __name__ == "__main__":
    sys.exit(main())
