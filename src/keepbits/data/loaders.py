"""Readers for the three supported layouts.

* ``.npz`` with ``x`` (uint8 N×H×W×C), ``y`` (int) and optional ``class_names``;
* MNIST / Fashion-MNIST idx files, plain or ``.gz``;
* an image folder with one subfolder per class (JPEG/PNG/WebP/BMP, any sizes), made one
  size by an explicit policy: ``resize`` (stretch), ``center-crop`` (scale the short side,
  crop the middle) or ``letterbox`` (scale the long side, pad with black).

:func:`load_dataset` picks the reader from the path; a directory holding ``train.npz``
and ``test.npz`` (or ``train_*.npz``) is read as a split data set.
"""
from __future__ import annotations

import gzip
import logging
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from keepbits.data.dataset import MAX_CLASSES, ImageDataset
from keepbits.data.preprocess import RESIZE_POLICIES, fit_into
from keepbits.data.stream import IMAGE_SUFFIXES, NPZ_ERRORS, decode_image, read_npz_member
from keepbits.errors import InputError

log = logging.getLogger(__name__)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_IDX_ITEMS = 1 << 31


def sample_mnist_path() -> Path:
    """Path of the MNIST sample bundled with keepbits (2,000 train / 500 test digits)."""
    return Path(__file__).resolve().parent.parent / "assets" / "mnist_sample.npz"


def load_npz(path: str | Path, split: str | None = None) -> ImageDataset:
    """Arrays ``x``/``y`` (one split), or ``x_<split>``/``y_<split>`` when ``split`` is given and
    present; each array's header is checked against the file's size before it is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            arrays = {name.removesuffix(".npy"): name for name in zf.namelist()}
            kx, ky = (f"x_{split}", f"y_{split}") if split and f"x_{split}" in arrays else ("x", "y")
            if split == "test" and kx == "x" and "x_train" in arrays:
                raise InputError(f"{path}: holds no test split (arrays: {sorted(arrays)})")
            if kx not in arrays or ky not in arrays:
                raise InputError(f"{path}: expected arrays 'x' and 'y', found {sorted(arrays)}")
            x, y = read_npz_member(zf, arrays[kx], path), read_npz_member(zf, arrays[ky], path)
            names = read_npz_member(zf, arrays["class_names"], path) if "class_names" in arrays else np.array([])
    except NPZ_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    if names.ndim != 1 or len(names) > MAX_CLASSES:
        raise InputError(f"{path}: 'class_names' must be a list of at most {MAX_CLASSES} names, got shape {names.shape}")
    return ImageDataset(x, y, [str(c) for c in names], source=str(path))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read idx file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise InputError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if count > _MAX_IDX_ITEMS or len(raw) - 4 - 4 * ndim != count * dtype.itemsize:
        raise InputError(f"{path}: idx payload size does not match its header shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def load_idx(images_path: str | Path, labels_path: str | Path) -> ImageDataset:
    images, labels = _read_idx(Path(images_path)), _read_idx(Path(labels_path))
    if images.dtype != np.uint8 or images.ndim != 3:
        raise InputError(f"{images_path}: expected uint8 N×H×W images, got {images.dtype} {images.shape}")
    return ImageDataset(images[..., None].copy(), labels.astype(np.int64), [], source=str(images_path))


def decode_readable(files: Sequence[Path], skipped: list[str], gray: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(position, image) for each of ``files`` that decodes (:func:`decode_image`); each that does
    not is appended to ``skipped`` and logged (the first five by name, then a count)."""
    for i, file in enumerate(files):
        try:
            yield i, decode_image(file, gray=gray)
        except InputError as exc:
            skipped.append(str(file))
            if len(skipped) <= 5:
                log.warning("skipped %s", exc)
    if len(skipped) > 5:
        log.warning("skipped %d unreadable images in all", len(skipped))


def class_folder_files(root: str | Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """The classes (subfolders of ``root``, sorted) and their image files as (label, path),
    listed, not read; :class:`InputError` when there are none."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{root}: no class subfolders found")
    files = [(label, file) for label, name in enumerate(classes) for file in sorted((root / name).iterdir())
             if file.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"{root}: read as labelled class folders ({root}/<class>/<image>), but none of its subfolders holds an "
                         f"image ({', '.join(IMAGE_SUFFIXES)}) directly (images deeper down are unlabelled footage; this needs labelled data)")
    return classes, files


def _is_greyscale(file: Path) -> bool:
    """Whether an image file's header says one grey channel (unreadable: no)."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            return image.mode in ("1", "L", "I", "I;16", "F")
    except Exception:  # noqa: BLE001 - Pillow raises many types; the decoder reports the file later
        return False


def class_folder_root(path: str | Path, split: str) -> Path | None:
    """The class-folder tree :func:`load_dataset` reads for ``split`` of ``path``, or None where
    it reads another layout (``.npz``, idx files)."""
    path = Path(path)
    if not path.is_dir() or sorted(path.glob(f"{split}.npz")) or sorted(path.glob(f"{split}_*.npz")) or _find_idx(path, split):
        return None
    if (path / split).is_dir():
        return class_folder_root(path / split, split)
    return path if any(p.is_dir() for p in path.iterdir()) else None


def load_image_folder(
    root: str | Path, size: tuple[int, int] = (224, 224), policy: str = "center-crop", gray: bool | None = None,
    crop_fraction: float = 1.0,
) -> ImageDataset:
    """Images under ``root/<class>/*``; classes sorted by name; every image made ``size`` (H, W)
    by :func:`keepbits.data.fit_into` under ``policy`` (``crop_fraction``: center-crop only);
    ``gray`` True: one channel, False: RGB, None: one channel when every file is greyscale.
    A file that cannot be decoded is skipped, logged and counted (``meta["skipped"]``, and in
    ``source``), as footage's are; none readable is an :class:`InputError`."""
    root = Path(root)
    if policy not in RESIZE_POLICIES:
        raise InputError(f"unknown resize policy {policy!r}; choose one of {RESIZE_POLICIES}")
    classes, files = class_folder_files(root)
    if gray is None:
        gray = all(_is_greyscale(file) for _, file in files)
    x = np.empty((len(files), size[0], size[1], 1 if gray else 3), np.uint8)
    kept: list[int] = []
    skipped: list[str] = []
    for i, image in decode_readable([file for _, file in files], skipped, gray):
        fit_into(image, x[len(kept)], policy, crop_fraction)
        kept.append(i)
    if not kept:
        raise InputError(f"{root}: none of the {len(files)} images in its class folders can be read ({skipped[0]} …)")
    empty = sorted(set(classes) - {classes[files[i][0]] for i in kept})
    if empty:  # a class the model will be told exists but never sees
        log.warning("%s: class folder(s) %s hold no readable image", root, ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    source = str(root) + (f" ({len(skipped)} unreadable of {len(files)} images skipped)" if skipped else "")
    ds = ImageDataset(x[:len(kept)], np.array([files[i][0] for i in kept]), classes, source=source)
    ds.meta["resize_policy"] = policy
    ds.meta["crop_fraction"] = crop_fraction
    ds.meta["skipped"] = skipped
    return ds


def _find_idx(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    for suffix in ("", ".gz"):
        img = root / f"{prefix}-images-idx3-ubyte{suffix}"
        lab = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if img.exists() and lab.exists():
            return img, lab
    return None


def load_dataset(
    path: str | Path, split: str = "train", size: tuple[int, int] | None = None, policy: str = "center-crop",
    crop_fraction: float = 1.0, channels: int | None = None,
) -> ImageDataset:
    """Read ``path`` (file or folder) and return the ``split`` ("train" or "test"); class
    folders' images are read with ``channels`` (1: grey, 3: RGB, as a model takes them; None: grey
    where every file is, else RGB).

    A single ``.npz`` file with arrays ``x_train``/``x_test`` is split by name; a plain
    one holds one split and is returned whatever ``split`` asks.

    Example:
        >>> from keepbits.data import load_dataset, sample_mnist_path
        >>> len(load_dataset(sample_mnist_path(), split="test"))
        500
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path not found: {path}")
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if path.is_file():
        if path.suffix != ".npz":
            raise InputError(f"{path}: unsupported data file (expected .npz, an idx folder or an image folder)")
        return load_npz(path, split)
    npz = sorted(path.glob(f"{split}.npz")) or sorted(path.glob(f"{split}_*.npz"))
    if npz:
        return load_npz(npz[0])
    idx = _find_idx(path, split)
    if idx:
        return load_idx(*idx)
    split_dir = path / split
    if split_dir.is_dir():
        return load_dataset(split_dir, split, size, policy, crop_fraction, channels)
    if any(p.is_dir() for p in path.iterdir()):
        return load_image_folder(path, size or (224, 224), policy, gray=None if channels is None else channels == 1,
                                 crop_fraction=crop_fraction)
    raise InputError(f"{path}: no {split} data found (looked for {split}.npz, idx files, {split}/ and class folders)")


def has_split(path: str | Path, split: str) -> bool:
    """Whether ``path`` holds a separate ``split`` (a ``test`` next to ``train``)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".npz":
            return False
        try:
            with zipfile.ZipFile(path) as zf:
                return f"x_{split}.npy" in zf.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
    if not path.is_dir():
        return False
    return bool(
        list(path.glob(f"{split}.npz")) or list(path.glob(f"{split}_*.npz")) or _find_idx(path, split) or (path / split).is_dir()
    )
