"""Overinterpretation mitigations (Carter et al. 2021, §4.5) as torch modules: an ensemble
(mean logits) and input dropout. Imported only when the overinterpretation audit trains models
(``import keepbits.audit`` stays torch-free)."""
from __future__ import annotations

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
    over ``samples`` masks drawn from a fixed seed, so ``f`` is deterministic."""

    def __init__(self, net: nn.Module, keep: float = 0.8, samples: int = 4, seed: int = 0):
        super().__init__()
        self.net, self.keep, self.samples, self.seed = net, keep, samples, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.training:
            return self.net(x * (torch.rand(n, 1, h, w, device=x.device) < self.keep).to(x.dtype))
        gen = torch.Generator().manual_seed(self.seed)
        masks = (torch.rand(self.samples, 1, 1, h, w, generator=gen) < self.keep).to(x.dtype).to(x.device)
        return torch.stack([self.net(x * m) for m in masks]).mean(0)
