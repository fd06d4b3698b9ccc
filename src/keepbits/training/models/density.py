"""Glow (Kingma & Dhariwal, 2018): a multi-scale normalising flow with exact log-likelihood,
used by SimpleBits (Schirrmeister et al.) to score images in bits per dimension (bpd).

Each level squeezes 2×2 pixels into channels, runs ``depth`` flow steps
(actnorm → invertible 1×1 convolution, LU-parameterised → affine coupling) and, except
at the last level, factors out half of the channels under a Gaussian whose mean and
log-std are predicted from the kept half. The top latent has a learned per-channel
Gaussian. Every layer starts at the identity in likelihood: actnorm scale 1 / bias 0
(until :meth:`Glow.initialize` sets them from data), orthogonal 1×1 convolutions, couplings
and priors whose last convolution is zero — so an untrained flow is exactly a standard
normal on the flow's input.

Bits per dimension with uniform dequantisation (SimpleBits S2, Fig. 2): an image
``x`` in [0, 1] (``k/255`` for 8-bit pixels) becomes ``y = (255·x + u)/256 − 1/2``,
``u ~ U(0, 1)`` (``u = 1/2`` without noise), and

    bpd(x) = −(log p(y) − D log 256) / (D log 2),   D = C·H·W.

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> flow = registry.build("glow", in_channels=3, image_size=(16, 16), levels=2, depth=2, hidden=16)
    >>> x = torch.rand(2, 3, 16, 16)
    >>> zs, _ = flow.encode(flow.to_flow_range(x, dequantize=False))
    >>> bool(torch.allclose(flow.decode(zs), flow.to_flow_range(x, dequantize=False), atol=1e-5))
    True
    >>> tuple(flow.bpd(x).shape)
    (2,)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from keepbits.errors import InputError
from keepbits.registry import register

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Σ over all but the batch axis of log N(z; mean, exp(log_std)²)."""
    logp = -0.5 * (_LOG_2PI + 2.0 * log_std + ((z - mean) * torch.exp(-log_std)) ** 2)
    return logp.flatten(1).sum(1)


def squeeze2(x: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×4C×H/2×W/2 (each 2×2 patch becomes 4 channels)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze2(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2`."""
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, 2 * h, 2 * w)


class ZeroConv2d(nn.Conv2d):
    """3×3 convolution initialised to zero, output scaled by exp(3·logs) (Glow's last layer)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.exp(3.0 * self.logs)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b)·exp(logs); data-dependent init via :meth:`initialize`."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Zero mean, unit variance per channel on the batch ``x`` (Glow S3.1)."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x + self.bias) * torch.exp(self.logs), self.logs.sum() * x.shape[2] * x.shape[3]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution, W = P·L·(U + diag(sign·exp(logs))) (Glow S3.2, LU form),
    initialised with a random rotation so log|det W| = 0."""

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.logs = nn.Parameter(torch.log(diag.abs()))

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.logs))
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        return F.conv2d(x, w[:, :, None, None]), self.logs.sum() * x.shape[2] * x.shape[3]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight().double()).float()
        return F.conv2d(y, w_inv[:, :, None, None])


class AffineCoupling(nn.Module):
    """x = [xa, xb]: yb = (xb + t(xa))·exp(tanh(h(xa))), ya = xa (Glow S3.3, RealNVP).
    The net ends in a :class:`ZeroConv2d`, so the coupling starts as the identity; the
    tanh bounds each layer's log-scale to (−1, 1) for stable training."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        half = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(half, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
            ZeroConv2d(hidden, 2 * (channels - half)),
        )

    def _shift_logscale(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)
        return shift, torch.tanh(raw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x.chunk(2, dim=1)
        shift, logs = self._shift_logscale(xa)
        return torch.cat([xa, (xb + shift) * torch.exp(logs)], 1), logs.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y.chunk(2, dim=1)
        shift, logs = self._shift_logscale(ya)
        return torch.cat([ya, yb * torch.exp(-logs) - shift], 1)


class FlowStep(nn.Module):
    """actnorm → invertible 1×1 conv → affine coupling."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


class Glow(nn.Module):
    """Multi-scale Glow on ``in_channels``×H×W inputs in [−1/2, 1/2] (see module doc).

    ``levels`` squeezes (H and W must be divisible by 2**levels), ``depth`` steps per level,
    ``hidden`` channels in the coupling networks.
    """

    def __init__(self, in_channels: int = 3, image_size: Sequence[int] = (32, 32), levels: int = 3, depth: int = 8, hidden: int = 128):
        super().__init__()
        h, w = (int(s) for s in image_size)
        if levels < 1 or depth < 1 or hidden < 1:
            raise InputError(f"glow needs levels, depth and hidden >= 1, got {levels}, {depth}, {hidden}")
        if h % 2**levels or w % 2**levels:
            raise InputError(f"glow with {levels} levels needs image sides divisible by {2**levels}, got {h}×{w}; resize the images or use fewer levels")
        self.in_channels, self.image_size, self.levels = in_channels, (h, w), levels
        self.steps = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        c = in_channels
        for level in range(levels):
            c *= 4
            self.steps.append(nn.ModuleList(FlowStep(c, hidden) for _ in range(depth)))
            if level < levels - 1:
                self.split_priors.append(ZeroConv2d(c // 2, 2 * (c - c // 2)))
                c = c // 2
        self.top_mean = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.top_log_std = nn.Parameter(torch.zeros(1, c, 1, 1))

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size[0] * self.image_size[1]

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Data-dependent actnorm init (Glow S3.1) from a batch ``y`` in the flow's range."""
        for level, steps in enumerate(self.steps):
            y = squeeze2(y)
            for step in steps:
                step.actnorm.initialize(y)
                y, _ = step(y)
            if level < self.levels - 1:
                y = y[:, : y.shape[1] // 2]

    def _forward(self, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """y → latents (one per split, then the top), the half kept at each split (what the
        split priors condition on), and the total log|det ∂z/∂y| per sample."""
        self._check(y)
        logdet = torch.zeros(y.shape[0], device=y.device)
        zs, kept = [], []
        for level, steps in enumerate(self.steps):
            y = squeeze2(y)
            for step in steps:
                y, ld = step(y)
                logdet = logdet + ld
            if level < self.levels - 1:
                keep, out = y.chunk(2, dim=1)
                zs.append(out)
                kept.append(keep)
                y = keep
        zs.append(y)
        return zs, kept, logdet

    def encode(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """y → latents (one per split, then the top) and the total log|det ∂z/∂y| per sample."""
        zs, _, logdet = self._forward(y)
        return zs, logdet

    def decode(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Latents from :meth:`encode` → y."""
        y = zs[-1]
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                y = torch.cat([y, zs[level]], 1)
            for step in reversed(self.steps[level]):
                y = step.inverse(y)
            y = unsqueeze2(y)
        return y

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Exact log density log p(y) in nats per sample (change of variables)."""
        zs, kept, logp = self._forward(y)
        for prior, keep, out in zip(self.split_priors, kept, zs):
            mean, log_std = prior(keep).chunk(2, dim=1)
            logp = logp + gaussian_log_prob(out, mean, log_std)
        return logp + gaussian_log_prob(zs[-1], self.top_mean, self.top_log_std)

    def to_flow_range(self, x: torch.Tensor, dequantize: bool = True) -> torch.Tensor:
        """[0, 1] images → flow input: gray replicated to 3 channels for a colour flow,
        bilinear resize to the flow's size, then y = (255·x + u)/256 − 1/2."""
        if x.dim() != 4:
            raise InputError(f"expected N×C×H×W images, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            if x.shape[1] == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.in_channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise InputError(f"density model takes {self.in_channels} channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        u = torch.rand_like(x) if dequantize else torch.full_like(x, 0.5)
        return (255.0 * x + u) / 256.0 - 0.5

    def bpd(self, x: torch.Tensor, dequantize: bool = True) -> torch.Tensor:
        """Bits per dimension of [0, 1] images ``x`` (see module doc), one value per image;
        differentiable in ``x``. D counts the flow's dimensions (3·H·W for a colour flow)."""
        logp = self.log_prob(self.to_flow_range(x, dequantize))
        d = self.num_dims
        return -(logp - d * math.log(256.0)) / (d * math.log(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bpd(x)

    def _check(self, y: torch.Tensor) -> None:
        if y.dim() != 4 or y.shape[1] != self.in_channels or tuple(y.shape[-2:]) != self.image_size:
            raise InputError(f"glow expects N×{self.in_channels}×{self.image_size[0]}×{self.image_size[1]} inputs, got {tuple(y.shape)}")


@register("glow", "density")
def glow(in_channels: int = 3, image_size: Sequence[int] = (32, 32), levels: int = 3, depth: int = 8, hidden: int = 128) -> nn.Module:
    """Glow normalising flow (multi-scale, actnorm, invertible 1×1 conv, affine coupling)."""
    return Glow(in_channels, tuple(image_size), levels, depth, hidden)
