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

Per-image orders are sharded over ``torchrun`` processes (gloo on CPU), saved chunk by chunk
as they finish (a killed run resumes where it stopped) and merged in image order.

Example:
    >>> from keepbits.audit.overinterpretation import random_subsets
    >>> import numpy as np
    >>> random_subsets(np.ones((2, 1, 4, 5), np.float32), 0.1, seed=0).reshape(2, -1).sum(1).tolist()
    [2.0, 2.0]
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from keepbits.audit._base import ModelAdapter, TorchAdapter, load_model
from keepbits.audit.sis import METHODS, BackSelectResult, backselect, find_sis, gradient_backselect
from keepbits.errors import InputError



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


# ----------------------------------------------------------------------------- models

def _torch_modules():
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        """Mean logits of several classifiers (§4.5)."""

        def __init__(self, members: Sequence[nn.Module]):
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([m(x) for m in self.members]).mean(0)

    class InputDropout(nn.Module):
        """Input dropout (§4.5): each pixel (all channels) kept with probability ``keep``, else
        set to the mask value 0 (the mean). Training draws fresh masks; evaluation averages the
        logits over ``samples`` masks drawn from a fixed seed, so ``f`` is deterministic."""

        def __init__(self, net: nn.Module, keep: float = 0.8, samples: int = 4, seed: int = 0):
            super().__init__()
            self.net, self.keep, self.samples, self.seed = net, keep, samples, seed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            if self.training:
                return self.net(x * (torch.rand(n, 1, h, w) < self.keep).to(x.dtype))
            gen = torch.Generator().manual_seed(self.seed)
            masks = (torch.rand(self.samples, 1, 1, h, w, generator=gen) < self.keep).to(x.dtype)
            return torch.stack([self.net(x * m) for m in masks]).mean(0)

    return Ensemble, InputDropout


def train_classifier_arrays(arch: str, x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, seed: int = 0,
                            batch_size: int = 128, lr: float = 0.05, input_dropout: float | None = None,
                            progress: bool = False, dropout_samples: int = 4) -> Any:
    """Train a fresh registry classifier on normalised float N×C×H×W arrays (SGD + Nesterov,
    cosine schedule, horizontal flips for colour images); returns the model in eval mode."""
    import torch
    import torch.nn.functional as F

    from keepbits import registry

    torch.manual_seed(seed)
    c, h, w = x.shape[1:]
    net = registry.build(arch, in_channels=c, num_classes=num_classes, image_size=[h, w])
    if input_dropout is not None:
        net = _torch_modules()[1](net, keep=input_dropout, samples=dropout_samples, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
    steps = epochs * math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"train {arch}", disable=not progress, leave=False)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            xb = xt[idx]
            if c == 3:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return net.eval()


def accuracy(model: ModelAdapter, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    return float((model.logits(x, batch_size).argmax(1) == np.asarray(y)).mean()) if len(x) else float("nan")


# ----------------------------------------------------------------------------- sharded orders

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1


def _dist() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
    return _Dist(tdist.get_rank(), tdist.get_world_size())


def _barrier(dist: _Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def compute_orders(model: ModelAdapter, x: np.ndarray, folder: str | Path, method: str = "gradient", k: int = 16,
                   chunk: int | None = None, batch_size: int = 64, progress: bool = True) -> list[BackSelectResult]:
    """BackSelect orders of every image of ``x`` (target: the predicted class; ``method``:
    ``"gradient"`` with ``k`` pixels per step, or exact ``"exact"``/``"incremental"``/``"plain"``), saved per chunk
    of ``chunk`` images (default 32 for gradient, 1 for exact) to ``folder/chunk_<start>.json`` as each finishes. Under ``torchrun``
    ranks take chunks round-robin; existing chunk files are reused (resume after a kill).
    Chunk files carry a fingerprint of their images and settings; others are recomputed.
    Every rank returns the merged list in image order."""
    if method not in ("gradient", "exact") + METHODS:
        raise InputError(f"method must be one of {('gradient', 'exact') + METHODS}, got {method!r}")
    chunk = chunk or (32 if method == "gradient" else 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dist = _dist()
    starts = list(range(0, len(x), chunk))
    mine = [s for i, s in enumerate(starts) if i % dist.world == dist.rank]
    from tqdm.auto import tqdm

    def fingerprint(s: int) -> str:
        return hashlib.sha256(np.ascontiguousarray(x[s : s + chunk]).tobytes() + f"{method}/{k}".encode()).hexdigest()[:20]

    def done(s: int) -> bool:
        path = folder / f"chunk_{s:07d}.json"
        return path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint(s)

    todo = [s for s in mine if not done(s)]
    bar = tqdm(total=sum(len(x[s : s + chunk]) for s in mine),
               initial=sum(len(x[s : s + chunk]) for s in mine if s not in todo),
               desc=f"backselect {folder.name} [rank {dist.rank}]", disable=not progress, leave=False)
    for s in todo:
        part = x[s : s + chunk]
        if method == "gradient":
            results = gradient_backselect(model, part, None, k, None, batch_size)
        else:
            results = [backselect(model, xi, method="auto" if method == "exact" else method) for xi in part]
        path = folder / f"chunk_{s:07d}.json"
        tmp = path.with_suffix(f".tmp{dist.rank}")
        tmp.write_text(json.dumps({"start": s, "fingerprint": fingerprint(s), "method": method, "k": k,
                                   "results": [r.to_dict() for r in results]}))
        os.replace(tmp, path)
        bar.update(len(part))
    bar.close()
    _barrier(dist)
    merged: list[BackSelectResult] = []
    for s in starts:
        record = json.loads((folder / f"chunk_{s:07d}.json").read_text())
        merged += [BackSelectResult.from_dict(d) for d in record["results"]]
    if len(merged) != len(x):
        raise InputError(f"{folder}: holds {len(merged)} results for {len(x)} images")
    return merged


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
    import torch

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
    dist = _dist()
    classes = train_set.num_classes
    retrain_epochs = cfg.retrain_epochs or cfg.epochs
    if cfg.model:
        original = load_model(cfg.model)
    else:
        mean, std = channel_stats(train_set.x)
        shape = train_set.shape_chw
        norm = TorchAdapter(torch.nn.Identity(), shape, mean=mean, std=std)
        original = _cached_model(out / "models" / "original.pt", lambda: train_classifier_arrays(
            cfg.arch, norm.normalize(train_set.x[tr_idx]), train_set.y[tr_idx], classes, cfg.epochs, cfg.seed, cfg.batch_size, cfg.lr,
            progress=cfg.progress), cfg.arch, shape, classes, mean, std, dist)
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
        return _cached_model(out / "models" / f"{name}.pt", lambda: train_classifier_arrays(
            cfg.arch, x, y, classes, retrain_epochs, seed, cfg.batch_size, cfg.lr, keep, cfg.progress, cfg.dropout_samples),
            cfg.arch, shape, classes, mean, std, dist, keep, cfg.dropout_samples)

    retrained_bs = trained("retrained_backselect", bs_tr, ytr, cfg.seed + 10)
    retrained_rnd = trained("retrained_random", rnd_tr, ytr, cfg.seed + 20)
    Ensemble, _ = _torch_modules()
    members = [original.torch_module] + [trained(f"ensemble_member_{i}", xtr, ytr, cfg.seed + 100 + i).torch_module for i in range(1, cfg.ensemble)]
    ensemble = TorchAdapter(Ensemble(members), shape, mean=mean, std=std)
    dropout = trained("input_dropout", xtr, ytr, cfg.seed + 30, cfg.keep_prob)
    orders_ens = compute_orders(ensemble, xte, out / "orders" / "ensemble_test", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)
    orders_drop = compute_orders(dropout, xte, out / "orders" / "input_dropout_test", cfg.method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress)

    pct = f"{cfg.fraction:.0%}"
    acc = {
        "original_full": accuracy(original, xte, yte),
        "original_backselect": accuracy(original, bs_te, yte),
        "original_random": accuracy(original, rnd_te, yte),
        "retrained_backselect": accuracy(retrained_bs, bs_te, yte),
        "retrained_random": accuracy(retrained_rnd, rnd_te, yte),
        "ensemble_full": accuracy(ensemble, xte, yte),
        "input_dropout_full": accuracy(dropout, xte, yte),
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


def _cached_model(path: Path, build: Callable[[], Any], arch: str, shape: Sequence[int], classes: int, mean: Sequence[float],
                  std: Sequence[float], dist: _Dist, keep: float | None = None, samples: int = 4) -> TorchAdapter:
    """Train once (rank 0) and save a keepbits checkpoint; other ranks and resumed runs load it."""
    from keepbits.training.checkpoint import build_model, load_checkpoint, model_entry, save_checkpoint

    if dist.rank == 0 and not path.exists():
        net = build()
        inner = net.net if keep is not None else net
        save_checkpoint(path, {"kind": "classifier", "models": {"classifier": model_entry(arch, {"in_channels": shape[0], "num_classes": classes,
                        "image_size": list(shape[1:])}, inner)}, "input_shape": list(shape), "normalization": {"mean": list(mean), "std": list(std)},
                        "class_names": [str(i) for i in range(classes)], "settings": {"input_dropout_keep": keep}})
    _barrier(dist)
    net = build_model(load_checkpoint(path, "classifier"), "classifier").eval()
    if keep is not None:
        net = _torch_modules()[1](net, keep=keep, samples=samples).eval()
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
