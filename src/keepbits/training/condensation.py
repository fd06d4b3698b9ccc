"""SimpleBits condensation (Schirrmeister et al., S4.3, Eq. 7): dataset condensation by
gradient matching (Zhao, Mopuri & Bilen, 2021) with a simplicity term.

Synthetic images are ``σ(v)`` of free logits ``v`` (initialised from a seeded class-balanced
sample of real images, :func:`initial_indices`). For every class ``c`` the loss is Zhao et
al.'s gradient distance between the classifier-parameter gradients of a real batch and of the
synthetic images of ``c``: for every weight tensor, reshaped to (output channels × the rest),
the sum over output channels of one minus the cosine of the two rows; bias and other 1-D
tensors (normalisation scales) are left out,

    D(∇_θ l(S_c), ∇_θ l(R_c)) = Σ_ℓ Σ_i (1 − cos(∇_θℓ,i l(S_c), ∇_θℓ,i l(R_c))),

plus ``λ_sim·bpd(S_c)`` under a frozen density model (Eq. 7). As in Zhao et al. the outer
loop draws a fresh classifier, and alternates matching steps on ``v`` with SGD steps of
the classifier on the current synthetic set. Evaluation trains fresh classifiers on the
condensed set only and reports their test accuracy (1 and 10 images per class).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from keepbits.training.condensation import matching_distance
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    >>> abs(float(matching_distance(net, x, y, x, y))) < 1e-6
    True
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from keepbits.errors import InputError
from keepbits.training.models.simplifiers import LOGIT_EPS

log = logging.getLogger("keepbits")


def layerwise_cosine_distance(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor], per_output_channel: bool = True) -> torch.Tensor:
    """Gradient distance of Zhao et al.: for each pair of tensors, Σ over output channels (rows
    of the tensor reshaped to ``shape[0]`` × the rest) of 1 − cos, skipping 1-D tensors (biases,
    normalisation scales). ``per_output_channel=False``: one 1 − cos per pair over all entries,
    no tensor skipped (for gradients already selected into vectors, as in post-hoc Alg. 1).

    Example:
        >>> a = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0, 1.0])]
        >>> b = [torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([-1.0, 0.0])]
        >>> round(float(layerwise_cosine_distance(a, b)), 3), round(float(layerwise_cosine_distance(a, b, per_output_channel=False)), 3)
        (1.0, 2.348)
    """
    total = grads_a[0].new_zeros(())
    for a, b in zip(grads_a, grads_b):
        if per_output_channel:
            if a.dim() <= 1:
                continue
            rows_a, rows_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        else:
            rows_a, rows_b = a.reshape(1, -1), b.reshape(1, -1)
        total = total + (1.0 - F.cosine_similarity(rows_a, rows_b, dim=1, eps=1e-8)).sum()
    return total


def initial_indices(y: torch.Tensor, num_classes: int, images_per_class: int, seed: int) -> torch.Tensor:
    """Indices of the real images a synthetic set starts from: ``images_per_class`` per class by
    :func:`keepbits.data.sample_indices` (seeded, class-balanced), ordered class by class."""
    from keepbits.data import sample_indices

    labels = y.cpu().numpy()
    counts = np.bincount(labels, minlength=num_classes)
    if (counts < images_per_class).any():
        raise InputError(f"every class needs at least {images_per_class} real images to initialise the synthetic set "
                         f"(class sizes {counts.tolist()})")
    idx = sample_indices(labels, images_per_class * num_classes, seed)
    return torch.from_numpy(idx[np.argsort(labels[idx], kind="stable")])


def matching_distance(net: torch.nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """Gradient-matching loss of one class: layer-wise cosine distance of ∇_θ CE on synthetic
    vs real batches; differentiable w.r.t. ``x_syn``. Zero when both batches are equal."""
    params = [p for p in net.parameters() if p.requires_grad]
    g_real = torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
    return layerwise_cosine_distance(list(g_syn), [g.detach() for g in g_real])


@dataclass
class CondensationConfig:
    """Settings of one condensation run (Zhao et al. defaults scaled down for CPUs)."""

    images_per_class: int = 10
    lambda_sim: float = 0.0
    outer_loops: int = 20
    inner_loops: int = 5
    net_steps: int = 5
    real_batch: int = 64
    lr_images: float = 0.1
    image_optimizer: str = "sgd"
    lr_net: float = 0.01
    seed: int = 0


def condense(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    make_net: Callable[[], torch.nn.Module],
    cfg: CondensationConfig,
    bpd: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condense [0, 1] images ``x`` (N×C×H×W) with labels ``y`` into ``images_per_class``
    synthetic images per class; returns (8-bit images: [0, 1] on the k/255 grid, labels), on
    ``x``'s device (where the classifiers are trained too). The images are optimised as σ(v) and
    rounded at the end, so their bpd and the classifiers trained on them see what 8-bit files
    would hold, as the real images they are compared with (no sub-8-bit detail)."""
    if cfg.lambda_sim > 0 and bpd is None:
        raise InputError("condensation with lambda_sim > 0 needs a density model (bpd)")
    gen = torch.Generator().manual_seed(cfg.seed)
    by_class = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    init = x[initial_indices(y, num_classes, cfg.images_per_class, cfg.seed)]
    # within half a grey level of 0 and 1: an image the optimiser leaves alone rounds back to itself (0.01 / 0.99 rounded to 3 / 252)
    logits = torch.logit(init.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)).clone().requires_grad_(True)
    y_syn = torch.arange(num_classes, device=x.device).repeat_interleave(cfg.images_per_class)
    if cfg.image_optimizer not in ("sgd", "adam"):
        raise InputError(f"image optimizer must be 'sgd' or 'adam', got {cfg.image_optimizer!r}")
    # Adam's per-pixel step does not shrink where σ saturates (MNIST's 0/1 pixels start at σ' ≈ 0.002)
    opt_img = (torch.optim.SGD([logits], lr=cfg.lr_images, momentum=0.5) if cfg.image_optimizer == "sgd"
               else torch.optim.Adam([logits], lr=cfg.lr_images))
    start = time.time()
    for outer in range(cfg.outer_loops):
        net = make_net().to(x.device)
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        for _ in range(cfg.inner_loops):
            loss = logits.new_zeros(())
            for c, idx in enumerate(by_class):
                real = idx[torch.randint(0, len(idx), (cfg.real_batch,), generator=gen)]
                syn = torch.sigmoid(logits[c * cfg.images_per_class : (c + 1) * cfg.images_per_class])
                loss = loss + matching_distance(net, syn, y_syn[y_syn == c], x[real], y[real])
                if cfg.lambda_sim > 0:
                    loss = loss + cfg.lambda_sim * bpd(syn).mean()
            opt_img.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            syn_all = torch.sigmoid(logits).detach()
            for _ in range(cfg.net_steps):
                opt_net.zero_grad(set_to_none=True)
                F.cross_entropy(net(syn_all), y_syn).backward()
                opt_net.step()
        log.info("condensation outer %d/%d  loss %.3f  (%.0f s)", outer + 1, cfg.outer_loops, loss.item(), time.time() - start)
    return torch.round(torch.sigmoid(logits).detach() * 255) / 255, y_syn
