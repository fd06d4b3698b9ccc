"""NICE training (Li & Ji, "Neural Image Compression and Explanation"); the rate/accuracy
benchmark of trained models is :mod:`keepbits.training.nice_eval`.

A generator maps the normalised image x to gate logits log α (N×1×H×W). Training samples
hard-concrete gates z (Eq. 7), builds the mixed-resolution image x̃ = x⊙z + x_b⊙(1−z)
(Eq. 12) and minimises (Eq. 10)

    L = L_D + λ1 L_C + λ2 L_S,

L_D the classifier's cross-entropy on x̃, L_C the expected L0 norm of the gates (Eq. 6)
and L_S the smoothness of y = E[z] (Eqs. 8–9). L_C and L_S are divided by the number of
pixels H·W, so λ1 trades one unit of cross-entropy against the whole image and the same
λ means the same thing at every image size. Evaluation always uses the deterministic
mask ẑ (Eq. 11). The math comes from :mod:`keepbits.training.functional`.

Modes: ``fixed`` (the classifier is frozen, eval mode, no gradient) and ``finetuned``
(the classifier blocks named in ``train_blocks`` train too, NICE footnote 4). With
``target_fraction`` set, "kept fraction = t" is treated as an equality constraint and λ1
as its Lagrange multiplier: after every step λ1 ← λ1 + η·(f − t)/t (dual ascent), f the
batch's kept fraction (ẑ > 0.5). λ1 may turn negative when the classifier alone would keep
fewer pixels than asked, so the fraction is reached from either side. The loss is then
divided by 1 + |λ1|: the gradient scale stays bounded while λ1 moves (Adam's moment
estimates lag a fast-growing loss and take oversized steps that saturate the gates) and
the minimiser for a given λ1 is unchanged.

Saliency warm start (``warmup_steps`` > 0; not in the paper): before Eq. 10 training, the
generator is fitted for that many steps to a localisation the classifier already has: per
image, the ``warmup_fraction`` of pixels with the highest gradient saliency |∂logit_y/∂x|
(channels summed, box-smoothed over ``warmup_smooth`` px), as a binary cross-entropy on
log α/β at learning rate ``warmup_lr`` (a supervised fit; Eq. 10's lr is too slow for it),
so ẑ > 0.5 (⇔ log α > 0, Eq. 11) on exactly those pixels. Eq. 10 training then refines the
mask. It helps where the generator would otherwise have to discover *where* the
object is from the weak L_D gradient alone (small objects in large scenes); the validation
accuracy and kept fraction after the warm start are recorded as history row ``epoch 0``;
``epochs=0`` stops there (the warm-started generator alone, for comparison).

Example:
    >>> import tempfile
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.training.classifier import ClassifierConfig, train_classifier
    >>> from keepbits.training.nice import NiceConfig, train_nice
    >>> out = tempfile.mkdtemp()
    >>> clf = train_classifier(ClassifierConfig(data=str(sample_mnist_path()), arch="lenet5", out=out + "/clf", epochs=1, progress=False))
    >>> cfg = NiceConfig(data=str(sample_mnist_path()), classifier=clf["checkpoints"]["last"], out=out + "/nice",
    ...                  generator="nice_mnist", block_size=28, epochs=1, progress=False)
    >>> summary = train_nice(cfg)
    >>> 0.0 <= summary["final"]["kept_fraction"] <= 1.0
    True
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from keepbits import registry
from keepbits.core.hard_concrete import BETA
from keepbits.data import Preprocessing, has_split, load_dataset, train_val_split
from keepbits.errors import CheckpointError, InputError
from keepbits.training.byo import Classifier, as_classifier, resolve_classifier
from keepbits.training.checkpoint import (
    Checkpoint, ModelEntry, build_model, check_resumable, load_checkpoint, refuse_earlier_run, refuse_finished, run_settings, save_checkpoint,
)
from keepbits.training.data import TensorImages
from keepbits.training.distributed import (
    PRECISIONS, Dist, all_reduce_sum, autocast, barrier, broadcast_buffers, data_parallel, init_distributed, resolve_device,
    resolve_precision, shutdown,
)
from keepbits.training.functional import (
    deterministic_mask,
    expected_gate,
    hard_concrete_sample,
    l0_penalty,
    mixed_resolution,
    smoothness_loss,
)
from keepbits.training.models.fast_generators import attach_classifier

log = logging.getLogger("keepbits")

MODES = ("fixed", "finetuned")
OPTIMIZERS = ("adam", "sgd")
LABELS = ("auto", "true", "predicted")
#: settings a ``--resume`` may change (run control); any other change is refused (:func:`check_resumable`)
RESUME_MAY_CHANGE = frozenset({"epochs", "max_minutes", "device", "precision", "workers", "shuffle_buffer", "out"})
MASK_THRESHOLD = 0.5
#: bound on |λ1| in target-sparsity mode
LAMBDA_MAX = 1e4
#: epoch numbers the warm start draws its batches (and crops) with, apart from training's
WARMUP_EPOCHS = 1_000_000


@dataclass
class NiceConfig:
    """Settings of one NICE run (the flags of ``keepbits train nice``).

    Classifier: ``classifier`` names it (:func:`keepbits.training.byo.resolve_classifier`: a
    checkpoint, a registry name, ``package.module:factory`` with ``classifier_weights`` /
    ``classifier_kwargs``, or an ``.onnx`` file), unless :func:`train_nice` is given one;
    ``preprocessing`` overrides fields of its :class:`keepbits.data.Preprocessing`.

    Data: ``data``, a data set read into memory (:func:`keepbits.data.load_dataset`; class-folder
    trees are brought to the classifier's size by its preprocessing), or ``footage``, paths
    streamed from disk (:class:`keepbits.data.Footage`: image folders of any nesting, videos,
    every ``frame_step``-th frame, ``.npz``) by ``workers`` processes with random crops and flips
    (``min_crop_area``); ``val_footage`` is evaluated after every epoch (no augmentation).
    ``labels``: ``true`` (the data's labels), ``predicted`` (the classifier's prediction on the
    unmasked image is L_D's target, Eq. 10), ``auto`` (true where the data has labels).

    ``optimizer='adam'``: Adam, lr ×0.1 every ``step_epochs`` epochs (NICE, MNIST);
    ``'sgd'``: SGD momentum 0.9 with a cosine schedule (NICE, natural images).
    ``max_train`` / ``max_test``: seeded samples of that many images (``seed``), not the first N.
    ``batch_size`` is per process (under ``torchrun`` the step sees ``world`` times as many).
    ``device``: ``auto`` | ``cpu`` | ``cuda``; ``precision``: ``auto`` (bf16 autocast of the
    networks' forward passes on CUDA, float32 on the CPU), ``fp32`` or ``bf16`` (CUDA only);
    losses, gates and the λ1 update are always float32. ``resume`` continues from ``out/last.pt``.
    ``max_minutes`` ends the run after the epoch in which that much wall time has passed (the
    learning-rate schedule still spans ``epochs``).
    ``val_fraction``: the stratified validation split held out of ``data``'s training split
    (:func:`keepbits.data.train_val_split`, ``seed``; give the classifier's own ``val_fraction``
    and ``seed`` so it holds images the classifier never trained on); with footage,
    ``val_footage`` is the validation split. Every epoch is evaluated on it, and choices
    (λ1, learning rates) are made on it; the test split is evaluated once, after training
    (``metrics["final"]``).
    """

    out: str
    classifier: str = ""
    data: str = ""
    footage: list[str] = field(default_factory=list)
    frame_step: int = 1
    workers: int = 0
    val_footage: list[str] = field(default_factory=list)
    min_crop_area: float = 0.25
    shuffle_buffer: int = 256
    labels: str = "auto"
    classifier_weights: str | None = None
    classifier_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    generator: str = "auto"
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = "fixed"
    train_blocks: list[str] = field(default_factory=list)
    block_size: int = 8
    lambda_l0: float = 1.0
    lambda_smooth: float = 0.0
    target_fraction: float | None = None
    target_rate: float = 0.05
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    warmup_smooth: int = 9
    warmup_lr: float = 1e-2
    optimizer: str = "adam"
    lr: float = 1e-3
    classifier_lr: float | None = None
    step_epochs: int = 5
    epochs: int = 10
    max_minutes: float | None = None
    batch_size: int = 64
    max_train: int | None = None
    max_test: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.labels not in LABELS:
            raise InputError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.out:
            raise InputError("an output folder is required")
        if bool(self.data) == bool(self.footage):
            raise InputError("give either data (a data set read into memory) or footage (paths streamed from disk), not both or neither")
        if self.val_footage and not self.footage:
            raise InputError("val footage goes with footage; a data set's validation split is --val-fraction of its training split")
        if self.frame_step < 1 or self.workers < 0 or self.shuffle_buffer < 0 or not 0.0 < self.min_crop_area <= 1.0:
            raise InputError(f"frame step must be >= 1, workers and shuffle buffer >= 0, min crop area in (0, 1]; got "
                             f"{self.frame_step}, {self.workers}, {self.shuffle_buffer}, {self.min_crop_area}")
        if self.block_size < 1:
            raise InputError(f"block size b must be >= 1, got {self.block_size}")
        if self.epochs < (0 if self.warmup_steps else 1) or self.batch_size < 1 or self.step_epochs < 1:
            raise InputError("epochs (0 allowed only after a warm start), batch size and step epochs must be positive")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"max minutes must be positive, got {self.max_minutes}")
        if not all(math.isfinite(v) and v >= 0 for v in (self.lambda_l0, self.lambda_smooth)):
            raise InputError(f"λ1 and λ2 must be finite and >= 0, got {self.lambda_l0} and {self.lambda_smooth}")
        if self.target_fraction is not None and not 0.0 < self.target_fraction < 1.0:
            raise InputError(f"target fraction must be in (0, 1), got {self.target_fraction}")
        for name, lr in (("learning rate", self.lr), ("classifier learning rate", self.classifier_lr)):
            if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
                raise InputError(f"{name} must be finite and >= 0, got {lr}")
        if self.warmup_steps < 0 or self.warmup_smooth < 1 or not self.warmup_lr > 0:
            raise InputError(f"warm-up steps must be >= 0, smoothing >= 1 px and lr > 0, got {self.warmup_steps}, {self.warmup_smooth}, {self.warmup_lr}")
        if self.warmup_fraction is not None and not 0.0 < self.warmup_fraction < 1.0:
            raise InputError(f"warm-up fraction must be in (0, 1), got {self.warmup_fraction}")
        if self.mode == "fixed" and self.train_blocks:
            raise InputError("train blocks are only used in finetuned mode")
        if self.generator != "auto":  # "auto" is resolved from the input size in train_nice
            registry.resolve(self.generator, None if ":" in self.generator else "generator")


def mask_and_mix(generator: torch.nn.Module, x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time ẑ (Eq. 11) of normalised ``x`` and its mixed-resolution image x̃ (Eq. 12)."""
    z_hat = deterministic_mask(generator(x))
    return z_hat, mixed_resolution(x, z_hat, block_size)


def load_nice(path: str | Path) -> tuple[torch.nn.Module, torch.nn.Module, Checkpoint]:
    """(generator, classifier, checkpoint) of a ``nice`` checkpoint, both networks in eval mode."""
    ckpt = load_checkpoint(path, "nice")
    classifier = build_model(ckpt, "classifier").eval()
    return attach_classifier(build_model(ckpt, "generator"), classifier).eval(), classifier, ckpt


@torch.no_grad()
def _evaluate(generator: torch.nn.Module, classifier: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
              block_size: int, threshold: float = MASK_THRESHOLD) -> dict[str, float]:
    """Accuracy on x̃ (when labels are given), agreement of the prediction on x̃ with the one on
    x, mean kept fraction (ẑ > threshold) and mean ẑ over normalised ``batches``."""
    generator.eval()
    classifier.eval()
    correct, agree, kept, mean_z, n, labelled = 0, 0, 0.0, 0.0, 0, 0
    for x, y in batches:
        z_hat, mixed = mask_and_mix(generator, x, block_size)
        pred = classifier(mixed).argmax(1)
        agree += (pred == classifier(x).argmax(1)).sum().item()
        if y is not None:
            correct += (pred == y.to(pred.device)).sum().item()
            labelled += len(y)
        kept += (z_hat > threshold).float().flatten(1).mean(1).sum().item()
        mean_z += z_hat.flatten(1).mean(1).sum().item()
        n += len(x)
    if n == 0:
        raise InputError("NICE evaluation read no image")
    metrics = {"agreement": agree / n, "kept_fraction": kept / n, "mean_mask": mean_z / n, "images": n}
    return {"accuracy": correct / labelled, **metrics} if labelled else metrics


def evaluate_nice(
    generator: torch.nn.Module,
    classifier: torch.nn.Module,
    data: TensorImages,
    block_size: int,
    batch_size: int = 256,
    threshold: float = MASK_THRESHOLD,
) -> dict[str, float]:
    """Accuracy of ``classifier`` on x̃ built with ẑ, agreement with its prediction on the
    unmasked image, mean kept fraction (ẑ > threshold) and mean ẑ (on the networks' device)."""
    device = next(generator.parameters()).device
    batches = ((x.to(device), y) for x, y in data.batches(batch_size))
    return _evaluate(generator, classifier, batches, block_size, threshold)


def _select_trainable(classifier: torch.nn.Module, blocks: Sequence[str]) -> list[torch.nn.Parameter]:
    """Unfreeze the parameters under the named modules (all when ``blocks`` is empty)."""
    top = [name for name, _ in classifier.named_children()]
    for block in blocks:
        if not any(name == block or name.startswith(block + ".") for name, _ in classifier.named_modules()):
            raise InputError(f"classifier has no block {block!r}; top-level blocks: {', '.join(top)}")
    params = []
    for name, p in classifier.named_parameters():
        keep = not blocks or any(name.startswith(block + ".") for block in blocks)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params


def _set_train_modes(classifier: torch.nn.Module, blocks: Sequence[str], mode: str) -> None:
    """Frozen parts stay in eval mode (batch-norm statistics untouched); trained blocks train."""
    classifier.eval()
    if mode == "finetuned":
        for name, module in classifier.named_modules():
            if not blocks or any(name == block or name.startswith(block + ".") for block in blocks):
                module.train()


class _Normalizer:
    """uint8 N×C×H×W batches → normalised float on the device (``(x/255 − mean)/std``)."""

    def __init__(self, pre: Preprocessing, device: str):
        self.mul = (1.0 / (255.0 * torch.tensor(pre.std, dtype=torch.float32))).view(1, -1, 1, 1).to(device)
        self.add = (-torch.tensor(pre.mean, dtype=torch.float32) / torch.tensor(pre.std, dtype=torch.float32)).view(1, -1, 1, 1).to(device)
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).float() * self.mul + self.add


class _ArrayData:
    """A data set held in memory as uint8 N×C×H×W (+ labels), sharded and batched per epoch as
    :func:`keepbits.training.classifier.fit_classifier` does: one seeded permutation, padded to a
    multiple of the world size, every ``world``-th image from ``rank`` on."""

    labelled = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, epoch: int, cfg: NiceConfig, dist: Dist, shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)) if shuffle else torch.arange(len(self))
        order = torch.cat([order, order[: (-len(order)) % dist.world]])[dist.rank :: dist.world]
        for start in range(0, len(order), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            yield self.images[index], self.labels[index]


class _FootageData:
    """Footage streamed by worker processes (:class:`keepbits.training.footage.FootageDataset`)."""

    def __init__(self, paths: Sequence[str], pre: Preprocessing, cfg: NiceConfig, dist: Dist, augment: bool):
        from keepbits.data import Footage
        from keepbits.training.footage import FootageDataset

        self.footage = Footage(paths, frame_step=cfg.frame_step)
        self.labelled = self.footage.labelled
        self.dataset = FootageDataset(self.footage, pre, augment=augment, labels=self.labelled,
                                      min_crop_area=cfg.min_crop_area, seed=cfg.seed, shuffle=cfg.shuffle_buffer if augment else 0,
                                      shard=(dist.rank, dist.world) if augment else (0, 1))
        self.workers, self.batch_size, self.pin = cfg.workers, cfg.batch_size, dist.device != "cpu"

    def batches(self, epoch: int, cfg: NiceConfig, dist: Dist, shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        from keepbits.training.footage import footage_loader

        self.dataset.set_epoch(epoch)
        for item in footage_loader(self.dataset, self.batch_size, self.workers, pin_memory=self.pin, persistent_workers=False):
            yield (item[0], item[1]) if self.dataset.labels else (item, None)


def _read_counts(data: Any) -> str:
    """What a footage source found and skipped, for a message (empty for other sources)."""
    if not isinstance(data, _FootageData):
        return ""
    counts = data.footage.counts.as_dict()
    return (f" from {sum(data.footage.files().values())} footage files ({counts['images']} pictures and {counts['frames']} frames read, "
            f"{counts['skipped']} files skipped as unreadable)")


def _load_data(cfg: NiceConfig, clf: Classifier, dist: Dist, true_labels: bool) -> tuple[Any, Any, Any]:
    """(train, validation or None, test or None) sources of uint8 batches at the classifier's input
    size, with labels where the data has them (``true_labels``: they are L_D's targets, so they must
    name the classifier's classes); a data set's validation split is carved from its training split."""
    pre = clf.preprocessing
    if cfg.footage:
        train = _FootageData(cfg.footage, pre, cfg, dist, augment=True)
        val = _FootageData(cfg.val_footage, pre, cfg, dist, augment=False) if cfg.val_footage else None
        if val is not None:  # selection on images the generator trained on would measure nothing held out
            seen = {os.path.realpath(unit.path) for unit in train.footage.units}
            shared = sorted({unit.path for unit in val.footage.units if os.path.realpath(unit.path) in seen})
            if shared:
                raise InputError(f"{len(shared)} file(s) of the validation footage are training footage too (e.g. {shared[0]}): "
                                 "--val-footage must be held out of --footage")
        return train, val, None
    size, policy = pre.input_size, pre.resize_policy
    channels = clf.input_shape[0]  # grey class-folder PNGs for a grey classifier
    splits = [load_dataset(cfg.data, "train", size, policy, pre.crop_fraction, channels)]
    splits.append(load_dataset(cfg.data, "test", size, policy, pre.crop_fraction, channels) if has_split(cfg.data, "test") else None)
    for split in splits:
        if split is not None and list(split.shape_chw) != clf.input_shape:
            raise InputError(f"{cfg.data}: images are {list(split.shape_chw)} (C,H,W) but the classifier expects {clf.input_shape}")
        if split is not None and true_labels and split.num_classes > len(clf.class_names):
            raise InputError(f"{cfg.data}: {split.num_classes} classes, the classifier knows {len(clf.class_names)}")
    train, test = splits
    train_index, val_index = train_val_split(train.y, cfg.val_fraction, cfg.seed)
    val = train.subset(val_index, "[val]") if len(val_index) else None
    train = train.subset(train_index, "[train]")
    if cfg.max_train:
        train = train.sample(cfg.max_train, cfg.seed)
    if test is not None and cfg.max_test:
        test = test.sample(cfg.max_test, cfg.seed)

    def tensors(ds: Any) -> _ArrayData:
        images = torch.from_numpy(np.ascontiguousarray(ds.x.transpose(0, 3, 1, 2)))
        return _ArrayData(images, torch.as_tensor(ds.y, dtype=torch.int64))

    return tensors(train), *(tensors(split) if split is not None else None for split in (val, test))


def _lr_factor(cfg: NiceConfig, progress: float) -> float:
    if cfg.optimizer == "sgd":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress / cfg.epochs)))
    return 0.1 ** int(progress // cfg.step_epochs)


def nice_loss(
    log_alpha: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lambda_l0: float, lambda_smooth: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 10 with L_C (Eq. 6) and L_S (Eq. 8 on y, Eq. 9) per pixel; returns (loss, parts).

    Example:
        >>> import torch
        >>> loss, parts = nice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), torch.tensor([0, 1]), 1.0, 1.0)
        >>> round(parts["smooth"], 3)
        0.0
    """
    pixels = log_alpha.shape[-2] * log_alpha.shape[-1]
    l_d = F.cross_entropy(logits, labels)
    l_c = l0_penalty(log_alpha) / pixels
    l_s = smoothness_loss(expected_gate(log_alpha)) / pixels
    loss = l_d + lambda_l0 * l_c + lambda_smooth * l_s
    return loss, {"ce": l_d.item(), "l0": l_c.item(), "smooth": l_s.item()}


#: ``generator="auto"`` picks the full-resolution ``nice_unet`` up to this shorter image side
#: (MNIST, CIFAR: pixel-exact masks matter, the U-Net is cheap there) and ``nice_fast`` above
#: it (camera frames: ``nice_unet`` costs as much as ResNet-18 at 224×224, ``nice_fast`` ~0.5 %).
FULL_RES_GENERATOR_MAX_SIDE = 64


def default_generator(height: int, width: int) -> str:
    """The registry name ``generator="auto"`` resolves to for H×W inputs.

    Example:
        >>> default_generator(28, 28), default_generator(224, 224)
        ('nice_unet', 'nice_fast')
    """
    return "nice_unet" if min(height, width) <= FULL_RES_GENERATOR_MAX_SIDE else "nice_fast"


def gradient_saliency(classifier: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, smooth: int = 1) -> torch.Tensor:
    """|∂ logit_t / ∂x| summed over channels (N×H×W); t = ``target``, default the predicted class;
    ``smooth`` > 1: box-filtered over ``smooth`` px (the warm start's map, and its test-time control).

    Example:
        >>> import torch
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 2))
        >>> gradient_saliency(clf, torch.randn(2, 1, 3, 3), smooth=3).shape
        torch.Size([2, 3, 3])
    """
    classifier.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classifier(x)
        t = logits.argmax(1) if target is None else target
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    scores = grad.abs().sum(1)
    if smooth > 1:
        scores = F.avg_pool2d(scores[:, None], smooth, stride=1, padding=smooth // 2, count_include_pad=False)[:, 0, : x.shape[2], : x.shape[3]]
    return scores


def topk_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Binary N×1×H×W mask keeping the ``counts[i]`` highest-scoring pixels of image i.

    Example:
        >>> import torch
        >>> topk_mask(torch.tensor([[[0.1, 0.9], [0.5, 0.2]]]), torch.tensor([2]))[0, 0].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    n = scores.shape[0]
    flat = scores.reshape(n, -1)
    rank = flat.argsort(1, descending=True).argsort(1)
    return (rank < counts.view(n, 1)).float().view(n, 1, *scores.shape[-2:])


def saliency_target(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fraction: float, smooth: int) -> torch.Tensor:
    """Binary N×1×H×W mask of the ``fraction`` most salient pixels per image: gradient saliency
    of the label's logit, box-smoothed over ``smooth`` px (the warm start's target).

    Example:
        >>> import torch
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> saliency_target(clf, torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 0]), 0.25, 1).sum((1, 2, 3)).tolist()
        [4.0, 4.0, 4.0]
    """
    scores = gradient_saliency(classifier, x, y, smooth)[:, None]
    counts = torch.full((len(x),), max(1, round(fraction * x.shape[2] * x.shape[3])), device=x.device)
    return topk_mask(scores, counts)


class _NiceNets(torch.nn.Module):
    """Generator and classifier as one module: the unit DistributedDataParallel wraps. Without
    ``noise``: log α only (the warm start); with it: log α and the classifier's logits of
    x̃(z), z the hard-concrete sample of Eq. 7 drawn with ``noise``."""

    def __init__(self, generator: torch.nn.Module, classifier: torch.nn.Module, block_size: int):
        super().__init__()
        self.generator, self.classifier, self.block_size = generator, classifier, block_size

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_alpha = self.generator(x).float()
        if noise is None:
            return log_alpha, None
        z = hard_concrete_sample(log_alpha, noise=noise)  # Eq. 7: L_D sees the sampled gate
        return log_alpha, self.classifier(mixed_resolution(x, z, self.block_size)).float()


def _step_noise(cfg: NiceConfig, dist: Dist, epoch: int, step: int, n: int, shape: Sequence[int]) -> torch.Tensor:
    """U(0, 1) noise of this rank's ``n`` images at (epoch, step): drawn for the whole step's
    batch on every rank from one seed and sliced as the images are (every ``world``-th), so a
    run on W processes samples the same gates as one process with W× the batch."""
    gen = torch.Generator(device=dist.device).manual_seed(((cfg.seed * 1_000_003 + epoch) * 1_000_003 + step) % (2**63))
    full = torch.rand((n * dist.world, *shape), generator=gen, device=dist.device)
    return full[dist.rank :: dist.world][:n]


def _targets(y: torch.Tensor | None, x: torch.Tensor, teacher: torch.nn.Module, predicted: bool, amp: Any) -> torch.Tensor:
    """L_D's target (Eq. 10): the data's labels, or the classifier's prediction on the unmasked image."""
    if not predicted:
        return y.to(x.device)
    with torch.no_grad(), amp:
        return teacher(x).argmax(1)


def _warm_start(cfg: NiceConfig, nets: torch.nn.Module, generator: torch.nn.Module, classifier: torch.nn.Module,
                teacher: torch.nn.Module, train: Any, normalize: _Normalizer, predicted: bool, dist: Dist,
                optimizer: torch.optim.Optimizer, amp: Any) -> dict[str, float]:
    """Fit log α/β to :func:`saliency_target` for ``cfg.warmup_steps`` steps (see module doc);
    returns the fraction asked and the last step's loss and kept fraction (ẑ > 0.5)."""
    fraction = cfg.warmup_fraction or cfg.target_fraction or 0.1
    generator.train()
    classifier.eval()
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.param_groups[0]["lr"] = cfg.warmup_lr  # group 0 is the generator's
    step, last, rounds = 0, {}, 0
    while step < cfg.warmup_steps:
        for x, y in _synced(train.batches(WARMUP_EPOCHS + rounds, cfg, dist), dist):
            x = normalize(x)
            target = saliency_target(classifier, x, _targets(y, x, teacher, predicted, amp), fraction, cfg.warmup_smooth)
            with amp:
                log_alpha, _ = nets(x)
            loss = F.binary_cross_entropy_with_logits(log_alpha / BETA, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == cfg.warmup_steps:
                last = {"warmup_bce": loss.item(), "warmup_train_kept": (log_alpha > 0).float().mean().item()}
                break
        rounds += 1
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return {"warmup_fraction": fraction, **last}


def _synced(batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]], dist: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``batches`` while every rank still has one (streamed footage shards can differ in length;
    a step needs every rank): the ranks agree before each step and stop together."""
    for batch in batches:
        if dist.world > 1 and int(all_reduce_sum(dist, torch.ones(1, device=dist.device)).item()) < dist.world:
            return
        yield batch
    if dist.world > 1:  # this rank is out: tell the others (their check counts one short)
        all_reduce_sum(dist, torch.zeros(1, device=dist.device))


def _snapshot_fields(cfg: NiceConfig, clf: Classifier) -> dict[str, Any]:
    settings = run_settings(cfg, leave_out=("progress", "command", "threads"))
    settings.update(block_size=int(cfg.block_size), mask_threshold=MASK_THRESHOLD, lambda_l0=float(cfg.lambda_l0),
                    lambda_smooth=float(cfg.lambda_smooth), classifier_checkpoint=settings["classifier"] or str(clf.source))
    return settings


def train_nice(cfg: NiceConfig, classifier: Classifier | torch.nn.Module | None = None,
               preprocessing: Preprocessing | None = None) -> dict[str, Any]:
    """Train a NICE generator against a classifier; write ``cfg.out/last.pt`` after every epoch
    and ``cfg.out/nice.pt`` at the end; return metrics.

    The classifier is ``classifier`` (a :class:`keepbits.training.byo.Classifier`, or an
    ``nn.Module`` with its ``preprocessing``), else the one ``cfg.classifier`` names. Under
    ``torchrun`` every process trains on its shard and gradients are averaged
    (DistributedDataParallel through :mod:`keepbits.training.distributed`); rank 0 writes."""
    cfg.validate()
    refuse_earlier_run([Path(cfg.out) / "last.pt", Path(cfg.out) / "nice.pt"], cfg.resume, cfg.overwrite, Path(cfg.out) / "last.pt")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dist = init_distributed(use_cuda=device == "cuda")
    precision = resolve_precision(cfg.precision, dist.device)
    amp = autocast(precision)
    if classifier is None:
        if not cfg.classifier:
            raise InputError("no classifier: name one (a checkpoint, registry name, package.module:factory or .onnx file)")
        clf = resolve_classifier(cfg.classifier, weights=cfg.classifier_weights, kwargs=cfg.classifier_kwargs,
                                 preprocessing=cfg.preprocessing or None)
    else:
        clf = as_classifier(classifier, preprocessing or cfg.preprocessing or None)
    c, h, w = clf.input_shape
    gen_kwargs = {"in_channels": c, **cfg.generator_kwargs}
    gen_name = default_generator(h, w) if cfg.generator == "auto" else cfg.generator
    if ":" in gen_name:
        registry.trust(gen_name)  # the user named it; the checkpoint will name it again
    try:
        generator = registry.resolve(gen_name, None if ":" in gen_name else "generator")(**gen_kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # an unknown option; a width of 0 (torch's own ValueError / RuntimeError)
        raise InputError(f"generator {cfg.generator}: bad options {cfg.generator_kwargs} ({exc})") from None
    classifier_net = clf.module
    if hasattr(generator, "attach") and cfg.mode != "fixed":
        raise InputError(f"generator {gen_name} reads the classifier's features, so the classifier must stay fixed (--mode fixed)")
    attach_classifier(generator, classifier_net)
    out = Path(cfg.out)
    last_path, path = out / "last.pt", out / "nice.pt"
    resumed = load_checkpoint(last_path, "nice") if cfg.resume and last_path.exists() else None
    if cfg.resume and resumed is None:
        log.warning("%s: nothing to resume from; starting a new run", last_path)
    if resumed is not None:
        for role, arch in (("generator", gen_name), ("classifier", clf.arch)):
            if resumed.models[role].arch != arch:
                raise CheckpointError(f"{last_path}: its {role} is a {resumed.models[role].arch}, this run's is a {arch}")
        generator.load_state_dict(resumed.models["generator"].state_dict)
        classifier_net.load_state_dict(resumed.models["classifier"].state_dict)
    predicted = cfg.labels == "predicted"
    train, val, test = _load_data(cfg, clf, dist, true_labels=cfg.labels != "predicted")
    if cfg.labels == "auto" and not train.labelled:
        predicted = True  # unlabelled footage: the classifier's own decisions are the targets
    if cfg.labels == "true" and not train.labelled:
        raise InputError("labels 'true' asked for, but the footage is unlabelled (use --labels predicted)")
    if resumed is not None:
        # the process count too: --batch-size is per process, so another count is another effective batch
        check_resumable(last_path, resumed.settings, {**_snapshot_fields(cfg, clf), "labels": "predicted" if predicted else "true",
                                                      "world_size": dist.world}, RESUME_MAY_CHANGE)
    generator.to(dist.device)
    classifier_net.to(dist.device)
    teacher = classifier_net
    if cfg.mode == "fixed":
        classifier_net.requires_grad_(False)
        groups = [{"params": list(generator.parameters()), "lr": cfg.lr}]
    else:
        if predicted:  # the targets stay the decisions of the classifier as given
            teacher = copy.deepcopy(classifier_net).eval().requires_grad_(False)
        trainable = _select_trainable(classifier_net, cfg.train_blocks)
        groups = [
            {"params": list(generator.parameters()), "lr": cfg.lr},
            {"params": trainable, "lr": cfg.classifier_lr if cfg.classifier_lr is not None else cfg.lr},
        ]
    if dist.world > 1 and dist.device != "cpu":
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    nets: torch.nn.Module = _NiceNets(generator, classifier_net, cfg.block_size)
    nets = data_parallel(dist, nets, find_unused_parameters=cfg.mode == "finetuned" and cfg.warmup_steps > 0)
    if cfg.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups)
    else:
        optimizer = torch.optim.SGD(groups, momentum=0.9)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    normalize = _Normalizer(clf.preprocessing, dist.device)

    lambda_l0 = cfg.lambda_l0
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resumed is not None:
        if resumed.optimizer is None:
            raise CheckpointError(f"{last_path}: holds no optimizer state to resume from")
        optimizer.load_state_dict(resumed.optimizer)
        history, lambda_final = resumed.metrics.get("history", []), resumed.settings.get("lambda_l0_final", lambda_l0)
        if (not isinstance(history, list) or not all(isinstance(row, dict) and isinstance(row.get("epoch", 0), numbers.Real) for row in history)
                or isinstance(lambda_final, bool) or not isinstance(lambda_final, numbers.Real) or not math.isfinite(lambda_final)):
            raise CheckpointError(f"{last_path}: needs the run's history (epoch rows) and a finite lambda_l0_final to resume from")
        history, lambda_l0 = list(history), float(lambda_final)
        if isinstance(train, _FootageData):  # the counts go on adding up over the whole run
            read = resumed.metrics.get("footage_read", {})
            for name in train.footage.counts.FIELDS:
                value = read.get(name, 0) if isinstance(read, dict) else 0
                train.footage.counts.add(name, int(value) if isinstance(value, int) and value >= 0 else 0)
        start_epoch = resumed.epoch + 1 if any(row.get("epoch", 0) >= 1 for row in history) else 0
        if cfg.epochs:  # epochs 0: a warm start only
            refuse_finished(last_path, start_epoch, cfg.epochs, "epochs")
        log.info("resuming %s after epoch %d", last_path, start_epoch)
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * dist.world)) if isinstance(train, _ArrayData) else None
    started = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    from tqdm.auto import tqdm

    def evaluate_on(data: Any) -> dict[str, float]:
        batches = ((normalize(x), y) for x, y in data.batches(0, cfg, Dist(device=dist.device), shuffle=False))
        return _evaluate(generator, classifier_net, batches, cfg.block_size)

    def snapshot(metrics: dict[str, Any], epoch: int, with_optimizer: bool) -> Checkpoint:
        settings = _snapshot_fields(cfg, clf)
        settings.update(lambda_l0_final=float(lambda_l0), labels="predicted" if predicted else "true", world_size=dist.world,
                        precision=precision)
        return Checkpoint(
            kind="nice", models={"generator": ModelEntry.of(gen_name, gen_kwargs, generator), "classifier": clf.entry(classifier_net)},
            input_shape=[c, h, w], normalization=clf.normalization, class_names=clf.class_names,
            preprocessing=clf.checkpoint_preprocessing(), settings=settings, metrics=metrics, command=cfg.command, epoch=epoch,
            optimizer=optimizer.state_dict() if with_optimizer else None,
        )

    def end_epoch(row: dict[str, Any], epoch: int) -> None:
        if dist.main:
            if val is not None:
                row.update({f"val_{k}": v for k, v in evaluate_on(val).items()})
            row["elapsed_s"] = round(time.time() - started, 1)
            history.append(row)
            log.info("nice epoch %d/%d  %s", epoch, cfg.epochs, "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "elapsed_s"))
            progress = {"history": history}
            if isinstance(train, _FootageData):
                progress["footage_read"] = train.footage.counts.as_dict()
            save_checkpoint(last_path, snapshot(progress, max(epoch - 1, 0), with_optimizer=True))
        barrier(dist)

    if cfg.warmup_steps and not history:
        row0: dict[str, Any] = {"epoch": 0, **_warm_start(cfg, nets, generator, classifier_net, teacher, train, normalize, predicted,
                                                         dist, optimizer, amp)}
        broadcast_buffers(dist, generator)
        end_epoch(row0, 0)
    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        generator.train()
        _set_train_modes(classifier_net, cfg.train_blocks, cfg.mode)
        sums = torch.zeros(7, dtype=torch.float64)  # loss, ce, l0, smooth, kept, correct, images
        bar = tqdm(total=steps_per_epoch, desc=f"nice epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and dist.main),
                   dynamic_ncols=True, leave=False)
        for step, (x_u8, y) in enumerate(_synced(train.batches(epoch, cfg, dist), dist)):
            factor = _lr_factor(cfg, epoch + step / steps_per_epoch if steps_per_epoch else epoch)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            x = normalize(x_u8)
            target = _targets(y, x, teacher, predicted, amp)
            noise = _step_noise(cfg, dist, epoch, step, len(x), (1, h, w))
            with amp:
                log_alpha, logits = nets(x, noise)
            loss, parts = nice_loss(log_alpha, logits, target, lambda_l0, cfg.lambda_smooth)
            if cfg.target_fraction is not None:
                loss = loss / (1.0 + abs(lambda_l0))  # bounded scale while λ1 moves; same minimiser
            if not torch.isfinite(loss):
                raise InputError(f"NICE training diverged at epoch {epoch + 1} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                kept_images = (deterministic_mask(log_alpha) > MASK_THRESHOLD).float().flatten(1).mean(1)
                n = len(x)
                step_sums = torch.tensor([loss.item() * n, parts["ce"] * n, parts["l0"] * n, parts["smooth"] * n,
                                          kept_images.sum().item(), (logits.argmax(1) == target).sum().item(), n], dtype=torch.float64)
            step_sums = all_reduce_sum(dist, step_sums.to(dist.device)).cpu()  # the whole step's batch, on every rank
            if cfg.target_fraction is not None:
                t = cfg.target_fraction
                kept = float(step_sums[4] / step_sums[6])
                lambda_l0 = float(np.clip(lambda_l0 + cfg.target_rate * (kept - t) / t, -LAMBDA_MAX, LAMBDA_MAX))
            sums += step_sums
            bar.update(1)
            bar.set_postfix(ce=f"{float(sums[1] / sums[6]):.3f}", kept=f"{float(sums[4] / sums[6]):.3f}", lam=f"{lambda_l0:.3g}")
        bar.close()
        if sums[6] == 0:  # summed over the ranks: every rank stops here together
            raise InputError(f"NICE epoch {epoch + 1} read no training image{_read_counts(train)}")
        broadcast_buffers(dist, generator)  # batch-norm statistics drift per rank: continue from rank 0's
        seen = float(sums[6])
        row: dict[str, Any] = {"epoch": epoch + 1, **{f"train_{k}": float(sums[i]) / seen
                                                      for i, k in enumerate(("loss", "ce", "l0", "smooth", "kept"))}}
        # L_D's targets are the labels or, with predicted labels, the decisions on the unmasked images
        row["train_agreement_sampled" if predicted else "train_accuracy_sampled"] = float(sums[5]) / seen
        row["train_images"] = int(sums[6])
        row["lambda_l0"] = lambda_l0
        end_epoch(row, epoch + 1)
        last_epoch = epoch
        out_of_time = cfg.max_minutes is not None and time.time() - started > 60.0 * cfg.max_minutes
        if int(all_reduce_sum(dist, torch.tensor([float(out_of_time)], device=dist.device)).item()):  # every rank stops together
            log.info("nice: time budget of %.1f min reached after epoch %d", cfg.max_minutes, epoch + 1)
            break

    summary: dict[str, Any] = {}
    if dist.main:
        split, final_data = next((name, data) for name, data in (("test", test), ("val", val), ("train", train)) if data is not None)
        if final_data is train and isinstance(train, _FootageData):
            # the training stream is random crops and flips, and this rank's shard only: measure whole
            # frames, every one of them, as keepbits eval and the runtime will see them
            final_data = _FootageData(cfg.footage, clf.preprocessing, cfg, dist, augment=False)
        final = evaluate_on(final_data)  # the one test evaluation, after training
        metrics = {"history": history, "final": final, "final_split": split, "lambda_l0_final": lambda_l0}
        if isinstance(train, _FootageData):
            # files found; pictures, frames and skipped files read over the run's training passes
            metrics["footage"] = {"files": train.footage.files(), "read": train.footage.counts.as_dict()}
        save_checkpoint(path, snapshot(metrics, max(last_epoch, 0), with_optimizer=False))
        summary = {**metrics, "checkpoint": str(path), "wall_time_s": round(time.time() - started, 1), "world_size": dist.world,
                   "device": dist.device, "precision": precision}
    del nets  # DistributedDataParallel lets go of the process group before it is destroyed
    shutdown(dist)
    return summary
