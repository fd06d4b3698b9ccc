"""Cheap NICE mask generator for deployment, registered by name. Maps a normalised N×C×H×W
image to the gate logits log α (N×1×H×W, the input of the hard-concrete gate, NICE Eq. 11)
for ANY H×W, and exports to ONNX with the dynamo exporter (dynamic batch and size).

* ``nice_fast``: a MobileNet-style encoder at reduced resolution: stride-2 stem (1/2), then
  depthwise-separable blocks down to 1/4, 1/8 and 1/16 (context); a light decoder
  (bilinear upsampling + concatenated skips at 1/8 and 1/4); a 1×1 head to log α at 1/4,
  bilinearly upsampled to H×W. ~13 k parameters and ~0.5% of ResNet-18's FLOPs at 224×224,
  where ``nice_unet`` (full-resolution U-Net) costs about as much as ResNet-18 itself.

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> gen = registry.build("nice_fast", in_channels=3)
    >>> tuple(gen(torch.zeros(2, 3, 37, 50)).shape)
    (2, 1, 37, 50)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keepbits.registry import register
from keepbits.training.models.generators import INIT_LOG_ALPHA


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3×3 (stride 1 or 2) + pointwise 1×1, each with BatchNorm and ReLU."""
    return nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, cout, 1))


def _up_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class NiceFast(nn.Module):
    """Stem (1/2) → separable blocks at 1/4, 1/8, 1/16 → decoder with skips at 1/8 and 1/4 →
    1×1 head → bilinear upsampling of log α to the input size. Stride-2 3×3 convolutions
    with padding 1 give ⌈H/2⌉, so every size works; skips fix the decoder's sizes."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int, int] = (8, 16, 32, 64)):
        super().__init__()
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.stem = nn.Sequential(*_conv_bn(in_channels, w1, 3, 2))
        self.enc2 = _separable(w1, w2, 2)
        self.enc3 = nn.Sequential(_separable(w2, w3, 2), _separable(w3, w3))
        self.enc4 = nn.Sequential(_separable(w3, w4, 2), _separable(w4, w4))
        self.dec3 = _separable(w4 + w3, w2)
        self.dec2 = _separable(w2 + w2, w1)
        self.head = nn.Conv2d(w1, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, INIT_LOG_ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e2 = self.enc2(self.stem(x))
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d3 = self.dec3(torch.cat([_up_to(e4, e3), e3], dim=1))
        d2 = self.dec2(torch.cat([_up_to(d3, e2), e2], dim=1))
        return _up_to(self.head(d2), x)


@register("nice_fast", "generator")
def nice_fast(in_channels: int = 3, widths: tuple[int, ...] | list[int] = (8, 16, 32, 64)) -> nn.Module:
    """Cheap MobileNet-style mask generator (~13 k parameters, ~0.5% of ResNet-18's FLOPs at 224)."""
    if len(widths) != 4:
        raise ValueError(f"nice_fast needs four widths, got {tuple(widths)}")
    return NiceFast(in_channels, tuple(widths))
