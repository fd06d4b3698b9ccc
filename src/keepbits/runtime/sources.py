"""Frame sources: video files, cameras (indices, ``/dev/video*`` devices), RTSP/HTTP URLs,
GStreamer pipelines, image folders, Python iterators.

Every source opens and reads in its own grabber thread into a :class:`BoundedQueue` (the
caller's thread never blocks in OpenCV, so signals are always handled):

* **files, folders, iterators** (``live=False``): policy ``block``, nothing is lost; a read
  error ends the stream (counted in ``errors``). :meth:`Source.start` waits up to
  ``stall_timeout`` for the source to open (a FIFO whose writer stalls never does): open
  errors raise there; a source that has not opened by then ends at once (``last_error``).
* **cameras, devices, URLs, GStreamer pipelines, live iterators** (``live=True``): policy
  ``drop_oldest`` with room for one frame, so the consumer always gets the newest one; frames
  overwritten unseen count as ``dropped``. A read that fails, raises or ends reconnects with
  exponential backoff (``reconnects``); ``max_reconnects`` consecutive reconnects without a
  frame end the stream (None: retry for ever).

Either kind: a wait longer than ``read_timeout`` counts as ``stale``; a source silent for
``stall_timeout`` ends the stream. Both timeouts must be positive (no busy-waiting). A frame
that cannot be used (an image file of a pixel type other than 8 or 16 bit, larger than
``max_pixels``, unreadable; an iterator's frame that is no image) is skipped and counted
(``skipped``); 16-bit images are converted to 8 bit (the high byte).

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
import math
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cv2
import numpy as np

from keepbits.data.stream import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from keepbits.errors import InputError
from keepbits.runtime.queues import BoundedQueue, QueueClosed

log = logging.getLogger(__name__)

LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")
#: FFmpeg's RTSP transports: TCP (interleaved on the RTSP connection: passes NAT and firewalls,
#: no packet loss) or UDP (lower latency; lost packets show as broken frames).
RTSP_TRANSPORTS = ("tcp", "udp")
_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_OPTIONS_LOCK = threading.Lock()
#: Largest source frame by default (pixels, 8192×4096): image files are checked from their
#: header before decoding, videos and cameras when opened.
DEFAULT_MAX_PIXELS = 1 << 25


@dataclass
class Skipped:
    """What a source's iterator yields for a frame it cannot use: counted, not delivered."""

    reason: str


@dataclass
class Frame:
    """One frame: ``image`` uint8 H×W×3 RGB (or H×W grey), ``index`` its place in the source (a
    video's frame number; in a folder, its image or video frame in sorted path order; counting
    skipped and stepped-over ones), capture ``timestamp``."""

    image: np.ndarray
    index: int
    timestamp: float
    #: For a folder source, the file it was read from, relative to the folder (a video's frame: ``<file>#<frame>``); else None.
    file: str | None = None


@dataclass
class _FileImage:
    """What a folder source's iterator yields for a readable file: its pixels, its name and, for a
    video's frame, its number in that video (``frame_step`` counts within each video; pictures are
    never stepped over)."""

    image: np.ndarray
    file: str
    frame: int | None = None


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^/\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it as ``***``: what
    logs, errors and summaries show of a camera URL or a GStreamer pipeline.

    Example:
        >>> from keepbits.runtime.sources import redact_url
        >>> redact_url("rtsp://admin:p@ss@10.0.0.5:554/h264"), redact_url("rtsp://10.0.0.5/live")
        ('rtsp://admin:***@10.0.0.5:554/h264', 'rtsp://10.0.0.5/live')
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)


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
    ``frame_step`` k keeps every k-th frame the source gives (frames 0, k, 2k, …; the others are
    read and dropped by the grabber, counted as ``stepped``); in a folder, every k-th frame of each
    video, and every picture.
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
        frame_step: int = 1,
    ):
        if not (isinstance(frame_step, int) and frame_step >= 1):
            raise InputError(f"frame_step must be an int >= 1, got {frame_step!r}")
        for what, value in (("read_timeout", read_timeout), ("stall_timeout", stall_timeout), ("backoff", backoff[0])):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{what} must be a positive number of seconds, got {value!r}")
        if backoff[1] < backoff[0]:
            raise InputError(f"backoff must be (first, most) with most >= first, got {backoff}")
        self.name, self.live, self.color, self._fps = name, live, color, fps
        self.read_timeout, self.stall_timeout = read_timeout, stall_timeout
        self.backoff, self.max_reconnects = backoff, max_reconnects
        self._open_fn = open_fn
        self._queue = BoundedQueue(queue_size or (1 if live else 4), "drop_oldest" if live else "block")
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._counts = {"read": 0, "delivered": 0, "stale": 0, "reconnects": 0, "errors": 0, "skipped": 0, "stepped": 0, "stalled": 0}
        self._skip_reasons: set[str] = set()  # logged once each
        self.last_error: str | None = None
        self._logged_failure: str | None = None  # the grabber's last logged failure (last_error is also the stall's)
        self.frame_step, self._position = frame_step, 0

    @property
    def fps(self) -> float | None:
        """The nominal frame rate, if known; a video file's comes from its header when it opens,
        so asking a non-live source starts it (:meth:`start`)."""
        if self._fps is None and not self.live:
            self.start()
        return self._fps

    # -- lifecycle -------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> "Source":
        """Start the grabber thread, which opens the source and reads it.

        A non-live source is waited for until it has opened, at most ``stall_timeout`` (or
        until ``stop`` is set): its open errors raise here; if it has not opened by then, the
        source ends at once (no frames, ``last_error`` says why) and its thread is abandoned.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._grab, name=f"keepbits-source-{self.name}", daemon=True)
            self._thread.start()
            if not self.live:
                deadline = time.monotonic() + self.stall_timeout
                while not self._opened.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                    if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                        self.last_error = f"did not open within {self.stall_timeout:g} s" if time.monotonic() >= deadline else "stopped while opening"
                        log.warning("source %s %s; ending the stream", self.name, self.last_error)
                        self.close(timeout=0)
                        break
                if self._open_error is not None:
                    raise self._open_error
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
        ``stop`` is set (checked every ``read_timeout``; the last wait is cut to end at ``stall_timeout``)."""
        self.start(stop)
        waited = 0.0
        while stop is None or not stop.is_set():
            wait = min(self.read_timeout, self.stall_timeout - waited)
            try:
                frame = self._queue.get(timeout=wait)
            except QueueClosed:
                return None
            except TimeoutError:
                self._counts["stale"] += wait >= self.read_timeout
                waited += wait
                if waited >= self.stall_timeout * (1 - 1e-9):
                    self.last_error = f"no frame for {waited:g} s" + (f"; last error: {self.last_error}" if self.last_error else "")
                    log.warning("source %s stalled (%s); ending the stream", self.name, self.last_error)
                    self._counts["stalled"] = 1
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
        """Counters: read, delivered, dropped, stale, reconnects, errors, skipped, stepped, stalled (1 when the
        stream ended because no frame came for ``stall_timeout``; + live, last_error)."""
        return {**self._counts, "dropped": self._queue.dropped, "live": self.live, "last_error": self.last_error}

    # -- grabber thread ----------------------------------------------------------------
    def _skip(self, reason: str) -> None:
        """Count a skipped item; log its reason once (a looped folder meets the same file each pass;
        after 1,024 distinct reasons new ones are counted only)."""
        self._counts["skipped"] += 1
        self.last_error = reason
        if reason not in self._skip_reasons and len(self._skip_reasons) < 1024:
            self._skip_reasons.add(reason)
            log.warning("source %s: skipped %s", self.name, reason)

    def _offer(self, item: Any) -> None:
        file = None
        if isinstance(item, _FileImage):
            item, file = item.image, item.file
        try:
            image = as_rgb(item, self.color)
        except InputError as exc:
            self._skip(str(exc))
            return
        frame = Frame(image, self._position - 1, time.time(), file)
        self._counts["read"] += 1
        while not self._queue.put(frame, timeout=0.1):
            if self._stop.is_set():
                return

    def _grab(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    iterator = self._open_fn()
                    self._fps = self._fps or getattr(iterator, "fps", None)
                    self._opened.set()
                    for item in iterator:
                        if self._stop.is_set():
                            return
                        self._position += 1  # skipped items keep their place: indices stay the source's
                        if isinstance(item, Skipped):
                            self._skip(item.reason)
                            continue
                        place = item.frame if isinstance(item, _FileImage) else self._position - 1
                        if place is not None and place % self.frame_step:
                            self._counts["stepped"] += 1
                            continue
                        self._offer(item)
                        attempt, self._logged_failure = 0, None  # a failure after frames came again is news
                    if not self.live:
                        return
                    self.last_error = "stream ended"
                except QueueClosed:  # the consumer closed the source
                    return
                except Exception as exc:  # noqa: BLE001 - a source may fail any way; count and go on
                    if not self.live and not self._opened.is_set():
                        self._open_error = exc  # raised by start()
                        return
                    self._counts["errors"] += 1
                    error = f"{type(exc).__name__}: {exc}"
                    repeated, self.last_error, self._logged_failure = error == self._logged_failure, error, error
                    # the same failure again (a camera still unplugged): counted, logged once
                    (log.debug if repeated else log.warning)("source %s: %s%s", self.name, error,
                                                             "; retrying" if self.live and not repeated else "")
                    if not self.live:
                        return
                if self.max_reconnects is not None and attempt >= self.max_reconnects:
                    return
                if self._stop.wait(min(self.backoff[0] * 2**attempt, self.backoff[1])):
                    return
                attempt += 1
                self._counts["reconnects"] += 1
        finally:
            self._opened.set()
            self._queue.close()


def _capture(target: str | int, timeout_ms: int, max_pixels: int, api: int = cv2.CAP_ANY,
             ffmpeg_options: str | None = None) -> cv2.VideoCapture:
    """An opened OpenCV capture of frames of at most ``max_pixels``; ``ffmpeg_options``
    (``key;value|key;value``) go to FFmpeg through ``OPENCV_FFMPEG_CAPTURE_OPTIONS``, which OpenCV
    reads when a capture opens."""
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
        shown = repr(redact_url(target)) if isinstance(target, str) else target
        raise InputError(f"cannot open video source {shown} (missing, corrupt, or no codec/driver)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if w * h > max_pixels:
        cap.release()
        raise InputError(f"video source {target!r}: {w}x{h} frames exceed max_pixels={max_pixels}")
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


class _VideoFrames:
    """The frames of a video file, opened (and its first frame read) on construction; ``fps``
    from its header; reopened at the end when looping."""

    def __init__(self, path: Path, loop: bool, timeout_ms: int, max_pixels: int):
        cap = _capture(str(path), timeout_ms, max_pixels)
        self.fps = cap.get(cv2.CAP_PROP_FPS) or None
        ok, first = cap.read()
        if not ok:
            cap.release()
            raise InputError(f"{path}: no decodable frame (a corrupt or unsupported image or video)")

        def frames() -> Iterator[np.ndarray]:
            yield first
            yield from _capture_frames(cap, live=False)
            while loop:
                yield from _capture_frames(_capture(str(path), timeout_ms, max_pixels), live=False)

        self._frames = frames()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._frames


def _read_image(file: Path, max_pixels: int) -> np.ndarray | Skipped:
    """One image file as uint8 (16-bit converted), or :class:`Skipped`; its size is read from
    the header (Pillow, with its decompression-bomb guard) and checked before decoding."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            width, height, kind = *im.size, im.format
        with open(file, "rb") as fh:  # OpenCV decodes a cut-off JPEG/PNG as a partly grey frame without an error
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 32))
            tail = fh.read()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on files it cannot identify
        return Skipped(f"{file.name}: not a readable image ({type(exc).__name__}: {exc})")
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(kind)
    if marker is not None and marker not in tail:
        return Skipped(f"{file.name}: truncated {kind} (no end marker; the data loaders skip it too)")
    if width * height > max_pixels:
        return Skipped(f"{file.name}: {width}x{height} pixels exceed max_pixels={max_pixels}")
    image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    if image is None:
        return Skipped(f"{file.name}: OpenCV cannot decode it")
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        return Skipped(f"{file.name}: {image.dtype} pixels (8 or 16 bit integers only)")
    return image


def _folder(path: Path, max_pixels: int, loop: bool = False, timeout_ms: int = 0) -> Callable[[], Iterator[_FileImage | Skipped]]:
    """The image and video files under ``path`` at any depth (``day1/cam0/…``), in sorted path
    order, an image named by its path under ``path``, a video's frames ``<path>#<frame>``; a
    file that cannot be read is one :class:`Skipped`; with ``loop`` again from the first after
    the last, as long as a pass reads any frame."""
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)}) "
                         "in it or its subfolders")

    def video(file: Path, name: str) -> Iterator[_FileImage | Skipped]:
        try:
            frames = _VideoFrames(file, False, timeout_ms, max_pixels)
        except InputError as exc:
            yield Skipped(f"{name}: {exc}")
            return
        for k, frame in enumerate(frames):
            yield _FileImage(frame, f"{name}#{k}", k)

    def frames() -> Iterator[_FileImage | Skipped]:
        while True:
            read = 0
            for file in files:
                name = file.relative_to(path).as_posix()
                if file.suffix.lower() in VIDEO_SUFFIXES:
                    for item in video(file, name):
                        read += not isinstance(item, Skipped)
                        yield item
                    continue
                item = _read_image(file, max_pixels)
                read += not isinstance(item, Skipped)
                yield item if isinstance(item, Skipped) else _FileImage(item, name)
            if not (loop and read):  # a pass of unreadable files only would loop for ever on nothing
                return

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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rtsp_transport: str | None = None,
    frame_step: int = 1,
) -> Source:
    """A :class:`Source` for a video file, image folder, camera (index ``0`` or device
    ``/dev/video0``), URL, GStreamer pipeline or iterable.

    ``color`` is the channel order of frames an iterable yields (OpenCV sources are handled).
    ``live`` overrides the policy (cameras, devices, URLs and GStreamer pipelines are live;
    files, folders, iterables not). Nothing is opened here: the source's thread opens it
    (:meth:`Source.start`). ``max_pixels`` bounds the frames of files, folders, cameras and URLs.
    ``read_timeout`` bounds opening and each read of OpenCV sources (FFmpeg's open and read
    timeouts). ``rtsp_transport`` (``"tcp"`` or ``"udp"``) sets FFmpeg's RTSP transport for
    ``rtsp://`` URLs (default: FFmpeg's, UDP then TCP). A GStreamer pipeline needs an OpenCV
    built with GStreamer (:class:`InputError` naming it otherwise). ``frame_step`` k keeps every
    k-th frame (:class:`Source`). ``loop`` replays a video file or an image folder from its start.

    Example:
        >>> from keepbits.runtime import open_source
        >>> open_source("missing.mp4")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.InputError: source not found: missing.mp4
    """
    if isinstance(spec, Source):
        return spec
    if not (isinstance(max_pixels, int) and max_pixels > 0):
        raise InputError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if rtsp_transport not in (None, *RTSP_TRANSPORTS):
        raise InputError(f"rtsp_transport must be one of {RTSP_TRANSPORTS}, got {rtsp_transport!r}")
    common = {"read_timeout": read_timeout, "stall_timeout": stall_timeout, "max_reconnects": max_reconnects, "frame_step": frame_step}
    timeout_ms = max(1, int(read_timeout * 1000)) if isinstance(read_timeout, (int, float)) and math.isfinite(read_timeout) else 0
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        index = int(spec)
        return Source(lambda: _capture_frames(_capture(index, timeout_ms, max_pixels), True), name=f"camera{index}",
                      live=True if live is None else live, color="bgr", **common)
    if isinstance(spec, str) and spec.lower().startswith(LIVE_SCHEMES):
        options = f"rtsp_transport;{rtsp_transport}" if rtsp_transport and spec.lower().startswith(("rtsp://", "rtsps://")) else None
        return Source(lambda: _capture_frames(_capture(spec, timeout_ms, max_pixels, ffmpeg_options=options), True),
                      name=redact_url(spec), live=True if live is None else live, color="bgr", **common)
    if is_gstreamer_pipeline(spec):
        from keepbits.runtime.video import has_backend

        if not has_backend("GSTREAMER"):
            raise InputError(f"{redact_url(spec)!r} is a GStreamer pipeline, but this OpenCV build has no GStreamer back-end "
                             "(keepbits doctor shows its video back-ends); use an OpenCV built with GStreamer, or a file, URL or camera")
        return Source(lambda: _capture_frames(_capture(spec, timeout_ms, max_pixels, cv2.CAP_GSTREAMER), True),
                      name=redact_url(spec.split(" ! ", 1)[0]), live=True if live is None else live, color="bgr", **common)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.exists():
            raise InputError(f"source not found: {path}")
        if _is_device(path):  # a V4L2 camera: live, reopened after a disconnect
            return Source(lambda: _capture_frames(_capture(str(path), timeout_ms, max_pixels), True), name=path.name,
                          live=True if live is None else live, color="bgr", **common)
        if path.is_dir():
            return Source(_folder(path, max_pixels, loop, timeout_ms), name=path.name, live=bool(live), color="bgr", **common)
        return Source(lambda: _VideoFrames(path, loop, timeout_ms, max_pixels), name=path.name, live=bool(live),
                      color="bgr", **common)
    if isinstance(spec, Iterable):
        return Source(lambda: iter(spec), name=type(spec).__name__, live=bool(live), color=color, **common)
    shown = redact_url(spec) if isinstance(spec, str) else spec
    raise InputError(f"unsupported source {shown!r}: give a path, folder, camera index, URL or iterable of frames")
