"""NICE mask generators, registered by name. Each maps a normalised N×C×H×W image to the
gate logits log α (N×1×H×W) for ANY H×W, and exports to ONNX (``torch.onnx.export(...,
dynamo=True)``) with dynamic batch and image size.

* ``nice_mnist``: Conv(C,1,3,1,1), NICE Table 1 (MNIST).
* ``nice_caltech``: [Conv(C,1,3,1,1)+ReLU+MaxPool(2)], [Conv(1,1,3,1,1)+ReLU+MaxPool(2)],
  Conv(1,1,3,1,1)+MaxPool(2), Upsample(8), NICE Table 1 (Caltech-256). Pooling rounds up
  and the ×8 nearest upsampling is cropped to H×W, so every output pixel lies on the input
  pixel it came from, whatever the size.
* ``nice_unet`` (default): a small U-Net (3 poolings, widths 16/32/64/128, ~0.48 M
  parameters); skips are resized to the encoder map they meet, so odd sizes work.

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> gen = registry.build("nice_unet", in_channels=3)
    >>> tuple(gen(torch.zeros(2, 3, 37, 50)).shape)
    (2, 1, 37, 50)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keepbits.registry import register

#: Initial bias of the last layer: log α = 1 gives ẑ ≈ 0.88 everywhere at the start (NICE Eq. 11),
#: so training begins near the full image and the L0 term removes pixels.
INIT_LOG_ALPHA = 1.0


class NiceMnist(nn.Module):
    """One 3×3 convolution to one channel (NICE Table 1, MNIST)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, 1, 1)
        nn.init.constant_(self.conv.bias, INIT_LOG_ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NiceCaltech(nn.Module):
    """Three 1-channel 3×3 convolutions with max-pooling, then ×8 upsampling (NICE Table 1)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 1, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(1, 1, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(1, 1, 3, 1, 1), nn.MaxPool2d(2, ceil_mode=True),
        )
        nn.init.constant_(self.body[6].bias, INIT_LOG_ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = F.interpolate(self.body(x), scale_factor=8.0, mode="nearest")
        return out[..., :h, :w]


def _conv_block(cin: int, cout: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class NiceUNet(nn.Module):
    """U-Net encoder–decoder: conv blocks at 1, 1/2, 1/4, 1/8 resolution, nearest upsampling
    to the skip's exact size, concatenation, a 1×1 head to log α."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"nice_unet needs at least two widths, each >= 1, got {widths}")
        self.down = nn.ModuleList([_conv_block(in_channels, widths[0], 1)])
        self.down.extend(_conv_block(widths[i - 1], widths[i], 2) for i in range(1, len(widths)))
        self.up = nn.ModuleList(
            _conv_block(widths[i + 1] + widths[i], widths[i], 2 if i else 1) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, INIT_LOG_ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


@register("nice_mnist", "generator")
def nice_mnist(in_channels: int = 1) -> nn.Module:
    """NICE Table 1 MNIST generator: Conv(C,1,3,1,1) (10 parameters for gray input)."""
    return NiceMnist(in_channels)


@register("nice_caltech", "generator")
def nice_caltech(in_channels: int = 3) -> nn.Module:
    """NICE Table 1 Caltech-256 generator: 3 tiny convs with max-pooling, Upsample(8)."""
    return NiceCaltech(in_channels)


@register("nice_unet", "generator")
def nice_unet(in_channels: int = 3, widths: tuple[int, ...] | list[int] = (16, 32, 64, 128)) -> nn.Module:
    """Small U-Net mask generator (default; ~0.48 M parameters, any H×W, ONNX-exportable)."""
    return NiceUNet(in_channels, tuple(widths))
