"""Image data as numpy arrays (no torch, no torchvision): in-memory data sets, footage
streamed from disk, preprocessing (:class:`Preprocessing`), the ImageNet class names.

Example:
    >>> from keepbits.data import load_dataset, sample_mnist_path
    >>> ds = load_dataset(sample_mnist_path(), split="train")
    >>> ds.x.shape[1:], ds.num_classes
    ((28, 28, 1), 10)
"""
from keepbits.data.dataset import ImageDataset, channel_stats, sample_indices, train_val_split
from keepbits.data.imagenet import imagenet_class_names, imagenet_wnids
from keepbits.data.loaders import (
    has_split,
    load_dataset,
    load_idx,
    load_image_folder,
    load_npz,
    sample_mnist_path,
)
from keepbits.data.preprocess import RESIZE_POLICIES, ImageFit, Preprocessing, fit_into
from keepbits.data.stream import Footage, Sample, decode_image

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
    "imagenet_class_names",
    "imagenet_wnids",
    "RESIZE_POLICIES",
    "ImageFit",
    "Preprocessing",
    "fit_into",
    "Footage",
    "Sample",
    "decode_image",
]
