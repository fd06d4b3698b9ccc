"""Footage (:class:`keepbits.data.Footage`: image trees, video frames, ``.npz``) as a torch
``IterableDataset`` streamed by worker processes, at the classifier's input size.

Each sample is cut by a random crop (area share in [``min_crop_area``, 1], aspect ratio the
model's × [3/4, 4/3]) and mirrored with probability 1/2 (``augment=True``), then made the
model's size by the classifier's :class:`keepbits.data.Preprocessing` policy. The random draw
of a sample depends only on (``seed``, epoch, file, position in the file), so any number of
workers yields the same samples. Items are uint8 C×H×W tensors (normalise on the device, with
the preprocessing's mean/std), with the label when ``labels=True`` (the footage must be
labelled); unlabelled footage yields images only.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.data import Footage, Preprocessing
    >>> from keepbits.training.footage import FootageDataset, footage_loader
    >>> path = tempfile.mkdtemp() + "/f.npz"
    >>> np.savez(path, x=np.zeros((5, 40, 60, 3), np.uint8))
    >>> data = FootageDataset(Footage([path]), Preprocessing((32, 32)))
    >>> [tuple(b.shape) for b in footage_loader(data, batch_size=4)]
    [(4, 3, 32, 32), (1, 3, 32, 32)]
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from keepbits.data import Footage, Preprocessing
from keepbits.data.stream import WORKER_START_METHOD
from keepbits.errors import InputError


def random_crop_box(width: int, height: int, aspect: float, min_area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (x0, y0, w, h) window of a width×height frame: area share uniform in
    [``min_area``, 1], aspect ratio ``aspect`` (w/h) times a log-uniform factor in [3/4, 4/3],
    clipped to the frame.

    Example:
        >>> import numpy as np
        >>> from keepbits.training.footage import random_crop_box
        >>> x0, y0, w, h = random_crop_box(640, 360, 1.0, 0.25, np.random.default_rng(0))
        >>> 0 <= x0 <= 640 - w and 0 <= y0 <= 360 - h and w * h >= 0.2 * 640 * 360
        True
    """
    area = rng.uniform(min_area, 1.0) * width * height
    ratio = aspect * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = max(1, min(width, round(math.sqrt(area * ratio))))
    h = max(1, min(height, round(math.sqrt(area / ratio))))
    return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h


class FootageDataset(IterableDataset):
    """Samples of ``footage`` as uint8 C×H×W tensors of ``preprocessing.input_size`` (see the
    module docstring); worker processes of a ``DataLoader`` share the files out between them.

    ``shuffle`` > 0 visits the files in an order drawn per epoch and mixes the samples through a
    buffer of that many (consecutive video frames end up in different batches); 0 keeps file
    order. ``shard=(rank, world)`` keeps every ``world``-th file from ``rank`` on (after the
    epoch's order): the share of one process of a distributed run."""

    def __init__(self, footage: Footage, preprocessing: Preprocessing, *, augment: bool = True, labels: bool = False,
                 min_crop_area: float = 0.25, seed: int = 0, shuffle: int = 0, shard: tuple[int, int] = (0, 1)):
        if labels and not footage.labelled:
            unlabelled = next(u.path for u in footage.units if not u.labelled)
            raise InputError(f"labels asked for, but {unlabelled} has none (videos and plain image trees are unlabelled)")
        if not 0.0 < min_crop_area <= 1.0:
            raise InputError(f"min_crop_area must be in (0, 1], got {min_crop_area}")
        if shuffle < 0 or not 0 <= shard[0] < shard[1]:
            raise InputError(f"shuffle must be >= 0 and shard (rank, world) with 0 <= rank < world, got {shuffle} and {shard}")
        self.footage, self.preprocessing = footage, preprocessing
        self.augment, self.labels, self.min_crop_area, self.seed = augment, labels, min_crop_area, seed
        self.shuffle, self.shard = int(shuffle), (int(shard[0]), int(shard[1]))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw other crops and flips (call before each epoch's iteration)."""
        self.epoch = int(epoch)

    def _units(self) -> list[Any]:
        units = list(self.footage.units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(units))
            units = [units[i] for i in order]
        rank, world = self.shard
        units = units[rank::world]
        info = get_worker_info()
        return units if info is None else units[info.id::info.num_workers]

    def _samples(self) -> Iterator[Any]:
        height, width = self.preprocessing.input_size
        for sample in self.footage.read(self._units()):
            image, flip = sample.image, False
            if self.augment:
                rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(sample.unit.path.encode()), sample.position])
                x0, y0, w, h = random_crop_box(image.shape[1], image.shape[0], width / height, self.min_crop_area, rng)
                image, flip = image[y0:y0 + h, x0:x0 + w], rng.random() < 0.5
            model_image, _ = self.preprocessing.fit(image)
            if flip:
                model_image = model_image[:, ::-1]
            tensor = torch.from_numpy(model_image.transpose(2, 0, 1).copy())
            yield (tensor, sample.label) if self.labels else tensor

    def __iter__(self) -> Iterator[Any]:
        if not self.shuffle:
            yield from self._samples()
            return
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, 2, self.shard[0], info.id if info is not None else 0])
        buffer: list[Any] = []
        for item in self._samples():
            if len(buffer) < self.shuffle:
                buffer.append(item)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = item
        rng.shuffle(buffer)
        yield from buffer


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one decoding/resizing thread per worker process
    torch.set_num_threads(1)


def footage_loader(dataset: FootageDataset, batch_size: int, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with ``num_workers`` worker processes (each with one
    OpenCV and one torch thread); ``kwargs`` go to ``DataLoader`` (e.g. ``pin_memory``).

    Workers start with :data:`keepbits.data.stream.WORKER_START_METHOD`, not by forking the caller:
    a process that already runs threads (ONNX Runtime or OpenCV pools, stream readers, sockets) can
    hand a forked child a lock that some thread held at the fork, and the child waits on it forever."""
    if num_workers:
        kwargs.setdefault("worker_init_fn", _worker_init)
        kwargs.setdefault("multiprocessing_context", WORKER_START_METHOD)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)
