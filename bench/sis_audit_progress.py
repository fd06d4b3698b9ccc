"""Where a long exact-SIS audit stands (issue 21): the 1,000-image ResNet-20 audit takes about a
day of both cores, so it runs in pieces (``keepbits audit sis`` under ``torchrun`` resumes from its
chunk files after a kill). This reads the audit's ``OUT/orders/chunk_*.json`` and writes
``bench/results/<name>.json``: BackSelect runs done (only chunks whose model fingerprint is the
given model's count), runs the audit needs (one forward pass over its seeded draw, as the audit
decides), seconds per BackSelect recorded in the chunks, and the time left at that rate with
``--processes`` processes (labelled as a projection).

    python bench/sis_audit_progress.py --audit runs/sis_audit_1000 --model runs/nice/cifar10_resnet20/best.pt \\
        --num-images 1000 --thresholds 0.9 --name sis_audit_cifar10_resnet20_1000_progress
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _results import default_data_dir, write_result
from sis_audit import runs_needed


def progress(audit: Path, model: Path, data: Path, num_images: int, seed: int, thresholds: list[float], processes: int) -> dict:
    """The progress record of the audit in ``audit`` (module doc)."""
    from keepbits.audit import load_model

    fingerprint = load_model(str(model)).fingerprint()
    chunks = sorted((audit / "orders").glob("chunk_*.json"))
    records = [json.loads(p.read_text()) for p in chunks]
    current = [r for r in records if r.get("model") == fingerprint]
    seconds = np.array([res["seconds"] for r in current for res in r["results"]], dtype=np.float64)
    needed = runs_needed(model, data, num_images, seed, min(thresholds))
    rate = float(np.median(seconds)) if len(seconds) else None
    written = sorted(p.stat().st_mtime for p, r in zip(chunks, records) if r.get("model") == fingerprint)
    span_h = (written[-1] - written[0]) / 3600 if len(written) > 1 else 0.0
    return {
        "audit": str(audit), "model": str(model), "model_fingerprint": fingerprint,
        "audit_command": (f"torchrun --nproc-per-node {processes} -m keepbits audit sis --model {model} --data {data} --out {audit} "
                          f"--num-images {num_images} --seed {seed} --threshold {min(thresholds)} --thresholds {' '.join(map(str, thresholds))}"),
        "chunk_files": len(chunks), "chunk_files_of_other_models": len(records) - len(current),
        "backselect_runs_done": int(len(seconds)), "backselect_runs_needed": needed,
        "seconds_per_backselect": None if rate is None else {
            "median": rate, "min": float(seconds.min()), "max": float(seconds.max()),
            "note": "per image, as the audit recorded it (wall time of one BackSelect in one process)"},
        "chunks_written_utc": [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in (written[0], written[-1])] if written else None,
        "runs_per_hour_between_first_and_last_chunk": round((len(written) - 1) / span_h, 2) if span_h > 0 else None,
        "hours_left_projected": None if rate is None else round(max(needed - len(seconds), 0) * rate / processes / 3600, 2),
        "projection": f"runs left × median seconds per run / {processes} processes; not a measurement",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", type=Path, required=True, help="the audit's --out folder")
    parser.add_argument("--model", type=Path, required=True, help="the audited checkpoint")
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding cifar10/ (default ../shared/data)")
    parser.add_argument("--num-images", type=int, default=1000, help="the audit's --num-images")
    parser.add_argument("--seed", type=int, default=0, help="the audit's --seed")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9], help="the audit's τ values (the smallest decides)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes the audit runs with")
    parser.add_argument("--name", default="sis_audit_progress", help="results name (bench/results/<name>.json)")
    args = parser.parse_args()
    print(write_result(args.name, progress(args.audit, args.model, args.data / "cifar10", args.num_images, args.seed, args.thresholds,
                                           args.processes)))


if __name__ == "__main__":
    main()
