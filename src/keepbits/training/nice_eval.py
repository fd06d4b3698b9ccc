"""Rate and accuracy of trained NICE models against same-budget baselines (the NICE benchmark).

For a trained generator and its classifier, per block size b:

* **equal budget** (:func:`equal_budget_masks`): NICE's binary mask ẑ > 0.5 (what the keepbits
  codec transmits) against random pixels, gradient saliency and optionally the SIS pixels of
  Batched Gradient BackSelect, every mask keeping, per image, exactly the pixels ẑ > 0.5 keeps;
  each composed into x̃ (Eq. 12), quantised to uint8, scored by the classifier;
* the **soft** mask ẑ itself (Eq. 11, as trained), reported separately: it blends every pixel
  with ẑ > 0 into x̃, so it spends more than the binary budget;
* **bytes**: x̃ of the binary mask as a whole PNG/JPEG/WebP image (the paper's protocol), and
  the payload keepbits actually sends for it (:func:`keepbits.codec.encode`, blocks mode:
  lossless PNG, or JPEG/WebP kept blocks), each with the accuracy on the decoded images.

Images are coded by :mod:`keepbits.codec.images`, the codec's own whole-image encoder.

Example:
    >>> import torch
    >>> from keepbits.training.nice_eval import to_uint8
    >>> to_uint8(torch.zeros(1, 1, 2, 2), [0.5], [0.25])[0, :, :, 0].tolist()
    [[128, 128], [128, 128]]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from keepbits.codec import decode, encode
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


def equal_budget_masks(z_hat: torch.Tensor, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Binary N×1×H×W masks at NICE's per-image budget: ``"nice"`` is ẑ > 0.5 itself (Eq. 11
    thresholded, what the codec transmits) and every named N×H×W score map keeps its top-k
    pixels, k = the number of pixels ẑ > 0.5 keeps in that image. Every mask therefore keeps
    exactly as many pixels per image: the one equal-budget comparison of the NICE benchmark.

    Example:
        >>> import torch
        >>> z_hat = torch.tensor([[[[0.9, 0.6], [0.3, 0.0]]]])
        >>> masks = equal_budget_masks(z_hat, {"score": torch.tensor([[[0.0, 1.0], [3.0, 2.0]]])})
        >>> masks["nice"][0, 0].tolist(), masks["score"][0, 0].tolist()
        ([[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]])
    """
    if z_hat.ndim != 4 or z_hat.shape[1] != 1:
        raise InputError(f"ẑ must be N×1×H×W, got {tuple(z_hat.shape)}")
    binary = (z_hat > MASK_THRESHOLD).float()
    counts = binary.flatten(1).sum(1).long()
    masks = {"nice": binary}
    for name, score in scores.items():
        if tuple(score.shape) != (z_hat.shape[0], *z_hat.shape[2:]):
            raise InputError(f"{name} scores must be {(z_hat.shape[0], *z_hat.shape[2:])} (N×H×W of the images), got {tuple(score.shape)}")
        masks[name] = topk_mask(score, counts)
    return masks


def payload_rows(frames: np.ndarray, masks: torch.Tensor, block_size: int, qualities: Sequence[int],
                 score: Any) -> list[dict[str, Any]]:
    """Bytes per image of the payloads keepbits sends (:func:`keepbits.codec.encode`, blocks mode)
    for uint8 N×H×W×C ``frames`` and binary N×1×H×W ``masks`` at ``block_size``: lossless (PNG
    kept blocks, raw background) and JPEG/WebP kept blocks at ``qualities`` (WebP: colour
    only); each row with ``score(decoded images)``, the accuracy on what the receiver decodes."""
    keep = masks[:, 0].numpy() > MASK_THRESHOLD
    settings = [("png", 90)] + [(c, q) for c in ("jpeg", "webp") if c != "webp" or frames.shape[-1] == 3 for q in qualities]
    rows = []
    for codec, quality in settings:
        sizes = np.zeros(len(frames), np.int64)
        decoded = np.empty_like(frames)
        for i, (frame, mask) in enumerate(zip(frames, keep)):
            data = encode(frame, mask, block=block_size, codec=codec, quality=quality, timestamp=0.0)
            sizes[i] = len(data)
            decoded[i] = decode(data)[0].reshape(frame.shape)
        rows.append({"codec": codec, "quality": None if codec == "png" else quality, "bytes_per_image": float(sizes.mean()),
                     "accuracy": score(decoded)})
    return rows


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
    """Rate and accuracy of NICE and of equal-budget baselines on ``dataset``, per block size.

    For every b: ``nice`` is x̃ of the binary mask ẑ > 0.5 (Eq. 11, 12) quantised to uint8, with
    its accuracy, its bytes as a whole PNG and as JPEG/WebP at ``qualities`` (``codecs``) and the
    bytes of keepbits payloads (``payloads``, :func:`payload_rows`); ``random``,
    ``saliency_topk`` and, with ``sis_ranks`` (N×H×W, :func:`backselect_ranks` of the same
    classifier and images), ``sis_backselect`` are binary masks at the same per-image pixel
    count (:func:`equal_budget_masks`), composed the same way (accuracy, PNG bytes);
    ``nice_soft`` is x̃ of the soft ẑ as trained (accuracy, PNG bytes), reported apart since it
    is not at that budget. Once: the original image as PNG and JPEG/WebP at ``qualities``.
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
    scores = {"random": torch.rand(sal.shape, generator=torch.Generator().manual_seed(seed)), "saliency_topk": sal}
    if sis_ranks is not None:
        scores["sis_backselect"] = sis_ranks
    masks = equal_budget_masks(z_hat, scores)

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

    def png_row(images: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy_on(images), "png_bytes_per_image": float(code_images(images, "png")[0].mean())}

    original = dataset.x
    result: dict[str, Any] = {
        "num_images": len(dataset),
        "kept_fraction": float(masks["nice"].mean()),
        "mean_mask": float(z_hat.mean()),
        "budget": "nice, random, saliency_topk, sis_backselect: binary masks keeping per image the pixels ẑ > 0.5 keeps; "
                  "nice_soft: x̃ of the soft ẑ (Eq. 11), not at that budget",
        "original": {"accuracy": accuracy_on(original), "codecs": codec_rows(original)},
        "per_block_size": [],
    }
    for b in block_sizes:
        nice_images = composed(masks["nice"], b)
        codecs = codec_rows(nice_images)
        row: dict[str, Any] = {"block_size": int(b), "nice": {
            "accuracy": accuracy_on(nice_images), "png_bytes_per_image": codecs[0]["bytes_per_image"], "codecs": codecs,
            "payloads": payload_rows(original, masks["nice"], int(b), qualities, accuracy_on)}}
        for name in scores:
            row[name] = png_row(composed(masks[name], b))
        row["nice_soft"] = png_row(composed(z_hat, b))
        result["per_block_size"].append(row)
    return result


__all__ = ["PNG_LEVEL", "backselect_ranks", "benchmark_nice", "code_images", "equal_budget_masks", "payload_rows", "to_uint8"]
