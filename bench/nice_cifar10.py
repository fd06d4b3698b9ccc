"""NICE run 2: CIFAR-10, ResNet-20, discriminator fixed and finetuned, trained at b = 16 and
evaluated at b ∈ {1, 2, 4, 8, 16, 32}: accuracy of the binary mask ẑ > 0.5 against random,
saliency and SIS pixels at the same per-image count, the soft ẑ apart, and bytes (x̃ as a whole
PNG/JPEG/WebP image and the keepbits payload) next to the original image's PNG/JPEG/WebP at
the quality whose accuracy matches NICE's.

Protocol (``nice_common``): the classifier holds out a stratified validation split of the
training images (``--val-fraction``, seed of ``--seeds[0]``). Fixed mode: every pilot λ1
(``--lambdas``) trains with the first seed and is scored on ``--max-val`` validation images at
the trained b; the rule (best validation accuracy of binary NICE among pilots keeping at most
``--max-kept``) picks λ1, which is then trained with every seed and tested once. Finetuned
mode: the same for the classifier learning rates ``--classifier-lrs`` at ``--finetune-lambda``
(``--finetune-seeds`` seeds).

Writes ``bench/results/nice_cifar10<tag>.json`` and ``nice_cifar10<tag>_b_accuracy.png`` / ``_b_bytes.png``.

    nice -n 10 python bench/nice_cifar10.py --classifier runs/resnet20_val/last.pt --lambdas 10 30 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from _results import add_data_argument, checkpoint_record, parse_args_with_data, results_dir, write_result
from keepbits.data import load_dataset
from keepbits.training.checkpoint import load_checkpoint
from keepbits.training.classifier import load_classifier
from keepbits.training.data import TensorImages
from keepbits.training.nice import NiceConfig, load_nice, train_nice
from keepbits.training.nice_eval import backselect_ranks, benchmark_nice
from nice_common import best_codec_at, choose, ensure_classifier, plot_curves, summarise_runs, validation_images

TRAIN_B = 16
EVAL_B = (1, 2, 4, 8, 16, 32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p, "cifar10/")
    p.add_argument("--classifier", default=None, help="ResNet-20 checkpoint trained with the same --val-fraction and first seed; "
                   "trained into --runs when missing")
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--runs", type=Path, default=Path("runs/nice"))
    p.add_argument("--generator", default="nice_unet")
    p.add_argument("--lambdas", type=float, nargs="+", default=[10.0, 30.0], help="fixed mode: pilot λ1 values (first seed, validation only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fixed mode: training seeds of the chosen λ1")
    p.add_argument("--max-kept", type=float, default=0.4, help="selection rule: best validation accuracy among pilots keeping at most this fraction")
    p.add_argument("--finetune-lambda", type=float, default=5.0, help="finetuned mode: λ1 (0 skips the mode)")
    p.add_argument("--classifier-lrs", type=float, nargs="+", default=[1e-3, 1e-4], help="finetuned mode: pilot classifier learning rates")
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[0], help="finetuned mode: training seeds of the chosen classifier lr")
    p.add_argument("--train-blocks", nargs="+", default=["layer3", "fc"], help="finetuned mode: ResNet-20 blocks that train")
    p.add_argument("--lambda-smooth", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3, help="generator Adam lr")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-train", type=int, default=10000, help="seeded class-balanced sample of the training split (after the validation hold-out)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-val", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--qualities", type=int, nargs="+", default=[5, 10, 20, 30, 50, 70, 90])
    p.add_argument("--coded-b", type=int, nargs="+", default=[TRAIN_B], help="b values that get JPEG/WebP and payload rows (others: accuracy, PNG)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result names (nice_cifar10<tag>.json / .png)")
    p.add_argument("--sis-k", type=int, default=16, help="SIS baseline: gradient BackSelect, K pixels per iteration (0: off)")
    p.add_argument("--reuse", action="store_true", help="evaluate existing generator checkpoints under --runs instead of retraining")
    args = parse_args_with_data(p, "cifar10")
    torch.set_num_threads(args.threads)
    data = args.data / "cifar10"
    started = time.time()
    seed0 = args.seeds[0]
    clf_path = ensure_classifier(data, "resnet20", args.runs / "cifar10_resnet20", args.classifier, epochs=args.classifier_epochs,
                                 optimizer="sgd", lr=0.1, warmup_epochs=1, val_fraction=args.val_fraction, seed=seed0)
    val = validation_images(data, args.val_fraction, seed0, args.max_val)
    test = load_dataset(data, "test").sample(args.max_test, seed0)

    done: dict[tuple, tuple[str, dict]] = {}  # the first seed's pilot of a chosen setting is reused for the test

    def trained(mode: str, lam: float, clr: float | None, seed: int) -> tuple[str, dict]:
        if (mode, lam, clr, seed) not in done:
            done[mode, lam, clr, seed] = train_once(mode, lam, clr, seed)
        return done[mode, lam, clr, seed]

    def train_once(mode: str, lam: float, clr: float | None, seed: int) -> tuple[str, dict]:
        out = args.runs / (f"cifar10_{args.generator}{args.tag}_{mode}_l{lam:g}" + (f"_clr{clr:g}" if clr else "") + f"_s{seed}")
        if args.reuse and (out / "nice.pt").exists():
            return str(out / "nice.pt"), {"history": load_checkpoint(out / "nice.pt").metrics["history"], "train_wall_s": None}
        cfg = NiceConfig(overwrite=True, data=str(data), classifier=clf_path, out=str(out), generator=args.generator, mode=mode,
                         train_blocks=args.train_blocks if mode == "finetuned" else [], block_size=TRAIN_B, lambda_l0=lam,
                         lambda_smooth=args.lambda_smooth, optimizer="adam", lr=args.lr, classifier_lr=clr, epochs=args.epochs,
                         max_train=args.max_train, max_test=args.max_test, val_fraction=args.val_fraction, seed=seed, progress=False,
                         command=" ".join(sys.argv))
        t0 = time.time()
        summary = train_nice(cfg)
        return summary["checkpoint"], {"history": summary["history"], "train_wall_s": round(time.time() - t0, 1)}

    def pilot(mode: str, lam: float, clr: float | None) -> dict:
        path, info = trained(mode, lam, clr, seed0)
        gen, clf, ckpt = load_nice(path)
        result = benchmark_nice(gen, clf, ckpt, val, [TRAIN_B], [], seed=seed0)  # selection needs NICE's accuracy and kept fraction only
        row = result["per_block_size"][0]
        print(f"pilot {mode} λ1={lam:g} clr={clr}: val kept {result['kept_fraction']:.3f}  NICE {row['nice']['accuracy']:.4f} "
              f"(soft {row['nice_soft']['accuracy']:.4f}, mean ẑ {result['mean_mask']:.3f})", flush=True)
        return {"mode": mode, "lambda_l0": lam, "classifier_lr": clr, "kept_fraction": result["kept_fraction"], "mean_mask": result["mean_mask"],
                "val": row, **info}

    def tested(mode: str, lam: float, clr: float | None, seeds: list[int], fixed_ranks: torch.Tensor | None) -> dict:
        runs = []
        for seed in seeds:
            path, info = trained(mode, lam, clr, seed)
            gen, clf, ckpt = load_nice(path)
            norm = ckpt.normalization
            ranks = fixed_ranks if mode == "fixed" else (backselect_ranks(clf, TensorImages(test, norm.mean, norm.std), args.sis_k) if args.sis_k else None)
            result = benchmark_nice(gen, clf, ckpt, test, EVAL_B, args.qualities, seed=seed, sis_ranks=ranks, coded_block_sizes=args.coded_b)
            for row in result["per_block_size"]:
                row["original_matching"] = {c: best_codec_at(result["original"]["codecs"], row["nice"]["accuracy"], c) for c in ("png", "jpeg", "webp")}
            runs.append({"seed": seed, **info, **result})
            print(mode, seed, [(r["block_size"], round(r["nice"]["accuracy"], 4), round(r["nice_soft"]["accuracy"], 4)) for r in result["per_block_size"]], flush=True)
        return {"mode": mode, "lambda_l0": lam, "classifier_lr": clr, "per_seed": runs, "summary": summarise_runs(runs)}

    pilots = [pilot("fixed", lam, None) for lam in args.lambdas]
    chosen_fixed = choose(pilots, args.max_kept)
    print("fixed mode, chosen on validation:", chosen_fixed and chosen_fixed["lambda_l0"], flush=True)
    finetune_pilots = [pilot("finetuned", args.finetune_lambda, clr) for clr in args.classifier_lrs] if args.finetune_lambda else []
    chosen_ft = choose(finetune_pilots, args.max_kept)
    print("finetuned mode, chosen on validation:", chosen_ft and chosen_ft["classifier_lr"], flush=True)

    runs = {}
    if chosen_fixed:
        norm = load_checkpoint(clf_path).normalization
        ranks = backselect_ranks(load_classifier(clf_path)[0], TensorImages(test, norm.mean, norm.std), args.sis_k) if args.sis_k else None
        runs["fixed"] = tested("fixed", chosen_fixed["lambda_l0"], None, args.seeds, ranks)
    if chosen_ft:
        runs["finetuned"] = tested("finetuned", args.finetune_lambda, chosen_ft["classifier_lr"], args.finetune_seeds, None)

    out_dir = results_dir()
    series_acc, series_bytes = {}, {}
    for mode, run in runs.items():
        rows = run["summary"]["per_block_size"]
        bs = [r["block_size"] for r in rows]
        series_acc[f"NICE {mode} (ẑ > 0.5)"] = (bs, [r["nice"]["accuracy"]["mean"] for r in rows])
        series_acc[f"NICE {mode}, soft ẑ"] = (bs, [r["nice_soft"]["accuracy"]["mean"] for r in rows])
        for m in ("sis_backselect", "saliency_topk", "random"):
            if m in rows[0]:
                series_acc[f"{m} at {mode}'s budget"] = (bs, [r[m]["accuracy"]["mean"] for r in rows])
        series_bytes[f"NICE {mode} (PNG of x̃)"] = (bs, [r["nice"]["png_bytes_per_image"]["mean"] for r in rows])
        series_bytes[f"NICE {mode} (lossless payload)"] = (bs, [r["payloads"][0]["bytes_per_image"]["mean"] for r in rows])
    if runs:
        plot_curves(out_dir / f"nice_cifar10{args.tag}_b_accuracy.png", series_acc, "block size b", "test accuracy",
                    f"CIFAR-10 ResNet-20, trained at b={TRAIN_B}, mean over seeds", logx=True)
        plot_curves(out_dir / f"nice_cifar10{args.tag}_b_bytes.png", series_bytes, "block size b", "bytes per image", f"CIFAR-10 ({len(test)} test images)", logx=True)
    payload = {
        "protocol": {
            "data": str(data), "classifier": clf_path, "train_images": args.max_train, "val_fraction": args.val_fraction,
            "validation_images": len(val), "test_images": len(test), "train_block_size": TRAIN_B, "eval_block_sizes": list(EVAL_B),
            "coded_block_sizes": args.coded_b,
            "generator": args.generator, "lambda_smooth": args.lambda_smooth, "optimizer": "adam", "lr": args.lr, "epochs": args.epochs,
            "train_blocks_finetuned": args.train_blocks, "seeds_fixed": args.seeds, "seeds_finetuned": args.finetune_seeds,
            "selection": f"highest validation accuracy of NICE (ẑ > 0.5) at b = {TRAIN_B} among pilots keeping <= {args.max_kept} of the pixels "
                         f"(seed {seed0}; fixed: λ1 in {args.lambdas}; finetuned: classifier lr in {args.classifier_lrs} at λ1 = {args.finetune_lambda}); "
                         "test evaluated only for the chosen settings",
            "budget": f"NICE = binary ẑ > 0.5; SIS (gradient BackSelect, k = {args.sis_k}), saliency and random keep the same per-image pixel "
                      "count; nice_soft = the soft ẑ, not at that budget",
            "matching": "smallest original-image PNG/JPEG/WebP (qualities listed) whose accuracy reaches binary NICE's at that b, per seed",
        },
        "classifier_metrics": checkpoint_record(load_checkpoint(clf_path)),
        "pilots_validation": pilots + finetune_pilots,
        "chosen": {"fixed_lambda_l0": chosen_fixed and chosen_fixed["lambda_l0"], "finetuned_classifier_lr": chosen_ft and chosen_ft["classifier_lr"]},
        "runs": runs,
        "wall_time_s": round(time.time() - started, 1),
    }
    print(write_result(f"nice_cifar10{args.tag}", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
