"""Cheap NICE mask generator for deployment, registered by name. Maps a normalised N×C×H×W
image to the gate logits log α (N×1×H×W, the input of the hard-concrete gate, NICE Eq. 11)
for ANY H×W, and exports to ONNX with the dynamo exporter (dynamic batch and size).

* ``nice_fast``: a MobileNet-style encoder at reduced resolution: stride-2 stem (1/2), then
  depthwise-separable blocks down to 1/4, 1/8 and 1/16 (context); a light decoder
  (bilinear upsampling + concatenated skips at 1/8 and 1/4); a 1×1 head to log α at 1/4,
  bilinearly upsampled to H×W. ~13 k parameters and ~0.5% of ResNet-18's FLOPs at 224×224,
  where ``nice_unet`` (full-resolution U-Net) costs about as much as ResNet-18 itself.

* ``nice_taps``: no encoder of its own. It reads the classifier's features at a few blocks
  (``forward_taps``; EfficientNet-Lite0's blocks 4, 10 and 15: 40 channels at 1/8, 112 at
  1/16, 320 at 1/32), projects each to ``width`` channels (1×1, default 16), upsamples them to the finest
  tap and sums them, then ReLU, a 3×3 convolution, ReLU and a 1×1 head give log α at 1/8,
  repeated over each 8×8 cell (nearest upsampling: the gates of Eq. 11 are per cell, so a
  b = 8 payload has no partial blocks). In the deployment graph the classifier's pass on the
  image is shared (:class:`keepbits.export.graphs.NiceGraph`), so the generator costs only
  its head. A keepbits design for edge deployment, not the paper's separate U-Net: the
  objective (Eq. 10), the gates (Eq. 11) and x̃ (Eq. 12) are unchanged; the classifier must
  stay fixed (``--mode fixed``). It holds the classifier without owning it: its state dict is
  the head alone, and :meth:`NiceTaps.attach` gives it the classifier after it is built.

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

from keepbits.errors import InputError
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


class NiceTaps(nn.Module):
    """log α from the classifier's own features (see the module docstring): lateral 1×1
    projections of the tapped blocks, upsampled to the finest and summed, ReLU → 3×3 → ReLU →
    1×1 head, nearest upsampling to the image size.

    Example:
        >>> import torch
        >>> from keepbits import registry
        >>> clf = registry.build("efficientnet_lite0", image_size=(64, 64)).eval()
        >>> gen = registry.build("nice_taps").attach(clf).eval()
        >>> tuple(gen(torch.zeros(2, 3, 64, 64)).shape), sorted(gen.state_dict())[:2]
        ((2, 1, 64, 64), ['head.bias', 'head.weight'])
    """

    def __init__(self, taps: tuple[int, ...] = (4, 10, 15), channels: tuple[int, ...] = (40, 112, 320), width: int = 16):
        super().__init__()
        if len(taps) != len(channels) or not taps:
            raise ValueError(f"nice_taps needs one channel count per tap, got taps {tuple(taps)} and channels {tuple(channels)}")
        self.taps = tuple(int(t) for t in taps)
        self.lateral = nn.ModuleList(nn.Conv2d(int(c), width, 1) for c in channels)
        self.mix = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, INIT_LOG_ALPHA)
        object.__setattr__(self, "classifier", None)  # held, not owned: outside state_dict, parameters() and .to()

    def attach(self, classifier: nn.Module) -> "NiceTaps":
        """Read the features of ``classifier`` (it needs ``forward_taps(x, taps)``); returns self."""
        if not callable(getattr(classifier, "forward_taps", None)):
            raise InputError(f"nice_taps reads the classifier's features, but a {type(classifier).__name__} has no "
                             "forward_taps(x, taps) (efficientnet_lite0 has; use nice_fast for other classifiers)")
        object.__setattr__(self, "classifier", classifier)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise InputError("nice_taps has no classifier to read: call attach(classifier) first")
        with torch.no_grad():  # the classifier is fixed: only the head learns
            _, features = self.classifier.forward_taps(x, self.taps)
        return self.from_features(features, x.shape[-2:])

    def from_features(self, features: list[torch.Tensor], size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """log α (N×1×H×W, H×W = ``size``) from the tapped features (``forward_taps``' order):
        :meth:`cell_log_alpha` repeated over each cell."""
        return resize(self.cell_log_alpha(features), size, "nearest")

    def cell_log_alpha(self, features: list[torch.Tensor]) -> torch.Tensor:
        """log α per cell (N×1×h×w at the finest tap's resolution), before the nearest upsampling."""
        finest = tuple(features[0].shape[-2:])
        summed = None
        for lateral, feature in zip(self.lateral, features):
            h = lateral(feature)
            if tuple(h.shape[-2:]) != finest:
                h = resize(h, finest, "bilinear")
            summed = h if summed is None else summed + h
        return self.head(self.mix(summed))


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str) -> torch.Tensor:
    """``F.interpolate`` of N×C×h×w ``x`` to ``size`` (``"nearest"``, or ``"bilinear"`` without
    aligned corners). Where ``size`` is a whole multiple of h×w it passes the integer factors
    instead: the same values (both spell the sampling step as the same correctly rounded
    h/H), and an exported graph holds a constant-scale ``Resize`` rather than the shape
    arithmetic that builds its output size around a dynamic batch axis."""
    (h, w), (height, width) = x.shape[-2:], (int(size[0]), int(size[1]))
    align = None if mode == "nearest" else False
    if height % h == 0 and width % w == 0:
        return F.interpolate(x, scale_factor=(float(height // h), float(width // w)), mode=mode, align_corners=align)
    return F.interpolate(x, size=(height, width), mode=mode, align_corners=align)


@register("nice_taps", "generator")
def nice_taps(in_channels: int = 3, taps: tuple[int, ...] | list[int] = (4, 10, 15),
              channels: tuple[int, ...] | list[int] = (40, 112, 320), width: int = 16) -> nn.Module:
    """Mask generator on the classifier's own features (EfficientNet-Lite0 by default); ``attach`` it
    to the classifier before use. ``in_channels`` is the image's, for the common call shape."""
    return NiceTaps(tuple(taps), tuple(channels), int(width))


def attach_classifier(generator: nn.Module, classifier: nn.Module) -> nn.Module:
    """``generator``, given ``classifier`` when it reads the classifier's features (``nice_taps``);
    every place that builds the pair (training, checkpoints, export) calls this."""
    attach = getattr(generator, "attach", None)
    return attach(classifier) if callable(attach) else generator
