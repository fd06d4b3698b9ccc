"""The user's images for commands that run a bundle on them (``keepbits eval``, ``compare``,
``explain``): a labelled data set, a folder of image files, or one image file.

Labelled: anything :func:`keepbits.data.load_dataset` reads (``.npz``, idx files, class
folders; its test split when it has one), class folders made the model's size by ``policy``.
Unlabelled: image files directly in a folder (any sizes; the runtime letterboxes them), or one
file, read by :func:`keepbits.data.decode_image` (RGB, pixel count bounded). ``num_images`` draws a seeded sample with :func:`keepbits.data.sample_indices`
(class-balanced when labelled), before unlabelled files are read.

Example:
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.data.images import load_images
    >>> images = load_images(sample_mnist_path(), num_images=20)
    >>> len(images), images.labelled, images.images[0].shape
    (20, True, (28, 28, 1))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keepbits.data.dataset import sample_indices
from keepbits.data.loaders import IMAGE_SUFFIXES, has_split, load_dataset
from keepbits.data.stream import decode_image
from keepbits.errors import InputError


@dataclass
class ImageSet:
    """``images``: uint8 H×W×C (C = 1 or 3, RGB; image files are read as RGB), sizes may differ; ``names``: one per image
    (file name, or the index in the data set); ``labels`` int64 or None; ``source`` says what was
    read and which sample was drawn."""

    images: list[np.ndarray]
    names: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def load_images(path: str | Path, *, num_images: int | None = None, seed: int = 0, split: str = "test",
                size: tuple[int, int] | None = None, policy: str = "letterbox") -> ImageSet:
    """Images at ``path`` (see the module docstring); a labelled set uses its ``split`` when it
    has one (else its train split), class folders made ``size`` (H, W) by ``policy``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path not found: {path}")
    sample = "" if num_images is None else f" [sample {num_images}, seed {seed}]"
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSet([decode_image(path)], [path.name], None, [], str(path))
    if path.is_dir() and not any(p.is_dir() for p in path.iterdir()) and not has_split(path, split) and not has_split(path, "train"):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no data set")
        chosen = sample_indices(np.zeros(len(files), np.int64), num_images, seed)
        return ImageSet([decode_image(files[i]) for i in chosen], [files[i].name for i in chosen], None, [], f"{path}{sample}")
    dataset = load_dataset(path, split if has_split(path, split) else "train", size=size, policy=policy)
    chosen = sample_indices(dataset.y, num_images, seed)
    return ImageSet([dataset.x[i] for i in chosen], [str(int(i)) for i in chosen], dataset.y[chosen],
                    list(dataset.class_names), f"{dataset.source}{sample}")


__all__ = ["ImageSet", "load_images"]
