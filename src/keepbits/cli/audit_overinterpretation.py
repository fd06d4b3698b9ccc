"""``keepbits audit overinterpretation``: do pixel subsets the eye cannot read suffice? (Carter et al. 2021)"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from keepbits.cli._common import (
    POSITIVE_LR, SEED, THRESHOLD, add_argument, add_device_option, existing_path, non_negative_int, number, output_folder,
    positive_int,
)
from keepbits.errors import InputError

HELP = ("overinterpretation audit: accuracy on 5%% BackSelect vs random pixel subsets, retraining on images the audited model never saw "
        "(with the full-image control), SIS sizes, mitigations")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set with train and test splits")
    p.add_argument("--out", required=True, help="output folder (report.html, report.json, models/, orders/; reruns resume)")
    p.add_argument("--model", default=None, help="classifier checkpoint to audit (default: train --arch here on the first half of the "
                   "training split); the retraining images come from the second half, which it must never have seen")
    p.add_argument("--arch", default="resnet20", help="registry classifier for the models trained here")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs of the audited recipe (audited model, replicates, input dropout; flips)")
    p.add_argument("--retrain-epochs", type=positive_int, default=None, help="epochs of the retraining recipe (subsets and the full-image "
                   "control; no augmentation; default: --epochs)")
    p.add_argument("--num-audit-images", type=positive_int, default=None, help="images of the first training half the audited recipe trains on "
                   "(class-balanced sample, seed --seed; default: the whole half)")
    add_argument(p, "--num-train-images", type=positive_int, default=None, deprecated=["--train-images"],
                 help="retraining images: a class-balanced sample of the second training half (seed --seed; default: the whole half)")
    add_argument(p, "--num-test-images", type=positive_int, default=None, deprecated=["--test-images"],
                 help="use a random sample of N test images (seed --seed; default: all)")
    p.add_argument("--fraction", type=float, default=0.05, help="pixel fraction kept per image")
    p.add_argument("--method", choices=["gradient", "exact"], default="gradient", help="BackSelect variant")
    p.add_argument("--k", type=positive_int, default=16, help="pixels masked per gradient BackSelect iteration")
    p.add_argument("--thresholds", type=THRESHOLD, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9], help="τ values of the SIS size statistics")
    p.add_argument("--ensemble", type=number(int, minimum=2), default=3, help="ensemble size: N identically trained replicates of the audited recipe")
    p.add_argument("--keep-prob", type=THRESHOLD, default=0.8, help="input dropout keep probability (train and test), in (0, 1]")
    p.add_argument("--dropout-samples", type=positive_int, default=4, help="input dropout masks averaged at test time (fixed seed)")
    p.add_argument("--num-exact-images", type=non_negative_int, default=0, help="also run exact BackSelect on a class-balanced sample of N test "
                   "images and compare it with the gradient orders (0: off)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training and BackSelect batch size")
    p.add_argument("--lr", type=POSITIVE_LR, default=0.05, help="peak learning rate (SGD, one-cycle schedule) of the models trained here")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image samples and the training runs")
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    if args.model:
        existing_path(args.model, "model")
    # a folder with models/ is an overinterpretation audit to resume; any other folder's reports are never overwritten
    if any((Path(args.out) / "orders").glob("chunk_*.json")):
        raise InputError(f"--out {args.out}: holds an SIS audit's runs (orders/chunk_*.json); choose another folder")
    output_folder(args.out, writes=() if (Path(args.out) / "models").is_dir() else ("report.html", "report.json"))
    from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation

    cfg = OverinterpretationConfig(
        data=args.data, out=args.out, model=args.model, arch=args.arch, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
        audit_images=args.num_audit_images, train_images=args.num_train_images, test_images=args.num_test_images, fraction=args.fraction, method=args.method, k=args.k,
        thresholds=args.thresholds, ensemble=args.ensemble, keep_prob=args.keep_prob, dropout_samples=args.dropout_samples,
        exact_images=args.num_exact_images, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, progress=not args.quiet,
    )
    result = run_overinterpretation(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"accuracy": result["accuracy"], "report": os.path.join(args.out, "report.html")}, indent=2))
    return 0
