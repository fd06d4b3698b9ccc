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


class Evaluation:
    """The pieces of the NICE benchmark on one data set, computed once: ẑ of every image, the
    classifier's gradient saliency, the equal-budget binary masks (:func:`equal_budget_masks`
    of random scores, saliency, ``sis_ranks`` and any ``extra_scores``), x̃ for a mask and b,
    per-image correctness on decoded images (for CIs and paired comparisons), whole-image and
    payload coding. :func:`benchmark_nice` is its standard report; benches with their own
    protocol (cluttered scenes) use it directly."""

    def __init__(self, generator: torch.nn.Module, classifier: torch.nn.Module, checkpoint: Checkpoint, dataset: ImageDataset,
                 seed: int = 0, batch_size: int = 256, sis_ranks: torch.Tensor | None = None,
                 extra_scores: Mapping[str, torch.Tensor] | None = None):
        self.classifier, self.dataset, self.batch_size = classifier.eval(), dataset, batch_size
        self.mean, self.std = checkpoint.normalization.mean, checkpoint.normalization.std
        self.data = TensorImages(dataset, self.mean, self.std)
        generator.eval()
        z_hats, saliency = [], []
        for x, _ in self.data.batches(batch_size):
            with torch.no_grad():
                z_hats.append(deterministic_mask(generator(x)))
            saliency.append(gradient_saliency(classifier, x))
        self.z_hat = torch.cat(z_hats)
        sal = torch.cat(saliency)
        self.scores = {"random": torch.rand(sal.shape, generator=torch.Generator().manual_seed(seed)), "saliency_topk": sal}
        if sis_ranks is not None:
            self.scores["sis_backselect"] = sis_ranks
        self.scores.update(extra_scores or {})
        self.masks = equal_budget_masks(self.z_hat, self.scores)

    def correct(self, images: np.ndarray) -> np.ndarray:
        """Per image: does the classifier get uint8 N×H×W×C ``images`` right?"""
        data = TensorImages(dataclasses.replace(self.dataset, x=images), self.mean, self.std)
        return predict_logits(self.classifier, data, self.batch_size).argmax(1) == self.dataset.y

    def accuracy(self, images: np.ndarray) -> float:
        """Accuracy of the classifier on uint8 N×H×W×C ``images`` (the data set's labels)."""
        return float(np.mean(self.correct(images))) if len(images) else float("nan")

    def composed(self, mask: torch.Tensor, block_size: int) -> np.ndarray:
        """x̃ (Eq. 12) of every image with ``mask`` (N×1×H×W, binary or soft) at b, as uint8."""
        parts, start = [], 0
        for x, _ in self.data.batches(self.batch_size):
            parts.append(to_uint8(mixed_resolution(x, mask[start : start + len(x)], block_size), self.mean, self.std))
            start += len(x)
        return np.concatenate(parts)

    def codec_rows(self, images: np.ndarray, qualities: Sequence[int]) -> list[dict[str, Any]]:
        """Whole images as PNG and JPEG/WebP at ``qualities``: bytes per image, accuracy on the decoded images."""
        rows = []
        for fmt, quality in [("png", None)] + [(f, q) for f in FORMATS if f != "png" for q in qualities]:
            sizes, decoded = code_images(images, fmt, quality)
            rows.append({"codec": fmt, "quality": quality, "bytes_per_image": float(sizes.mean()), "accuracy": self.accuracy(decoded)})
        return rows

    def payload(self, mask: torch.Tensor, block_size: int, codec: str = "png", quality: int = 90) -> tuple[np.ndarray, np.ndarray]:
        """The payloads keepbits sends (:func:`keepbits.codec.encode`, blocks mode: ``codec`` png =
        lossless kept blocks and raw background, jpeg/webp at ``quality``) for the original images
        and a binary N×1×H×W ``mask`` at b: (bytes per image, what the receiver decodes)."""
        frames, keep = self.dataset.x, mask[:, 0].numpy() > MASK_THRESHOLD
        sizes = np.zeros(len(frames), np.int64)
        decoded = np.empty_like(frames)
        for i, (frame, kept) in enumerate(zip(frames, keep)):
            data = encode(frame, kept, block=block_size, codec=codec, quality=quality, timestamp=0.0)
            sizes[i] = len(data)
            decoded[i] = decode(data)[0].reshape(frame.shape)
        return sizes, decoded

    def payload_rows(self, mask: torch.Tensor, block_size: int, qualities: Sequence[int]) -> list[dict[str, Any]]:
        """:meth:`payload` lossless and with JPEG/WebP kept blocks at ``qualities`` (WebP: colour
        only): bytes per image and accuracy on the decoded images."""
        settings = [("png", None)] + [(c, q) for c in ("jpeg", "webp") if c != "webp" or self.dataset.x.shape[-1] == 3 for q in qualities]
        rows = []
        for codec, quality in settings:
            sizes, decoded = self.payload(mask, block_size, codec, quality or 90)
            rows.append({"codec": codec, "quality": quality, "bytes_per_image": float(sizes.mean()), "accuracy": self.accuracy(decoded)})
        return rows

    def png_row(self, mask: torch.Tensor, block_size: int) -> dict[str, float]:
        """Accuracy and whole-image PNG bytes of x̃ with ``mask`` at b."""
        images = self.composed(mask, block_size)
        return {"accuracy": self.accuracy(images), "png_bytes_per_image": float(code_images(images, "png")[0].mean())}


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
    coded_block_sizes: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Rate and accuracy of NICE and of equal-budget baselines on ``dataset``, per block size.

    For every b: ``nice`` is x̃ of the binary mask ẑ > 0.5 (Eq. 11, 12) quantised to uint8, with
    its accuracy, its bytes as a whole PNG and as JPEG/WebP at ``qualities`` (``codecs``) and the
    bytes of keepbits payloads (``payloads``, :meth:`Evaluation.payload_rows`); ``random``,
    ``saliency_topk`` and, with ``sis_ranks`` (N×H×W, :func:`backselect_ranks` of the same
    classifier and images), ``sis_backselect`` are binary masks at the same per-image pixel
    count (:func:`equal_budget_masks`), composed the same way (accuracy, PNG bytes);
    ``nice_soft`` is x̃ of the soft ẑ as trained (accuracy, PNG bytes), reported apart since it
    is not at that budget. Once: the original image as PNG and JPEG/WebP at ``qualities``.
    Accuracies are measured on the decoded images. ``coded_block_sizes`` (default: all): the b
    values that get the JPEG/WebP and payload rows (the others: accuracy and PNG bytes).
    """
    ev = Evaluation(generator, classifier, checkpoint, dataset, seed, batch_size, sis_ranks)
    result: dict[str, Any] = {
        "num_images": len(dataset),
        "kept_fraction": float(ev.masks["nice"].mean()),
        "mean_mask": float(ev.z_hat.mean()),
        "budget": "nice, random, saliency_topk, sis_backselect: binary masks keeping per image the pixels ẑ > 0.5 keeps; "
                  "nice_soft: x̃ of the soft ẑ (Eq. 11), not at that budget",
        "original": {"accuracy": ev.accuracy(dataset.x), "codecs": ev.codec_rows(dataset.x, qualities)},
        "per_block_size": [],
    }
    block_sizes = [int(b) for b in block_sizes]
    coded = set(block_sizes if coded_block_sizes is None else coded_block_sizes)
    for b in block_sizes:
        nice_images = ev.composed(ev.masks["nice"], b)
        codecs = ev.codec_rows(nice_images, qualities if b in coded else ())
        row: dict[str, Any] = {"block_size": b, "nice": {
            "accuracy": ev.accuracy(nice_images), "png_bytes_per_image": codecs[0]["bytes_per_image"], "codecs": codecs,
            "payloads": ev.payload_rows(ev.masks["nice"], b, qualities if b in coded else ())}}
        for name in ev.scores:
            row[name] = ev.png_row(ev.masks[name], b)
        row["nice_soft"] = ev.png_row(ev.z_hat, b)
        result["per_block_size"].append(row)
    return result


__all__ = ["Evaluation", "PNG_LEVEL", "backselect_ranks", "benchmark_nice", "code_images", "equal_budget_masks", "to_uint8"]
