"""The exported computations, as torch modules whose eager mode is the reference of the ONNX graph.

:class:`NiceGraph`: normalise, generate log α, mask ẑ (NICE Eq. 11) and compose x̃ (Eq. 12),
classify. :class:`SimplifierGraph`: the SimpleBits simplifier and the classifier of its image.
Both take the bundle's input conventions (``docs/bundle.md``): uint8 N×H×W×C pixels or
float N×C×H×W on [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn

from keepbits.export import ops
from keepbits.training.models.fast_generators import resize


class NiceGraph(nn.Module):
    """The exported computation: normalise, generate log α, mask + compose, classify.

    ``forward(image)`` returns ``(logits, mask, mixed)``, or ``(logits, mask)`` without
    ``mixed_output`` (then a classifier of the original image needs no compose at all); eager
    mode is the torch reference of the ONNX graph. A generator that reads the classifier's own
    features (``from_features``, e.g. ``nice_taps``) shares the classifier's pass over the
    original image: the graph holds the classifier once.
    """

    def __init__(self, generator: nn.Module, classifier: nn.Module, mean: list[float], std: list[float],
                 block_size: int, input_dtype: str = "uint8", classify_on: str = "original", fused: bool = True,
                 mixed_output: bool = True):
        super().__init__()
        self.generator, self.classifier = generator.eval(), classifier.eval()
        self.block_size, self.classify_on, self.fused, self.mixed_output = int(block_size), classify_on, fused, mixed_output
        self.nhwc = input_dtype == "uint8"
        scale = 255.0 if self.nhwc else 1.0
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/scale − mean)/std as one multiply-add
        self.register_buffer("norm_mul", 1.0 / (scale * std_t), persistent=False)
        self.register_buffer("norm_add", -mean_t / std_t, persistent=False)
        self.eval()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x/scale − mean)/std per channel, on an N×C×(H·W) view: the reshape keeps ONNX
        Runtime's layout pass from moving the input's NHWC→NCHW transpose below this multiply-add
        (it does so in INT8 graphs, whose convolutions run NHWC), where a per-channel constant
        broadcasts along the innermost axis, ONNX Runtime's slow case."""
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        return (flat * self.norm_mul.reshape(1, c, 1) + self.norm_add.reshape(1, c, 1)).reshape(n, c, h, w)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # contiguous: a channels-last-strided tensor makes the dynamo exporter spell a later flatten as
        # as_strided (Reshape to 1-D, Gather, Reshape), which merges the batch axis
        x = image.permute(0, 3, 1, 2).contiguous().to(torch.float32) if self.nhwc else image
        xn = self.normalise(x)
        logits = None
        if self.classify_on == "original" and hasattr(self.generator, "from_features"):
            # a generator on the classifier's own features (nice_taps): one classifier pass for both
            logits, features = self.classifier.forward_taps(xn, self.generator.taps)
            if not self.mixed_output:
                # ẑ is pointwise in log α and log α repeats per cell: gate the cells, then repeat ẑ
                cells = ops.hard_concrete_mask(self.generator.cell_log_alpha(features))
                return logits, resize(cells, xn.shape[-2:], "nearest")
            log_alpha = self.generator.from_features(features, xn.shape[-2:])
        else:
            log_alpha = self.generator(xn)
        if not self.mixed_output and self.classify_on == "original":
            return (self.classifier(xn) if logits is None else logits), ops.hard_concrete_mask(log_alpha)
        mask, mixed = ops.mask_and_compose(log_alpha, x, self.block_size, self.fused)
        if logits is None:
            logits = self.classifier(xn if self.classify_on == "original" else self.normalise(mixed))
        if not self.mixed_output:
            return logits, mask
        if self.nhwc:
            mixed = mixed.permute(0, 2, 3, 1)
        return logits, mask, mixed


class SimplifierGraph(nn.Module):
    """The exportable SimpleBits stage: image → (``logits`` of the simplified image,
    ``simplified``), what replaces the explain stage of the runtime pipeline.

    ``input_dtype="float32"``: N×C×H×W on [0, 1] in and out; ``"uint8"``: N×H×W×C pixels
    0..255 in, ``simplified`` N×H×W×C float on 0..255 out (the bundle conventions of
    ``docs/bundle.md``). The classifier normalises inside (:class:`Normalized`).
    """

    def __init__(self, simplifier: nn.Module, classifier: nn.Module, input_dtype: str = "float32"):
        super().__init__()
        self.simplifier, self.classifier = simplifier, classifier
        self.nhwc = input_dtype == "uint8"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255.0 if self.nhwc else image  # see NiceGraph
        simplified = self.simplifier(x)
        logits = self.classifier(simplified)
        return logits, (simplified * 255.0).permute(0, 2, 3, 1) if self.nhwc else simplified


__all__ = ["NiceGraph", "SimplifierGraph"]
