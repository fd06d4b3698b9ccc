"""SimpleBits simplifier (Schirrmeister et al., S2.2): a residual U-Net with ELU and a
learned per-channel affine (scale, shift) in place of normalisation, wrapped so that

    x_sim = σ(logit(x) + w·UNet(x)),   w initialised to 0,

i.e. the simplifier is exactly the identity at initialisation. Inputs and outputs are
images in [0, 1]; sides that are not multiples of 2**downsamplings are padded
(replicate) inside and cropped back.

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> sim = registry.build("simplebits_unet", in_channels=1, base=8)
    >>> pixels = torch.randint(0, 256, (2, 1, 28, 28))
    >>> bool(torch.equal((sim(pixels / 255) * 255).round().long(), pixels))  # identity at init
    True
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from keepbits.registry import register

#: Inputs are clamped to [ε, 1 − ε] before the logit: half an 8-bit quantisation step, so the
#: identity at init is exact after rounding to 8 bits, while the sigmoid's slope at fully dark or
#: bright pixels stays ~2e-3 (with ε = 1e-5 it was ~1e-5, and the simplifier could hardly move
#: MNIST's 0/1 pixels).
LOGIT_EPS = 0.5 / 256


class ChannelAffine(nn.Module):
    """y = x·scale + shift per channel (the normalisation-free stand-in of S2.2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ResBlock(nn.Module):
    """x → skip(x) + conv(ELU(affine(conv(ELU(affine(x))))))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            ChannelAffine(cin), nn.ELU(), nn.Conv2d(cin, cout, 3, padding=1),
            ChannelAffine(cout), nn.ELU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class ResidualUNet(nn.Module):
    """U-Net of :class:`ResBlock` with ``downsamplings`` stride-2 steps (SimpleBits: 5);
    widths ``base·2**i`` capped at ``max_width``."""

    def __init__(self, in_channels: int, base: int = 32, downsamplings: int = 5, max_width: int = 256):
        super().__init__()
        widths = [min(base * 2**i, max_width) for i in range(downsamplings + 1)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(widths[i], widths[i]) for i in range(downsamplings))
        self.pool = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(downsamplings))
        self.middle = ResBlock(widths[-1], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(downsamplings))
        self.merge = nn.ModuleList(ResBlock(2 * widths[i], widths[i]) for i in range(downsamplings))
        self.head = nn.Sequential(ChannelAffine(widths[0]), nn.ELU(), nn.Conv2d(widths[0], in_channels, 3, padding=1))
        self.multiple = 2**downsamplings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        x = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        x = self.stem(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.middle(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.head(x)[..., :h, :w]


class Simplifier(nn.Module):
    """x_sim = σ(logit(x) + w·UNet(2x − 1)) with a scalar ``w`` starting at 0 (S2.2)."""

    def __init__(self, in_channels: int = 3, base: int = 32, downsamplings: int = 5):
        super().__init__()
        self.unet = ResidualUNet(in_channels, base, downsamplings)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)
        return torch.sigmoid(torch.logit(x) + self.weight * self.unet(2.0 * x - 1.0))


@register("simplebits_unet", "simplifier")
def simplebits_unet(in_channels: int = 3, base: int = 32, downsamplings: int = 5) -> nn.Module:
    """SimpleBits residual U-Net simplifier, identity at init."""
    return Simplifier(in_channels, base, downsamplings)
