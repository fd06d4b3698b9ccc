"""Image classifiers, registered by name. All take normalised float N×C×H×W input.

Example:
    >>> import torch
    >>> from keepbits import registry
    >>> net = registry.build("lenet5", in_channels=1, num_classes=10, image_size=(28, 28))
    >>> tuple(net(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from keepbits.registry import register


class LeNet5(nn.Module):
    """LeNet5-Caffe (NICE Table 1): conv 20@5×5, pool, conv 50@5×5, pool, fc 500, ReLU, fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2)
        )
        h, w = ((image_size[0] - 4) // 2 - 4) // 2, ((image_size[1] - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(50 * h * w, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """Dataset-condensation ConvNet (Zhao et al.): ``depth`` × [conv 3×3, instance norm, ReLU,
    avg-pool 2], then one linear layer. Instance norm keeps it free of batch statistics, so a
    batch of one synthetic image per class trains it the same as a real batch."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128, depth: int = 3):
        super().__init__()
        layers, cin, (h, w) = [], in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, 1, 1), nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            cin, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """ResNet of basic blocks; ``stem='imagenet'`` (7×7/2 + max-pool) or ``'cifar'`` (3×3/1)."""

    def __init__(self, widths, blocks, in_channels=3, num_classes=10, stem="cifar"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ScanningResNet(ResNet):
    """A CIFAR ResNet-20 slid over a larger image, for small objects in clutter (NICE run 3).

    The image is average-pooled by ``downsample`` (so a 64-px object becomes CIFAR-sized), the
    ResNet trunk gives a feature map at ¼ of that, the classifier's linear layer scores every
    position, the scores are averaged over ``window``×``window`` positions (one CIFAR-sized crop,
    what the global average pool sees in a 32×32 image) and each class takes its highest window.
    Parameter names equal ``resnet20``'s, so CIFAR-10 weights load unchanged (``init``)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, downsample: int = 2, window: int = 8):
        super().__init__((16, 32, 64), (3, 3, 3), in_channels, num_classes, stem="cifar")
        self.downsample, self.window = downsample, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample, ceil_mode=True)
        features = self.layer3(self.layer2(self.layer1(self.stem(x))))
        scores = F.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)
        k = min(self.window, scores.shape[2], scores.shape[3])
        return F.avg_pool2d(scores, k, stride=1).amax(dim=(2, 3))


class VGG(nn.Module):
    """VGG-16 with batch norm, CIFAR variant (global average pool + one linear layer)."""

    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers, cin = [], in_channels
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class ScaledStdConv2d(nn.Conv2d):
    """Conv with scaled weight standardisation (Brock et al.): W ← g·(W − μ)/(σ·√fan_in)."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.gamma, self.eps = gamma, eps

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self.gain * self.gamma * (self.weight - mean) / torch.sqrt(var * fan_in + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


#: γ for ELU so that activations keep unit variance under N(0, 1) inputs (NF-Nets recipe).
ELU_GAMMA = 1.2716


class NFBlock(nn.Module):
    """Pre-activation wide-ResNet block without normalisation: x + α·f(x/β)."""

    def __init__(self, cin: int, cout: int, stride: int, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.conv1 = ScaledStdConv2d(cin, cout, 3, stride, 1, gamma=ELU_GAMMA)
        self.conv2 = ScaledStdConv2d(cout, cout, 3, 1, 1, gamma=ELU_GAMMA)
        self.shortcut = ScaledStdConv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.elu(x / self.beta)
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.elu(self.conv1(pre)))
        return shortcut + self.alpha * out


class NFWideResNet(nn.Module):
    """Normalizer-free Wide-ResNet (SimpleBits S2.1): ELU, scaled weight standardisation,
    residual branch scale α = 0.2, signal-propagation bookkeeping of the expected std β."""

    def __init__(self, depth: int = 16, widen: int = 2, in_channels: int = 3, num_classes: int = 10, alpha: float = 0.2):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = ScaledStdConv2d(in_channels, 16, 3, 1, 1)
        blocks, cin, expected_var = [], 16, 1.0
        for i, width in enumerate(widths):
            for j in range(n):
                beta = expected_var ** 0.5
                blocks.append(NFBlock(cin, width, 2 if (j == 0 and i > 0) else 1, alpha, beta))
                # a transition block resets the variance (its shortcut is a fresh conv)
                expected_var = 1.0 + alpha**2 if blocks[-1].shortcut is not None else expected_var + alpha**2
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register("lenet5", "classifier")
def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: tuple[int, int] = (28, 28)) -> nn.Module:
    """LeNet5-Caffe, as in NICE Table 1 (MNIST)."""
    return LeNet5(in_channels, num_classes, tuple(image_size))


@register("convnet3", "classifier")
def convnet3(in_channels: int = 3, num_classes: int = 10, image_size: tuple[int, int] = (32, 32), width: int = 128) -> nn.Module:
    """ConvNet-3 of dataset condensation (Zhao et al.; SimpleBits S4.3), ``width`` filters per layer."""
    return ConvNet(in_channels, num_classes, tuple(image_size), width)


@register("resnet18", "classifier")
def resnet18(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """ResNet-18, ImageNet-style stem, for larger images (≥ 64 px)."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, num_classes, stem="imagenet")


@register("resnet20", "classifier")
def resnet20(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """ResNet-20 for CIFAR (16/32/64 filters, 3 blocks per stage, ~0.27 M parameters)."""
    return ResNet((16, 32, 64), (3, 3, 3), in_channels, num_classes, stem="cifar")


@register("resnet20_large", "classifier")
def resnet20_large(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """ResNet-20 adapted to large inputs (e.g. 256 px scenes): ImageNet stem (7×7/2 + max-pool,
    ¼ resolution), then ResNet-20's three stages; ~4× ResNet-20's FLOPs at 4× its side."""
    return ResNet((16, 32, 64), (3, 3, 3), in_channels, num_classes, stem="imagenet")


@register("resnet20_scan", "classifier")
def resnet20_scan(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """ResNet-20 slid over ½-resolution input, best 32-px window per class (:class:`ScanningResNet`);
    start it from CIFAR-10 ResNet-20 weights (``keepbits train classifier --init``)."""
    return ScanningResNet(in_channels, num_classes)


@register("vgg16_bn", "classifier")
def vgg16_bn(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """VGG-16 with batch norm, CIFAR variant."""
    return VGG(in_channels, num_classes)


@register("nf_wrn16_2", "classifier")
def nf_wrn16_2(in_channels: int = 3, num_classes: int = 10, image_size=None) -> nn.Module:
    """Normalizer-free Wide-ResNet 16-2 (SimpleBits S2.1)."""
    return NFWideResNet(16, 2, in_channels, num_classes)
