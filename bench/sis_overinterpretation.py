"""Overinterpretation on CIFAR-10 (Carter et al. 2021 Table 1 style).

Runs :func:`keepbits.audit.overinterpretation.run_overinterpretation`: the audited model and its
replicates train on one half of the training split, the retraining images come from the other
half (never seen by the model that picks their pixels); batched gradient BackSelect, 5% subsets,
retraining without augmentation next to the full-image control, random baseline, SIS sizes at
every τ with CIs, ensemble of identically trained replicates and input dropout compared on
common confident images, optionally exact BackSelect on a sample. Writes
``bench/results/sis_overinterpretation_cifar10.json``; the HTML report goes to ``--out``. Reruns
resume from ``--out`` (models and per-chunk orders are kept).

    nice -n 10 python bench/sis_overinterpretation.py --audit-images 10000 --train-images 5000 --test-images 1000 --epochs 15 --k 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
from _results import add_data_argument, parse_args_with_data, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "cifar10/")
    parser.add_argument("--out", type=Path, default=Path("runs/sis_overinterpretation_cifar10"))
    parser.add_argument("--model", default=None, help="audit this classifier checkpoint instead of training --arch")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--retrain-epochs", type=int, default=None, help="epochs of the retraining recipe (default: --epochs)")
    parser.add_argument("--audit-images", type=int, default=None, help="images of the first training half the audited recipe trains on")
    parser.add_argument("--train-images", type=int, default=None, help="retraining images from the second training half")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--ensemble", type=int, default=3)
    parser.add_argument("--dropout-samples", type=int, default=4)
    parser.add_argument("--exact-images", type=int, default=0, help="test images also run through exact BackSelect")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seeds the halves, the image samples and every model")
    parser.add_argument("--tag", default="", help="suffix of the result file (e.g. s1 for another seed)")
    args = parse_args_with_data(parser, "cifar10")
    import torch

    torch.set_num_threads(args.threads)
    cfg = OverinterpretationConfig(str(args.data / "cifar10"), str(args.out), model=args.model, arch=args.arch, epochs=args.epochs,
                                   retrain_epochs=args.retrain_epochs, audit_images=args.audit_images, train_images=args.train_images,
                                   test_images=args.test_images, k=args.k, ensemble=args.ensemble, dropout_samples=args.dropout_samples,
                                   exact_images=args.exact_images, lr=args.lr, seed=args.seed)
    result = run_overinterpretation(cfg)
    result["report"] = str(args.out / "report.html")
    print(write_result("sis_overinterpretation_cifar10" + (f"_{args.tag}" if args.tag else ""), result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
