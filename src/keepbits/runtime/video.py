"""What this OpenCV build can do with video: its capture back-ends (FFmpeg, GStreamer, V4L2),
its Video I/O build lines, and video writers that prefer H.264.

Annotated and decoded videos (``.mp4``, ``.mov``) are written as H.264 (``avc1``, which browsers
play) when the OpenCV build has an H.264 encoder, else as MPEG-4 Part 2 (``mp4v``) with a
one-line notice; ``.avi`` as Motion JPEG.
The pip wheels of OpenCV carry FFmpeg without an H.264 software encoder, so ``mp4v`` is what
they write.

Example:
    >>> from keepbits.runtime.video import has_backend
    >>> has_backend("CV_IMAGES")
    True
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from keepbits.errors import InputError

log = logging.getLogger(__name__)

_CAPTURE_BACKENDS = {"FFMPEG": "CAP_FFMPEG", "GSTREAMER": "CAP_GSTREAMER", "V4L2": "CAP_V4L2", "CV_IMAGES": "CAP_IMAGES"}


def has_backend(name: str) -> bool:
    """Whether this OpenCV build has the video back-end ``name`` (``FFMPEG``, ``GSTREAMER``,
    ``V4L2``, ``CV_IMAGES``), built in or as a loadable plugin."""
    attribute = _CAPTURE_BACKENDS.get(name.upper())
    if attribute is None:
        raise InputError(f"unknown OpenCV video back-end {name!r}; known: {', '.join(_CAPTURE_BACKENDS)}")
    return bool(cv2.videoio_registry.hasBackend(getattr(cv2, attribute)))


def build_video_io() -> dict[str, str]:
    """The "Video I/O" lines of ``cv2.getBuildInformation()`` as {name: value}, e.g.
    ``{"FFMPEG": "YES", "GStreamer": "NO", "v4l/v4l2": "YES (linux/videodev2.h)", ...}``.

    Example:
        >>> from keepbits.runtime.video import build_video_io
        >>> isinstance(build_video_io(), dict)
        True
    """
    lines = cv2.getBuildInformation().splitlines()
    out: dict[str, str] = {}
    inside = False
    for line in lines:
        if line.strip() == "Video I/O:":
            inside = True
            continue
        if inside:
            if not line.startswith("    ") or not line.strip():
                break
            name, sep, value = line.strip().partition(":")
            if sep:
                out[name.strip()] = value.strip()
    return out


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (FFmpeg and OpenCV print there from C) for a probe."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _writer(path: str | Path, fourcc: str, fps: float, size: tuple[int, int], quiet: bool) -> cv2.VideoWriter | None:
    with _quiet_native_stderr() if quiet else contextlib.nullcontext():
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if writer.isOpened():
        return writer
    writer.release()
    return None


@functools.cache
def h264_available() -> bool:
    """Whether OpenCV writes H.264 (``avc1``) MP4 here: one frame into a temporary file (probed once)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = _writer(Path(tmp) / "probe.mp4", "avc1", 10.0, (64, 48), quiet=True)
        if writer is None:
            return False
        with _quiet_native_stderr():
            writer.write(np.zeros((48, 64, 3), np.uint8))
            writer.release()
        return (Path(tmp) / "probe.mp4").stat().st_size > 0


def even_size(width: int, height: int) -> tuple[int, int]:
    """The frame size (W, H) a video is written at: rounded down to even sides, as H.264's 4:2:0
    sampling needs (at least 2×2).

    Example:
        >>> from keepbits.runtime.video import even_size
        >>> even_size(361, 240)
        (360, 240)
    """
    return max(2, width - width % 2), max(2, height - height % 2)


#: Video containers keepbits writes, by suffix, with the codecs tried in order: H.264 first where
#: the container holds it (used only when this OpenCV writes it, :func:`h264_available`).
VIDEO_CONTAINERS = {".mp4": ("avc1", "mp4v"), ".mov": ("avc1", "mp4v"), ".avi": ("MJPG",)}


def video_codecs(path: str | Path) -> tuple[str, ...]:
    """The codecs (FourCC) tried for a video at ``path``, by its suffix; :class:`InputError` for
    a container keepbits does not write.

    Example:
        >>> from keepbits.runtime.video import video_codecs
        >>> video_codecs("out.avi")
        ('MJPG',)
    """
    path = Path(path)
    codecs = VIDEO_CONTAINERS.get(path.suffix.lower())
    if codecs is None:
        raise InputError(f"unknown video container {path.suffix or '(no suffix)'!r} (use {', '.join(VIDEO_CONTAINERS)})")
    return codecs


#: Highest frame rate a video is written at (frames/s): OpenCV's writer hangs on an infinite one.
MAX_FPS = 1000.0


def check_fps(fps: float, what: str = "fps") -> None:
    """:class:`InputError` naming ``what`` unless ``fps`` is a frame rate a video can be written
    at (finite, ``0 < fps <= MAX_FPS``).

    Example:
        >>> from keepbits.runtime.video import check_fps
        >>> check_fps(float("nan"))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.InputError: fps must be a number > 0 and <= 1000, got nan
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise InputError(f"{what} must be a number > 0 and <= {MAX_FPS:g}, got {fps!r}")


def new_video_path(path: str | Path, what: str = "video") -> Path:
    """``path`` for a video about to be written: :class:`InputError` where a file is already there
    (an earlier run's video, a source): keepbits never overwrites one. A folder there is left to
    the writer's own check."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} exists (an earlier run's?): keepbits never overwrites it; choose another name")
    return path


def open_video_writer(path: str | Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """A writer of ``size`` (W, H; :func:`even_size`) BGR frames into ``path``'s container
    (:data:`VIDEO_CONTAINERS`): for MP4 and MOV H.264 (``avc1``) when this OpenCV writes it,
    else ``mp4v`` with a one-line notice (once per process); :class:`InputError` for a frame rate
    :func:`check_fps` refuses or when no codec of the container opens."""
    path = Path(path)
    codecs = video_codecs(path)
    check_fps(fps, f"frame rate of video {path}")
    for fourcc in codecs:
        if fourcc == "avc1" and not h264_available():
            continue
        writer = _writer(path, fourcc, fps, size, quiet=fourcc != codecs[-1])
        if writer is not None:
            if fourcc == "mp4v":
                _notice_mp4v()
            return writer
    raise InputError(f"cannot write video {path} at {size[0]}x{size[1]} (this OpenCV build opens none of {', '.join(codecs)})")


@functools.cache
def _notice_mp4v() -> None:
    log.warning("videos are written as mp4v (MPEG-4 Part 2), which browsers may not play: this OpenCV build did not open "
                "an H.264 (avc1) writer")


__all__ = ["MAX_FPS", "VIDEO_CONTAINERS", "build_video_io", "check_fps", "even_size", "h264_available", "has_backend", "new_video_path",
           "open_video_writer", "video_codecs"]
