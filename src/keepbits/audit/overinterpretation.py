"""Overinterpretation audit (Carter et al. 2021, "Overinterpretation reveals image
classification model pathologies").

Pipeline (§3–4):

1. BackSelect orders of train and test images under the original model (Batched Gradient
   BackSelect, §3.2/S5, or exact BackSelect); keep the top ``fraction`` (default 5%) of
   pixels per image, mask the rest (§4.1).
2. Retrain a fresh classifier on the kept subsets and test it on the test subsets; baseline:
   the same fraction of random pixels per image (fixed per image); the original model is
   also evaluated on both kinds of subsets (Table 1).
3. SIS sizes at several τ, sizes of correctly vs wrongly classified images with 95% CIs
   (§4.4), and pixel-location frequency heatmaps (Fig. 2).
4. Mitigations (§4.5): an ensemble (mean logits) and input dropout (keep ``p`` at train and
   test time), with their SIS sizes and accuracies.

Per-image orders come from :func:`keepbits.audit.sis_orders.compute_orders` (sharded over
``torchrun`` processes, cached chunk by chunk, resumable). Models are trained once (rank 0)
by the one classifier trainer, :func:`keepbits.training.classifier.fit_classifier` (SGD with
Nesterov momentum, 15% warm-up then cosine decay, flips for colour images), and cached as
keepbits checkpoints that resumed runs and the other ranks load.

Example:
    >>> from keepbits.audit.overinterpretation import random_subsets
    >>> import numpy as np
    >>> random_subsets(np.ones((2, 1, 4, 5), np.float32), 0.1, seed=0).reshape(2, -1).sum(1).tolist()
    [2.0, 2.0]
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from keepbits.audit._base import ModelAdapter, TorchAdapter, load_model
from keepbits.audit.sis import BackSelectResult, find_sis
from keepbits.audit.sis_orders import compute_orders
from keepbits.core import accuracy
from keepbits.errors import InputError
from keepbits.training.distributed import Dist, barrier, init_distributed


def keep_count(pixels: int, fraction: float) -> int:
    """Pixels kept for a ``fraction`` subset (at least one)."""
    return max(1, int(math.ceil(fraction * pixels)))


def backselect_subsets(x: np.ndarray, orders: Sequence[BackSelectResult], fraction: float, mask_value: float = 0.0) -> np.ndarray:
    """Keep the last ``fraction`` of each BackSelect order (the most important pixels), mask the rest."""
    n, c, h, w = x.shape
    keep = np.zeros((n, h * w), bool)
    k = keep_count(h * w, fraction)
    for i, r in enumerate(orders):
        keep[i, r.order[-k:]] = True
    return np.where(keep.reshape(n, 1, h, w), x, np.float32(mask_value)).astype(np.float32)


def random_subsets(x: np.ndarray, fraction: float, seed: int, mask_value: float = 0.0) -> np.ndarray:
    """Keep ``fraction`` random pixels per image (image ``i`` uses generator ``(seed, i)``: fixed per image)."""
    n, c, h, w = x.shape
    k = keep_count(h * w, fraction)
    keep = np.zeros((n, h * w), bool)
    for i in range(n):
        keep[i, np.random.default_rng([seed, i]).choice(h * w, k, replace=False)] = True
    return np.where(keep.reshape(n, 1, h, w), x, np.float32(mask_value)).astype(np.float32)


# ----------------------------------------------------------------------------- statistics

def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% normal-approximation confidence half-width (1.96·s/√n)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(half), "n": int(len(v))}


def sis_size_stats(orders: Sequence[BackSelectResult], labels: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per τ: how many images reach τ, mean SIS size (fraction of pixels), and sizes of
    correctly vs wrongly classified images with 95% CIs (§4.4)."""
    rows = []
    for tau in thresholds:
        sizes, right, wrong = [], [], []
        for r, label in zip(orders, labels):
            sis = find_sis(r, tau)
            if sis is None:
                continue
            frac = len(sis) / (r.shape[0] * r.shape[1])
            sizes.append(frac)
            (right if r.target == label else wrong).append(frac)
        rows.append({"threshold": tau, "images_at_threshold": len(sizes), "images": len(orders),
                     "size": mean_ci(sizes), "size_correct": mean_ci(right), "size_wrong": mean_ci(wrong)})
    return rows


def location_frequency(orders: Sequence[BackSelectResult], threshold: float) -> np.ndarray:
    """Fraction of images (reaching τ) whose SIS holds each pixel (Fig. 2), H×W."""
    h, w = orders[0].shape
    count, n = np.zeros(h * w), 0
    for r in orders:
        sis = find_sis(r, threshold)
        if sis is not None:
            count[sis] += 1
            n += 1
    return (count / max(n, 1)).reshape(h, w)


# ----------------------------------------------------------------------------- pipeline

@dataclass
class OverinterpretationConfig:
    """Settings of ``keepbits audit overinterpretation`` (defaults: the paper's 5% subsets)."""

    data: str
    out: str
    model: str | None = None
    arch: str = "resnet20"
    epochs: int = 30
    retrain_epochs: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    fraction: float = 0.05
    method: str = "gradient"
    k: int = 16
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    ensemble: int = 3
    keep_prob: float = 0.8
    dropout_samples: int = 4
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    progress: bool = True


def run_overinterpretation(cfg: OverinterpretationConfig) -> dict[str, Any]:
    """Run the whole pipeline; rank 0 writes ``cfg.out/report.html`` and ``report.json``; returns the results.

    Example (tiny, on the bundled MNIST sample):
        >>> import tempfile
        >>> from keepbits.data import sample_mnist_path
        >>> from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
        >>> cfg = OverinterpretationConfig(str(sample_mnist_path()), tempfile.mkdtemp(), arch="lenet5", epochs=1,
        ...     train_images=64, test_images=32, k=98, ensemble=2, progress=False)
        >>> sorted(run_overinterpretation(cfg)["accuracy"])[:2]
        ['ensemble_full', 'input_dropout_full']
    """
    from keepbits.data import channel_stats, has_split, load_dataset

    started = time.time()
    if not 0 < cfg.fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {cfg.fraction}")
    if not has_split(cfg.data, "test"):
        raise InputError(f"{cfg.data}: needs a test split next to the train split")
    train_set, test_set = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
    rng = np.random.default_rng(cfg.seed)
    tr_idx = np.sort(rng.permutation(len(train_set))[: cfg.train_images]) if cfg.train_images else np.arange(len(train_set))
    # random subsets (seeded, sorted): data sets stored by class must not give one-class subsets
    te_idx = np.sort(rng.permutation(len(test_set))[: cfg.test_images]) if cfg.test_images else np.arange(len(test_set))
    out = Path(cfg.out)
    dist = init_distributed(use_cuda=False)
    classes = train_set.class_names
    retrain_epochs = cfg.retrain_epochs or cfg.epochs
    if cfg.model:
        original = load_model(cfg.model)
    else:
        mean, std = channel_stats(train_set.x)
        norm = ModelAdapter(train_set.shape_chw, mean=mean, std=std)
        original = _trained(out / "models" / "original.pt", cfg, norm.normalize(train_set.x[tr_idx]), train_set.y[tr_idx], classes,
                            mean, std, cfg.epochs, cfg.seed, dist)
    if original.torch_module is None and cfg.method == "gradient":
        raise InputError(f"{cfg.model}: gradient BackSelect needs a torch checkpoint (use --method exact for ONNX)")
    xtr, ytr = original.normalize(train_set.x[tr_idx]), train_set.y[tr_idx]
    xte, yte = original.normalize(test_set.x[te_idx]), test_set.y[te_idx]
    orders_tr = compute_orders(original, xtr, out / "orders" / "original_train", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)
    orders_te = compute_orders(original, xte, out / "orders" / "original_test", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)
    bs_tr, bs_te = backselect_subsets(xtr, orders_tr, cfg.fraction), backselect_subsets(xte, orders_te, cfg.fraction)
    rnd_tr, rnd_te = random_subsets(xtr, cfg.fraction, cfg.seed), random_subsets(xte, cfg.fraction, cfg.seed + 1)

    shape, mean, std = original.input_shape, original.mean.tolist(), original.std.tolist()

    def trained(name: str, x: np.ndarray, y: np.ndarray, seed: int, keep: float | None = None) -> TorchAdapter:
        return _trained(out / "models" / f"{name}.pt", cfg, x, y, classes, mean, std, retrain_epochs, seed, dist, keep)

    retrained_bs = trained("retrained_backselect", bs_tr, ytr, cfg.seed + 10)
    retrained_rnd = trained("retrained_random", rnd_tr, ytr, cfg.seed + 20)
    from keepbits.audit._mitigations import Ensemble

    members = [original.torch_module] + [trained(f"ensemble_member_{i}", xtr, ytr, cfg.seed + 100 + i).torch_module for i in range(1, cfg.ensemble)]
    ensemble = TorchAdapter(Ensemble(members), shape, mean=mean, std=std)
    dropout = trained("input_dropout", xtr, ytr, cfg.seed + 30, cfg.keep_prob)
    orders_ens = compute_orders(ensemble, xte, out / "orders" / "ensemble_test", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)
    orders_drop = compute_orders(dropout, xte, out / "orders" / "input_dropout_test", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)

    pct = f"{cfg.fraction:.0%}"
    acc = {
        "original_full": accuracy(original.logits(xte), yte),
        "original_backselect": accuracy(original.logits(bs_te), yte),
        "original_random": accuracy(original.logits(rnd_te), yte),
        "retrained_backselect": accuracy(retrained_bs.logits(bs_te), yte),
        "retrained_random": accuracy(retrained_rnd.logits(rnd_te), yte),
        "ensemble_full": accuracy(ensemble.logits(xte), yte),
        "input_dropout_full": accuracy(dropout.logits(xte), yte),
    }
    sizes = {name: sis_size_stats(o, yte, cfg.thresholds) for name, o in
             (("original", orders_te), ("ensemble", orders_ens), ("input_dropout", orders_drop))}
    heat_tau = cfg.thresholds[len(cfg.thresholds) // 2]
    heatmaps = {name: location_frequency(o, heat_tau) for name, o in (("original", orders_te), ("ensemble", orders_ens), ("input_dropout", orders_drop))}
    result = {
        "settings": asdict(cfg), "train_images": int(len(tr_idx)), "test_images": int(len(te_idx)),
        "pixels": int(shape[1] * shape[2]), "kept_pixels": keep_count(shape[1] * shape[2], cfg.fraction),
        "accuracy": acc, "sis_sizes": sizes, "heatmap_threshold": heat_tau, "wall_time_s": round(time.time() - started, 1),
    }
    if dist.rank == 0:
        _write_report(out, cfg, result, heatmaps, test_set.x[te_idx], orders_te, original, pct)
    return result


def _trained(path: Path, cfg: OverinterpretationConfig, x: np.ndarray, y: np.ndarray, class_names: Sequence[str], mean: Sequence[float],
             std: Sequence[float], epochs: int, seed: int, dist: Dist, keep: float | None = None) -> TorchAdapter:
    """A fresh ``cfg.arch`` trained on normalised N×C×H×W ``x`` (with input dropout ``keep``, §4.5)
    by the one classifier trainer, once (rank 0), saved as a classifier checkpoint at ``path``;
    other ranks and resumed runs load it."""
    import torch

    from keepbits import registry
    from keepbits.audit._mitigations import InputDropout
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint
    from keepbits.training.classifier import FitConfig, fit_classifier
    from keepbits.training.data import TensorArrays

    shape = list(x.shape[1:])
    if dist.main and not path.exists():
        torch.manual_seed(seed)
        kwargs = {"in_channels": shape[0], "num_classes": len(class_names), "image_size": shape[1:]}
        net = registry.build(cfg.arch, **kwargs)
        fit = FitConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="sgd", lr=cfg.lr, momentum=0.9, weight_decay=5e-4,
                        schedule="cosine", warmup_epochs=0.15 * epochs, augment="auto", crop_padding=0, seed=seed, progress=cfg.progress)
        fit_classifier(net if keep is None else InputDropout(net, keep, cfg.dropout_samples, seed), TensorArrays(x, y), fit)
        save_checkpoint(path, Checkpoint(kind="classifier", models={"classifier": ModelEntry.of(cfg.arch, kwargs, net)}, input_shape=shape,
                                         normalization=Normalization(list(mean), list(std)), class_names=list(class_names),
                                         settings={**asdict(fit), "input_dropout_keep": keep}, epoch=epochs - 1))
    barrier(dist)
    net = build_model(load_checkpoint(path, "classifier"), "classifier").eval()
    if keep is not None:
        net = InputDropout(net, keep, cfg.dropout_samples).eval()
    return TorchAdapter(net, shape, mean=mean, std=std)


def _write_report(out: Path, cfg: OverinterpretationConfig, result: dict[str, Any], heatmaps: dict[str, np.ndarray],
                  images: np.ndarray, orders: Sequence[BackSelectResult], original: ModelAdapter, pct: str) -> None:
    from keepbits.report import Report, overlay

    acc = result["accuracy"]
    report = Report("Overinterpretation audit", meta={"data": cfg.data, "model": cfg.model or f"{cfg.arch} trained here ({cfg.epochs} epochs)",
                    "train images": result["train_images"], "test images": result["test_images"], "method": cfg.method,
                    "k (pixels per gradient step)": cfg.k if cfg.method == "gradient" else "-", "subset": f"{pct} = {result['kept_pixels']} pixels"})
    s = report.section("Table 1: accuracy on pixel subsets",
                       f"Top-{pct} BackSelect subsets vs {pct} random pixels (fixed per image), rest masked to the mean.")
    s.table([
        {"model": "original", "trained on": "full images", "tested on": "full images", "accuracy": acc["original_full"]},
        {"model": "original", "trained on": "full images", "tested on": f"{pct} BackSelect", "accuracy": acc["original_backselect"]},
        {"model": "original", "trained on": "full images", "tested on": f"{pct} random", "accuracy": acc["original_random"]},
        {"model": "retrained", "trained on": f"{pct} BackSelect", "tested on": f"{pct} BackSelect", "accuracy": acc["retrained_backselect"]},
        {"model": "retrained", "trained on": f"{pct} random", "tested on": f"{pct} random", "accuracy": acc["retrained_random"]},
        {"model": f"ensemble of {cfg.ensemble}", "trained on": "full images", "tested on": "full images", "accuracy": acc["ensemble_full"]},
        {"model": f"input dropout keep {cfg.keep_prob}", "trained on": "full images", "tested on": "full images", "accuracy": acc["input_dropout_full"]},
    ])
    s = report.section("SIS size vs threshold", "Mean SIS size (fraction of pixels) of test images reaching τ, 95% CI.")
    s.line_plot({name: (cfg.thresholds, [r["size"]["mean"] for r in rows]) for name, rows in result["sis_sizes"].items()},
                xlabel="threshold τ", ylabel="SIS size (fraction of pixels)",
                errors={name: [r["size"]["ci95"] for r in rows] for name, rows in result["sis_sizes"].items()})
    s.table([{"model": name, "τ": r["threshold"], "images ≥ τ": f"{r['images_at_threshold']}/{r['images']}",
              "size": r["size"]["mean"], "±95%": r["size"]["ci95"], "correct": r["size_correct"]["mean"], "±95% ": r["size_correct"]["ci95"],
              "wrong": r["size_wrong"]["mean"], "± 95%": r["size_wrong"]["ci95"]}
             for name, rows in result["sis_sizes"].items() for r in rows])
    s = report.section("Where SIS pixels lie (Fig. 2)", f"Fraction of test images (f ≥ τ = {result['heatmap_threshold']}) whose SIS holds each pixel.")
    for name, heat in heatmaps.items():
        s.heatmap(heat, title=name, cmap="magma")
    s = report.section(f"Examples: {pct} BackSelect subsets", "Original | kept pixels (red) | what the retrained model sees.")
    x = original.normalize(images[:8])
    masked = original.denormalize(backselect_subsets(x, orders[:8], cfg.fraction))
    tiles, titles = [], []
    k = result["kept_pixels"]
    for img, r, m in zip(images[:8], orders[:8], masked):
        keep = np.zeros(r.shape[0] * r.shape[1], bool)
        keep[r.order[-k:]] = True
        tiles += [img, overlay(img, keep.reshape(r.shape)), m]
        titles += [f"class {r.target}", "subset", "masked"]
    s.image_grid(tiles, titles, cols=6)
    report.data = result
    report.write(out)
