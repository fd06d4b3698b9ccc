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
    >>> clf = train_classifier(ClassifierConfig(data=str(sample_mnist_path()), arch="lenet5", out=out, epochs=1, progress=False))
    >>> cfg = NiceConfig(data=str(sample_mnist_path()), classifier=clf["checkpoints"]["last"], out=out,
    ...                  generator="nice_mnist", block_size=28, epochs=1, progress=False)
    >>> summary = train_nice(cfg)
    >>> 0.0 <= summary["final"]["kept_fraction"] <= 1.0
    True
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from keepbits import registry
from keepbits.core.hard_concrete import BETA
from keepbits.data import has_split, load_dataset, train_val_split
from keepbits.errors import CheckpointError, InputError
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint
from keepbits.training.data import TensorImages
from keepbits.training.functional import (
    deterministic_mask,
    expected_gate,
    hard_concrete_sample,
    l0_penalty,
    mixed_resolution,
    smoothness_loss,
)

log = logging.getLogger("keepbits")

MODES = ("fixed", "finetuned")
OPTIMIZERS = ("adam", "sgd")
MASK_THRESHOLD = 0.5
#: bound on |λ1| in target-sparsity mode
LAMBDA_MAX = 1e4


@dataclass
class NiceConfig:
    """Settings of one NICE run (the flags of ``keepbits train nice``).

    ``optimizer='adam'``: Adam, lr ×0.1 every ``step_epochs`` epochs (NICE, MNIST);
    ``'sgd'``: SGD momentum 0.9 with a cosine schedule (NICE, natural images).
    ``max_train`` / ``max_test``: seeded samples of that many images (``seed``), not the first N.
    ``val_fraction``: the stratified validation split held out of the training data
    (:func:`keepbits.data.train_val_split`, ``seed``; give the classifier's own ``val_fraction``
    and ``seed`` so it holds images the classifier never trained on). Every epoch is evaluated
    on it, and choices (λ1, learning rates) are made on it; the test split is evaluated once,
    after training (``metrics["final"]``).
    """

    data: str
    classifier: str
    out: str
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
    batch_size: int = 64
    max_train: int | None = None
    max_test: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.block_size < 1:
            raise InputError(f"block size b must be >= 1, got {self.block_size}")
        if self.epochs < (0 if self.warmup_steps else 1) or self.batch_size < 1 or self.step_epochs < 1:
            raise InputError("epochs (0 allowed only after a warm start), batch size and step epochs must be positive")
        if self.lambda_l0 < 0 or self.lambda_smooth < 0:
            raise InputError(f"λ1 and λ2 must be >= 0, got {self.lambda_l0} and {self.lambda_smooth}")
        if self.target_fraction is not None and not 0.0 < self.target_fraction < 1.0:
            raise InputError(f"target fraction must be in (0, 1), got {self.target_fraction}")
        if self.warmup_steps < 0 or self.warmup_smooth < 1 or self.warmup_lr <= 0:
            raise InputError(f"warm-up steps must be >= 0, smoothing >= 1 px and lr > 0, got {self.warmup_steps}, {self.warmup_smooth}, {self.warmup_lr}")
        if self.warmup_fraction is not None and not 0.0 < self.warmup_fraction < 1.0:
            raise InputError(f"warm-up fraction must be in (0, 1), got {self.warmup_fraction}")
        if self.mode == "fixed" and self.train_blocks:
            raise InputError("train blocks are only used in finetuned mode")
        if self.generator != "auto":  # "auto" is resolved from the input size in train_nice
            registry.spec(self.generator, "generator")


def mask_and_mix(generator: torch.nn.Module, x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time ẑ (Eq. 11) of normalised ``x`` and its mixed-resolution image x̃ (Eq. 12)."""
    z_hat = deterministic_mask(generator(x))
    return z_hat, mixed_resolution(x, z_hat, block_size)


def load_nice(path: str | Path) -> tuple[torch.nn.Module, torch.nn.Module, Checkpoint]:
    """(generator, classifier, checkpoint) of a ``nice`` checkpoint, both networks in eval mode."""
    ckpt = load_checkpoint(path, "nice")
    return build_model(ckpt, "generator").eval(), build_model(ckpt, "classifier").eval(), ckpt


@torch.no_grad()
def evaluate_nice(
    generator: torch.nn.Module,
    classifier: torch.nn.Module,
    data: TensorImages,
    block_size: int,
    batch_size: int = 256,
    threshold: float = MASK_THRESHOLD,
) -> dict[str, float]:
    """Accuracy of ``classifier`` on x̃ built with ẑ, mean kept fraction (ẑ > threshold) and mean ẑ."""
    generator.eval()
    classifier.eval()
    correct, kept, mean_z, n = 0, 0.0, 0.0, 0
    for x, y in data.batches(batch_size):
        z_hat, mixed = mask_and_mix(generator, x, block_size)
        correct += (classifier(mixed).argmax(1) == y).sum().item()
        kept += (z_hat > threshold).float().flatten(1).mean(1).sum().item()
        mean_z += z_hat.flatten(1).mean(1).sum().item()
        n += len(y)
    n = max(n, 1)
    return {"accuracy": correct / n, "kept_fraction": kept / n, "mean_mask": mean_z / n}


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


def _load_data(cfg: NiceConfig, clf: Checkpoint) -> tuple[TensorImages, TensorImages | None, TensorImages | None]:
    """(train, validation, test) of ``cfg.data`` as the classifier's tensors; validation carved from train."""
    train = load_dataset(cfg.data, "train")
    test = load_dataset(cfg.data, "test") if has_split(cfg.data, "test") else None
    for split in (train, test):
        if split is not None and list(split.shape_chw) != clf.input_shape:
            raise InputError(f"{cfg.data}: images are {list(split.shape_chw)} (C,H,W) but the classifier expects {clf.input_shape}")
        if split is not None and split.num_classes > len(clf.class_names):
            raise InputError(f"{cfg.data}: {split.num_classes} classes, the classifier knows {len(clf.class_names)}")
    train_idx, val_idx = train_val_split(train.y, cfg.val_fraction, cfg.seed)
    val = train.subset(val_idx, "[val]") if len(val_idx) else None
    train = train.subset(train_idx, "[train]")
    if cfg.max_train:
        train = train.sample(cfg.max_train, cfg.seed)
    if test is not None and cfg.max_test:
        test = test.sample(cfg.max_test, cfg.seed)
    mean, std = clf.normalization.mean, clf.normalization.std
    val_t = TensorImages(val, mean, std) if val is not None else None
    return TensorImages(train, mean, std), val_t, (TensorImages(test, mean, std) if test is not None else None)


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
    scores = gradient_saliency(classifier, x, y, smooth)
    counts = torch.full((len(x),), max(1, round(fraction * x.shape[2] * x.shape[3])))
    return topk_mask(scores, counts)


def _warm_start(cfg: NiceConfig, generator: torch.nn.Module, classifier: torch.nn.Module, train_t: TensorImages,
                optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Fit log α/β to :func:`saliency_target` for ``cfg.warmup_steps`` steps (see module doc);
    returns the fraction asked and the last step's loss and kept fraction (ẑ > 0.5)."""
    fraction = cfg.warmup_fraction or cfg.target_fraction or 0.1
    generator.train()
    classifier.eval()
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.param_groups[0]["lr"] = cfg.warmup_lr  # group 0 is the generator's
    step, last = 0, {}
    while step < cfg.warmup_steps:
        order = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(cfg.seed * 1000 - 1 - step))
        for x, y in train_t.batches(cfg.batch_size, order):
            target = saliency_target(classifier, x, y, fraction, cfg.warmup_smooth)
            log_alpha = generator(x)
            loss = F.binary_cross_entropy_with_logits(log_alpha / BETA, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == cfg.warmup_steps:
                last = {"warmup_bce": loss.item(), "warmup_train_kept": (log_alpha > 0).float().mean().item()}
                break
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return {"warmup_fraction": fraction, **last}


def train_nice(cfg: NiceConfig) -> dict[str, Any]:
    """Train a NICE generator against ``cfg.classifier``; write ``cfg.out/nice.pt``; return metrics."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    clf = load_checkpoint(cfg.classifier)
    if "classifier" not in clf.models:
        raise CheckpointError(f"{cfg.classifier}: holds no classifier (kind {clf.kind})")
    classifier = build_model(clf, "classifier")
    train_t, val_t, test_t = _load_data(cfg, clf)
    c, h, w = clf.input_shape
    gen_kwargs = {"in_channels": c, **cfg.generator_kwargs}
    gen_name = default_generator(h, w) if cfg.generator == "auto" else cfg.generator
    try:
        generator = registry.build(gen_name, "generator", **gen_kwargs)
    except TypeError as exc:
        raise InputError(f"generator {cfg.generator}: bad options {cfg.generator_kwargs} ({exc})") from None

    if cfg.mode == "fixed":
        classifier.requires_grad_(False)
        groups = [{"params": list(generator.parameters()), "lr": cfg.lr}]
    else:
        trainable = _select_trainable(classifier, cfg.train_blocks)
        groups = [
            {"params": list(generator.parameters()), "lr": cfg.lr},
            {"params": trainable, "lr": cfg.classifier_lr if cfg.classifier_lr is not None else cfg.lr},
        ]
    if cfg.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups)
    else:
        optimizer = torch.optim.SGD(groups, momentum=0.9)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    out = Path(cfg.out)
    path = out / "nice.pt"
    lambda_l0 = cfg.lambda_l0
    history: list[dict[str, Any]] = []
    steps_per_epoch = math.ceil(len(train_t) / cfg.batch_size)
    started = time.time()
    from tqdm.auto import tqdm

    def snapshot(metrics: dict[str, Any], epoch: int) -> Checkpoint:
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "command", "threads")}
        settings.update(
            block_size=int(cfg.block_size),
            mask_threshold=MASK_THRESHOLD,
            lambda_l0=float(cfg.lambda_l0),
            lambda_l0_final=float(lambda_l0),
            lambda_smooth=float(cfg.lambda_smooth),
            classifier_checkpoint=str(cfg.classifier),
        )
        clf_entry = clf.models["classifier"]
        return Checkpoint(
            kind="nice",
            models={"generator": ModelEntry.of(gen_name, gen_kwargs, generator), "classifier": ModelEntry.of(clf_entry.arch, clf_entry.kwargs, classifier)},
            input_shape=[c, h, w], normalization=Normalization(list(clf.normalization.mean), list(clf.normalization.std)),
            class_names=list(clf.class_names), preprocessing=dict(clf.preprocessing), settings=settings, metrics=metrics,
            command=cfg.command, epoch=epoch,
        )

    if cfg.warmup_steps:
        row0: dict[str, Any] = {"epoch": 0, **_warm_start(cfg, generator, classifier, train_t, optimizer)}
        if val_t is not None:
            row0.update({f"val_{k}": v for k, v in evaluate_nice(generator, classifier, val_t, cfg.block_size).items()})
        row0["elapsed_s"] = round(time.time() - started, 1)
        history.append(row0)
        log.info("nice warm start  %s", "  ".join(f"{k}={v:.4g}" for k, v in row0.items() if isinstance(v, float) and k != "elapsed_s"))
    for epoch in range(cfg.epochs):
        generator.train()
        _set_train_modes(classifier, cfg.train_blocks, cfg.mode)
        order = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        sums = {"loss": 0.0, "ce": 0.0, "l0": 0.0, "smooth": 0.0, "kept": 0.0, "correct": 0.0}
        seen = 0
        bar = tqdm(total=steps_per_epoch, desc=f"nice epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, dynamic_ncols=True, leave=False)
        for step, (x, y) in enumerate(train_t.batches(cfg.batch_size, order)):
            factor = _lr_factor(cfg, epoch + step / steps_per_epoch)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            log_alpha = generator(x)
            z = hard_concrete_sample(log_alpha)  # Eq. 7: L_D sees the sampled gate
            logits = classifier(mixed_resolution(x, z, cfg.block_size))
            loss, parts = nice_loss(log_alpha, logits, y, lambda_l0, cfg.lambda_smooth)
            if cfg.target_fraction is not None:
                loss = loss / (1.0 + abs(lambda_l0))  # bounded scale while λ1 moves; same minimiser
            if not torch.isfinite(loss):
                raise InputError(f"NICE training diverged at epoch {epoch + 1} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                kept = (deterministic_mask(log_alpha) > MASK_THRESHOLD).float().mean().item()
            if cfg.target_fraction is not None:
                t = cfg.target_fraction
                lambda_l0 = float(np.clip(lambda_l0 + cfg.target_rate * (kept - t) / t, -LAMBDA_MAX, LAMBDA_MAX))
            n = len(y)
            seen += n
            for key, value in (("loss", loss.item()), *parts.items(), ("kept", kept)):
                sums[key] += value * n
            sums["correct"] += (logits.argmax(1) == y).sum().item()
            bar.update(1)
            bar.set_postfix(ce=f"{sums['ce'] / seen:.3f}", kept=f"{sums['kept'] / seen:.3f}", lam=f"{lambda_l0:.3g}")
        bar.close()
        row: dict[str, Any] = {"epoch": epoch + 1, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items() if k != "correct"}}
        row["train_accuracy_sampled"] = sums["correct"] / max(seen, 1)
        row["lambda_l0"] = lambda_l0
        if val_t is not None:
            row.update({f"val_{k}": v for k, v in evaluate_nice(generator, classifier, val_t, cfg.block_size).items()})
        row["elapsed_s"] = round(time.time() - started, 1)
        history.append(row)
        log.info("nice epoch %d/%d  %s", epoch + 1, cfg.epochs, "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "elapsed_s"))
        save_checkpoint(path, snapshot({"history": history}, epoch))

    split, final_t = next((name, t) for name, t in (("test", test_t), ("val", val_t), ("train", train_t)) if t is not None)
    final = evaluate_nice(generator, classifier, final_t, cfg.block_size)  # the one test evaluation, after training
    metrics = {"history": history, "final": final, "final_split": split, "lambda_l0_final": lambda_l0}
    save_checkpoint(path, snapshot(metrics, max(cfg.epochs - 1, 0)))
    return {**metrics, "checkpoint": str(path), "wall_time_s": round(time.time() - started, 1)}
