"""SimpleBits per-instance simplification during training (Schirrmeister et al., S2.2, S3).

A simplifier ``g`` (identity at init) and a classifier ``f_θ`` are trained jointly. Every
step, on a batch X_orig with X_sim = Q(g(X_orig)) (``Q``: rounding to 8 bits, straight-through
for the gradient, so no sub-quantisation detail can carry information):

1. simplifier update: one *differentiable* step of the classifier's own optimiser (AdamW
   with its current moment estimates, as the paper's unrolled update through the optimiser)
   on the simplified batch, ``θ' = AdamW_step(θ, ∇_θ l(f_θ(X_sim)))``, then

       L = λ_sim·L_sim + 10·l(f_θ'(X_orig)) + l(f_θ(X_sim)) + l(f_θ'(X_sim))   (S3)

   where ``L_sim`` is the bpd of X_sim under a frozen Glow (:mod:`keepbits.training.density`),
   switched off for an example while l(f_θ'(x_orig)) > 0.1; ``l`` is cross-entropy. Only
   ``g`` is updated with L (AdamW, lr 5e-4, weight decay 1e-5; ``sim_lr`` can change its
   rate); its gradient reaches ``g`` through X_sim and through θ' (second order).
2. classifier update: X_sim is recomputed with the updated ``g`` (no gradient to ``g``) and
   the classifier takes one AdamW step on l(f_θ(X_sim)) alone: it learns from the simplified
   images only, never from the originals.

Classifiers take normalised input: ``f(x) = net((x − mean)/std)`` for [0, 1] images ``x``.

Example:
    >>> import tempfile
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits
    >>> import keepbits.training.density as d
    >>> dens = tempfile.mkdtemp() + "/d.pt"
    >>> _ = d.train_density(d.DensityConfig(data=str(sample_mnist_path()), out=dens, levels=2, depth=1, hidden=8, steps=1, batch_size=4, eval_images=4))
    >>> cfg = SimpleBitsConfig(data=str(sample_mnist_path()), out=tempfile.mkdtemp() + "/s.pt", density=dens,
    ...                        arch="lenet5", unet_base=4, steps=2, batch_size=8, max_test=16)
    >>> sorted(train_simplebits(cfg)["metrics"])
    ['acc_orig', 'acc_sim', 'bpd_orig', 'bpd_sim', 'gate_open', 'steps', 'wall_time_s']
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from keepbits import registry
from keepbits.core import accuracy
from keepbits.data import ImageDataset, Preprocessing, channel_stats, has_split, load_dataset
from keepbits.errors import InputError
from keepbits.training.byo import Classifier, as_classifier, resolve_classifier
from keepbits.training.checkpoint import (
    Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, load_resumable, refuse_earlier_run, refuse_finished, resume_path, run_settings, save_checkpoint,
    state_digest,
)
from keepbits.training.classifier import FitConfig, predict_logits
from keepbits.training.density import images_to_unit, load_density
from keepbits.training.distributed import (
    Dist, all_gather, average_gradients, broadcast_buffers, init_distributed, rank_mean, resolve_device, shutdown,
)

log = logging.getLogger("keepbits")

Params = dict[str, torch.Tensor]

#: L_sim is switched off for an example while l(f'(x_orig)) exceeds this (S3).
LOSS_GATE = 0.1


class Normalized(torch.nn.Module):
    """``net((x − mean)/std)`` for [0, 1] inputs, so simplifier and classifier share one scale."""

    def __init__(self, net: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images rounded to the 256 levels k/255; the gradient passes straight through.

    Example:
        >>> x = torch.tensor([0.1234, 0.5], requires_grad=True)
        >>> q = quantize_8bit(x)
        >>> (q * 255).tolist() == [31.0, 128.0], torch.autograd.grad(q.sum(), x)[0].tolist()
        (True, [1.0, 1.0])
    """
    return x + ((x.clamp(0.0, 1.0) * 255.0).round() / 255.0 - x).detach()


def unrolled_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                  lr: float | None = None, dist: Dist | None = None) -> tuple[Params, torch.Tensor]:
    """One differentiable step of ``optimizer`` (AdamW, with its current state) on
    CE(f_θ(x), y): returns θ' (differentiable w.r.t. θ and ``x``) and the loss at θ. The
    step equals what ``optimizer.step()`` would do (decoupled weight decay, bias-corrected
    moments); ``lr`` overrides the groups' learning rates. Under ``torchrun`` (``dist``) the
    gradient is the ranks' mean (differentiably), so θ' is the step of the whole batch."""
    params = dict(model.named_parameters())
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    if dist is not None and dist.world > 1:  # every rank computes every parameter's gradient: the collectives line up
        grads = tuple(rank_mean(dist, g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    fast = dict(params)
    for name, grad in zip(names, grads):
        p = params[name]
        if grad is None:
            continue
        group, state = group_of[id(p)], optimizer.state.get(p, {})
        beta1, beta2 = group["betas"]
        step = float(state.get("step", 0)) + 1
        m = beta1 * state["exp_avg"] + (1 - beta1) * grad if state else (1 - beta1) * grad
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad if state else (1 - beta2) * grad * grad
        rate = group["lr"] if lr is None else lr
        denom = v.clamp_min(1e-30).sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
        fast[name] = p * (1 - rate * group["weight_decay"]) - (rate / (1 - beta1**step)) * m / denom
    return fast, loss


def simplebits_loss(
    classifier: torch.nn.Module,
    simplifier: torch.nn.Module,
    bpd: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lambda_sim: float,
    optimizer: torch.optim.Optimizer,
    inner_lr: float | None = None,
    dist: Dist | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The simplifier's objective L = λ_sim·L_sim + L_cls (S3) on one batch of [0, 1] images,
    with θ' one differentiable step of the classifier's ``optimizer`` on the simplified batch
    (of the ranks' whole batch under ``torchrun``)."""
    x_sim = quantize_8bit(simplifier(x))
    fast, ce_sim_before = unrolled_step(classifier, x_sim, y, optimizer, inner_lr, dist)
    ce_orig_after = F.cross_entropy(functional_call(classifier, fast, (x,)), y, reduction="none")
    ce_sim_after = F.cross_entropy(functional_call(classifier, fast, (x_sim,)), y)
    l_cls = 10.0 * ce_orig_after.mean() + ce_sim_before + ce_sim_after
    bits = bpd(x_sim)
    gate = (ce_orig_after.detach() <= LOSS_GATE).float()
    l_sim = (gate * bits).mean()
    loss = lambda_sim * l_sim + l_cls
    stats = {"loss": loss.item(), "l_cls": l_cls.item(), "bpd_sim": bits.mean().item(), "gate": gate.mean().item()}
    return loss, stats


def simplebits_step(classifier: torch.nn.Module, simplifier: torch.nn.Module, bpd: Callable[[torch.Tensor], torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor, lambda_sim: float, opt_classifier: torch.optim.Optimizer,
                    opt_simplifier: torch.optim.Optimizer, inner_lr: float | None = None, dist: Dist | None = None) -> dict[str, float]:
    """One joint training step (module doc): the simplifier on L through the unrolled step,
    then the classifier on the simplified batch of the updated simplifier. Leaves each
    network's gradient of its own update in ``.grad``. Under ``torchrun`` (``dist``) each rank
    holds its share of the batch and every gradient is the ranks' mean: the step of the whole batch."""
    dist = dist or Dist()
    loss, stats = simplebits_loss(classifier, simplifier, bpd, x, y, lambda_sim, opt_classifier, inner_lr, dist)
    if not torch.isfinite(loss):
        raise InputError("simplebits training diverged (non-finite loss); lower --lr or --sim-lr")
    sim_params = [p for p in simplifier.parameters() if p.requires_grad]
    for p, g in zip(sim_params, torch.autograd.grad(loss, sim_params, allow_unused=True)):
        p.grad = g
    average_gradients(dist, sim_params)
    opt_simplifier.step()
    with torch.no_grad():
        x_sim = quantize_8bit(simplifier(x))
    ce = F.cross_entropy(classifier(x_sim), y)
    opt_classifier.zero_grad(set_to_none=True)
    ce.backward()
    average_gradients(dist, classifier.parameters())
    opt_classifier.step()
    stats["ce_classifier_update"] = ce.item()
    return stats


@dataclass
class SimpleBitsConfig:
    """Settings of ``keepbits train simplebits``. ``classifier`` (optional) names a classifier to
    finetune (:func:`keepbits.training.byo.resolve_classifier`: a checkpoint, registry name,
    ``package.module:factory`` with ``classifier_weights``/``classifier_kwargs``, or ``.onnx``),
    else ``arch`` trains from scratch; ``preprocessing`` overrides fields of its preprocessing.
    ``device``: ``auto`` | ``cpu`` | ``cuda``."""

    data: str
    out: str
    density: str | None = None
    arch: str = "nf_wrn16_2"
    classifier: str | None = None
    classifier_weights: str | None = None
    classifier_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    lambda_sim: float = 1.0
    inner_lr: float | None = None
    lr: float = 5e-4
    sim_lr: float | None = None
    weight_decay: float = 1e-5
    steps: int = 500
    batch_size: int = 32
    unet_base: int = 16
    max_train: int | None = None
    max_test: int | None = 1000
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    log_every: int = 25
    checkpoint_every: int = 100
    resume: bool = False
    overwrite: bool = False
    command: str = ""


#: settings a ``--resume`` may change (run control); any other change is refused (:func:`check_resumable`)
RESUME_MAY_CHANGE = frozenset({"steps", "device", "threads", "log_every", "checkpoint_every", "max_test", "command", "out"})


def _load_split(path: str, split: str, limit: int | None, pre: Preprocessing | None = None) -> ImageDataset:
    size = dict(size=pre.input_size, policy=pre.resize_policy, crop_fraction=pre.crop_fraction,
                channels=len(pre.mean)) if pre is not None else {}
    return load_dataset(path, split, **size).sample(limit)


def build_classifier(arch: str, in_channels: int, num_classes: int, image_size: Sequence[int], mean, std) -> tuple[Normalized, dict]:
    """A registered classifier wrapped in :class:`Normalized`; returns it and its build kwargs."""
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, "image_size": list(image_size)}
    return Normalized(registry.build(arch, kind="classifier", **kwargs), mean, std), kwargs


@torch.no_grad()
def simplify(simplifier: torch.nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Simplified versions of [0, 1] images ``x`` (N×C×H×W), in batches, rounded to 8 bits
    (:func:`quantize_8bit`: what is scored, stored and retrained on)."""
    simplifier.eval()
    device = next(simplifier.parameters(), torch.zeros(0)).device
    return torch.cat([quantize_8bit(simplifier(x[i : i + batch_size].to(device))).cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def mean_bpd(flow: torch.nn.Module, x: torch.Tensor, batch_size: int = 128, seed: int = 0) -> float:
    """Mean bpd of [0, 1] images under ``flow`` (fixed dequantisation noise seed)."""
    from keepbits.training.density import evaluate_bpd

    return evaluate_bpd(flow, x, batch_size, seed)


def retrain_config(steps: int, batch_size: int = 64, lr: float = 5e-4, weight_decay: float = 1e-5, seed: int = 0) -> FitConfig:
    """Settings of a fresh classifier trained on (simplified, condensed) [0, 1] images, the
    retraining / evaluation protocol: ``steps`` AdamW steps at the joint training's lr and weight
    decay, constant lr, no augmentation. Train with :func:`keepbits.training.classifier.fit_classifier`.

    Example:
        >>> retrain_config(300, batch_size=256, lr=1e-3).optimizer
        'adamw'
    """
    return FitConfig(steps=steps, batch_size=batch_size, optimizer="adamw", lr=lr, weight_decay=weight_decay, schedule="none",
                     augment="none", seed=seed, progress=False)


def train_mse_simplifier(
    simplifier: torch.nn.Module, flow: torch.nn.Module, x: torch.Tensor, lambda_sim: float, steps: int,
    batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
) -> torch.nn.Module:
    """S7 baseline: a simplifier trained without classifier on L = MSE(x_sim, x) + λ_sim·bpd(x_sim),
    x_sim rounded to 8 bits (straight-through) as in joint training."""
    gen = torch.Generator().manual_seed(seed)
    simplifier = simplifier.to(next(flow.parameters(), torch.zeros(0)).device)  # where the density model is
    opt = torch.optim.AdamW(simplifier.parameters(), lr=lr, weight_decay=1e-5)
    simplifier.train()
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)].to(next(simplifier.parameters()).device)
        x_sim = quantize_8bit(simplifier(batch))
        loss = F.mse_loss(x_sim, batch) + lambda_sim * flow.bpd(x_sim).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return simplifier.eval()


def train_simplebits(cfg: SimpleBitsConfig, classifier: Classifier | torch.nn.Module | None = None,
                     preprocessing: Preprocessing | None = None) -> dict[str, Any]:
    """Jointly train simplifier and classifier (see module doc); write ``cfg.out``
    (kind ``simplebits``: roles ``simplifier``, ``classifier``, ``density`` path in settings).
    ``classifier`` (a :class:`keepbits.training.byo.Classifier`, or an ``nn.Module`` with its
    ``preprocessing``) is finetuned instead of the one ``cfg`` names or ``cfg.arch`` from scratch."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if (not (math.isfinite(cfg.lambda_sim) and cfg.lambda_sim >= 0) or (cfg.inner_lr is not None and not cfg.inner_lr > 0)
            or cfg.steps < 0 or cfg.checkpoint_every < 1):
        raise InputError(f"need lambda_sim >= 0, inner_lr > 0, steps >= 0, checkpoint_every >= 1 (got {cfg.lambda_sim}, {cfg.inner_lr}, "
                         f"{cfg.steps}, {cfg.checkpoint_every})")
    refuse_earlier_run([cfg.out, resume_path(cfg.out)], cfg.resume, cfg.overwrite, resume_path(cfg.out))
    device = resolve_device(cfg.device)
    dist = init_distributed(use_cuda=device == "cuda")
    device = dist.device if dist.world > 1 else device
    torch.manual_seed(cfg.seed)
    own: Classifier | None = None
    if classifier is not None:
        own = as_classifier(classifier, preprocessing or cfg.preprocessing or None)
    elif cfg.classifier:  # finetuning a pretrained classifier (Fig. 5, "finetuning")
        own = resolve_classifier(cfg.classifier, weights=cfg.classifier_weights, kwargs=cfg.classifier_kwargs,
                                 preprocessing=cfg.preprocessing or None)
    pre = own.preprocessing if own is not None else None
    train = _load_split(cfg.data, "train", cfg.max_train, pre)
    test = _load_split(cfg.data, "test", cfg.max_test, pre) if has_split(cfg.data, "test") else None
    c, h, w = train.shape_chw
    if own is not None and [c, h, w] != own.input_shape:
        raise InputError(f"{cfg.data}: images are {[c, h, w]} (C,H,W) but the classifier expects {own.input_shape}")
    flow = load_density(cfg.density).to(device)
    if own is not None:
        arch, clf_kwargs, norm = own.arch, own.kwargs, own.normalization
        classifier_net = Normalized(own.module, norm.mean, norm.std)
    else:
        arch = cfg.arch
        norm = Normalization(*channel_stats(train.x))
        classifier_net, clf_kwargs = build_classifier(arch, c, train.num_classes, (h, w), norm.mean, norm.std)
    sim_kwargs = {"in_channels": c, "base": cfg.unet_base}
    simplifier = registry.build("simplebits_unet", kind="simplifier", **sim_kwargs)
    simplifier.to(device), classifier_net.to(device)
    opt_sim = torch.optim.AdamW(simplifier.parameters(), lr=cfg.sim_lr or cfg.lr, weight_decay=cfg.weight_decay)
    opt_clf = torch.optim.AdamW(classifier_net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, labels = torch.from_numpy(np.ascontiguousarray(train.x)), torch.from_numpy(train.y)
    settings = run_settings(cfg)

    def record(metrics: dict[str, Any], with_optimizer: bool) -> Checkpoint:
        return Checkpoint(
            kind="simplebits",
            models={"simplifier": ModelEntry.of("simplebits_unet", sim_kwargs, simplifier), "classifier": ModelEntry.of(arch, clf_kwargs, classifier_net.net)},
            input_shape=[c, h, w], normalization=Normalization(list(norm.mean), list(norm.std)),
            class_names=own.class_names if own is not None else train.class_names,
            preprocessing=own.checkpoint_preprocessing() if own is not None else {}, settings={**settings, "world_size": dist.world},
            command=cfg.command, metrics=metrics,
            optimizer={"simplifier": opt_sim.state_dict(), "classifier": opt_clf.state_dict()} if with_optimizer else None,
        )

    done, gate_sum, elapsed = 0, 0.0, 0.0
    last = resume_path(cfg.out)
    if cfg.resume and last.exists():
        previous = load_resumable(last, "simplebits", {**settings, "world_size": dist.world}, RESUME_MAY_CHANGE,
                                  ("steps_run", "gate_sum"))
        simplifier.load_state_dict(previous.models["simplifier"].state_dict)
        classifier_net.net.load_state_dict(previous.models["classifier"].state_dict)
        opt_sim.load_state_dict(previous.optimizer["simplifier"])
        opt_clf.load_state_dict(previous.optimizer["classifier"])
        done, gate_sum = int(previous.metrics["steps_run"]), float(previous.metrics["gate_sum"])
        refuse_finished(last, done, cfg.steps, "steps")
        elapsed = float(previous.metrics.get("wall_time_s", 0.0))
        log.info("simplebits: resuming %s from step %d", last, done)
    elif cfg.resume:
        log.warning("%s: nothing to resume from; starting a new run", last)
    start, recent = time.time() - elapsed, []

    def mean_gate_sum() -> float:  # every rank's running sum of its batch's gate fraction, averaged: the whole batch's
        return float(np.mean(all_gather(dist, gate_sum)))

    for step in range(done + 1, cfg.steps + 1):
        # each step seeds its own batch (one draw for all ranks, each takes its slice) and dequantisation noise,
        # so a resumed run continues exactly
        draw = torch.randint(0, len(images), (dist.world * cfg.batch_size,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        idx = draw[dist.rank * cfg.batch_size : (dist.rank + 1) * cfg.batch_size]
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
        simplifier.train(), classifier_net.train()
        stats = simplebits_step(classifier_net, simplifier, flow.bpd, images_to_unit(images[idx]).to(device), labels[idx].to(device),
                                cfg.lambda_sim, opt_clf, opt_sim, cfg.inner_lr, dist)
        recent.append(stats)
        gate_sum += stats["gate"]
        if step % cfg.log_every == 0 and dist.main:
            avg = {k: float(np.mean([s[k] for s in recent])) for k in recent[0]}
            log.info("simplebits step %d/%d  L %.3f  L_cls %.3f  bpd_sim %.3f  gate %.2f  CE(f(X_sim)) %.3f  (%.0f s)", step, cfg.steps,
                     avg["loss"], avg["l_cls"], avg["bpd_sim"], avg["gate"], avg["ce_classifier_update"], time.time() - start)
            recent = []
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            state = {"steps_run": step, "gate_sum": mean_gate_sum(), "wall_time_s": time.time() - start}
            broadcast_buffers(dist, classifier_net)
            if dist.main:
                save_checkpoint(last, record(state, with_optimizer=True))
    gate_sum = mean_gate_sum()
    broadcast_buffers(dist, classifier_net)  # batch-norm statistics drift per rank: keep rank 0's
    digests = all_gather(dist, [state_digest(simplifier)[:16], state_digest(classifier_net)[:16]])
    summary: dict[str, Any] = {}
    if dist.main:
        metrics = evaluate_simplebits(classifier_net, simplifier, flow, test if test is not None else train)
        metrics["steps"], metrics["wall_time_s"] = cfg.steps, time.time() - start
        metrics["gate_open"] = gate_sum / max(cfg.steps, 1)  # fraction of examples whose L_sim was on, mean over steps
        save_checkpoint(last, record({**metrics, "steps_run": cfg.steps, "gate_sum": gate_sum}, with_optimizer=True))
        classifier_net, simplifier = classifier_net.cpu(), simplifier.cpu()
        save_checkpoint(cfg.out, record({**metrics, "rank_parameter_digests": digests}, with_optimizer=False))
        log.info("simplebits: %s -> %s", {k: round(v, 4) for k, v in metrics.items()}, cfg.out)
        summary = {"metrics": metrics, "checkpoint": str(cfg.out), "world_size": dist.world}
    summary = all_gather(dist, summary)[0]
    shutdown(dist)  # rank 0's files are on disk before any rank returns
    return summary


def evaluate_simplebits(classifier: torch.nn.Module, simplifier: torch.nn.Module, flow: torch.nn.Module, data: ImageDataset) -> dict[str, float]:
    """Accuracy on original and simplified images, mean bpd of both (the Fig. 5 axes)."""
    x, y = images_to_unit(data.x), torch.from_numpy(data.y)
    x_sim = simplify(simplifier, x)
    return {
        "bpd_orig": mean_bpd(flow, x), "bpd_sim": mean_bpd(flow, x_sim),
        "acc_orig": accuracy(predict_logits(classifier, x), y), "acc_sim": accuracy(predict_logits(classifier, x_sim), y),
    }


def load_simplebits(path: str | Path) -> tuple[torch.nn.Module, Normalized, Checkpoint]:
    """(simplifier, normalised classifier, checkpoint) of a ``simplebits`` checkpoint, eval mode."""
    ckpt = load_checkpoint(path, kind="simplebits")
    simplifier = build_model(ckpt, "simplifier").eval()
    classifier = Normalized(build_model(ckpt, "classifier"), ckpt.normalization.mean, ckpt.normalization.std).eval()
    return simplifier, classifier, ckpt
