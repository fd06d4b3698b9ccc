"""Classifier training: the one training loop of keepbits classifiers (:func:`fit_classifier`:
SGD (Nesterov) or AdamW, cosine or step schedule, crop/flip augmentation, DistributedDataParallel
under ``torchrun`` through :mod:`keepbits.training.distributed`), its in-memory entry point for
arrays (audits, SimpleBits retraining) and the data-set entry point :func:`train_classifier`
(per-epoch evaluation, atomic resumable checkpoints ``last.pt``/``best.pt``). ``best.pt`` is the
epoch with the highest accuracy on the validation split carved from the training data
(:func:`keepbits.data.train_val_split`, seeded, stratified); the test split is evaluated and
recorded every epoch but never selects anything. Without a validation split
(``val_fraction=0``) there is no selection and no ``best.pt``: ``last.pt`` is the model.

Example:
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.training.classifier import ClassifierConfig, train_classifier
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> cfg = ClassifierConfig(data=str(sample_mnist_path()), arch="lenet5", out=out, epochs=1, progress=False)
    >>> train_classifier(cfg)["epochs_run"]
    1
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from keepbits import registry
from keepbits.data import ImageDataset, channel_stats, has_split, load_dataset, sample_indices, train_val_split
from keepbits.errors import CheckpointError, InputError
from keepbits.training.checkpoint import (
    Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, load_resumable, load_state, refuse_earlier_run, refuse_finished, run_settings, save_checkpoint, state_digest,
)
from keepbits.training.data import TensorArrays, TensorImages
from keepbits.training.distributed import (
    PRECISIONS, Dist, all_gather, all_reduce_sum, autocast, broadcast_buffers, data_parallel, init_distributed, resolve_device,
    resolve_precision, shutdown,
)

log = logging.getLogger("keepbits")


@dataclass(kw_only=True)
class FitConfig:
    """How a classifier is optimised: the settings of the one training loop, :func:`fit_classifier`.

    ``steps`` (optional) trains exactly that many optimizer steps (epochs of the data, the last
    one cut short) instead of ``epochs`` epochs; schedules then span ``steps`` steps.
    ``warmup_epochs`` (may be fractional) ramps the lr linearly from 0 first. ``precision``:
    ``fp32``, ``bf16`` (autocast of the forward pass, CUDA only; the loss is float32) or ``auto``
    (bf16 on CUDA, float32 on the CPU).
    """

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    warmup_epochs: float = 0
    label_smoothing: float = 0.0
    augment: str = "auto"
    crop_padding: int = 4
    seed: int = 0
    precision: str = "fp32"
    progress: bool = True

    def default_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad setting."""
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "none"):
            raise InputError(f"schedule must be 'cosine', 'step' or 'none', got {self.schedule!r}")
        if self.augment not in ("auto", "crop-flip", "crop", "none"):
            raise InputError(f"augment must be auto, crop-flip, crop or none, got {self.augment!r}")
        if (self.epochs < 1 and self.steps is None) or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise InputError("epochs (or steps) and batch size must be positive")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (math.isfinite(self.default_lr()) and self.default_lr() >= 0):  # 0 holds the weights still (a test's tool)
            raise InputError(f"learning rate must be finite and >= 0, got {self.lr}")


@dataclass(kw_only=True)
class ClassifierConfig(FitConfig):
    """Settings of one classifier training run (the CLI flags of ``keepbits train classifier``);
    ``max_train``: a seeded class-balanced sample of that many training images (``seed``), not the first N;
    ``val_fraction``: the stratified validation split (``seed``) held out of the training data
    before that sample, the only split ``best.pt`` is selected on (0: no selection, no ``best.pt``);
    ``device``: ``auto`` | ``cpu`` | ``cuda`` (under ``torchrun``: ``cuda:<local rank>``);
    ``precision`` defaults to ``auto`` here (bf16 autocast on CUDA)."""

    data: str
    arch: str
    out: str
    precision: str = "auto"
    val_fraction: float = 0.1
    image_size: tuple[int, int] = (224, 224)
    resize_policy: str = "center-crop"
    max_train: int | None = None
    resume: bool = False
    overwrite: bool = False
    init: str | None = None
    device: str = "auto"
    threads: int | None = None
    command: str = ""


#: settings a ``--resume`` may change (run control); any other change is refused (:func:`check_resumable`)
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "precision", "threads", "command", "out"})


def load_classifier(path: str | Path, expected_arch: str | None = None) -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild a classifier (eval mode) from a ``classifier`` or ``nice`` checkpoint."""
    ckpt = load_checkpoint(path)
    if "classifier" not in ckpt.models:
        raise CheckpointError(f"{path}: holds no classifier (kind {ckpt.kind})")
    return build_model(ckpt, "classifier", expected_arch).eval(), ckpt


def _lr_factor(cfg: FitConfig, progress: float, total_epochs: float) -> float:
    """Learning-rate multiplier at fractional epoch ``progress`` of ``total_epochs``."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return (progress + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress / max(total_epochs, 1e-9))))
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(progress >= e for e in cfg.step_epochs)
    return 1.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorArrays, batch_size: int = 512, dist: Dist | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (sharded over ranks if distributed)."""
    dist = dist or Dist()
    model.eval()
    index = torch.arange(dist.rank, len(data), dist.world)
    stats = torch.zeros(3, dtype=torch.float64)
    for x, y in data.batches(batch_size, index):
        logits = model(x.to(dist.device, memory_format=torch.channels_last))
        y = y.to(dist.device)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").item()
        stats[1] += (logits.argmax(1) == y).sum().item()
        stats[2] += len(y)
    all_reduce_sum(dist, stats)
    return {"loss": float(stats[0] / max(stats[2], 1)), "accuracy": float(stats[1] / max(stats[2], 1))}


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: TensorArrays | torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """N×K logits of ``model`` (eval mode) on ``data`` (a :class:`TensorArrays`/:class:`TensorImages`,
    or N×C×H×W model input), computed batch by batch on the model's device; score them with
    :func:`keepbits.core.accuracy`.

    Example:
        >>> import torch
        >>> from keepbits.core import accuracy
        >>> from keepbits.training.classifier import predict_logits
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> logits = predict_logits(net, torch.zeros(5, 1, 2, 2), batch_size=2)
        >>> logits.shape, accuracy(logits, logits.argmax(1))
        ((5, 2), 1.0)
    """
    model.eval()
    device = next(model.parameters(), torch.zeros(0)).device
    if isinstance(data, TensorArrays):
        batches = (x for x, _ in data.batches(batch_size))
    else:
        x_all = torch.as_tensor(data)
        batches = (x_all[i : i + batch_size] for i in range(0, len(x_all), batch_size))
    parts = [model(x.to(device)).float().cpu() for x in batches]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


def make_optimizer(model: torch.nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov when momentum > 0) or AdamW at ``cfg.default_lr()``; weight decay on weights
    only (not on biases, norm parameters or gains)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("gain") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.default_lr(), momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.default_lr())


def fit_classifier(model: torch.nn.Module, data: TensorArrays, cfg: FitConfig, *, dist: Dist | None = None,
                   optimizer: torch.optim.Optimizer | None = None, start_epoch: int = 0,
                   after_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> torch.nn.Module:
    """The training loop of every keepbits classifier: minibatch cross-entropy (``label_smoothing``)
    on ``data`` (uint8 :class:`TensorImages` normalised per batch, or in-memory
    :class:`TensorArrays`), ``cfg``'s optimizer, schedule and augmentation (``auto``: crop,
    plus flips for colour images). Each epoch draws a permutation from ``cfg.seed``; under
    ``torchrun`` (``dist.world > 1``) the model trains as DistributedDataParallel, each rank on an
    equal shard of it, and rank 0's buffers (batch-norm statistics) are broadcast after every epoch.
    ``after_epoch(epoch, row)`` runs on every rank with the epoch's training loss and accuracy.
    Returns ``model`` (on ``dist.device``, eval mode).

    Example:
        >>> import torch
        >>> from keepbits.training.classifier import FitConfig, fit_classifier
        >>> from keepbits.training.data import TensorArrays
        >>> x = torch.randn(32, 1, 4, 4); y = (x.mean((1, 2, 3)) > 0).long()
        >>> rows = []
        >>> net = fit_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)), TensorArrays(x, y),
        ...                      FitConfig(epochs=2, batch_size=8, optimizer="adamw", augment="none", progress=False),
        ...                      after_epoch=lambda epoch, row: rows.append(row["epoch"]))
        >>> rows
        [1, 2]
    """
    cfg.validate()
    dist = dist or Dist()
    amp = autocast(resolve_precision(cfg.precision, dist.device))
    model = model.to(dist.device, memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU (oneDNN), as fast on GPU
    optimizer = optimizer or make_optimizer(model, cfg)
    net = data_parallel(dist, model)
    flip = cfg.augment == "crop-flip" or (cfg.augment == "auto" and data.channels == 3)
    crop = cfg.crop_padding if cfg.augment != "none" else 0
    lr = cfg.default_lr()
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * dist.world))
    epochs = cfg.epochs if cfg.steps is None else math.ceil(cfg.steps / steps_per_epoch)
    total_epochs = cfg.epochs if cfg.steps is None else cfg.steps / steps_per_epoch
    steps_done = start_epoch * steps_per_epoch
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, epochs):
        net.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(data), generator=gen)
        pad = (-len(order)) % dist.world  # equal shard sizes, as DistributedSampler
        order = torch.cat([order, order[:pad]])[dist.rank :: dist.world]
        aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + dist.rank)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not (cfg.progress and dist.main), dynamic_ncols=True, leave=False)
        seen, loss_sum, correct = 0, 0.0, 0
        for step, (x, y) in enumerate(data.batches(cfg.batch_size, order, crop, flip, aug_gen)):
            if cfg.steps is not None and steps_done == cfg.steps:
                break
            factor = _lr_factor(cfg, epoch + step / steps_per_epoch, total_epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr * factor
            x, y = x.to(dist.device, memory_format=torch.channels_last), y.to(dist.device)
            with amp:
                logits = net(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise InputError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower the learning rate")
            steps_done += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        broadcast_buffers(dist, model)  # batch-norm statistics drift per rank: continue from rank 0's
        if after_epoch is not None:
            after_epoch(epoch, {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)})
    return model.eval()


def _prepare_data(cfg: ClassifierConfig) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
    size, policy = tuple(cfg.image_size), cfg.resize_policy  # used by class-folder trees only
    full = load_dataset(cfg.data, "train", size, policy)
    test = load_dataset(cfg.data, "test", size, policy) if has_split(cfg.data, "test") else None
    if test is not None and (test.x.shape[1:] != full.x.shape[1:] or test.num_classes > full.num_classes):
        raise InputError(f"{cfg.data}: test split has images {test.x.shape[1:]} / {test.num_classes} classes, train has {full.x.shape[1:]} / {full.num_classes}")
    train_idx, val_idx = train_val_split(full.y, cfg.val_fraction, cfg.seed)
    if cfg.max_train:  # a class-balanced sample, not the first N: files such as CIFAR-10's are sorted by class
        train_idx = train_idx[sample_indices(full.y[train_idx], cfg.max_train, cfg.seed)]
    val = full.subset(val_idx, "[val]") if len(val_idx) else None
    return full.subset(train_idx, "[train]"), val, test


def _load_init(model: torch.nn.Module, path: str, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """Load a classifier checkpoint's weights into ``model`` (same names and shapes); the
    normalisation those weights were trained with replaces the data's own."""
    ckpt = load_checkpoint(path, "classifier")
    entry = ckpt.models["classifier"]
    load_state(model, entry.state_dict, f"{path}: weights do not fit this architecture")
    log.info("initialised from %s (%s)", path, entry.arch)
    return list(ckpt.normalization.mean), list(ckpt.normalization.std)


def train_classifier(cfg: ClassifierConfig) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``cfg.data``; write ``last.pt``/``best.pt`` into ``cfg.out``; return metrics."""
    cfg.validate()
    refuse_earlier_run([Path(cfg.out) / "last.pt", Path(cfg.out) / "best.pt"], cfg.resume, cfg.overwrite, Path(cfg.out) / "last.pt")
    registry.spec(cfg.arch, "classifier")
    dist = init_distributed(use_cuda=resolve_device(cfg.device) == "cuda")
    resolve_precision(cfg.precision, dist.device)  # bf16 without CUDA is refused before any data is read
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    train_set, val_set, test_set = _prepare_data(cfg)
    mean, std = channel_stats(train_set.x)
    c, h, w = train_set.shape_chw
    kwargs = {"in_channels": c, "num_classes": train_set.num_classes, "image_size": [h, w]}
    model = registry.build(cfg.arch, **kwargs)
    if cfg.init:
        mean, std = _load_init(model, cfg.init, mean, std)
    model = model.to(dist.device, memory_format=torch.channels_last)
    train_t = TensorImages(train_set, mean, std)
    val_t = TensorImages(val_set, mean, std) if val_set is not None else None
    test_t = TensorImages(test_set, mean, std) if test_set is not None else None
    optimizer = make_optimizer(model, cfg)
    preprocessing = {"resize_policy": train_set.meta["resize_policy"]} if "resize_policy" in train_set.meta else {}

    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    start_epoch, history, best = 0, [], None
    # the process count too: --batch-size is per process, so another count is another effective batch
    settings = {**run_settings(cfg, leave_out=("progress",)), "world_size": dist.world}
    if cfg.resume and last_path.exists():
        # an lr left to the optimizer's default (None) equals that default named explicitly
        previous = load_resumable(last_path, "classifier", settings, RESUME_MAY_CHANGE,
                                  defaults={"lr": replace(cfg, lr=None).default_lr()})
        entry = previous.models["classifier"]
        if entry.arch != cfg.arch:
            raise CheckpointError(f"{last_path}: checkpoint is a {entry.arch}, asked to resume a {cfg.arch}")
        if len(previous.class_names) != train_set.num_classes:
            raise CheckpointError(f"{last_path}: checkpoint has {len(previous.class_names)} classes, data has {train_set.num_classes}")
        model.load_state_dict(entry.state_dict)
        optimizer.load_state_dict(previous.optimizer)
        history, best = previous.metrics.get("history"), previous.metrics.get("best")
        if not isinstance(history, list) or not all(isinstance(row, dict) for row in history) or not isinstance(best, (dict, type(None))):
            raise CheckpointError(f"{last_path}: metrics must hold the run's history (a list of epoch rows) and best (a row or None) to resume")
        start_epoch = previous.epoch + 1
        refuse_finished(last_path, start_epoch, cfg.epochs, "epochs")
        log.info("resuming %s from epoch %d", last_path, start_epoch)
    elif cfg.resume:
        log.warning("%s: nothing to resume from; starting a new run", last_path)

    def snapshot(epoch: int, metrics: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            kind="classifier", models={"classifier": ModelEntry.of(cfg.arch, kwargs, model)}, input_shape=[c, h, w],
            normalization=Normalization(mean, std), class_names=train_set.class_names, preprocessing=preprocessing,
            settings=settings, command=cfg.command,
            metrics=metrics, epoch=epoch, optimizer=optimizer.state_dict(),
        )

    # a resumed run's clock goes on from the earlier process's (as NICE's and density's do)
    before = history[-1].get("elapsed_s", 0.0) if history else 0.0
    started = time.time() - (float(before) if isinstance(before, (int, float)) and math.isfinite(before) else 0.0)

    def after_epoch(epoch: int, row: dict[str, Any]) -> None:
        nonlocal best
        if val_t is not None:
            row["val_accuracy"] = evaluate(model, val_t, dist=dist)["accuracy"]
        if test_t is not None:
            row["test_accuracy"] = evaluate(model, test_t, dist=dist)["accuracy"]
        row["elapsed_s"] = round(time.time() - started, 1)
        history.append(row)
        # selection reads the validation split only (never test); without one, nothing is selected
        improved = val_t is not None and (best is None or row["val_accuracy"] > best["val_accuracy"])
        if improved:
            best = {"epoch": epoch + 1, "selected_by": "val_accuracy", **{k: v for k, v in row.items() if k.endswith("accuracy")}}
        metrics: dict[str, Any] = {"history": history, "best": best, "world_size": dist.world}
        if dist.world > 1 and epoch == cfg.epochs - 1:  # record that every rank ends on the same weights
            metrics["rank_parameter_digests"] = all_gather(dist, state_digest(model)[:16])
        if dist.main:
            log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs, "  ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "elapsed_s"))
            save_checkpoint(last_path, snapshot(epoch, metrics))
            if improved:
                save_checkpoint(best_path, snapshot(epoch, metrics))

    if val_t is None and dist.main:
        log.warning("no validation split (val_fraction 0): nothing is selected, no best.pt is written; use last.pt")
    fit_classifier(model, train_t, cfg, dist=dist, optimizer=optimizer, start_epoch=start_epoch, after_epoch=after_epoch)
    shutdown(dist)  # rank 0's checkpoints are on disk before any rank returns
    return {
        "epochs_run": cfg.epochs - start_epoch,
        "history": history,
        "best": best,
        "world_size": dist.world,
        "device": dist.device,
        "precision": resolve_precision(cfg.precision, dist.device),
        "wall_time_s": round(time.time() - started, 1),
        "checkpoints": {"last": str(last_path), "best": str(best_path) if best is not None else None},
    }
