"""NICE run 1: MNIST, LeNet5 fixed, b = 28, λ1 sweep (λ2 = 0): accuracy vs kept fraction,
against random-pixel and gradient-saliency top-k masks at the same per-image pixel budget.

Writes ``bench/results/nice_mnist.json``, ``nice_mnist_accuracy.png`` (accuracy vs kept
fraction) and ``nice_mnist_masks.png`` (NICE Fig. 2 style: ẑ and x̃ for each λ1).

    nice -n 5 python bench/nice_mnist.py --classifier runs/nice/mnist_lenet5/last.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import default_data_dir, results_dir, write_result
from keepbits.data import load_dataset
from keepbits.training.checkpoint import build_model, load_checkpoint
from keepbits.training.nice import NiceConfig, load_nice, train_nice
from keepbits.training.nice_eval import backselect_ranks, benchmark_nice
from keepbits.training.data import TensorImages
from nice_common import ensure_classifier, masks_and_mixed, plot_curves, plot_masks

BLOCK = 28


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding mnist/ (default ../shared/data)")
    p.add_argument("--classifier", default=None, help="LeNet5 checkpoint; trained (2 epochs AdamW) into --runs when missing")
    p.add_argument("--runs", type=Path, default=Path("runs/nice"), help="where checkpoints go")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    p.add_argument("--generator", default="nice_mnist")
    p.add_argument("--generator-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"widths": [8, 16, 32]}\'')
    p.add_argument("--target-fraction", type=float, default=None, help="adapt λ1 (from each --lambdas start) to keep this fraction")
    p.add_argument("--tag", default="", help="suffix of the result names (nice_mnist<tag>.json / .png)")
    p.add_argument("--lr", type=float, default=1e-2, help="generator Adam lr (×0.1 every 5 epochs)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-train", type=int, default=20000)
    p.add_argument("--max-test", type=int, default=10000)
    p.add_argument("--qualities", type=int, nargs="+", default=[50, 90])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sis-k", type=int, default=8, help="SIS baseline: gradient BackSelect, K pixels per iteration (0: off)")
    p.add_argument("--reuse", action="store_true", help="evaluate existing generator checkpoints under --runs instead of retraining")
    args = p.parse_args()
    if args.data is None or not (args.data / "mnist").is_dir():
        p.error(f"data folder not found: {args.data} (pass --data)")
    torch.set_num_threads(args.threads)
    data = args.data / "mnist"
    started = time.time()
    clf_path = ensure_classifier(data, "lenet5", args.runs / "mnist_lenet5", args.classifier, epochs=2, optimizer="adamw", lr=1e-3,
                                 weight_decay=0.0, val_fraction=0.0, augment="none", seed=args.seed)
    clf_ckpt = load_checkpoint(clf_path)
    clf_metrics = clf_ckpt.metrics
    test = load_dataset(data, "test")
    test = test.sample(args.max_test, args.seed)

    ranks = None
    if args.sis_k:
        norm = clf_ckpt.normalization
        ranks = backselect_ranks(build_model(clf_ckpt, "classifier").eval(), TensorImages(test, norm.mean, norm.std), args.sis_k)
    rows, figure = [], {"masks": [], "mixed": [], "titles": []}
    for lam in args.lambdas:
        out = args.runs / f"mnist_{args.generator}{args.tag}_l{lam:g}"
        cfg = NiceConfig(data=str(data), classifier=clf_path, out=str(out), generator=args.generator,
                         generator_kwargs=args.generator_kwargs, block_size=BLOCK,
                         lambda_l0=lam, lambda_smooth=0.0, target_fraction=args.target_fraction, optimizer="adam", lr=args.lr, epochs=args.epochs,
                         max_train=args.max_train, max_test=args.max_test, seed=args.seed, progress=False,
                         command=" ".join(sys.argv))
        t0 = time.time()
        if args.reuse and (out / "nice.pt").exists():
            summary = {"checkpoint": str(out / "nice.pt"), **load_checkpoint(out / "nice.pt").metrics}
        else:
            summary = train_nice(cfg)
        train_s = time.time() - t0
        gen, clf, ckpt = load_nice(summary["checkpoint"])
        result = benchmark_nice(gen, clf, ckpt, test, [BLOCK], args.qualities, seed=args.seed, sis_ranks=ranks)
        row = result["per_block_size"][0]
        rows.append({
            "lambda_l0": lam, "lambda_l0_final": summary["lambda_l0_final"], "train_wall_s": round(train_s, 1), "kept_fraction": result["kept_fraction"], "mean_mask": result["mean_mask"],
            "nice_accuracy": row["nice"]["accuracy"], "saliency_topk_accuracy": row["saliency_topk"]["accuracy"],
            "random_accuracy": row["random"]["accuracy"], "nice_png_bytes": row["nice"]["png_bytes_per_image"],
            "sis_backselect_accuracy": row["sis_backselect"]["accuracy"] if ranks is not None else None,
            "saliency_topk_png_bytes": row["saliency_topk"]["png_bytes_per_image"], "random_png_bytes": row["random"]["png_bytes_per_image"],
            "nice_codecs": row["nice"]["codecs"], "training_history": summary["history"],
        })
        original = result["original"]
        sis = f"  SIS {row['sis_backselect']['accuracy']:.4f}" if ranks is not None else ""
        print(f"λ1={lam:g}: kept {result['kept_fraction']:.3f}  NICE {row['nice']['accuracy']:.4f}  saliency {row['saliency_topk']['accuracy']:.4f}  "
              f"random {row['random']['accuracy']:.4f}{sis}", flush=True)
        z_hat, mixed = masks_and_mixed(gen, ckpt, test.subset(np.arange(8)), BLOCK)
        figure["masks"].append(z_hat)
        figure["mixed"].append(mixed)
        figure["titles"].append(f"λ1={lam:g}")

    out_dir = results_dir()
    name = f"nice_mnist{args.tag}"
    plot_masks(out_dir / f"{name}_masks.png", test.x[:8], figure["masks"], figure["mixed"], figure["titles"])
    fr = [r["kept_fraction"] for r in rows]
    plot_curves(out_dir / f"{name}_accuracy.png", {
        "NICE (ẑ)": (fr, [r["nice_accuracy"] for r in rows]),
        "gradient saliency top-k": (fr, [r["saliency_topk_accuracy"] for r in rows]),
        "random pixels": (fr, [r["random_accuracy"] for r in rows]),
        **({"SIS (gradient BackSelect)": (fr, [r["sis_backselect_accuracy"] for r in rows])} if ranks is not None else {}),
    }, "kept fraction (ẑ > 0.5)", "test accuracy", f"MNIST, LeNet5 fixed, b = {BLOCK}, {len(test)} test images")
    meets = [r for r in rows if r["nice_accuracy"] >= 0.98 and r["kept_fraction"] <= 0.15]
    payload = {
        "protocol": {
            "data": str(data), "train_images": args.max_train, "test_images": len(test), "block_size": BLOCK, "lambda_smooth": 0.0, "target_fraction": args.target_fraction,
            "generator": args.generator, "generator_kwargs": args.generator_kwargs, "optimizer": f"Adam lr {args.lr} (×0.1 every 5 epochs)", "epochs": args.epochs,
            "batch_size": 64, "seed": args.seed, "classifier": clf_path, "mode": "fixed",
            "baselines": "same per-image pixel count as ẑ > 0.5; saliency = |d logit_pred / dx| summed over channels; "
                         f"SIS = the pixels Batched Gradient BackSelect (k = {args.sis_k}) masks last",
            "accuracy": "on the decoded uint8 image (PNG is lossless)",
        },
        "classifier_metrics": {k: v for k, v in clf_metrics.items() if k != "history"},
        "original": original,
        "sweep": rows,
        "target": {"rule": "accuracy >= 0.98 at kept fraction <= 0.15", "met_by_lambdas": [r["lambda_l0"] for r in meets],
                   "nice_above_baselines_at_every_budget": all(
                       r["nice_accuracy"] > max(r["saliency_topk_accuracy"], r["random_accuracy"], r["sis_backselect_accuracy"] or 0.0) for r in rows)},
        "wall_time_s": round(time.time() - started, 1),
    }
    print(write_result(name, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
