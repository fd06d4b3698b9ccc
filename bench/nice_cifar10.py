"""NICE run 2: CIFAR-10, ResNet-20, discriminator fixed and finetuned, trained at b = 16 and
evaluated at b ∈ {1, 2, 4, 8, 16, 32}: accuracy and bytes vs b, next to PNG/JPEG/WebP of the
original image at the quality whose accuracy matches NICE's.

Writes ``bench/results/nice_cifar10<tag>.json`` and ``nice_cifar10<tag>_b_accuracy.png`` / ``_b_bytes.png``.

    nice -n 5 python bench/nice_cifar10.py --classifier runs/nice/cifar10_resnet20/last.pt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _results import default_data_dir, results_dir, write_result
from keepbits.data import load_dataset
from keepbits.training.checkpoint import load_checkpoint
from keepbits.training.data import TensorImages
from keepbits.training.nice import NiceConfig, load_nice, train_nice
from keepbits.training.nice_eval import backselect_ranks, benchmark_nice
from nice_common import best_codec_at, ensure_classifier, plot_curves

TRAIN_B = 16
EVAL_B = (1, 2, 4, 8, 16, 32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding cifar10/ (default ../shared/data)")
    p.add_argument("--classifier", default=None, help="ResNet-20 checkpoint; trained into --runs when missing")
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--runs", type=Path, default=Path("runs/nice"))
    p.add_argument("--modes", nargs="+", default=["fixed", "finetuned"])
    p.add_argument("--train-blocks", nargs="+", default=["layer3", "fc"], help="finetuned mode: ResNet-20 blocks that train")
    p.add_argument("--generator", default="nice_unet")
    p.add_argument("--lambda-l0", type=float, default=3.0)
    p.add_argument("--lambda-smooth", type=float, default=0.5)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classifier-lr", type=float, default=None, help="finetuned mode: the classifier blocks' lr (default --lr)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train", type=int, default=20000)
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--qualities", type=int, nargs="+", default=[5, 10, 20, 30, 50, 70, 90])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result names (nice_cifar10<tag>.json / .png)")
    p.add_argument("--sis-k", type=int, default=16, help="SIS baseline: gradient BackSelect, K pixels per iteration (0: off)")
    args = p.parse_args()
    if args.data is None or not (args.data / "cifar10").is_dir():
        p.error(f"data folder not found: {args.data} (pass --data)")
    torch.set_num_threads(args.threads)
    data = args.data / "cifar10"
    started = time.time()
    clf_path = ensure_classifier(data, "resnet20", args.runs / "cifar10_resnet20", args.classifier, epochs=args.classifier_epochs,
                                 optimizer="sgd", lr=0.1, val_fraction=0.0, seed=args.seed)
    test = load_dataset(data, "test")
    test = test.sample(args.max_test, args.seed)

    runs, series_acc, series_bytes = {}, {}, {}
    for mode in args.modes:
        out = args.runs / f"cifar10_{args.generator}_{mode}"
        cfg = NiceConfig(data=str(data), classifier=clf_path, out=str(out), generator=args.generator, mode=mode,
                         train_blocks=args.train_blocks if mode == "finetuned" else [], block_size=TRAIN_B,
                         lambda_l0=args.lambda_l0, lambda_smooth=args.lambda_smooth, optimizer=args.optimizer, lr=args.lr, classifier_lr=args.classifier_lr,
                         epochs=args.epochs, max_train=args.max_train, max_test=args.max_test, seed=args.seed,
                         progress=False, command=" ".join(sys.argv))
        t0 = time.time()
        summary = train_nice(cfg)
        gen, clf, ckpt = load_nice(summary["checkpoint"])
        norm = ckpt.normalization
        ranks = backselect_ranks(clf, TensorImages(test, norm.mean, norm.std), args.sis_k) if args.sis_k else None
        result = benchmark_nice(gen, clf, ckpt, test, EVAL_B, args.qualities, seed=args.seed, sis_ranks=ranks)
        for row in result["per_block_size"]:
            acc = row["nice"]["accuracy"]
            row["original_matching"] = {c: best_codec_at(result["original"]["codecs"], acc, c) for c in ("png", "jpeg", "webp")}
        runs[mode] = {"train_wall_s": round(time.time() - t0, 1), "training_history": summary["history"], **result}
        bs = [r["block_size"] for r in result["per_block_size"]]
        series_acc[f"NICE {mode}"] = (bs, [r["nice"]["accuracy"] for r in result["per_block_size"]])
        series_bytes[f"NICE {mode} (PNG of x̃)"] = (bs, [r["nice"]["png_bytes_per_image"] for r in result["per_block_size"]])
        print(mode, [(r["block_size"], round(r["nice"]["accuracy"], 4), round(r["nice"]["png_bytes_per_image"], 1)) for r in result["per_block_size"]], flush=True)

    out_dir = results_dir()
    plot_curves(out_dir / f"nice_cifar10{args.tag}_b_accuracy.png", series_acc, "block size b", "test accuracy", f"CIFAR-10 ResNet-20, trained at b={TRAIN_B}", logx=True)
    plot_curves(out_dir / f"nice_cifar10{args.tag}_b_bytes.png", series_bytes, "block size b", "bytes per image", f"CIFAR-10, PNG of x̃ ({len(test)} test images)", logx=True)
    payload = {
        "protocol": {
            "data": str(data), "train_images": args.max_train, "test_images": len(test), "train_block_size": TRAIN_B,
            "eval_block_sizes": list(EVAL_B), "generator": args.generator, "lambda_l0": args.lambda_l0, "lambda_smooth": args.lambda_smooth,
            "optimizer": args.optimizer, "lr": args.lr, "classifier_lr": args.classifier_lr, "epochs": args.epochs, "train_blocks_finetuned": args.train_blocks,
            "seed": args.seed, "classifier": clf_path,
            "matching": "smallest original-image JPEG/WebP (qualities listed) whose accuracy reaches NICE's at that b",
            "baselines": f"random, gradient saliency top-k and SIS (gradient BackSelect, k = {args.sis_k}) at ẑ's per-image pixel count",
        },
        "classifier_metrics": {k: v for k, v in load_checkpoint(clf_path).metrics.items() if k != "history"},
        "runs": runs,
        "wall_time_s": round(time.time() - started, 1),
    }
    print(write_result(f"nice_cifar10{args.tag}", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
