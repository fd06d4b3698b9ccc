"""Shared pieces of the BackSelect evaluators used by :mod:`keepbits.audit.sis`.

An evaluator holds B base images (normalised, B×C×H×W) and returns the logits of
candidates "base image ``img[i]`` with pixel ``pix[i]`` (``row * W + col``) masked";
``mask`` masks the step's choices in the bases. Implementations: :class:`AdapterEvaluator`
(any :class:`~keepbits.audit.ModelAdapter`, numpy), ``DenseTorch`` and ``GraphScreen`` (torch),
``OnnxScreen`` and ``OnnxFloat64`` (ONNX Runtime, ONNX reference evaluator).
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from keepbits.audit._base import ModelAdapter

#: chunk sizes tried when timing a model (candidate images per forward pass)
CHUNK_SIZES = (16, 32, 64, 128, 256, 512, 1024)


class Evaluator(Protocol):
    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None: ...

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None: ...

    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray: ...

    def base_logits(self) -> np.ndarray: ...


def tune_chunk(run: Callable[[int], object], sizes: tuple[int, ...] = CHUNK_SIZES, budget_s: float = 2.0) -> tuple[int, float]:
    """(size, CPU seconds per candidate) for ``run(size)``: the largest size in ``sizes`` within
    10% of the lowest CPU time per candidate (larger chunks: fewer calls). Each size gets one
    warm-up and the best of two timed calls (CPU time, so other processes on the machine
    disturb it less); stops once a size is 20% slower per candidate than the best, or after
    ``budget_s``.

    Example:
        >>> tune_chunk(lambda size: sum(range(size)), sizes=(1, 2))[0] in (1, 2)
        True
    """
    rates: dict[int, float] = {}
    spent = 0.0
    for size in sizes:
        run(size)
        took = float("inf")
        for _ in range(2):
            started = time.process_time()
            run(size)
            took = min(took, time.process_time() - started)
            spent += took
        rates[size] = took / size
        if rates[size] > 1.2 * min(rates.values()) or spent > budget_s:
            break
    best = min(rates.values())
    size = max(s for s, r in rates.items() if r <= 1.1 * best)
    return size, rates[size]


def masked_pixel(images: np.ndarray, img: np.ndarray, pix: np.ndarray, value: np.ndarray, width: int,
                 channels_last: bool = False) -> np.ndarray:
    """Copies of ``images[img]`` with pixel ``pix[i]`` of copy ``i`` set to ``value`` (one gather, one scatter).

    Example:
        >>> masked_pixel(np.ones((1, 1, 2, 2)), np.array([0, 0]), np.array([1, 2]), np.zeros(1), 2)[:, 0].tolist()
        [[[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]]
    """
    batch = images[img]
    rows, cols, n = pix // width, pix % width, np.arange(len(pix))
    if channels_last:
        batch[n, rows, cols, :] = value
    else:
        batch[n, :, rows, cols] = value
    return batch


class AdapterEvaluator:
    """Any :class:`~keepbits.audit.ModelAdapter`: candidate batches built in numpy, ``model.logits`` on float32 inputs."""

    def __init__(self, model: ModelAdapter, chunk: int | None = None):
        self.model, self.chunk = model, chunk or 512

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        self.base = np.array(x, dtype=np.float32)
        self.mask_value = np.asarray(mask_value, np.float32)

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        w = self.base.shape[3]
        self.base[img, :, pix // w, pix % w] = self.mask_value

    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        w = self.base.shape[3]
        out = [self.model.logits(masked_pixel(self.base, img[i : i + self.chunk], pix[i : i + self.chunk], self.mask_value, w),
                                 self.chunk) for i in range(0, len(img), self.chunk)]
        return np.concatenate(out) if out else np.zeros((0, 0))

    def base_logits(self) -> np.ndarray:
        return self.model.logits(self.base, self.chunk)
