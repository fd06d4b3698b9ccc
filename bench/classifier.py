"""Classifier accuracy benchmark (issue: foundation).

Trains LeNet5 on MNIST and ResNet-20 on the CIFAR-10 20k subset, evaluates on the official
test sets, and writes ``bench/results/classifier_<task>.json`` with the metrics, wall time,
epochs and settings (not the weights; checkpoints stay in ``--runs``).

    python bench/classifier.py --task mnist-lenet5
    python bench/classifier.py --task cifar10-resnet20
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _results import add_data_argument, require_data, write_result
from keepbits.training.classifier import ClassifierConfig, train_classifier

TASKS = {
    # target: minimum test accuracy the issue asks for
    "mnist-lenet5": dict(subdir="mnist", arch="lenet5", epochs=8, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                         batch_size=128, crop_padding=2, augment="crop", target=0.990),
    "cifar10-resnet20": dict(subdir="cifar10", arch="resnet20", epochs=30, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                             batch_size=128, crop_padding=4, augment="crop-flip", warmup_epochs=1, target=0.80),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    add_data_argument(parser, "mnist/ and cifar10/")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where checkpoints go")
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epoch count")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args()
    require_data(parser, args.data, TASKS[args.task]["subdir"])
    task = dict(TASKS[args.task])
    target = task.pop("target")
    subdir = task.pop("subdir")
    if args.epochs:
        task["epochs"] = args.epochs
    out = args.runs / f"bench_{args.task}"
    cfg = ClassifierConfig(overwrite=True, data=str(args.data / subdir), out=str(out), val_fraction=0.0, threads=args.threads,
                           command=" ".join(sys.argv), **task)
    started = time.time()
    summary = train_classifier(cfg)
    final = summary["history"][-1]
    payload = {
        "task": args.task,
        "arch": cfg.arch,
        "data": str(args.data / subdir),
        "settings": {k: v for k, v in vars(cfg).items() if k not in ("progress", "command")},
        "epochs": cfg.epochs,
        "wall_time_s": round(time.time() - started, 1),
        "final_test_accuracy": final["test_accuracy"],
        "target_test_accuracy": target,
        "meets_target": final["test_accuracy"] >= target,
        "history": summary["history"],
        "checkpoint": summary["checkpoints"]["last"],
    }
    path = write_result(f"classifier_{args.task}", payload)
    print(f"{args.task}: test accuracy {final['test_accuracy']:.4f} (target {target}) in {payload['wall_time_s']} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
