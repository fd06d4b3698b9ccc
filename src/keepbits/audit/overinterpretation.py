"""Overinterpretation audit (Carter et al. 2021, "Overinterpretation reveals image
classification model pathologies").

Protocol (§3–4, Table 1):

0. The training split is cut in two disjoint halves (:func:`keepbits.data.train_val_split`,
   seeded, stratified): the audited model trains on the first (``audit_images`` of it), the
   retraining images (``train_images``) come from the second, so the model that picks their
   pixels has never seen them.
1. BackSelect orders of the retraining and test images under the audited model (Batched
   Gradient BackSelect, §3.2/S5, or exact BackSelect); keep the top ``fraction`` (default 5 %)
   of pixels per image, mask the rest to the channel mean (§4.1).
2. Fresh classifiers, one recipe (``retrain_epochs``, no augmentation, as Table 1), trained on
   the BackSelect subsets, on the same fraction of random pixels (fixed per image), and, the
   control, on the same images in full; tested on the matching test images. The audited model
   is also evaluated on both kinds of subsets. Accuracies with 95 % CIs.
3. SIS sizes at every τ, correctly vs wrongly classified images with 95 % CIs and the CI of
   their difference (§4.4), pixel-location heatmaps (Fig. 2).
4. Mitigations (§4.5), compared with a single model of the same recipe: an ensemble of
   ``ensemble`` identically trained replicates (mean logits) and input dropout (keep ``p`` at
   train and test time), on the test images that every compared model classifies with
   confidence ≥ τ, accuracy beside every SIS size.
5. Optionally (``exact_images``), exact BackSelect on a class-balanced sample of test images
   against the gradient orders: SIS sizes (gradient ones are whole iterations, multiples of
   ``k`` pixels) and overlap of the ``fraction`` subsets.

Per-image orders come from :func:`keepbits.audit.sis_orders.compute_orders` (sharded over
``torchrun`` processes, cached chunk by chunk, resumable). Models are trained once (rank 0)
by the one classifier trainer, :func:`keepbits.training.classifier.fit_classifier` (SGD with
Nesterov momentum, 15% warm-up then cosine decay), and cached as keepbits checkpoints that
resumed runs and the other ranks load.

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
from keepbits.audit._sis_onnx import gradient_module
from keepbits.audit.sis import BackSelectResult, find_sis
from keepbits.audit.sis_orders import compute_orders
from keepbits.core.stats import t_quantile
from keepbits.errors import InputError
from keepbits.training.distributed import Dist, barrier, init_distributed, resolve_device, worker_device


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
    """Mean and 95% confidence half-width, t₀.₉₇₅(n − 1)·s/√n (Student's t: at the audits' small n
    the normal 1.96 is too narrow, 6.5× at n = 2); for 0/1 values (correct or not) the mean is an
    accuracy and the half-width its CI.

    Example:
        >>> mean_ci([1.0, 0.0, 1.0, 1.0])["mean"]
        0.75
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    half = t_quantile(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(half), "n": int(len(v))}


def difference_ci(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) − mean(b) of two independent samples with its 95% half-width (Welch: Student's t
    at the Welch–Satterthwaite degrees of freedom) and
    which way it points: ``"lower"``/``"higher"`` when the CI excludes 0, else ``"no difference"``.

    Example:
        >>> difference_ci([1.0, 1.2, 0.8], [3.0, 3.1, 2.9])["direction"]
        'lower'
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return {"difference": float("nan"), "ci95": float("nan"), "direction": "too few images"}
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    spread = va * va / (len(a) - 1) + vb * vb / (len(b) - 1)
    dof = (va + vb) ** 2 / spread if spread > 0 else len(a) + len(b) - 2  # both constant: no spread to weigh
    half = float(t_quantile(0.975, max(dof, 1.0)) * math.sqrt(va + vb))
    direction = "no difference" if abs(diff) <= half else ("lower" if diff < 0 else "higher")
    return {"difference": diff, "ci95": half, "direction": direction}


def sis_fractions(orders: Sequence[BackSelectResult], threshold: float) -> np.ndarray:
    """SIS size (fraction of pixels) of every image at τ; NaN where f(x) < τ."""
    out = np.full(len(orders), np.nan)
    for i, r in enumerate(orders):
        sis = find_sis(r, threshold)
        if sis is not None:
            out[i] = len(sis) / (r.shape[0] * r.shape[1])
    return out


def sis_size_stats(orders: Sequence[BackSelectResult], labels: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per τ: how many images reach τ, mean SIS size (fraction of pixels), sizes of correctly
    vs wrongly classified images with 95% CIs and the CI of wrong − correct (§4.4), so the
    direction is stated for each τ it holds at."""
    rows = []
    correct = np.array([r.target == label for r, label in zip(orders, labels)], bool)
    for tau in thresholds:
        sizes = sis_fractions(orders, tau)
        ok = ~np.isnan(sizes)
        right, wrong = sizes[ok & correct], sizes[ok & ~correct]
        rows.append({"threshold": tau, "images_at_threshold": int(ok.sum()), "images": len(orders),
                     "size": mean_ci(sizes[ok]), "size_correct": mean_ci(right), "size_wrong": mean_ci(wrong),
                     "wrong_minus_correct": difference_ci(wrong, right)})
    return rows


def common_sis_sizes(orders: dict[str, Sequence[BackSelectResult]], labels: np.ndarray, thresholds: Sequence[float],
                     reference: str) -> list[dict[str, Any]]:
    """Per τ, SIS sizes of several models on the same images: those every model classifies with
    f ≥ τ (each for its own prediction). Per model: mean size with 95% CI, accuracy on those
    images, and the paired difference from ``reference`` (same images) with its 95% CI."""
    rows = []
    for tau in thresholds:
        sizes = {name: sis_fractions(o, tau) for name, o in orders.items()}
        common = np.logical_and.reduce([~np.isnan(v) for v in sizes.values()])
        row: dict[str, Any] = {"threshold": tau, "common_images": int(common.sum()), "images": len(labels), "models": {}}
        for name, o in orders.items():
            right = [o[i].target == labels[i] for i in np.flatnonzero(common)]
            entry = {"size": mean_ci(sizes[name][common]), "accuracy_on_common": mean_ci(np.asarray(right, np.float64))}
            if name != reference:
                entry["minus_" + reference] = mean_ci(sizes[name][common] - sizes[reference][common])
            row["models"][name] = entry
        rows.append(row)
    return rows


def subset_overlap(a: Sequence[BackSelectResult], b: Sequence[BackSelectResult], fraction: float) -> dict[str, float]:
    """Mean fraction of the ``fraction`` subset (last pixels of each order) that two sets of
    orders of the same images share, with its 95% CI."""
    shared = []
    for ra, rb in zip(a, b):
        k = keep_count(len(ra.order), fraction)
        shared.append(len(np.intersect1d(ra.order[-k:], rb.order[-k:])) / k)
    return mean_ci(shared)


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
    """Settings of ``keepbits audit overinterpretation`` (defaults: the paper's 5% subsets).

    ``audit_images``: sample of the first training half the audited model (and its replicates
    and the input-dropout model) train on; ``train_images``: sample of the second half whose
    subsets are retrained on; ``test_images``: test sample; all seeded, class-balanced
    (:func:`keepbits.data.sample_indices`), None = all. ``epochs``: the audited recipe;
    ``retrain_epochs``: the retraining recipe (no augmentation). ``ensemble``: replicates of
    the audited recipe averaged; ``exact_images``: test images also run through exact
    BackSelect (0: off). ``device``: ``auto``/``cpu``/``cuda``, where the models train and
    BackSelect runs (the process group stays gloo; each ``torchrun`` rank takes ``cuda:<LOCAL_RANK>``)."""

    data: str
    out: str
    model: str | None = None
    arch: str = "resnet20"
    epochs: int = 30
    retrain_epochs: int | None = None
    audit_images: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    fraction: float = 0.05
    method: str = "gradient"
    k: int = 16
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    ensemble: int = 3
    keep_prob: float = 0.8
    dropout_samples: int = 4
    exact_images: int = 0
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def split_halves(labels: np.ndarray, audit_count: int | None, train_count: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets of a training split: (images the audited model trains on, images
    whose subsets are retrained on), two stratified halves (:func:`keepbits.data.train_val_split`
    at 0.5), each then sampled class-balanced to its count (None: the whole half).

    Example:
        >>> import numpy as np
        >>> audit, retrain = split_halves(np.repeat([0, 1], 10), 4, None, seed=0)
        >>> len(audit), len(retrain), bool(set(audit) & set(retrain))
        (4, 10, False)
    """
    from keepbits.data import sample_indices, train_val_split

    audit, retrain = train_val_split(labels, 0.5, seed)
    return audit[sample_indices(labels[audit], audit_count, seed)], retrain[sample_indices(labels[retrain], train_count, seed)]


def run_overinterpretation(cfg: OverinterpretationConfig) -> dict[str, Any]:
    """Run the whole pipeline; rank 0 writes ``cfg.out/report.html`` and ``report.json``; returns the results.

    Example (tiny, on the bundled MNIST sample):
        >>> import tempfile
        >>> from keepbits.data import sample_mnist_path
        >>> from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
        >>> cfg = OverinterpretationConfig(str(sample_mnist_path()), tempfile.mkdtemp(), arch="lenet5", epochs=1,
        ...     audit_images=64, train_images=64, test_images=32, k=98, ensemble=2, progress=False)
        >>> sorted(run_overinterpretation(cfg)["accuracy"])[:3]
        ['control_full', 'ensemble_full', 'input_dropout_full']
    """
    from keepbits.data import channel_stats, has_split, load_dataset, sample_indices

    started = time.time()
    resolve_device(cfg.device)  # an unusable device is refused before any training
    if not 0 < cfg.fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {cfg.fraction}")
    if cfg.ensemble < 2:
        raise InputError(f"an ensemble needs at least 2 replicates, got {cfg.ensemble}")
    if cfg.k < 1 or cfg.exact_images < 0 or cfg.epochs < 1 or (cfg.retrain_epochs is not None and cfg.retrain_epochs < 1):
        raise InputError(f"k and epochs must be >= 1, exact_images >= 0, got k={cfg.k}, epochs={cfg.epochs}, "
                         f"retrain_epochs={cfg.retrain_epochs}, exact_images={cfg.exact_images}")
    if not cfg.thresholds or not all(0 < t <= 1 for t in cfg.thresholds):
        raise InputError(f"thresholds must be in (0, 1], got {cfg.thresholds}")
    if any(n is not None and n < 1 for n in (cfg.audit_images, cfg.train_images, cfg.test_images)):
        raise InputError(f"image counts must be >= 1 (None: all), got audit_images={cfg.audit_images}, "
                         f"train_images={cfg.train_images}, test_images={cfg.test_images}")
    if not 0 < cfg.keep_prob <= 1 or cfg.dropout_samples < 1:
        raise InputError(f"input dropout needs keep_prob in (0, 1] and dropout_samples >= 1, got {cfg.keep_prob}, {cfg.dropout_samples}")
    if not has_split(cfg.data, "test"):
        raise InputError(f"{cfg.data}: needs a test split next to the train split")
    train_set, test_set = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
    audit_idx, tr_idx = split_halves(train_set.y, cfg.audit_images, cfg.train_images, cfg.seed)
    te_idx = sample_indices(test_set.y, cfg.test_images, cfg.seed)
    out = Path(cfg.out)
    dist = init_distributed(use_cuda=False)
    classes = train_set.class_names
    retrain_epochs = cfg.retrain_epochs or cfg.epochs
    if cfg.model:
        original = load_model(cfg.model)
        if cfg.method == "gradient":  # an ONNX model without a torch twin is refused before any training
            gradient_module(original)
        mean, std = original.mean.tolist(), original.std.tolist()
    else:
        mean, std = channel_stats(train_set.x[audit_idx])
    norm = ModelAdapter(train_set.shape_chw, mean=mean, std=std)
    xa, ya = norm.normalize(train_set.x[audit_idx]), train_set.y[audit_idx]

    def trained(name: str, x: np.ndarray, y: np.ndarray, seed: int, epochs: int, augment: str, keep: float | None = None) -> TorchAdapter:
        return _trained(out / "models" / f"{name}.pt", cfg, x, y, classes, mean, std, epochs, seed, dist, augment, keep)

    # the audited recipe (on the audit half): replicates, the first one is the audited model unless one is given
    replicates = [trained(f"replicate_{i}", xa, ya, cfg.seed + i, cfg.epochs, "auto") for i in range(cfg.ensemble)]
    original = original if cfg.model else replicates[0]
    xtr, ytr = original.normalize(train_set.x[tr_idx]), train_set.y[tr_idx]
    xte, yte = original.normalize(test_set.x[te_idx]), test_set.y[te_idx]

    def orders(model: ModelAdapter, x: np.ndarray, name: str, method: str = cfg.method) -> list[BackSelectResult]:
        # the folder is this audit's own cache: models retrained for another recipe replace their orders too
        return compute_orders(model, x, out / "orders" / name, method, cfg.k, batch_size=cfg.batch_size, progress=cfg.progress,
                              device=cfg.device, replace_other_audits=True)

    orders_tr, orders_te = orders(original, xtr, "original_train"), orders(original, xte, "original_test")
    bs_tr, bs_te = backselect_subsets(xtr, orders_tr, cfg.fraction), backselect_subsets(xte, orders_te, cfg.fraction)
    rnd_tr, rnd_te = random_subsets(xtr, cfg.fraction, cfg.seed), random_subsets(xte, cfg.fraction, cfg.seed + 1)

    # the retraining recipe (on the other half, no augmentation): subsets and the full-image control
    retrained_bs = trained("retrained_backselect", bs_tr, ytr, cfg.seed + 10, retrain_epochs, "none")
    retrained_rnd = trained("retrained_random", rnd_tr, ytr, cfg.seed + 20, retrain_epochs, "none")
    control = trained("control_full", xtr, ytr, cfg.seed + 40, retrain_epochs, "none")

    from keepbits.audit._mitigations import Ensemble

    shape = original.input_shape
    ensemble = TorchAdapter(Ensemble([r.torch_module for r in replicates]), shape, mean=mean, std=std)
    dropout = trained("input_dropout", xa, ya, cfg.seed + 30, cfg.epochs, "auto", cfg.keep_prob)
    mitigation_orders = {"single": orders(replicates[0], xte, "replicate_0_test") if cfg.model else orders_te,
                         "ensemble": orders(ensemble, xte, "ensemble_test"), "input_dropout": orders(dropout, xte, "input_dropout_test")}

    accuracy = {name: acc_on(model, x, yte) for name, model, x in (
        ("original_full", original, xte), ("original_backselect", original, bs_te), ("original_random", original, rnd_te),
        ("retrained_backselect", retrained_bs, bs_te), ("retrained_random", retrained_rnd, rnd_te), ("control_full", control, xte),
        ("single_full", replicates[0], xte), ("ensemble_full", ensemble, xte), ("input_dropout_full", dropout, xte))}
    sizes = {"original": sis_size_stats(orders_te, yte, cfg.thresholds),
             **{name: sis_size_stats(o, yte, cfg.thresholds) for name, o in mitigation_orders.items() if name != "single"}}
    heat_tau = cfg.thresholds[len(cfg.thresholds) // 2]
    heatmaps = {name: location_frequency(o, heat_tau) for name, o in (("original", orders_te), ("ensemble", mitigation_orders["ensemble"]),
                                                                      ("input_dropout", mitigation_orders["input_dropout"]))}
    result = {
        "settings": asdict(cfg), "audit_images": int(len(audit_idx)), "train_images": int(len(tr_idx)), "test_images": int(len(te_idx)),
        "retraining_images_unseen_by_audited_model": not cfg.model,
        "pixels": int(shape[1] * shape[2]), "kept_pixels": keep_count(shape[1] * shape[2], cfg.fraction),
        "accuracy": {k: v["mean"] for k, v in accuracy.items()}, "accuracy_ci95": {k: v["ci95"] for k, v in accuracy.items()},
        "sis_sizes": sizes, "mitigations_common_images": common_sis_sizes(mitigation_orders, yte, cfg.thresholds, "single"),
        "heatmap_threshold": heat_tau, "classes": len(classes),
    }
    if cfg.exact_images:
        pick = sample_indices(yte, cfg.exact_images, cfg.seed)
        exact = orders(original, xte[pick], "original_test_exact", "exact")
        gradient = [orders_te[i] for i in pick]
        result["exact_vs_gradient"] = {
            "images": int(len(pick)), "k": cfg.k, "gradient_size_step": cfg.k / (shape[1] * shape[2]),
            "subset_overlap": subset_overlap(exact, gradient, cfg.fraction),
            "sis_sizes": {"exact": sis_size_stats(exact, yte[pick], cfg.thresholds), "gradient": sis_size_stats(gradient, yte[pick], cfg.thresholds)},
            "original_accuracy_on_subsets": {"exact": acc_on(original, backselect_subsets(xte[pick], exact, cfg.fraction), yte[pick]),
                                             "gradient": acc_on(original, backselect_subsets(xte[pick], gradient, cfg.fraction), yte[pick])},
            "seconds_per_image_exact": float(np.mean([r.seconds for r in exact])),
        }
    result["wall_time_s"] = round(time.time() - started, 1)
    if dist.rank == 0:
        shown = sample_indices(yte, 8, cfg.seed)  # examples across classes (test files are often sorted by class)
        _write_report(out, cfg, result, heatmaps, test_set.x[te_idx[shown]], [orders_te[i] for i in shown], original)
    return result


def acc_on(model: ModelAdapter, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy of ``model`` on normalised ``x`` with its 95% CI."""
    return mean_ci((model.logits(x).argmax(1) == y).astype(np.float64))


def _trained(path: Path, cfg: OverinterpretationConfig, x: np.ndarray, y: np.ndarray, class_names: Sequence[str], mean: Sequence[float],
             std: Sequence[float], epochs: int, seed: int, dist: Dist, augment: str, keep: float | None = None) -> TorchAdapter:
    """A fresh ``cfg.arch`` trained on normalised N×C×H×W ``x`` (with input dropout ``keep``, §4.5;
    ``augment``: ``"auto"`` = flips for colour images, ``"none"``) by the one classifier trainer,
    once (rank 0), saved as a classifier checkpoint at ``path``; other ranks and resumed runs load it.
    A checkpoint already at ``path`` is reused only if it was trained by the same recipe on the same
    data (arch, fit settings, input dropout, sha256 of ``x`` and ``y``); otherwise it is retrained."""
    import hashlib
    import json

    import torch

    from keepbits import registry
    from keepbits.audit._mitigations import InputDropout
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint
    from keepbits.training.classifier import FitConfig, fit_classifier
    from keepbits.training.data import TensorArrays

    shape = list(x.shape[1:])
    fit = FitConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer="sgd", lr=cfg.lr, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=0.15 * epochs, augment=augment, crop_padding=0, seed=seed, progress=cfg.progress)
    data = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes() + np.ascontiguousarray(y, np.int64).tobytes()).hexdigest()
    recipe = json.loads(json.dumps({**{k: v for k, v in asdict(fit).items() if k != "progress"}, "arch": cfg.arch, "input_dropout_keep": keep,
                                    "input_dropout_samples": cfg.dropout_samples if keep is not None else None,
                                    "images": len(x), "data_sha256": data, "normalization": [[float(v) for v in mean], [float(v) for v in std]]}))
    if dist.main and _recipe_of(path) != recipe:
        torch.manual_seed(seed)
        kwargs = {"in_channels": shape[0], "num_classes": len(class_names), "image_size": shape[1:]}
        net = registry.build(cfg.arch, **kwargs)
        fit_classifier(net if keep is None else InputDropout(net, keep, cfg.dropout_samples, seed), TensorArrays(x, y), fit,
                       dist=Dist(device=worker_device(cfg.device)))
        save_checkpoint(path, Checkpoint(kind="classifier", models={"classifier": ModelEntry.of(cfg.arch, kwargs, net)}, input_shape=shape,
                                         normalization=Normalization(list(mean), list(std)), class_names=list(class_names),
                                         settings={"recipe": recipe}, epoch=epochs - 1))
    barrier(dist)
    net = build_model(load_checkpoint(path, "classifier"), "classifier").eval()
    if keep is not None:
        net = InputDropout(net, keep, cfg.dropout_samples).eval()
    return TorchAdapter(net, shape, mean=mean, std=std, class_names=class_names)


def _recipe_of(path: Path) -> dict[str, Any] | None:
    """The training recipe recorded in the classifier checkpoint at ``path`` (None: no file, or not one of ours)."""
    from keepbits.errors import CheckpointError
    from keepbits.training.checkpoint import load_checkpoint

    if not path.exists():
        return None
    try:
        return load_checkpoint(path, "classifier").settings.get("recipe")
    except CheckpointError:
        return None


def _interval(value: float, ci95: float, spec: str) -> str:
    """``value ± ci95`` as a table shows it: a dash where no image gave a value, the value alone
    where one image gave no interval (``ci95`` in ``spec`` without its sign)."""
    if not math.isfinite(value):
        return "–"
    return f"{value:{spec}}" + (f" ± {ci95:{spec.lstrip('+')}}" if math.isfinite(ci95) else "")


def _pm(stat: dict[str, float]) -> str:
    return _interval(stat["mean"], stat["ci95"], ".3f")


def _difference(d: dict[str, Any]) -> str:
    """wrong − correct SIS size with its CI and direction; a dash where it is undefined."""
    return f"{_interval(d['difference'], d['ci95'], '+.4f')} ({d['direction']})"


def _write_report(out: Path, cfg: OverinterpretationConfig, result: dict[str, Any], heatmaps: dict[str, np.ndarray],
                  images: np.ndarray, orders: Sequence[BackSelectResult], original: ModelAdapter) -> None:
    from keepbits.report import Report, overlay, plural

    pct = f"{cfg.fraction:.0%}"
    acc = {k: {"mean": v, "ci95": result["accuracy_ci95"][k]} for k, v in result["accuracy"].items()}
    audited = cfg.model or f"{cfg.arch} trained here ({plural(cfg.epochs, 'epoch')}, {result['audit_images']} images of the first training half)"
    report = Report("Overinterpretation audit", meta={
        "data": cfg.data, "model": audited, "retraining images": f"{result['train_images']} of the second training half"
        + ("" if result["retraining_images_unseen_by_audited_model"] else " (make sure --model never trained on them)"),
        "test images": result["test_images"], "method": cfg.method, "k (pixels per gradient step)": cfg.k if cfg.method == "gradient" else "-",
        "subset": f"{pct} = {result['kept_pixels']} pixels",
        "fresh models": f"{cfg.arch} (replicates, ensemble, input dropout, retrained and control)"
        + (" — another network than the audited one" if cfg.model else ""),
        "retraining recipe": f"{plural(cfg.retrain_epochs or cfg.epochs, 'epoch')}, no augmentation"})
    full, chance = acc["original_full"], 1.0 / result["classes"]
    if full["mean"] - (full["ci95"] if math.isfinite(full["ci95"]) else 0.0) <= chance:
        # every comparison below is then between near-random models: say it before the tables do
        report.section("Warning: the audited model is not above chance",
                       f"Its accuracy on the full test images, {_pm(full)}, does not exceed chance ({chance:.2f} for "
                       f"{result['classes']} classes) beyond its 95% CI: the subsets, the retraining and the mitigations "
                       "below measure nothing about overinterpretation. Train it longer or give a better --model.")
    s = report.section("Table 1: accuracy on pixel subsets (95% CI)",
                       f"Top-{pct} BackSelect subsets vs {pct} random pixels (fixed per image), rest masked to the mean. Fresh models "
                       "share one recipe and one set of images: the control trains on those images in full.")
    # unseen by the audited model when it was trained here; of a --model, nothing says so
    retrain = f"{result['train_images']} {'unseen ' if result['retraining_images_unseen_by_audited_model'] else ''}images"
    s.table([
        {"model": "audited", "trained on": "full images", "tested on": "full images", "accuracy": _pm(acc["original_full"])},
        {"model": "audited", "trained on": "full images", "tested on": f"{pct} BackSelect", "accuracy": _pm(acc["original_backselect"])},
        {"model": "audited", "trained on": "full images", "tested on": f"{pct} random", "accuracy": _pm(acc["original_random"])},
        {"model": "fresh", "trained on": f"{retrain}, full (control)", "tested on": "full images", "accuracy": _pm(acc["control_full"])},
        {"model": "fresh", "trained on": f"{retrain}, {pct} BackSelect", "tested on": f"{pct} BackSelect", "accuracy": _pm(acc["retrained_backselect"])},
        {"model": "fresh", "trained on": f"{retrain}, {pct} random", "tested on": f"{pct} random", "accuracy": _pm(acc["retrained_random"])},
        {"model": "single replicate", "trained on": "full images", "tested on": "full images", "accuracy": _pm(acc["single_full"])},
        {"model": f"ensemble of {cfg.ensemble} replicates", "trained on": "full images", "tested on": "full images", "accuracy": _pm(acc["ensemble_full"])},
        {"model": f"input dropout keep {cfg.keep_prob}", "trained on": "full images", "tested on": "full images", "accuracy": _pm(acc["input_dropout_full"])},
    ])
    s = report.section("SIS size vs threshold", "Mean SIS size (fraction of pixels) of the test images each model classifies with f ≥ τ, 95% CI; "
                       "wrong − correct with its 95% CI and direction at every τ (§4.4).")
    s.line_plot({name: (cfg.thresholds, [r["size"]["mean"] for r in rows]) for name, rows in result["sis_sizes"].items()},
                xlabel="threshold τ", ylabel="SIS size (fraction of pixels)",
                errors={name: [r["size"]["ci95"] for r in rows] for name, rows in result["sis_sizes"].items()})
    s.table([{"model": name, "τ": r["threshold"], "images ≥ τ": f"{r['images_at_threshold']}/{r['images']}", "size": _pm(r["size"]),
              "correct": _pm(r["size_correct"]), "wrong": _pm(r["size_wrong"]),
              "wrong − correct": _difference(r["wrong_minus_correct"])}
             for name, rows in result["sis_sizes"].items() for r in rows])
    s = report.section("Mitigations on common images", "Per τ: the test images every model classifies with f ≥ τ; SIS size (95% CI), "
                       "paired difference from the single replicate, accuracy on those images.")
    s.table([{"τ": r["threshold"], "common images": f"{r['common_images']}/{r['images']}", "model": name, "size": _pm(m["size"]),
              "− single": _pm(m["minus_single"]) if "minus_single" in m else "", "accuracy (common)": _pm(m["accuracy_on_common"])}
             for r in result["mitigations_common_images"] for name, m in r["models"].items()])
    if "exact_vs_gradient" in result:
        e = result["exact_vs_gradient"]
        s = report.section("Exact vs gradient BackSelect", f"{e['images']} test images; gradient SIS sizes move in steps of k = {e['k']} pixels "
                           f"({e['gradient_size_step']:.1%}). Shared fraction of the {pct} subsets: {_pm(e['subset_overlap'])}.")
        s.table([{"τ": a["threshold"], "exact size": _pm(a["size"]), "gradient size": _pm(b["size"])}
                 for a, b in zip(e["sis_sizes"]["exact"], e["sis_sizes"]["gradient"])])
    s = report.section("Where SIS pixels lie (Fig. 2)", f"Fraction of test images (f ≥ τ = {result['heatmap_threshold']}) whose SIS holds each pixel.")
    for name, heat in heatmaps.items():
        if heat.any():
            s.heatmap(heat, title=name, cmap="magma")
        else:
            s.text(f"{name}: no SIS pixel at τ = {result['heatmap_threshold']} (no test image reaches it, or its SIS are empty).",
                   note=True)
    s = report.section(f"Examples: {pct} BackSelect subsets", "Original | kept pixels (red) | what the retrained model sees.")
    x = original.normalize(images[:8])
    masked = original.denormalize(backselect_subsets(x, orders[:8], cfg.fraction))
    tiles, titles = [], []
    k = result["kept_pixels"]
    for img, r, m in zip(images[:8], orders[:8], masked):
        keep = np.zeros(r.shape[0] * r.shape[1], bool)
        keep[r.order[-k:]] = True
        tiles += [img, overlay(img, keep.reshape(r.shape)), m]
        titles += [f"class {original.class_name(r.target)}", "subset", "masked"]
    s.image_grid(tiles, titles, cols=6)
    report.data = result
    report.write(out)
