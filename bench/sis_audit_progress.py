"""Where a long exact-SIS audit stands (issue 21): the 1,000-image ResNet-20 audit takes about a
day of both cores, so it runs in pieces (``keepbits audit sis`` under ``torchrun`` resumes from its
chunk files after a kill). This reads the audit's ``OUT/orders/chunk_*.json`` and writes
``bench/results/<name>.json``: BackSelect runs done (only chunks whose model fingerprint is the
given model's count), runs the audit needs (one forward pass over its seeded draw, as the audit
decides), seconds per BackSelect recorded in the chunks, runs per hour while it ran (from the write
time each chunk records), the time left at that rate with
``--processes`` processes (labelled as a projection), and the interim results: ``keepbits audit sis
--partial``'s report over the runs finished so far (written to ``AUDIT/report_partial.*``; its SIS
size at each τ and how each class is covered).

    A=bench/results/sis_audit_cifar10_resnet20_1000   # the audit kept in the repository (docs/sis.md)
    python bench/sis_audit_progress.py --audit $A --model $A/resnet20_cifar10.pt \\
        --num-images 1000 --thresholds 0.9 --name sis_audit_cifar10_resnet20_1000_repo_progress
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _results import add_data_argument, require_data, write_result
from sis_audit import audit_draw


#: Chunk writes further apart than this many median BackSelect runs mark a stop (or a pause) of the
#: audit: within a running piece a rank writes a chunk every run. (The longest run is no measure: a run
#: that was paused records its pause.)
PIECE_GAP_RUNS = 3


def progress(audit: Path, model: Path, data: Path, num_images: int, seed: int, thresholds: list[float], processes: int) -> dict:
    """The progress record of the audit in ``audit`` (module doc)."""
    from keepbits.audit import load_model

    fingerprint = load_model(str(model)).fingerprint()
    chunks = sorted((audit / "orders").glob("chunk_*.json"))
    records = [json.loads(p.read_text()) for p in chunks]
    current = [r for r in records if r.get("model") == fingerprint]
    seconds = np.array([res["seconds"] for r in current for res in r["results"]], dtype=np.float64)
    partial = interim(audit, model, data, num_images, seed, thresholds)
    needed = partial["backselect_runs"]
    rate = float(np.median(seconds)) if len(seconds) else None
    # the time each chunk records; a file's own time is no guide (a checkout of the chunks kept in git resets it)
    written = sorted(float(r["written_at"]) for r in current if isinstance(r.get("written_at"), (int, float)))
    pieces = running_pieces(written, PIECE_GAP_RUNS * rate if rate is not None else 0.0)
    hours = sum(b - a for a, b, _ in pieces) / 3600
    return {
        "audit": str(audit), "model": str(model), "model_fingerprint": fingerprint,
        "audit_command": (f"torchrun --nproc-per-node {processes} -m keepbits audit sis --model {model} --data {data} --out {audit} "
                          f"--num-images {num_images} --seed {seed} --threshold {min(thresholds)} --thresholds {' '.join(map(str, thresholds))}"),
        "chunk_files": len(chunks), "chunk_files_of_other_models": len(records) - len(current),
        "backselect_runs_done": int(len(seconds)), "backselect_runs_needed": needed,
        "seconds_per_backselect": None if rate is None else {
            "median": rate, "min": float(seconds.min()), "max": float(seconds.max()),
            "note": "per image, as the audit recorded it (wall time of one BackSelect in one process)"},
        "chunks_without_write_time": len(current) - len(written),
        "chunks_written_utc": [_utc(written[0]), _utc(written[-1])] if written else None,
        "pieces": [{"from": _utc(a), "to": _utc(b), "chunks": n} for a, b, n in pieces],
        "runs_per_hour_within_pieces": round(sum(n - 1 for _, _, n in pieces) / hours, 2) if hours > 0 else None,
        "rate_note": "chunks after the first of each piece per hour of the pieces' spans (a piece: chunks written at most "
                     f"{PIECE_GAP_RUNS} median runs apart; the audit was stopped or paused between pieces; chunks without a "
                     "written_at (the audit recorded none before 2026-12-07) are left out)",
        "hours_left_projected": None if rate is None else round(max(needed - len(seconds), 0) * rate / processes / 3600, 2),
        "projection": f"runs left × median seconds per run / {processes} processes; not a measurement",
        "interim": partial,
    }


def interim(audit: Path, model: Path, data: Path, num_images: int, seed: int, thresholds: list[float]) -> dict:
    """The partial report of the audit (``sis_audit(partial=True)`` on its seeded draw, computing no
    run): runs done of needed, SIS size per τ over the finished images, and per-class coverage."""
    from keepbits.audit.sis_report import sis_audit

    drawn = audit_draw(model, data, num_images, seed)
    report = sis_audit(str(model), drawn.x, drawn.y, audit, threshold=min(thresholds), thresholds=thresholds, progress=False,
                       partial=True)
    return {
        "report": str(audit / "report_partial.html"),
        "backselect_runs": report["summary"]["backselect_runs"], "backselect_runs_done": report["summary"]["backselect_runs_done"],
        "sis_size_fraction": [{"threshold": s["threshold"], "images": s["images_at_threshold"], **s["size"]} for s in report["size_stats"]],
        "per_class": {str(c["class"]): {"needed": c["needed"], "done": c["done"]} for c in report["coverage"]},
        "note": "over the finished runs only: chunks are computed in a seeded random order (since 2026-12-06, after the "
                "1,000-image audit's first 109 runs, which went in image order), so check per_class before reading the "
                "sizes as the whole draw's",
    }


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def running_pieces(times: list[float], max_gap: float) -> list[tuple[float, float, int]]:
    """The sorted chunk write ``times`` cut where two follow more than ``max_gap`` seconds apart
    (the audit was not running in between): (first, last, chunks) per piece.

    Example:
        >>> running_pieces([0.0, 10.0, 20.0, 500.0, 505.0], 50.0)
        [(0.0, 20.0, 3), (500.0, 505.0, 2)]
    """
    pieces: list[tuple[float, float, int]] = []
    for t in times:
        if pieces and t - pieces[-1][1] <= max_gap:
            first, _, n = pieces[-1]
            pieces[-1] = (first, t, n + 1)
        else:
            pieces.append((t, t, 1))
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", type=Path, required=True, help="the audit's --out folder")
    parser.add_argument("--model", type=Path, required=True, help="the audited checkpoint")
    add_data_argument(parser, "cifar10/")
    parser.add_argument("--num-images", type=int, default=1000, help="the audit's --num-images")
    parser.add_argument("--seed", type=int, default=0, help="the audit's --seed")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9], help="the audit's τ values (the smallest decides)")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes the audit runs with")
    parser.add_argument("--name", default="sis_audit_progress", help="results name (bench/results/<name>.json)")
    args = parser.parse_args()
    require_data(parser, args.data, "cifar10")
    print(write_result(args.name, progress(args.audit, args.model, args.data / "cifar10", args.num_images, args.seed, args.thresholds,
                                           args.processes)))


if __name__ == "__main__":
    main()
