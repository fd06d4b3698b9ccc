"""Image data sets as numpy arrays (no torch, no torchvision).

Example:
    >>> from keepbits.data import load_dataset, sample_mnist_path
    >>> ds = load_dataset(sample_mnist_path(), split="train")
    >>> ds.x.shape[1:], ds.num_classes
    ((28, 28, 1), 10)
"""
from keepbits.data.dataset import ImageDataset, channel_stats, sample_indices, train_val_split
from keepbits.data.loaders import (
    has_split,
    load_dataset,
    load_idx,
    load_image_folder,
    load_npz,
    sample_mnist_path,
)

__all__ = [
    "ImageDataset",
    "channel_stats",
    "sample_indices",
    "train_val_split",
    "has_split",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_npz",
    "sample_mnist_path",
]
