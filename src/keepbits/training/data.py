"""Turning :class:`keepbits.data.ImageDataset` (or in-memory) arrays into torch batches.

Batches are built from one uint8 tensor held in memory: no per-sample Python objects,
no worker processes. Augmentation (random crop with zero padding, horizontal flip) runs
on the batch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from keepbits.data import ImageDataset
from keepbits.errors import InputError


class TensorArrays:
    """In-memory N×C×H×W images already in the model's input space (e.g. normalised floats,
    or [0, 1] images for a model that normalises itself) and their labels, batched with
    optional augmentation. :class:`TensorImages` is the uint8 twin that normalises per batch."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        self.images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise InputError(f"need N×C×H×W images and N labels, got {tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def batches(
        self,
        batch_size: int,
        order: torch.Tensor | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (model-input batch, labels) over ``order`` (default: in sequence); crops pad with zeros."""
        order = torch.arange(len(self)) if order is None else order
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x = self.images[index]
            if crop_padding:
                x = random_crop(x, crop_padding, generator)
            if flip:
                x = random_flip(x, generator)
            yield self._model_input(x), self.labels[index]


class TensorImages(TensorArrays):
    """A data set as an N×C×H×W uint8 tensor plus labels, with normalisation stats."""

    def __init__(self, dataset: ImageDataset, mean: Sequence[float], std: Sequence[float]):
        super().__init__(dataset.x.transpose(0, 3, 1, 2), dataset.y)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self.mean) / self.std

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``padding`` (zeros) and cut a random H×W window per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return cropped.gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left–right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
