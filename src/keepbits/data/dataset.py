"""The in-memory data set type, validation, seeded class-balanced samples, deterministic splits and normalisation stats."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from keepbits.errors import InputError

#: Most classes a data set may have; also the bound of a bundle manifest's class names (the
#: payload's i16 class index).
MAX_CLASSES = 1 << 15


@dataclass
class ImageDataset:
    """``x``: uint8 N×H×W×C images; ``y``: int64 labels in [0, len(class_names))."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    source: str = "<memory>"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x, y = self.x, np.asarray(self.y)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise InputError(f"{self.source}: images must be uint8, got {getattr(x, 'dtype', type(x))}")
        if x.ndim == 3:  # N×H×W gray
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise InputError(f"{self.source}: images must be N×H×W×C with C in (1, 3), got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise InputError(f"{self.source}: labels must be a vector of length {len(x)}, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{self.source}: labels must be integers, got {y.dtype}")
        if len(y) and y.min() < 0:
            raise InputError(f"{self.source}: labels must be class indices, found the negative label {int(y.min())}")
        if len(y) and y.max() >= MAX_CLASSES:
            raise InputError(f"{self.source}: label {int(y.max())} is beyond the {MAX_CLASSES} classes allowed")
        if len(self.class_names) > MAX_CLASSES:
            raise InputError(f"{self.source}: {len(self.class_names)} class names, more than the {MAX_CLASSES} classes allowed")
        if not self.class_names:
            self.class_names = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
        if len(y) and y.max() >= len(self.class_names):
            raise InputError(
                f"{self.source}: label out of range: found {int(y.min())}..{int(y.max())} "
                f"but there are {len(self.class_names)} classes"
            )
        self.x, self.y = x, y.astype(np.int64)
        self.class_names = [str(c) for c in self.class_names]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape_chw(self) -> tuple[int, int, int]:
        n, h, w, c = self.x.shape
        return (c, h, w)

    def subset(self, index: np.ndarray, source_suffix: str = "") -> "ImageDataset":
        return ImageDataset(self.x[index], self.y[index], list(self.class_names), self.source + source_suffix, dict(self.meta))

    def sample(self, count: int | None, seed: int = 0) -> "ImageDataset":
        """``count`` images by :func:`sample_indices` (seeded, class-balanced, file order); all of
        them when ``count`` is None or ≥ the size.

        Example:
            >>> import numpy as np
            >>> from keepbits.data import ImageDataset
            >>> ds = ImageDataset(np.zeros((10, 2, 2, 1), np.uint8), np.repeat([0, 1], 5), ["a", "b"])
            >>> ds.sample(4).y.tolist()
            [0, 0, 1, 1]
        """
        if count is None or count >= len(self):
            return self
        return self.subset(sample_indices(self.y, count, seed), f"[sample {count}, seed {seed}]")


def sample_indices(labels: np.ndarray, count: int | None, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` items drawn without replacement, as equally from each class as the
    class sizes allow (per-class counts differ by at most one until a class runs out; which
    classes get the extra one is random), seeded, returned in file order. Every command that
    takes a count of images uses this, never the first N: files such as CIFAR-10's are sorted
    by class. ``count`` None or ≥ the size: all indices.

    Example:
        >>> import numpy as np
        >>> labels = np.repeat([0, 1, 2], 4)  # sorted by class: the first 6 would be classes 0 and 1 only
        >>> np.bincount(labels[sample_indices(labels, 6, seed=1)]).tolist()
        [2, 2, 2]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be a vector, got shape {labels.shape}")
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    if count < 0:
        raise InputError(f"sample size must be >= 0, got {count}")
    order = np.random.default_rng(seed).permutation(len(labels))  # random order within each class
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    grouped = shuffled[by_class]
    rank = np.empty(len(labels), np.int64)  # position of each shuffled item within its class
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(grouped, grouped, side="left")
    first = np.lexsort((np.arange(len(labels)), rank))[:count]  # round by round: rank 0 of every class, then rank 1, ...
    return np.sort(order[first])


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of the indices of ``labels`` into (train, val) index arrays, both
    in file order: each class gives round(``val_fraction`` × its size) items, drawn at random, to
    the validation split, so val has the classes' proportions (class-sorted files included). Model
    selection (``best.pt``, λ1 pilots) reads this split, never the test set.

    Example:
        >>> import numpy as np
        >>> labels = np.repeat([0, 1], [8, 2])  # sorted by class, 80 % / 20 %
        >>> train, val = train_val_split(labels, 0.5, seed=0)
        >>> np.bincount(labels[val]).tolist(), len(train)
        ([4, 1], 5)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"validation fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be a vector, got shape {labels.shape}")
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    val = [order[shuffled == c][: int(round(val_fraction * np.count_nonzero(shuffled == c)))] for c in np.unique(labels)]
    is_val = np.zeros(len(labels), bool)
    is_val[np.concatenate(val) if val else np.zeros(0, np.int64)] = True
    if len(labels) and is_val.all():  # a trainer given this would train on nothing
        raise InputError(f"no training image is left once the validation split ({val_fraction:g}) of {len(labels)} holds out "
                         "round(fraction × class size) per class; lower --val-fraction")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def channel_stats(x: np.ndarray, max_images: int = 20000, chunk_values: int = 1 << 24) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale, from all images or,
    above ``max_images``, a seeded uniform sample of that many (never the first N: files may be
    sorted by class). Sums run over chunks of at most ``chunk_values`` values (exact
    integer sums in float64), so memory stays bounded for large images.

    Example:
        >>> import numpy as np
        >>> channel_stats(np.array([[[[0, 255]], [[255, 255]]]], np.uint8))
        ([0.5, 1.0], [0.5, 1.0])
    """
    sample = x if len(x) <= max_images else x[np.sort(np.random.default_rng(0).choice(len(x), max_images, replace=False))]
    channels = sample.shape[-1]
    per_image = max(1, sample[0].size if len(sample) else 1)
    step = max(1, chunk_values // per_image)
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(sample), step):
        part = sample[start : start + step].reshape(-1, channels).astype(np.float64)
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
    count = max(1, len(sample) * per_image // channels)
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(squares / count / 255.0**2 - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return [float(v) for v in mean], [float(v) for v in std]
