"""Rate and accuracy of trained NICE models against same-budget baselines (the NICE benchmark).

For a trained generator and its classifier: x̃ built with ẑ (NICE Eqs. 11–12) quantised to
uint8, its bytes as PNG and as JPEG/WebP, and the classifier's accuracy on the decoded
images; baselines keep the same number of pixels per image as ẑ > 0.5 does (random pixels,
gradient saliency, optionally the SIS pixels of Batched Gradient BackSelect). Images are
coded by :mod:`keepbits.codec.images`, the codec's own whole-image encoder.

Example:
    >>> import torch
    >>> from keepbits.training.nice_eval import to_uint8
    >>> to_uint8(torch.zeros(1, 1, 2, 2), [0.5], [0.25])[0, :, :, 0].tolist()
    [[128, 128], [128, 128]]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from keepbits.codec.images import FORMATS, decode_image, encode_image
from keepbits.core import accuracy
from keepbits.data import ImageDataset
from keepbits.errors import InputError
from keepbits.training.checkpoint import Checkpoint
from keepbits.training.classifier import predict_logits
from keepbits.training.data import TensorImages
from keepbits.training.functional import deterministic_mask, mixed_resolution
from keepbits.training.nice import MASK_THRESHOLD, gradient_saliency, topk_mask

#: zlib level of the benchmark's PNGs (lossless at the highest compression).
PNG_LEVEL = 9


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised N×C×H×W → uint8 N×H×W×C (round to nearest, clip): what a codec receives."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def code_images(images: np.ndarray, fmt: str, quality: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode each uint8 N×H×W×C image as ``fmt`` (:func:`keepbits.codec.encode_image`: PNG at
    zlib level :data:`PNG_LEVEL`, JPEG/WebP at ``quality``) and decode it back; returns
    (bytes per image, decoded images).

    Example:
        >>> import numpy as np
        >>> sizes, decoded = code_images(np.zeros((2, 8, 8, 1), np.uint8), "png")
        >>> sizes.shape, decoded.shape
        ((2,), (2, 8, 8, 1))
    """
    sizes = np.zeros(len(images), dtype=np.int64)
    decoded = np.empty_like(images)
    options = {"png_level": PNG_LEVEL} if fmt == "png" else {"quality": quality}
    for i, image in enumerate(images):
        data = encode_image(image, fmt, **options)
        sizes[i] = len(data)
        decoded[i] = decode_image(data, fmt, channels=images.shape[-1])
    return sizes, decoded


def backselect_ranks(classifier: torch.nn.Module, data: TensorImages, k: int, batch_size: int = 256) -> torch.Tensor:
    """Per-pixel importance (N×H×W) from Batched Gradient BackSelect (Carter et al. 2021, §3.2;
    ``k`` pixels per iteration): the step at which a pixel is masked, so the pixels masked last
    (the sufficient input subset) rank highest."""
    from keepbits.audit import gradient_backselect

    ranks = []
    for x, _ in data.batches(batch_size):
        n, c, h, w = x.shape
        for result in gradient_backselect(classifier, x.numpy(), k=k, batch_size=batch_size, input_shape=(c, h, w)):
            rank = np.empty(h * w, np.float32)
            rank[result.order] = np.arange(len(result.order), dtype=np.float32)
            ranks.append(torch.from_numpy(rank.reshape(h, w)))
    return torch.stack(ranks)


def benchmark_nice(
    generator: torch.nn.Module,
    classifier: torch.nn.Module,
    checkpoint: Checkpoint,
    dataset: ImageDataset,
    block_sizes: Iterable[int],
    qualities: Sequence[int] = (10, 30, 50, 75, 90),
    seed: int = 0,
    batch_size: int = 256,
    sis_ranks: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Rate and accuracy of NICE and of same-budget baselines on ``dataset``, per block size.

    For every b: NICE x̃ built with ẑ (Eq. 11, 12), quantised to uint8, its accuracy and
    bytes as PNG and as JPEG/WebP at ``qualities``; random-pixel and gradient-saliency
    top-k masks keeping, per image, as many pixels as ẑ > 0.5 does, composed the same
    way (PNG bytes, accuracy); with ``sis_ranks`` (N×H×W, :func:`backselect_ranks` of the
    same classifier and images), also the SIS baseline: the pixels BackSelect masks last.
    Once: the original image as PNG and JPEG/WebP at ``qualities`` (bytes, accuracy).
    Accuracies are measured on the decoded images.
    """
    mean, std = checkpoint.normalization.mean, checkpoint.normalization.std
    data = TensorImages(dataset, mean, std)
    generator.eval()
    classifier.eval()
    z_hats, saliency = [], []
    for x, _ in data.batches(batch_size):
        with torch.no_grad():
            z_hats.append(deterministic_mask(generator(x)))
        saliency.append(gradient_saliency(classifier, x))
    z_hat = torch.cat(z_hats)
    sal = torch.cat(saliency)
    counts = (z_hat > MASK_THRESHOLD).flatten(1).sum(1)
    rand = topk_mask(torch.rand(sal.shape, generator=torch.Generator().manual_seed(seed)), counts)
    sal_mask = topk_mask(sal, counts)
    baselines = {"random": rand, "saliency_topk": sal_mask}
    if sis_ranks is not None:
        if tuple(sis_ranks.shape) != tuple(sal.shape):
            raise InputError(f"sis_ranks must be {tuple(sal.shape)} (N×H×W of the images), got {tuple(sis_ranks.shape)}")
        baselines["sis_backselect"] = topk_mask(sis_ranks, counts)

    def accuracy_on(images: np.ndarray) -> float:
        return accuracy(predict_logits(classifier, TensorImages(dataclasses.replace(dataset, x=images), mean, std), batch_size), dataset.y)

    def composed(mask: torch.Tensor, b: int) -> np.ndarray:
        parts, start = [], 0
        for x, _ in data.batches(batch_size):
            parts.append(to_uint8(mixed_resolution(x, mask[start : start + len(x)], b), mean, std))
            start += len(x)
        return np.concatenate(parts)

    def codec_rows(images: np.ndarray) -> list[dict[str, Any]]:
        rows = []
        for fmt, quality in [("png", None)] + [(f, q) for f in FORMATS if f != "png" for q in qualities]:
            sizes, decoded = code_images(images, fmt, quality)
            rows.append({"codec": fmt, "quality": quality, "bytes_per_image": float(sizes.mean()), "accuracy": accuracy_on(decoded)})
        return rows

    original = dataset.x
    result: dict[str, Any] = {
        "num_images": len(dataset),
        "kept_fraction": float((z_hat > MASK_THRESHOLD).float().mean()),
        "mean_mask": float(z_hat.mean()),
        "original": {"accuracy": accuracy_on(original), "codecs": codec_rows(original)},
        "per_block_size": [],
    }
    for b in block_sizes:
        nice_images = composed(z_hat, b)
        row: dict[str, Any] = {"block_size": int(b), "nice": {"accuracy": accuracy_on(nice_images), "codecs": codec_rows(nice_images)}}
        for name, mask in baselines.items():
            images = composed(mask, b)
            sizes, _ = code_images(images, "png")
            row[name] = {"accuracy": accuracy_on(images), "png_bytes_per_image": float(sizes.mean())}
        row["nice"]["png_bytes_per_image"] = row["nice"]["codecs"][0]["bytes_per_image"]
        result["per_block_size"].append(row)
    return result


__all__ = ["PNG_LEVEL", "backselect_ranks", "benchmark_nice", "code_images", "to_uint8"]
