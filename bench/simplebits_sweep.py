"""SimpleBits Fig. 5 on CPU-sized subsets: λ_sim sweep → accuracy vs bpd of the simplified
test images for joint training, retraining from scratch on simplified images and
finetuning a pretrained classifier; optional S7 baselines (Gaussian blur, JPEG quality, simplifier on MSE + bpd)
scored with the same protocol (fresh classifier trained on the transformed train images,
tested on the transformed test images; bpd under the same density model).

    OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/simplebits_sweep.py --dataset mnist

Writes ``bench/results/simplebits_sweep_<dataset>.json`` after every run (partial results survive),
``..._images.png`` (the same test images after each transform) and ``..._curve.png`` (Fig. 5:
accuracy vs bpd per mode).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, require_data, results_dir, save_image_rows, write_result  # noqa: E402


def gaussian_blur(x, sigma: float):
    """Separable Gaussian blur (reflect padding) of N×C×H×W [0, 1] images, rounded to 8 bits like
    the simplified images (no sub-quantisation detail reaches the bpd or the classifier)."""
    import torch
    import torch.nn.functional as F

    from keepbits.training.simplebits import quantize_8bit

    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return quantize_8bit(F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=x.shape[1]))


def jpeg(x, quality: int):
    """JPEG round trip (:func:`keepbits.codec.encode_image`) of N×C×H×W [0, 1] images at ``quality``."""
    import torch

    from keepbits.codec import decode_image, encode_image

    out = [decode_image(encode_image(img, "jpeg", quality), "jpeg") for img in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def plot_curve(rows: list[dict], path: Path) -> None:
    """Fig. 5-style plot: test accuracy vs mean bpd, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["bpd"], r["accuracy"]) for r in rows if r["mode"] == mode)
        ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "o", label=mode)
    ax.set_xlabel("bits per dimension of the test images (density model)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p, "mnist/ and cifar10/")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--density", default=None)
    p.add_argument("--arch", default="nf_wrn16_2")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--lambdas", type=float, nargs="*", default=[0.3, 1.0, 3.0], help="λ_sim values (none: baselines only)")
    p.add_argument("--modes", nargs="+", default=["joint", "retrain", "finetune"], choices=["joint", "retrain", "finetune"])
    p.add_argument("--steps", type=int, default=60, help="joint / finetune steps per λ")
    p.add_argument("--retrain-from", choices=["joint", "finetune"], default="joint",
                   help="whose simplifier's images the 'retrain' mode trains a fresh classifier on (the paper: joint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sim-lr", type=float, default=5e-4, help="simplifier AdamW lr (the paper's 5e-4; 2e-3 diverged in joint training, docs/simplebits.md)")
    p.add_argument("--inner-lr", type=float, default=None, help="lr of the unrolled AdamW step of the classifier (default: the classifier's lr, as in the paper)")
    p.add_argument("--unet-base", type=int, default=8)
    p.add_argument("--classifier-steps", type=int, default=150, help="plain AdamW steps for baseline / retrained classifiers")
    p.add_argument("--blur-sigmas", type=float, nargs="*", default=[])
    p.add_argument("--jpeg-qualities", type=int, nargs="*", default=[])
    p.add_argument("--mse-lambdas", type=float, nargs="*", default=[], help="S7 baseline: simplifier trained on MSE + λ·bpd")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of every initialisation and batch order (the data samples stay seed 0)")
    p.add_argument("--device", default=None, help="torch device of the SimpleBits training, e.g. cuda (fresh classifiers use CUDA when present)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()
    require_data(p, args.data, args.dataset)

    import torch

    from keepbits.data import channel_stats, load_dataset
    from keepbits.core import accuracy
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
    from keepbits.training.classifier import fit_classifier, predict_logits
    from keepbits.training.data import TensorArrays
    from keepbits.training.density import images_to_unit, load_density
    from keepbits.training.simplebits import (
        SimpleBitsConfig, build_classifier, load_simplebits, mean_bpd, retrain_config, simplify, train_mse_simplifier, train_simplebits,
    )
    from keepbits import registry

    torch.set_num_threads(args.threads)
    root = Path(args.data) / args.dataset
    train, test = load_dataset(root, "train"), load_dataset(root, "test")
    train, test = train.sample(args.max_train), test.sample(args.max_test)
    xtr, ytr = images_to_unit(train.x), torch.from_numpy(train.y)
    xte, yte = images_to_unit(test.x), torch.from_numpy(test.y)
    mean, std = channel_stats(train.x)
    flow = load_density(args.density).to(args.device or "cpu")
    c, h, w = train.shape_chw
    work = Path(tempfile.mkdtemp(prefix="simplebits_sweep_"))
    rows: list[dict] = []
    name = f"simplebits_sweep_{args.dataset}{'_' + args.tag if args.tag else ''}"

    strips: list[tuple[str, np.ndarray]] = []
    shown_idx = torch.linspace(0, len(xte) - 1, 10).long()  # spread over the (class-ordered) test subset

    def record(row: dict, images: torch.Tensor) -> None:
        """``images``: the transformed test set, or just its ``shown_idx`` images."""
        rows.append(row)
        shown = images[shown_idx] if len(images) == len(xte) else images
        strips.append((" ".join(f"{v:g}" if isinstance(v, float) else str(v) for k, v in row.items() if k in ("mode", "lambda_sim", "sigma", "quality")), shown.numpy()))
        save_image_rows(strips, results_dir() / f"{name}_images.png")
        plot_curve(rows, results_dir() / f"{name}_curve.png")
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_result(name, {"settings": vars(args), "sizes": {"train": len(train), "test": len(test)}, "rows": rows,
                            "protocol": "accuracy on simplified/transformed test images; bpd = mean test bpd under the density model"})

    def fresh_fit(x_train) -> torch.nn.Module:
        torch.manual_seed(args.seed)
        clf, _ = build_classifier(args.arch, c, train.num_classes, (h, w), mean, std)
        return fit_classifier(clf, TensorArrays(x_train, ytr), retrain_config(args.classifier_steps, args.batch_size, seed=args.seed))

    t0 = time.time()
    base = fresh_fit(xtr)
    record({"mode": "original", "bpd": mean_bpd(flow, xte), "accuracy": accuracy(predict_logits(base, xte), yte), "wall_s": time.time() - t0}, xte)
    pretrained = work / "pretrained.pt"
    save_checkpoint(pretrained, Checkpoint(
        kind="classifier", models={"classifier": ModelEntry.of(args.arch, {"in_channels": c, "num_classes": train.num_classes, "image_size": [h, w]}, base.net.cpu())},
        input_shape=[c, h, w], normalization=Normalization(mean, std), class_names=train.class_names))

    for sigma in args.blur_sigmas:
        t0 = time.time()
        clf = fresh_fit(gaussian_blur(xtr, sigma))
        xb = gaussian_blur(xte, sigma)
        record({"mode": "blur", "sigma": sigma, "bpd": mean_bpd(flow, xb), "accuracy": accuracy(predict_logits(clf, xb), yte), "wall_s": time.time() - t0}, xb)
    for q in args.jpeg_qualities:
        t0 = time.time()
        clf = fresh_fit(jpeg(xtr, q))
        xj = jpeg(xte, q)
        record({"mode": "jpeg", "quality": q, "bpd": mean_bpd(flow, xj), "accuracy": accuracy(predict_logits(clf, xj), yte), "wall_s": time.time() - t0}, xj)
    for lam in args.mse_lambdas:
        t0 = time.time()
        torch.manual_seed(args.seed)
        sim = registry.build("simplebits_unet", kind="simplifier", in_channels=c, base=args.unet_base)
        sim = train_mse_simplifier(sim, flow, xtr, lam, args.steps, args.batch_size, lr=args.sim_lr, seed=args.seed)
        clf = fresh_fit(simplify(sim, xtr))
        xs = simplify(sim, xte)
        record({"mode": "mse_bpd", "lambda_sim": lam, "bpd": mean_bpd(flow, xs), "accuracy": accuracy(predict_logits(clf, xs), yte), "wall_s": time.time() - t0}, xs)

    for lam in args.lambdas:
        for mode in [m for m in ("joint", "finetune") if m in args.modes or (m == args.retrain_from and "retrain" in args.modes)]:
            t0 = time.time()
            out = work / f"{mode}_{lam}.pt"
            cfg = SimpleBitsConfig(overwrite=True, data=str(root), out=str(out), density=args.density, arch=args.arch, lambda_sim=lam,
                                   steps=args.steps, batch_size=args.batch_size, sim_lr=args.sim_lr, inner_lr=args.inner_lr, unet_base=args.unet_base,
                                   max_train=args.max_train, max_test=args.max_test, threads=args.threads, seed=args.seed, device=args.device or "cpu",
                                   classifier=str(pretrained) if mode == "finetune" else None)
            m = train_simplebits(cfg)["metrics"]
            simplifier, _, _ = load_simplebits(out)
            if mode in args.modes:
                record({"mode": mode, "lambda_sim": lam, "bpd": m["bpd_sim"], "accuracy": m["acc_sim"], "acc_orig": m["acc_orig"],
                        "gate_open": m["gate_open"], "wall_s": time.time() - t0},
                       simplify(simplifier, xte[shown_idx]))
            if mode == args.retrain_from and "retrain" in args.modes:
                t0 = time.time()
                clf = fresh_fit(simplify(simplifier, xtr))
                xs = simplify(simplifier, xte)
                record({"mode": "retrain", "simplifier_from": mode, "lambda_sim": lam, "bpd": mean_bpd(flow, xs), "accuracy": accuracy(predict_logits(clf, xs), yte),
                        "wall_s": time.time() - t0}, xs)


if __name__ == "__main__":
    main()
