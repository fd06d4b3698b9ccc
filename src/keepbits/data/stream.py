"""Footage as training data, streamed from disk: image folders of any nesting, video files
(every ``frame_step``-th frame) and ``.npz`` arrays, read one file (or one chunk of an
``.npz``) at a time, never the whole set in memory.

:class:`Footage` finds the files (:func:`discover`) and reads them (:meth:`Footage.read`). A
file that cannot be read (corrupt, truncated, over ``max_pixels``) is skipped: counted in
:attr:`Footage.counts` (shared by worker processes) and logged, never fatal. The pixel count
is checked from the header before a picture is decoded.

Labels are optional: an ``.npz`` with ``y`` has them, an image tree has them when
``class_folders`` names its top-level folders (an ImageNet-style ``<wnid>/<file>.jpg``
tree); everything else is unlabelled (label −1).

Example:
    >>> import numpy as np, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from keepbits.data import Footage
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "a" / "b").mkdir(parents=True)
    >>> Image.new("RGB", (40, 30)).save(root / "a" / "b" / "x.png")
    >>> (root / "broken.jpg").write_bytes(b"not a jpeg")
    10
    >>> footage = Footage([root])
    >>> [s.image.shape for s in footage.read()], footage.counts.as_dict()
    ([(30, 40, 3)], {'images': 1, 'frames': 0, 'skipped': 1})
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from keepbits.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
#: Largest picture or video frame decoded (pixels), checked from the header before decoding.
MAX_PIXELS = 40_000_000
#: Images per work unit of an uncompressed ``.npz`` (units are what worker processes share out).
NPZ_CHUNK = 256
#: Most bytes deflate can expand one compressed byte into (the format's limit is about 1032:1).
DEFLATE_MAX_RATIO = 1032
#: What reading a damaged ``.npz`` can raise, besides :class:`InputError`.
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One piece of work: an image file, a video, or images ``start:stop`` of an ``.npz``.
    ``label`` is the class of an image file (−1: none); ``labelled``: whether its items carry one."""

    path: str
    kind: str
    start: int = 0
    stop: int = 0
    label: int = -1
    labelled: bool = False


@dataclass
class Sample:
    """One image read: uint8 H×W×3 RGB (or H×W×1), its label (−1: none), the :class:`Unit` it
    came from and its ``position`` there (frame number of a video, index in an ``.npz``)."""

    image: np.ndarray
    label: int
    unit: Unit
    position: int


#: How reader processes start: from a fork server (a clean process), never by forking a caller that
#: may already run threads (a forked child can inherit a lock some thread held and wait forever).
WORKER_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class Counts:
    """Counters shared by every process that reads the same :class:`Footage` (shared memory,
    passed to worker processes started with :data:`WORKER_START_METHOD`): images and video frames
    read, files skipped."""

    FIELDS = ("images", "frames", "skipped")

    def __init__(self) -> None:
        self._values = multiprocessing.get_context(WORKER_START_METHOD).Array("q", len(self.FIELDS))

    def add(self, field: str, count: int = 1) -> None:
        with self._values.get_lock():
            self._values[self.FIELDS.index(field)] += count

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(self.FIELDS, (int(v) for v in self._values)))


def _npy_header(fh: BinaryIO, path: Path, member: str = "x.npy") -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the ``.npy`` array ``member`` whose header starts at ``fh``'s position."""
    try:
        version = np.lib.format.read_magic(fh)
        return (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
    except ValueError as exc:
        raise InputError(f"{path}: {member} is not a .npy array ({exc})") from None


def npz_member_header(zf: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the array ``member`` (``"x.npy"``) of the ``.npz`` ``zf``
    read from ``path``, from its header only. Checked before anything reads the data: the bytes
    the header claims (one at least per item) fit in the member's uncompressed size in the zip
    directory, and that size fits what its compressed bytes can give (stored: as many; deflated:
    :data:`DEFLATE_MAX_RATIO` times as many, within the file), so what a reader allocates and
    loops over is bounded by the file's bytes. :class:`InputError` otherwise; ``KeyError`` when
    ``member`` is missing."""
    info = zf.getinfo(member)
    if info.flag_bits & 0x1:
        raise InputError(f"{path}: {member} is encrypted")
    ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: DEFLATE_MAX_RATIO}.get(info.compress_type)
    if ratio is None:
        raise InputError(f"{path}: {member} uses zip compression method {info.compress_type} (numpy writes stored or deflated)")
    if info.compress_size > path.stat().st_size or info.file_size > ratio * info.compress_size:
        raise InputError(f"{path}: {member} claims {info.file_size} bytes from {info.compress_size} compressed bytes "
                         f"(more than {'the file holds' if ratio == 1 else 'deflate can give'})")
    with zf.open(info) as fh:
        shape, fortran, dtype = _npy_header(fh, path, member)
        data_bytes = info.file_size - fh.tell()
    if math.prod(shape) * max(dtype.itemsize, 1) > data_bytes:
        raise InputError(f"{path}: {member} claims shape {shape} of {dtype}, more than the {max(data_bytes, 0)} bytes it holds")
    return shape, fortran, dtype


def read_npz_member(zf: zipfile.ZipFile, member: str, path: Path) -> np.ndarray:
    """The array ``member`` of the ``.npz`` ``zf`` read from ``path``, once :func:`npz_member_header` has checked its size."""
    npz_member_header(zf, member, path)
    with zf.open(member) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def _stored_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """File offset of an uncompressed zip member's data (after its local header)."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: damaged zip entry {info.filename}")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _npz_images(path: Path, max_pixels: int) -> tuple[tuple[int, ...], bool, bool]:
    """Shape of the ``x`` images of an ``.npz`` (from its header only), whether it has ``y``
    (one integer label per image, also checked from its header), and whether ``x`` is stored
    uncompressed (``np.savez``: any image can be read directly)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "x.npy" not in names:
                raise InputError(f"{path}: expected an array 'x' of images, found {sorted(n[:-4] for n in names)}")
            stored = zf.getinfo("x.npy").compress_type == zipfile.ZIP_STORED
            shape, fortran, dtype = npz_member_header(zf, "x.npy", path)
            labelled = "y.npy" in names
            if labelled:
                y_shape, _, y_dtype = npz_member_header(zf, "y.npy", path)
    except NPZ_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    if fortran or dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise InputError(f"{path}: 'x' must be uint8 N×H×W or N×H×W×C (C = 1 or 3) in C order, "
                         f"got {dtype} {shape}{' in Fortran order' if fortran else ''}")
    if shape[1] * shape[2] > max_pixels:
        raise InputError(f"{path}: images of {shape[2]}×{shape[1]} exceed the {max_pixels} pixel limit")
    if shape[1] * shape[2] == 0:
        raise InputError(f"{path}: images of {shape[2]}×{shape[1]} hold no pixels")
    if labelled and (y_shape != (shape[0],) or not np.issubdtype(y_dtype, np.integer)):
        raise InputError(f"{path}: 'y' must hold one integer label per image, got {y_dtype} {y_shape}")
    return shape, labelled, stored


def discover(paths: Sequence[str | os.PathLike], *, class_folders: Sequence[str] | None = None,
             max_pixels: int = MAX_PIXELS, npz_chunk: int = NPZ_CHUNK) -> list[Unit]:
    """Work units of every image, video and ``.npz`` file in ``paths`` (files, or folders
    searched at any depth), in sorted path order. With ``class_folders``, an image's label is
    the index of its top-level folder (relative to the folder given) in that list.
    An uncompressed ``.npz`` (``np.savez``) is split into units of ``npz_chunk`` images, each
    read by seeking; a compressed one is one unit, decompressed in order. An ``.npz`` is checked
    here from its headers: one that cannot be read is an :class:`InputError` when given by
    itself, and one empty unit in a folder (skipped and counted when read, like a corrupt
    picture); pictures and videos are checked only when read.
    """
    index = {name: i for i, name in enumerate(class_folders)} if class_folders is not None else None
    units: list[Unit] = []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise InputError(f"data path not found: {root}")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            suffix = file.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                label = -1
                if index is not None:
                    top = file.relative_to(root).parts[0] if root.is_dir() and len(file.relative_to(root).parts) > 1 else ""
                    if top not in index:
                        raise InputError(f"{file}: its folder {top!r} is not one of the {len(index)} class folders")
                    label = index[top]
                units.append(Unit(str(file), "image", label=label, labelled=index is not None))
            elif suffix in VIDEO_SUFFIXES:
                units.append(Unit(str(file), "video"))
            elif suffix == ".npz":  # uncompressed: chunks read by seeking; compressed: one unit, read in order
                try:
                    shape, labelled, stored = _npz_images(file, max_pixels)
                except InputError:
                    if root.is_file():
                        raise
                    units.append(Unit(str(file), "npz", labelled=True))  # no items: any labels asked for are "there"
                    continue
                step = npz_chunk if stored else max(shape[0], 1)
                units += [Unit(str(file), "npz", s, min(s + step, shape[0]), labelled=labelled) for s in range(0, shape[0], step)]
            elif root.is_file():
                raise InputError(f"{file}: unsupported file (images {', '.join(IMAGE_SUFFIXES)}, videos "
                                 f"{', '.join(VIDEO_SUFFIXES)}, .npz)")
    if not units:
        raise InputError(f"no images, videos or .npz files found in {', '.join(str(p) for p in paths) or 'no paths'}")
    return units


def decode_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, gray: bool = False) -> np.ndarray:
    """uint8 H×W×3 RGB (``gray``: H×W×1) of an image file; :class:`InputError` when it cannot be
    decoded or has more than ``max_pixels`` pixels (checked from the header, before decoding).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> from keepbits.data.stream import decode_image
        >>> path = tempfile.mkdtemp() + "/a.png"
        >>> Image.new("L", (5, 4), 9).save(path)
        >>> decode_image(path).shape, decode_image(path, gray=True).shape
        ((4, 5, 3), (4, 5, 1))
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise InputError(f"{path}: {img.width}×{img.height} image exceeds the {max_pixels} pixel limit")
            arr = np.asarray(img.convert("L" if gray else "RGB"), np.uint8)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt input
        raise InputError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") from None
    return arr[..., None] if arr.ndim == 2 else arr


class Footage:
    """The images of ``paths`` (see :func:`discover`), read lazily: :meth:`read` yields one
    :class:`Sample` at a time; ``frame_step`` keeps every k-th video frame (frames 0, k, 2k, …).
    Picklable, so a torch ``DataLoader`` can hand it to worker processes (which share
    :attr:`counts`)."""

    def __init__(self, paths: Sequence[str | os.PathLike], *, frame_step: int = 1, class_folders: Sequence[str] | None = None,
                 max_pixels: int = MAX_PIXELS, npz_chunk: int = NPZ_CHUNK):
        if frame_step < 1:
            raise InputError(f"frame step must be >= 1, got {frame_step}")
        if max_pixels < 1 or npz_chunk < 1:
            raise InputError(f"max_pixels and npz_chunk must be positive, got {max_pixels} and {npz_chunk}")
        self.frame_step, self.max_pixels = int(frame_step), int(max_pixels)
        self.units = discover(paths, class_folders=class_folders, max_pixels=max_pixels, npz_chunk=npz_chunk)
        self.counts = Counts()

    def files(self) -> dict[str, int]:
        """How many picture, video and ``.npz`` files the footage holds (found, not yet read)."""
        kinds = {"image": set(), "video": set(), "npz": set()}
        for unit in self.units:
            kinds[unit.kind].add(unit.path)
        return {"images": len(kinds["image"]), "videos": len(kinds["video"]), "npz": len(kinds["npz"])}

    @property
    def labelled(self) -> bool:
        """Whether every unit carries labels."""
        return all(u.labelled for u in self.units)

    def read(self, units: Iterable[Unit] | None = None) -> Iterator[Sample]:
        """Yield the samples of ``units`` (default: all), skipping (and counting) unreadable files."""
        for unit in self.units if units is None else units:
            read = {"image": self._image, "video": self._video, "npz": self._npz}[unit.kind]
            try:
                yield from read(unit)
            except InputError as exc:
                self.counts.add("skipped")
                _log.warning("skipped: %s", exc)

    def _image(self, unit: Unit) -> Iterator[Sample]:
        image = decode_image(unit.path, self.max_pixels)
        self.counts.add("images")
        yield Sample(image, unit.label, unit, 0)

    def _video(self, unit: Unit) -> Iterator[Sample]:
        import cv2

        cap = cv2.VideoCapture(unit.path)
        try:
            if not cap.isOpened():
                raise InputError(f"{unit.path}: cannot open the video")
            width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width * height > self.max_pixels:
                raise InputError(f"{unit.path}: {width}×{height} frames exceed the {self.max_pixels} pixel limit")
            position, read = 0, 0
            while cap.grab():
                if position % self.frame_step == 0:
                    ok, frame = cap.retrieve()
                    if not ok:
                        break
                    if frame.shape[0] * frame.shape[1] > self.max_pixels:  # the header may not know the size
                        raise InputError(f"{unit.path}: frame {position} exceeds the {self.max_pixels} pixel limit")
                    read += 1
                    self.counts.add("frames")
                    yield Sample(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), -1, unit, position)
                position += 1
            if not read:
                raise InputError(f"{unit.path}: no frame could be decoded")
        finally:
            cap.release()

    def _npz(self, unit: Unit) -> Iterator[Sample]:
        path = Path(unit.path)
        shape, _, stored = _npz_images(path, self.max_pixels)  # checked again: a broken file's unit stops here
        if unit.stop > shape[0]:
            raise InputError(f"{path}: holds {shape[0]} images, fewer than when it was found")
        try:
            with zipfile.ZipFile(path) as zf:
                labels = read_npz_member(zf, "y.npy", path) if unit.labelled else None
                info = zf.getinfo("x.npy")
                if stored:
                    fh: BinaryIO = open(path, "rb")
                    fh.seek(_stored_offset(path, info))
                else:
                    fh = zf.open(info)
                with fh:
                    _npy_header(fh, path)
                    per_image = math.prod(shape[1:])
                    if unit.start:  # only uncompressed members are split, so this seek is direct
                        fh.seek(fh.tell() + unit.start * per_image)
                    for position in range(unit.start, unit.stop):
                        raw = fh.read(per_image)
                        if len(raw) != per_image:
                            raise InputError(f"{path}: truncated at image {position}")
                        image = np.frombuffer(raw, np.uint8).reshape(shape[1:])
                        self.counts.add("images")
                        yield Sample(image[..., None] if image.ndim == 2 else image,
                                     -1 if labels is None else int(labels[position]), unit, position)
        except NPZ_ERRORS as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
