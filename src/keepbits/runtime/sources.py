"""Frame sources: video files, cameras (indices, ``/dev/video*`` devices), RTSP/HTTP URLs,
GStreamer pipelines, image folders, Python iterators.

Every source reads in its own grabber thread into a :class:`BoundedQueue`:

* **files, folders, iterators** (``live=False``): policy ``block``, nothing is lost; a read
  error ends the stream (counted in ``errors``).
* **cameras, devices, URLs, GStreamer pipelines, live iterators** (``live=True``): policy
  ``drop_oldest`` with room for one frame, so the consumer always gets the newest one; frames
  overwritten unseen count as ``dropped``. A wait longer than ``read_timeout`` counts as ``stale``; a source silent for
  ``stall_timeout`` ends the stream. A read that fails, raises or ends reconnects with
  exponential backoff (``reconnects``); ``max_reconnects`` consecutive reconnects without
  a frame end the stream (None: retry for ever).

Frames come out as :class:`Frame` with an RGB (or grey) uint8 image.

Example:
    >>> import numpy as np
    >>> from keepbits.runtime import open_source
    >>> with open_source([np.zeros((4, 4, 3), np.uint8)] * 3) as src:
    ...     [f.index for f in src], src.stats()["delivered"]
    ([0, 1, 2], 3)
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np

from keepbits.errors import InputError
from keepbits.runtime.queues import BoundedQueue, QueueClosed

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")
#: FFmpeg's RTSP transports: TCP (interleaved on the RTSP connection: passes NAT and firewalls,
#: no packet loss) or UDP (lower latency; lost packets show as broken frames).
RTSP_TRANSPORTS = ("tcp", "udp")
_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_OPTIONS_LOCK = threading.Lock()


@dataclass
class Frame:
    """One frame: ``image`` uint8 H×W×3 RGB (or H×W grey), ``index`` in source order, capture ``timestamp``."""

    image: np.ndarray
    index: int
    timestamp: float


def as_rgb(item: Any, color: str = "rgb") -> np.ndarray:
    """uint8 H×W×3 RGB or H×W grey from a numpy frame (``color`` ``rgb``/``bgr``) or PIL image.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.sources import as_rgb
        >>> as_rgb(np.array([[[1, 2, 3]]], np.uint8), "bgr").tolist()
        [[[3, 2, 1]]]
    """
    if color not in ("rgb", "bgr"):
        raise InputError(f"color must be 'rgb' or 'bgr', got {color!r}")
    if hasattr(item, "convert") and hasattr(item, "mode"):  # PIL image
        item, color = np.asarray(item.convert("L" if item.mode in ("L", "1", "I", "F") else "RGB")), "rgb"
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        raise InputError(f"frames must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if color == "bgr" else cv2.COLOR_RGBA2RGB)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise InputError(f"frames must be H×W, H×W×3 or H×W×4, got shape {arr.shape}")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if color == "bgr" and arr.ndim == 3 else arr


class Source:
    """A frame stream read by a grabber thread; iterate it or call :meth:`get`.

    ``open_fn()`` returns an iterator of frames (numpy in ``color`` order, or PIL); it is
    called again to reconnect a live source. ``fps`` is the nominal rate, if known.
    """

    def __init__(
        self,
        open_fn: Callable[[], Iterator[Any]],
        *,
        name: str,
        live: bool,
        color: str = "rgb",
        fps: float | None = None,
        queue_size: int | None = None,
        read_timeout: float = 5.0,
        stall_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 8.0),
        max_reconnects: int | None = None,
    ):
        self.name, self.live, self.color, self.fps = name, live, color, fps
        self.read_timeout, self.stall_timeout = read_timeout, stall_timeout
        self.backoff, self.max_reconnects = backoff, max_reconnects
        self._open_fn = open_fn
        self._queue = BoundedQueue(queue_size or (1 if live else 4), "drop_oldest" if live else "block")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: Iterator[Any] | None = None
        self._counts = {"read": 0, "delivered": 0, "stale": 0, "reconnects": 0, "errors": 0}
        self.last_error: str | None = None
        self._next_index = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "Source":
        """Open (errors of a non-live source's first open raise here) and start grabbing."""
        if self._thread is None:
            if not self.live:
                self._first = self._open_fn()
            self._thread = threading.Thread(target=self._grab, name=f"keepbits-source-{self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop grabbing; a thread stuck in a blocking read is left to die with the process."""
        self._stop.set()
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Source":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while (frame := self.get()) is not None:
            yield frame

    # -- consumer ----------------------------------------------------------------------
    def get(self, stop: threading.Event | None = None) -> Frame | None:
        """Next frame, or None when the stream has ended, stalled past ``stall_timeout``, or
        ``stop`` is set (checked every ``read_timeout``)."""
        self.start()
        waited = 0.0
        while stop is None or not stop.is_set():
            try:
                frame = self._queue.get(timeout=self.read_timeout)
            except QueueClosed:
                return None
            except TimeoutError:
                self._counts["stale"] += 1
                waited += self.read_timeout
                if waited >= self.stall_timeout:
                    self.last_error = f"no frame for {waited:.1f} s"
                    log.warning("source %s stalled (%s); ending the stream", self.name, self.last_error)
                    self.close(timeout=0)
                    return None
                continue
            self._counts["delivered"] += 1
            return frame
        return None

    def ready(self) -> bool:
        """Whether a frame is waiting, so that :meth:`get` would return without blocking."""
        return len(self._queue) > 0

    def stats(self) -> dict[str, Any]:
        """Counters: read, delivered, dropped, stale, reconnects, errors (+ last_error)."""
        return {**self._counts, "dropped": self._queue.dropped, "last_error": self.last_error}

    # -- grabber thread ----------------------------------------------------------------
    def _offer(self, item: Any) -> None:
        frame = Frame(as_rgb(item, self.color), self._next_index, time.time())
        self._next_index += 1
        self._counts["read"] += 1
        while not self._queue.put(frame, timeout=0.1):
            if self._stop.is_set():
                return

    def _grab(self) -> None:
        attempt = 0
        iterator = self._first
        try:
            while not self._stop.is_set():
                try:
                    for item in iterator if iterator is not None else self._open_fn():
                        if self._stop.is_set():
                            return
                        self._offer(item)
                        attempt = 0
                    if not self.live:
                        return
                    self.last_error = "stream ended"
                except QueueClosed:  # the consumer closed the source
                    return
                except Exception as exc:  # noqa: BLE001 - a source may fail any way; count and go on
                    self._counts["errors"] += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("source %s: %s", self.name, self.last_error)
                    if not self.live:
                        return
                iterator = None
                if self.max_reconnects is not None and attempt >= self.max_reconnects:
                    return
                if self._stop.wait(min(self.backoff[0] * 2**attempt, self.backoff[1])):
                    return
                attempt += 1
                self._counts["reconnects"] += 1
        finally:
            self._queue.close()


def _capture(target: str | int, timeout_ms: int, api: int = cv2.CAP_ANY, ffmpeg_options: str | None = None) -> cv2.VideoCapture:
    """An opened OpenCV capture; ``ffmpeg_options`` (``key;value|key;value``) go to FFmpeg through
    ``OPENCV_FFMPEG_CAPTURE_OPTIONS``, which OpenCV reads when a capture opens."""
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    if ffmpeg_options is None:
        cap = cv2.VideoCapture(target, api, params)
    else:
        with _FFMPEG_OPTIONS_LOCK:
            before = os.environ.get(_FFMPEG_OPTIONS)
            os.environ[_FFMPEG_OPTIONS] = ffmpeg_options
            try:
                cap = cv2.VideoCapture(target, api, params)
            finally:
                if before is None:
                    del os.environ[_FFMPEG_OPTIONS]
                else:
                    os.environ[_FFMPEG_OPTIONS] = before
    if not cap.isOpened():
        cap.release()
        raise InputError(f"cannot open video source {target!r} (missing, corrupt, or no codec/driver)")
    return cap


def _capture_frames(cap: cv2.VideoCapture, live: bool) -> Iterator[np.ndarray]:
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                if live:
                    raise OSError("read failed (camera/stream disconnected or timed out)")
                return
            yield image
    finally:
        cap.release()


def _video_file(path: Path, loop: bool, timeout_ms: int) -> Callable[[], Iterator[np.ndarray]]:
    def open_fn() -> Iterator[np.ndarray]:
        cap = _capture(str(path), timeout_ms)
        ok, first = cap.read()
        if not ok:
            cap.release()
            raise InputError(f"{path}: no decodable frame (corrupt or unsupported video)")

        def frames() -> Iterator[np.ndarray]:
            yield first
            yield from _capture_frames(cap, live=False)
            while loop:
                yield from _capture_frames(_capture(str(path), timeout_ms), live=False)

        return frames()

    return open_fn


def _folder(path: Path) -> Callable[[], Iterator[np.ndarray]]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")

    def frames() -> Iterator[np.ndarray]:
        for file in files:
            image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
            if image is None:
                log.warning("skipping unreadable image %s", file)
                continue
            yield image

    return frames


def is_gstreamer_pipeline(spec: Any) -> bool:
    """Whether ``spec`` reads as a GStreamer pipeline (elements joined by ``!``).

    Example:
        >>> from keepbits.runtime.sources import is_gstreamer_pipeline
        >>> is_gstreamer_pipeline("videotestsrc ! videoconvert ! appsink"), is_gstreamer_pipeline("clip.mp4")
        (True, False)
    """
    return isinstance(spec, str) and " ! " in spec and "://" not in spec.split(" ! ", 1)[0]


def _is_device(path: Path) -> bool:
    """A character device (``/dev/video0``, or a link to one): a camera, read live."""
    try:
        return stat.S_ISCHR(path.stat().st_mode)
    except OSError:
        return False


def open_source(
    spec: Any,
    *,
    loop: bool = False,
    live: bool | None = None,
    color: str = "rgb",
    read_timeout: float = 5.0,
    stall_timeout: float = 30.0,
    max_reconnects: int | None = None,
    rtsp_transport: str | None = None,
) -> Source:
    """A :class:`Source` for a video file, image folder, camera (index ``0`` or device
    ``/dev/video0``), URL, GStreamer pipeline or iterable.

    ``color`` is the channel order of frames an iterable yields (OpenCV sources are handled).
    ``live`` overrides the policy (cameras, devices, URLs and GStreamer pipelines are live;
    files, folders, iterables not). ``read_timeout`` bounds opening and each read of OpenCV
    sources (FFmpeg's open and read timeouts). ``rtsp_transport`` (``"tcp"`` or ``"udp"``) sets
    FFmpeg's RTSP transport for ``rtsp://`` URLs (default: FFmpeg's, UDP then TCP). A GStreamer
    pipeline needs an OpenCV built with GStreamer (:class:`InputError` naming it otherwise).

    Example:
        >>> from keepbits.runtime import open_source
        >>> open_source("missing.mp4")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.InputError: source not found: missing.mp4
    """
    if isinstance(spec, Source):
        return spec
    if rtsp_transport not in (None, *RTSP_TRANSPORTS):
        raise InputError(f"rtsp_transport must be one of {RTSP_TRANSPORTS}, got {rtsp_transport!r}")
    timeout_ms = int(read_timeout * 1000)
    common = {"read_timeout": read_timeout, "stall_timeout": stall_timeout, "max_reconnects": max_reconnects}
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        index = int(spec)
        return Source(lambda: _capture_frames(_capture(index, timeout_ms), True), name=f"camera{index}",
                      live=True if live is None else live, color="bgr", **common)
    if isinstance(spec, str) and spec.lower().startswith(LIVE_SCHEMES):
        options = f"rtsp_transport;{rtsp_transport}" if rtsp_transport and spec.lower().startswith(("rtsp://", "rtsps://")) else None
        return Source(lambda: _capture_frames(_capture(spec, timeout_ms, ffmpeg_options=options), True), name=spec.split("@")[-1],
                      live=True if live is None else live, color="bgr", **common)
    if is_gstreamer_pipeline(spec):
        from keepbits.runtime.video import has_backend

        if not has_backend("GSTREAMER"):
            raise InputError(f"{spec!r} is a GStreamer pipeline, but this OpenCV build has no GStreamer back-end "
                             "(keepbits doctor shows its video back-ends); use an OpenCV built with GStreamer, or a file, URL or camera")
        return Source(lambda: _capture_frames(_capture(spec, timeout_ms, cv2.CAP_GSTREAMER), True), name=spec.split(" ! ", 1)[0],
                      live=True if live is None else live, color="bgr", **common)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.exists():
            raise InputError(f"source not found: {path}")
        if _is_device(path):  # a V4L2 camera: live, reopened after a disconnect
            return Source(lambda: _capture_frames(_capture(str(path), timeout_ms), True), name=path.name,
                          live=True if live is None else live, color="bgr", **common)
        if path.is_dir():
            return Source(_folder(path), name=path.name, live=bool(live), color="bgr", **common)
        cap = _capture(str(path), timeout_ms)
        fps = cap.get(cv2.CAP_PROP_FPS) or None
        cap.release()
        return Source(_video_file(path, loop, timeout_ms), name=path.name, live=bool(live), color="bgr", fps=fps, **common)
    if isinstance(spec, Iterable):
        return Source(lambda: iter(spec), name=type(spec).__name__, live=bool(live), color=color, **common)
    raise InputError(f"unsupported source {spec!r}: give a path, folder, camera index, URL or iterable of frames")
