"""The user's images for commands that run a bundle on them (``keepbits eval``, ``compare``,
``explain``): a labelled data set, the user's own footage, or one image file.

Labelled: anything :func:`keepbits.data.load_dataset` reads (``.npz``, idx files, a ``train``/
``test`` split, or class folders: every entry a folder that holds image files directly), its
test split when it has one; class folders' drawn files are read at their own sizes, like footage
(the bundle's pipeline fits every image once, by the bundle's resize policy).
Footage (unlabelled): every other folder (image files at any nesting, videos, ``.npz``) or one
video file, read by :class:`keepbits.data.Footage`: pictures keep their sizes (the runtime fits
them), videos give every ``frame_step``-th frame, and a file that cannot be read is skipped and
counted (:attr:`ImageSet.counts`), not fatal. ``num_images`` draws a seeded sample with
:func:`keepbits.data.sample_indices` (class-balanced when labelled; files before they are read
when the footage holds pictures only), else a seeded reservoir sample of the frames as they
stream past (memory: ``num_images`` frames).

Example:
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.data.images import load_images
    >>> images = load_images(sample_mnist_path(), num_images=20)
    >>> len(images), images.labelled, images.images[0].shape
    (20, True, (28, 28, 1))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from keepbits.data.dataset import sample_indices
from keepbits.data.loaders import IMAGE_SUFFIXES, class_folder_files, class_folder_root, decode_readable, has_split, load_dataset
from keepbits.data.preprocess import fit_into
from keepbits.data.stream import VIDEO_SUFFIXES, Footage, Sample, decode_image
from keepbits.errors import InputError


@dataclass
class ImageSet:
    """``images``: uint8 H×W×C (C = 1 or 3, RGB; image files are read as RGB), sizes may differ (one N×H×W×C array
    from :func:`model_images`); ``names``: one per image
    (the file's path under the folder given, ``#frame`` for a video frame, ``[i]`` for an ``.npz``
    image, or the index in a labelled data set); ``labels`` int64 or None; ``source`` says what
    was read and which sample was drawn; ``counts``: footage only, pictures and video frames read
    and files skipped (:class:`keepbits.data.stream.Counts`)."""

    images: list[np.ndarray] | np.ndarray
    names: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    source: str
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def is_labelled_set(path: Path, split: str = "test") -> bool:
    """Whether ``path`` is a labelled data set (module docstring), not footage."""
    if path.is_file():
        return path.suffix.lower() == ".npz"
    if has_split(path, split) or has_split(path, "train"):
        return True
    entries = list(path.iterdir())
    folders = [p for p in entries if p.is_dir()]
    if not folders or any(p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES) for p in entries):
        return False
    return all(not any(q.is_dir() for q in f.iterdir()) and any(q.suffix.lower() in IMAGE_SUFFIXES for q in f.iterdir())
               for f in folders)


def _name(sample: Sample, root: Path) -> str:
    where = Path(sample.unit.path)
    name = where.name if root.is_file() else where.relative_to(root).as_posix()
    return {"image": name, "video": f"{name}#frame{sample.position}", "npz": f"{name}[{sample.position}]"}[sample.unit.kind]


def _reservoir(samples: Iterable[Sample], n: int, seed: int) -> list[Sample]:
    """A uniform seeded sample of ``n`` of ``samples`` (Algorithm R), in stream order; holds ``n`` at a time."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, Sample]] = []
    for t, sample in enumerate(samples):
        if t < n:
            kept.append((t, sample))
        else:
            j = int(rng.integers(0, t + 1))
            if j < n:
                kept[j] = (t, sample)
    return [sample for _, sample in sorted(kept, key=lambda item: item[0])]


def _sample_note(num_images: int | None, available: int, seed: int) -> str:
    """`` [sample N, seed S]`` for a source string, or nothing when every item was taken."""
    return "" if num_images is None or num_images >= available else f" [sample {num_images}, seed {seed}]"


def load_footage(path: str | Path, *, num_images: int | None = None, seed: int = 0, frame_step: int = 1) -> ImageSet:
    """The user's unlabelled footage at ``path`` (module docstring) as an :class:`ImageSet`.

    Example:
        >>> import numpy as np, tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> from keepbits.data.images import load_footage
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "day1" / "cam0").mkdir(parents=True)
        >>> Image.new("RGB", (40, 30)).save(root / "day1" / "cam0" / "a.png")
        >>> (root / "broken.jpg").write_bytes(b"not a jpeg")
        10
        >>> footage = load_footage(root)
        >>> footage.names, footage.counts["skipped"]
        (['day1/cam0/a.png'], 1)
    """
    path = Path(path)
    if num_images is not None and num_images < 1:
        raise InputError(f"num_images must be >= 1 or None (all), got {num_images}")
    footage = Footage([path], frame_step=frame_step)
    pictures_only = all(unit.kind == "image" for unit in footage.units)
    if num_images is None:
        samples = list(footage.read())
    elif pictures_only:  # draw files, read only those
        chosen = sample_indices(np.zeros(len(footage.units), np.int64), num_images, seed)
        samples = list(footage.read(footage.units[i] for i in chosen))
    else:
        samples = _reservoir(footage.read(), num_images, seed)
    counts = footage.counts.as_dict()
    if not samples:
        raise InputError(f"{path}: no image could be read ({counts['skipped']} files skipped)")
    read = ", ".join(f"{counts[k]} {k}" for k in ("images", "frames") if counts[k])
    skipped = f", {counts['skipped']} unreadable files skipped" if counts["skipped"] else ""
    sample = _sample_note(num_images, len(footage.units) if pictures_only else counts["images"] + counts["frames"], seed)
    step = f", one video frame in {frame_step}" if frame_step > 1 and counts["frames"] else ""
    return ImageSet([s.image for s in samples], [_name(s, path) for s in samples], None, [],
                    f"{path} (footage: {read} read{step}{skipped}){sample}", counts)


def load_images(path: str | Path, *, num_images: int | None = None, seed: int = 0, split: str = "test",
                frame_step: int = 1) -> ImageSet:
    """Images at ``path`` (see the module docstring) at their own sizes, for a bundle's pipeline
    to fit once by its own resize policy; a labelled set uses its ``split`` when it has one (else
    its train split), class folders read only the drawn files; footage keeps every
    ``frame_step``-th video frame."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path not found: {path}")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSet([decode_image(path)], [path.name], None, [], str(path))
    if not is_labelled_set(path, split):
        if path.is_file() and path.suffix.lower() not in VIDEO_SUFFIXES:
            raise InputError(f"{path}: unsupported data file (images {', '.join(IMAGE_SUFFIXES)}, videos "
                             f"{', '.join(VIDEO_SUFFIXES)}, .npz, or a folder)")
        return load_footage(path, num_images=num_images, seed=seed, frame_step=frame_step)
    split = split if has_split(path, split) else "train"
    root = class_folder_root(path, split)
    if root is not None:
        return _class_folder_sample(root, num_images, seed)
    dataset = load_dataset(path, split)
    chosen = sample_indices(dataset.y, num_images, seed)
    sample = _sample_note(num_images, len(dataset.y), seed)
    return ImageSet([dataset.x[i] for i in chosen], [str(int(i)) for i in chosen], dataset.y[chosen],
                    list(dataset.class_names), f"{dataset.source}{sample}")


def _class_folder_sample(root: Path, num_images: int | None, seed: int) -> ImageSet:
    """A seeded class-balanced draw of the class folders' files, read (and only those) at their
    own sizes, named by their path under ``root``; an unreadable one is skipped and counted."""
    classes, files = class_folder_files(root)
    labels = np.array([label for label, _ in files], np.int64)
    chosen = sample_indices(labels, num_images, seed)
    images, names, kept, skipped = [], [], [], []
    for k, image in decode_readable([files[i][1] for i in chosen], skipped):
        images.append(image)
        names.append(files[chosen[k]][1].relative_to(root).as_posix())
        kept.append(chosen[k])
    if not images:
        raise InputError(f"{root}: none of the {len(chosen)} drawn images can be read")
    note = f" ({len(skipped)} unreadable drawn images skipped)" if skipped else ""
    return ImageSet(images, names, labels[kept], classes, f"{root}{_sample_note(num_images, len(files), seed)}{note}")


def model_images(path: str | Path, preprocessing: Any, *, split: str = "test", num_images: int | None = None, seed: int = 0,
                 frame_step: int = 1, channels: int | None = None) -> ImageSet:
    """Images at ``path`` made the model's input (``preprocessing``: a
    :class:`keepbits.data.Preprocessing`, or None for data already at the model's size), as an
    :class:`ImageSet` whose ``images`` is one uint8 N×H×W×C array. A labelled set is sampled
    class-balanced from its ``split`` (:func:`keepbits.data.load_dataset`: an error where it has
    no such split; class folders are fitted, ``.npz``/idx arrays taken as they are); footage
    (labels None) as :func:`load_footage` samples it, each picture or frame fitted by the
    preprocessing's resize policy. ``channels``: the model's (default: the preprocessing's).

    Example:
        >>> from keepbits.data import Preprocessing, sample_mnist_path
        >>> from keepbits.data.images import model_images
        >>> images = model_images(sample_mnist_path(), Preprocessing((28, 28), (0.5,), (0.5,), "resize"), num_images=10)
        >>> images.images.shape, images.labels.shape
        ((10, 28, 28, 1), (10,))
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"data path not found: {path}")
    fit = {} if preprocessing is None else dict(size=tuple(preprocessing.input_size), policy=preprocessing.resize_policy,
                                                 crop_fraction=preprocessing.crop_fraction)
    want = channels or (len(preprocessing.mean) if preprocessing is not None else None)
    root = class_folder_root(path, split) if is_labelled_set(path, split) else None
    if root is not None and preprocessing is not None:  # draw the files, then read and fit only those
        drawn = _class_folder_sample(root, num_images, seed)
        h, w = preprocessing.input_size
        x = np.empty((len(drawn), h, w, want), np.uint8)
        for image, out in zip(drawn.images, x):
            fit_into(image, out, preprocessing.resize_policy, preprocessing.crop_fraction)
        return ImageSet(x, drawn.names, drawn.labels, drawn.class_names, drawn.source)
    if is_labelled_set(path, split):
        dataset = load_dataset(path, split, **fit)
        chosen = sample_indices(dataset.y, num_images, seed)
        x = dataset.x[chosen]
        if want is not None and x.shape[-1] != want:  # class folders are read as RGB: a grey model takes them grey (and back)
            converted = np.empty((*x.shape[:3], want), np.uint8)
            for image, out in zip(x, converted):
                fit_into(image, out, "resize")  # same size: only the channel conversion
            x = converted
        sample = _sample_note(num_images, len(dataset.y), seed)
        return ImageSet(x, [str(int(i)) for i in chosen], dataset.y[chosen], list(dataset.class_names), f"{dataset.source}{sample}")
    if preprocessing is None:
        raise InputError(f"{path}: footage needs the model's input size and resize policy, which this model does not record")
    footage = load_footage(path, num_images=num_images, seed=seed, frame_step=frame_step)
    h, w = preprocessing.input_size
    x = np.empty((len(footage), h, w, want), np.uint8)
    for image, out in zip(footage.images, x):
        fit_into(image, out, preprocessing.resize_policy, preprocessing.crop_fraction)
    return ImageSet(x, footage.names, None, [], footage.source, footage.counts)


__all__ = ["ImageSet", "is_labelled_set", "load_footage", "load_images", "model_images"]
