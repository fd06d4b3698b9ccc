"""Overinterpretation mitigations (Carter et al. 2021, §4.5) as torch modules: an ensemble
(mean logits) and input dropout. Imported only when the overinterpretation audit trains models
(``import keepbits.audit`` stays torch-free)."""
from __future__ import annotations

import math
from typing import Sequence

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
    """Input dropout (§4.5): each pixel (all channels) kept with probability ``keep``, else set
    to the mask value 0 (the mean). Training draws fresh masks; evaluation averages the logits
    over ``samples`` fixed masks (:meth:`evaluation_masks`), so ``f`` is deterministic."""

    def __init__(self, net: nn.Module, keep: float = 0.8, samples: int = 4, seed: int = 0):
        super().__init__()
        self.net, self.keep, self.samples, self.seed = net, keep, samples, seed

    def evaluation_masks(self, h: int, w: int) -> torch.Tensor:
        """``samples``×1×H×W masks, stratified per pixel: each position is dropped in ⌊q⌋ or ⌈q⌉
        of them (q = (1 − keep)·samples, the rounding drawn so its rate is q) and, with two or
        more masks, kept in at least one, so no position is hidden from every evaluation
        (independent masks hid 0.2² = 4 % of the positions from both of two masks at keep 0.8,
        in every image), which raises the keep rate to 1/samples where keep is below it; one mask
        drops each position at rate 1 − keep."""
        gen = torch.Generator().manual_seed(self.seed)
        q = (1.0 - self.keep) * self.samples
        drops = (math.floor(q) + (torch.rand(1, h, w, generator=gen) < q - math.floor(q))).clamp(max=max(1, self.samples - 1))
        order = torch.rand(self.samples, 1, h, w, generator=gen).argsort(0).argsort(0)  # each position's masks in random order
        return (order >= drops).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.training:
            return self.net(x * (torch.rand(n, 1, h, w, device=x.device) < self.keep).to(x.dtype))
        masks = self.evaluation_masks(h, w).to(device=x.device, dtype=x.dtype)
        return torch.stack([self.net(x * m) for m in masks]).mean(0)
