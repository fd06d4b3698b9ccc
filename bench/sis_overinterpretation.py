"""Overinterpretation on CIFAR-10 (issue 6, Carter et al. 2021 Table 1 style).

Runs :func:`keepbits.audit.overinterpretation.run_overinterpretation` (batched gradient
BackSelect, 5% subsets, retraining, random baseline, SIS sizes, ensemble and input-dropout
mitigations) and writes ``bench/results/sis_overinterpretation_cifar10.json``; the HTML report
goes to ``--out``. Reruns resume from ``--out`` (models and per-chunk orders are kept).

    nice -n 5 python bench/sis_overinterpretation.py --arch lenet5 --train-images 4000 --test-images 500 --epochs 15
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
from _results import default_data_dir, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding cifar10/ (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/sis_overinterpretation_cifar10"))
    parser.add_argument("--model", default=None, help="audit this classifier checkpoint instead of training --arch")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--ensemble", type=int, default=3)
    parser.add_argument("--dropout-samples", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    if args.data is None or not (args.data / "cifar10").is_dir():
        parser.error(f"CIFAR-10 not found under {args.data} (pass --data)")
    cfg = OverinterpretationConfig(str(args.data / "cifar10"), str(args.out), model=args.model, arch=args.arch, epochs=args.epochs,
                                   train_images=args.train_images, test_images=args.test_images, k=args.k, ensemble=args.ensemble,
                                   dropout_samples=args.dropout_samples, lr=args.lr)
    result = run_overinterpretation(cfg)
    result["report"] = str(args.out / "report.html")
    print(write_result("sis_overinterpretation_cifar10", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
