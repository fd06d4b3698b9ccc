"""Seed summary of ``bench/simplebits_sweep.py`` runs: the rows of several result files (one per
seed) grouped by what was run (mode, λ_sim, blur σ, JPEG quality), with mean, sample standard
deviation and range of bpd and accuracy over the seeds that ran it.

    python bench/simplebits_seeds.py --runs simplebits_sweep_mnist_joint_s0 simplebits_sweep_mnist_joint_s1 \
        simplebits_sweep_mnist_joint_s2 --name simplebits_sweep_mnist_seeds

Reads ``bench/results/<run>.json``; writes ``bench/results/<name>.json``. Files of one seed may be
split (``--runs a_s1 a_s1_baselines``): rows are told apart by the seed in their file's settings,
and a setting a seed ran twice (the "original" row of every file) must have the same results.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import results_dir, write_result  # noqa: E402

#: Row fields that say what was run (the rest are measurements).
SETTING_KEYS = ("mode", "simplifier_from", "lambda_sim", "sigma", "quality")
MEASURED_KEYS = ("bpd", "accuracy", "acc_orig", "gate_open")


def group_rows(runs: list[dict]) -> list[dict]:
    """One entry per setting: the per-seed values and their mean / sd / min / max.

    Example:
        >>> a = {"settings": {"seed": 0}, "rows": [{"mode": "blur", "sigma": 1.0, "bpd": 3.0, "accuracy": 0.9}]}
        >>> b = {"settings": {"seed": 1}, "rows": [{"mode": "blur", "sigma": 1.0, "bpd": 3.2, "accuracy": 0.8}]}
        >>> g = group_rows([a, b])[0]
        >>> g["seeds"], round(g["bpd"]["mean"], 3), round(g["accuracy"]["sd"], 4)
        ([0, 1], 3.1, 0.0707)
    """
    groups: dict[tuple, dict] = {}
    for run in runs:
        seed = run["settings"]["seed"]
        for row in run["rows"]:
            key = tuple((k, row[k]) for k in SETTING_KEYS if k in row)
            entry = groups.setdefault(key, {"setting": dict(key), "per_seed": {}})
            measured = {k: row[k] for k in MEASURED_KEYS if k in row}
            if entry["per_seed"].setdefault(seed, measured) != measured:
                raise ValueError(f"seed {seed} ran {dict(key)} twice with different results")
    out = []
    for entry in groups.values():
        seeds = sorted(entry["per_seed"])
        summary = {**entry["setting"], "seeds": seeds, "per_seed": [{"seed": s, **entry["per_seed"][s]} for s in seeds]}
        for k in MEASURED_KEYS:
            values = [entry["per_seed"][s][k] for s in seeds if k in entry["per_seed"][s]]
            if values:
                summary[k] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                              "min": min(values), "max": max(values)}
        out.append(summary)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="result names (bench/results/<run>.json) of simplebits_sweep.py")
    p.add_argument("--name", required=True, help="output result name")
    args = p.parse_args()
    runs = []
    for name in args.runs:
        path = results_dir() / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"no result file {path}")
        runs.append(json.loads(path.read_text()))
    rows = group_rows(runs)
    write_result(args.name, {"runs": args.runs, "statistics": "mean, sample standard deviation (n − 1) and range over the seeds that ran a setting",
                             "rows": rows})
    for r in rows:
        setting = ", ".join(f"{k}={r[k]}" for k in SETTING_KEYS if k in r)
        print(f"{setting:45s} seeds {r['seeds']}  bpd {r['bpd']['mean']:.3f}  acc {r['accuracy']['mean']:.3f}"
              + (f" ± {r['accuracy']['sd']:.3f}" if r["accuracy"]["sd"] is not None else ""))


if __name__ == "__main__":
    main()
