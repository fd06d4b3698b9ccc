"""Helpers shared by the NICE benchmark scripts (bench/nice_*.py): classifier on demand, the
validation images settings are chosen on, per-seed summaries, the rate–accuracy summary and the
figures.

Protocol of every NICE bench: the classifier is trained with a stratified validation split held
out of the training data (``val_fraction``, seed); NICE uses the same split (``NiceConfig``'s
``val_fraction``/``seed``), pilots are scored on those validation images and the setting is
chosen there by a rule fixed in advance; the test images are evaluated once, for the chosen
setting, over several training seeds (mean ± spread)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np


def ensure_classifier(data: Path, arch: str, out: Path, given: str | None, **train: Any) -> str:
    """``given`` if set; else ``out/last.pt``, trained now with ``train`` settings when missing."""
    if given:
        return given
    path = out / "last.pt"
    if not path.exists():
        from keepbits.training.classifier import ClassifierConfig, train_classifier

        logging.getLogger("keepbits").info("training %s on %s into %s", arch, data, out)
        train_classifier(ClassifierConfig(data=str(data), arch=arch, out=str(out), progress=False, **train))
    return str(path)


def validation_images(data: Path, val_fraction: float, seed: int, count: int | None) -> Any:
    """The validation images NICE holds out (:func:`keepbits.data.train_val_split` of ``data``'s
    training split, as ``train_nice`` with this ``val_fraction`` and ``seed``), a seeded
    class-balanced sample of ``count`` of them."""
    from keepbits.data import load_dataset, train_val_split

    full = load_dataset(data, "train")
    _, val_idx = train_val_split(full.y, val_fraction, seed)
    return full.subset(val_idx, "[val]").sample(count, seed)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over seeds (and the values)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max()),
            "n": int(len(v)), "values": [float(x) for x in v]}


#: methods of a ``benchmark_nice`` row: NICE's binary mask, the baselines at its per-image budget, the soft ẑ
METHODS = ("nice", "sis_backselect", "saliency_topk", "random", "nice_soft")
BASELINES = ("sis_backselect", "saliency_topk", "random")


def summarise_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed ``benchmark_nice`` results of one setting → mean ± spread per block size: accuracy
    and PNG bytes of every method, NICE (binary) minus each baseline per seed, payload bytes and
    accuracy per codec setting."""
    out: dict[str, Any] = {"seeds": len(results), "kept_fraction": spread([r["kept_fraction"] for r in results]),
                           "mean_mask": spread([r["mean_mask"] for r in results]), "per_block_size": []}
    for i, row in enumerate(results[0]["per_block_size"]):
        rows = [r["per_block_size"][i] for r in results]
        entry: dict[str, Any] = {"block_size": row["block_size"]}
        for m in METHODS:
            if m in row:
                entry[m] = {k: spread([r[m][k] for r in rows]) for k in ("accuracy", "png_bytes_per_image")}
        entry["nice_minus"] = {m: spread([r["nice"]["accuracy"] - r[m]["accuracy"] for r in rows]) for m in BASELINES if m in row}
        entry["payloads"] = [{"codec": p["codec"], "quality": p["quality"],
                              "bytes_per_image": spread([r["nice"]["payloads"][j]["bytes_per_image"] for r in rows]),
                              "accuracy": spread([r["nice"]["payloads"][j]["accuracy"] for r in rows])}
                             for j, p in enumerate(row["nice"]["payloads"])]
        out["per_block_size"].append(entry)
    return out


def choose(pilots: list[dict[str, Any]], max_kept: float) -> dict[str, Any] | None:
    """The selection rule of the NICE benches, fixed before a run: among pilots (rows with
    ``kept_fraction`` and ``val``, a ``benchmark_nice`` row on validation images) keeping at most
    ``max_kept`` of the pixels, the one with the highest validation accuracy of binary NICE
    (ties: fewer pixels); None when no pilot qualifies."""
    eligible = [q for q in pilots if q["kept_fraction"] <= max_kept]
    return max(eligible, key=lambda q: (q["val"]["nice"]["accuracy"], -q["kept_fraction"])) if eligible else None


def best_codec_at(rows: list[dict[str, Any]], accuracy: float, codec: str) -> dict[str, Any] | None:
    """The smallest ``codec`` row (bytes) whose accuracy reaches ``accuracy``; None if none does."""
    ok = [r for r in rows if r["codec"] == codec and r["accuracy"] >= accuracy]
    return min(ok, key=lambda r: r["bytes_per_image"]) if ok else None


def masks_and_mixed(generator: Any, checkpoint: Any, images: Any, block: int) -> tuple[np.ndarray, np.ndarray]:
    """ẑ (N×H×W) and x̃ (uint8 N×H×W×C) of a small ``ImageDataset`` under a trained generator."""
    import torch

    from keepbits.training.data import TensorImages
    from keepbits.training.nice import mask_and_mix
    from keepbits.training.nice_eval import to_uint8

    mean, std = checkpoint.normalization.mean, checkpoint.normalization.std
    x, _ = next(TensorImages(images, mean, std).batches(len(images)))
    with torch.no_grad():
        z_hat, mixed = mask_and_mix(generator, x, block)
    return z_hat[:, 0].numpy(), to_uint8(mixed, mean, std)


def plot_masks(path: Path, images: np.ndarray, masks: list[np.ndarray], mixed: list[np.ndarray], titles: list[str]) -> None:
    """A grid like NICE Fig. 2: originals, then ẑ and x̃ for each setting (rows: images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = 1 + 2 * len(masks)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n), squeeze=False)
    gray = images.shape[-1] == 1
    show = (lambda a: a[..., 0]) if gray else (lambda a: a)
    for i in range(n):
        axes[i, 0].imshow(show(images[i]), cmap="gray" if gray else None, vmin=0, vmax=255)
        for j, (m, x) in enumerate(zip(masks, mixed)):
            axes[i, 1 + 2 * j].imshow(m[i], cmap="viridis", vmin=0, vmax=1)
            axes[i, 2 + 2 * j].imshow(show(x[i]), cmap="gray" if gray else None, vmin=0, vmax=255)
    axes[0, 0].set_title("x", fontsize=7)
    for j, t in enumerate(titles):
        axes[0, 1 + 2 * j].set_title(f"ẑ {t}", fontsize=7)
        axes[0, 2 + 2 * j].set_title(f"x̃ {t}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    """Line plot of named (x, y) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
