"""The receiver's side: payloads back to images, masks, metadata and video.

One writer for every way payloads arrive: ``keepbits decode`` (``.kbit`` files from
``--sink files:``), ``keepbits receive`` over TCP (:mod:`keepbits.runtime.net`) and over MQTT
(:mod:`keepbits.runtime.mqtt`). Per payload it writes x̃ (or the simplified image) cropped to
the source frame's box as ``<name>.png``, the hard mask (blocks and mixed modes) as ``<name>_mask.png``
(255 = kept), one line of ``frames.jsonl``, and optionally a frame of a video. A payload that
does not decode raises :class:`keepbits.errors.DecodeError` and writes nothing; callers count it
and go on.

Example:
    >>> import tempfile, numpy as np
    >>> from keepbits.codec import encode
    >>> from keepbits.runtime.receiver import PayloadWriter
    >>> out = tempfile.mkdtemp()
    >>> with PayloadWriter(out) as writer:
    ...     record = writer.write(encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4))
    >>> record["image"], record["mask"], record["kept_pixels"]
    ('00000000.png', '00000000_mask.png', 64)
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from keepbits._json import jsonable
from keepbits.codec import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_PER_BYTE, PayloadMeta, decode
from keepbits.errors import DecodeError, InputError
from keepbits.runtime.video import check_fps, even_size, new_video_path, open_video_writer, video_codecs

log = logging.getLogger(__name__)


def _crop(image: np.ndarray, roi: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, w, h = roi
    return image[y0:y0 + h, x0:x0 + w] if w and h else image


def _write_png(path: Path, image: np.ndarray) -> None:
    """``cv2.imwrite``, but an :class:`OSError` where it fails (it only returns False: full disk,
    a folder removed, a name too long), so no record names a file that was not written."""
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")


class PayloadWriter:
    """Decode payloads into ``out``: PNGs (``images``), mask PNGs (``masks``), ``frames.jsonl``
    (``append``: added to an existing one, as a receiver keeps what it received before; else an
    existing one is refused), and ``video`` (a new file: an existing one is refused) at ``fps``;
    frames of another size than the first are resized to it. Nothing is overwritten: a frame
    whose name is taken (a sender repeating a sequence number, a file already in ``out``) is
    written as ``<name>~<k>`` and counted in ``renamed``. ``max_pixels`` and
    ``max_pixels_per_byte`` bound :func:`keepbits.codec.decode`. Safe to call from several
    threads (one per sender); ``what`` names ``out`` in errors."""

    def __init__(self, out: str | Path, *, video: str | Path | None = None, fps: float = 25.0, images: bool = True,
                 masks: bool = True, append: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_pixels_per_byte: int | None = DEFAULT_MAX_PIXELS_PER_BYTE, what: str = "--out"):
        self.out, self.images, self.masks = Path(out), images, masks
        self.limits = {"max_pixels": max_pixels, "max_pixels_per_byte": max_pixels_per_byte}
        if video is not None:
            try:
                video_codecs(video)
            except InputError as exc:
                raise InputError(f"video {video}: {exc}") from None
            new_video_path(video)
            check_fps(fps, f"frame rate of video {video}")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{what} {out}: exists and is not a folder")
        if not append and (self.out / "frames.jsonl").exists():
            raise InputError(f"{what} {out}: holds a frames.jsonl (a files: sink's folder or an earlier decode); "
                             "choose another folder or remove it")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.out / "frames.jsonl", "a" if append else "x", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{what} {out}: cannot write there ({exc.strerror or exc})") from None
        self.video_path, self.fps = video, fps
        self.video: Any = None
        self.size: tuple[int, int] | None = None
        self.frames = self.renamed = 0
        self._writing: set[str] = set()  # names claimed by frames whose files are not written yet
        self._lock = threading.Lock()

    def _claim(self, name: str) -> str:
        """``name``, or the first free ``<name>~<k>`` where a file in ``out`` or a frame being
        written (another thread's) has it; :meth:`write` releases it once its files are written."""
        def taken(stem: str) -> bool:
            return stem in self._writing or (self.out / f"{stem}.png").exists() or (self.out / f"{stem}_mask.png").exists()

        with self._lock:
            free = name if not taken(name) else next(f"{name}~{k}" for k in itertools.count(1) if not taken(f"{name}~{k}"))
            self.renamed += free != name
            self._writing.add(free)
        return free

    def write(self, payload: bytes, name: str | Callable[[PayloadMeta], str] | None = None, *, prefix: str = "",
              **extra: Any) -> dict[str, Any]:
        """Decode ``payload`` and write its files under ``name`` (a function of the payload's
        :class:`keepbits.codec.PayloadMeta`, or default: ``prefix`` and its sequence number, 8
        digits); ``extra`` goes first into its JSONL record, which is returned.
        :class:`keepbits.errors.DecodeError` for a bad payload, :class:`OSError` where a file
        cannot be written (then no record is added)."""
        image, mask, meta = decode(payload, **self.limits)
        name = name(meta) if callable(name) else name or f"{prefix}{meta.sequence:08d}"
        crop = _crop(image, meta.roi)
        bgr = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR if crop.shape[2] == 1 else cv2.COLOR_RGB2BGR)
        # the keys and meanings of the sender's frames.jsonl (keepbits.runtime.stream) where both have a field
        record = {**extra, "sequence": meta.sequence, "timestamp": meta.timestamp,
                  "label": None if meta.label is None else meta.name, "label_index": meta.label,
                  "score": meta.score, "payload_bytes": meta.total_bytes, "mode": meta.mode, "kept_blocks": meta.kept_blocks,
                  "total_blocks": meta.total_blocks, "kept_pixels": None if mask is None else int(mask.sum()),
                  "size": [int(bgr.shape[1]), int(bgr.shape[0])], "image": None, "mask": None}
        record = jsonable(record)  # a crafted header's score or timestamp of NaN or inf: null, as JSON has no such number
        if self.images or (self.masks and mask is not None):
            name = self._claim(name)
            try:
                if self.images:
                    _write_png(self.out / f"{name}.png", bgr)
                    record["image"] = f"{name}.png"
                if self.masks and mask is not None:
                    _write_png(self.out / f"{name}_mask.png", _crop(mask, meta.roi).astype(np.uint8) * 255)
                    record["mask"] = f"{name}_mask.png"
            finally:
                with self._lock:
                    self._writing.discard(name)
        with self._lock:
            if self.video_path is not None:
                if self.video is None:
                    self.size = even_size(bgr.shape[1], bgr.shape[0])
                    self.video = open_video_writer(self.video_path, self.fps, self.size)
                self.video.write(cv2.resize(bgr, self.size) if (bgr.shape[1], bgr.shape[0]) != self.size else bgr)
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self.jsonl.flush()
            self.frames += 1
        return record

    def close(self) -> None:
        self.jsonl.close()
        if self.video is not None:
            self.video.release()

    def __enter__(self) -> "PayloadWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Suffix of the payload files ``--sink files:DIR`` writes (``DIR/payloads/<sequence>.kbit``).
PAYLOAD_SUFFIX = ".kbit"
#: Largest payload file :func:`decode_files` reads (bytes); larger files count as bad payloads.
MAX_PAYLOAD_BYTES = 64 << 20


def payload_files(paths: Sequence[str | Path]) -> list[Path]:
    """The payload files named by ``paths``: files as given, folders as their ``*.kbit`` files
    (a ``files:`` sink folder: those in its ``payloads/``), each folder's sorted by name.

    Example:
        >>> from keepbits.runtime.receiver import payload_files
        >>> payload_files(["/nonexistent"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.InputError: payload file or folder not found: /nonexistent
    """
    files: list[Path] = []
    for value in paths:
        path = Path(value)
        if path.is_dir():
            found = sorted(p for p in path.glob(f"*{PAYLOAD_SUFFIX}") if p.is_file())
            if not found and (path / "payloads").is_dir():
                found = sorted(p for p in (path / "payloads").glob(f"*{PAYLOAD_SUFFIX}") if p.is_file())
            if not found:
                raise InputError(f"{path}: no {PAYLOAD_SUFFIX} payload files (in it or in its payloads/ folder)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"payload file or folder not found: {path}")
    return files


def decode_files(paths: Sequence[str | Path], out: str | Path, *, video: str | Path | None = None, fps: float = 25.0,
                 images: bool = True, masks: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Decode the payload files of ``paths`` (:func:`payload_files`; a file named twice once) into
    ``out`` with a :class:`PayloadWriter`, each under its file's stem, or, where two files share a
    stem (two runs' folders), under ``<position>-<stem>``. A file that is larger than ``max_bytes``,
    unreadable or not a valid payload is logged, listed in ``bad`` and skipped; one whose images
    cannot be written, in ``unwritten``; returns the summary.

    Example:
        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> from keepbits.codec import encode
        >>> from keepbits.runtime.receiver import decode_files
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.kbit").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4))
        >>> _ = (folder / "b.kbit").write_bytes(b"garbage")
        >>> summary = decode_files([folder], folder / "out")
        >>> summary["decoded"], summary["bad_payloads"], summary["bad"][0]["file"].endswith("b.kbit")
        (1, 1, True)
    """
    files, seen = [], set()
    for file in payload_files(paths):  # a file named twice is decoded once
        if file.resolve() not in seen:
            seen.add(file.resolve())
            files.append(file)
    stems = [f.stem for f in files]
    # two runs' folders both hold 00000000.kbit: then every file is named by its position too, so none overwrites another
    names = stems if len(set(stems)) == len(stems) else [f"{i:05d}-{stem}" for i, stem in enumerate(stems, 1)]
    bad: list[dict[str, str]] = []
    unwritten: list[dict[str, str]] = []
    with PayloadWriter(out, video=video, fps=fps, images=images, masks=masks, max_pixels=max_pixels) as writer:
        for file, name in zip(files, names):
            try:
                size = file.stat().st_size
                if size > max_bytes:
                    raise DecodeError(f"{size} bytes, larger than the {max_bytes} a payload may have")
                payload = file.read_bytes()
            except (DecodeError, OSError) as exc:
                bad.append({"file": str(file), "error": str(exc)})
                log.warning("%s: bad payload skipped (%s)", file, exc)
                continue
            try:
                writer.write(payload, name, file=str(file))
            except DecodeError as exc:
                bad.append({"file": str(file), "error": str(exc)})
                log.warning("%s: bad payload skipped (%s)", file, exc)
            except OSError as exc:  # decoded, but its PNG could not be written
                unwritten.append({"file": str(file), "error": str(exc)})
                log.warning("%s: decoded, not written (%s)", file, exc)
    return {"payloads": len(files), "decoded": writer.frames, "bad_payloads": len(bad), "bad": bad, "write_errors": len(unwritten),
            "unwritten": unwritten, "renamed": writer.renamed, "out": str(out),
            "video": None if video is None or not writer.frames else str(video)}


__all__ = ["MAX_PAYLOAD_BYTES", "PAYLOAD_SUFFIX", "PayloadWriter", "decode_files", "payload_files"]
