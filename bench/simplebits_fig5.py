"""One Fig. 5-style figure (test accuracy vs bpd) from several ``simplebits_sweep`` result files.

    python bench/simplebits_fig5.py --name cifar10 bench/results/simplebits_sweep_cifar10_joint_s0.json \
        bench/results/simplebits_sweep_cifar10_finetune_s0.json bench/results/simplebits_sweep_cifar10_baselines_s0.json

Each input may carry a label (``FILE=LABEL``) appended to its SimpleBits rows' modes (joint,
finetune, retrain), e.g. to tell two simplifier learning rates apart. The "original" row is taken from the first file that has
one. Writes ``bench/results/simplebits_fig5_<name>.png`` and prints the merged rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import results_dir  # noqa: E402
from simplebits_sweep import plot_curve  # noqa: E402


#: Rows a FILE=LABEL label applies to (baselines and the original are the same whatever the label).
SIMPLEBITS_MODES = ("joint", "finetune", "retrain")


def merged_rows(inputs: list[str]) -> list[dict]:
    rows: list[dict] = []
    for spec in inputs:
        path, _, label = spec.partition("=")
        for row in json.loads(Path(path).read_text())["rows"]:
            if row["mode"] == "original" and any(r["mode"] == "original" for r in rows):
                continue
            mode = f"retrain on {row['simplifier_from']} images" if "simplifier_from" in row else row["mode"]
            mode = f"{mode} ({label})" if label and row["mode"] in SIMPLEBITS_MODES else mode
            rows.append({**row, "mode": mode, "file": Path(path).name})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="simplebits_sweep JSON files, optionally FILE=LABEL")
    p.add_argument("--name", required=True, help="suffix of the figure's file name")
    args = p.parse_args()
    rows = merged_rows(args.inputs)
    out = results_dir() / f"simplebits_fig5_{args.name}.png"
    plot_curve(rows, out)
    for r in rows:
        setting = next((f"{k} {r[k]:g}" for k in ("lambda_sim", "sigma", "quality") if k in r), "")
        print(f"{r['mode']:28s} {setting:16s} bpd {r['bpd']:.3f}  accuracy {r['accuracy']:.3f}  {r['file']}")
    print(out)


if __name__ == "__main__":
    main()
