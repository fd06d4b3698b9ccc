"""Sinks: where processed frames go. Each has ``write(frame, result, record)`` and
``close() -> stats``; ``record`` is the frame's JSON metadata (see :mod:`keepbits.runtime.stream`).

* ``files:DIR``: ``DIR/payloads/<sequence>.kbit`` + ``DIR/frames.jsonl`` (one line per frame).
* ``video:OUT.mp4`` (``.mov``, ``.avi``): the source frames annotated with the mask (or, for
  SimpleBits bundles, the simplified image), label, score and bytes; H.264 when the OpenCV
  build writes it, else mp4v (``.avi``: Motion JPEG).
* ``tcp:HOST:PORT``: length-prefixed payloads to ``keepbits receive`` (:mod:`keepbits.runtime.net`).
* ``mqtt://HOST:PORT/TOPIC``: one MQTT message per payload (:mod:`keepbits.runtime.mqtt`, ``keepbits[mqtt]``).

Example:
    >>> import tempfile
    >>> from keepbits.runtime.sinks import open_sink
    >>> type(open_sink("files:" + tempfile.mkdtemp())).__name__
    'FilesSink'
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from keepbits.errors import InputError
from keepbits.runtime.video import MAX_FPS, even_size, new_video_path, open_video_writer, video_codecs


class Sink(Protocol):
    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None: ...

    def close(self) -> dict[str, Any]: ...


class FilesSink:
    """Payload files plus JSONL metadata, flushed per frame; the folder is created (and checked
    writable) when the sink opens. A folder that holds an earlier run's payloads (or a non-empty
    ``frames.jsonl``) is refused:
    writing over them would mix two runs under one ``frames.jsonl`` (a shorter run leaves the
    longer one's tail) and lose the first; ``replace=True`` deletes them first (the demo, which
    owns its folder)."""

    def __init__(self, folder: str | Path, replace: bool = False):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"sink files:{folder}: {folder} exists and is not a folder")
        earlier = sorted((self.folder / "payloads").glob("*.kbit")) if (self.folder / "payloads").is_dir() else []
        jsonl = self.folder / "frames.jsonl"
        # a run that wrote nothing (its source never gave a frame) leaves nothing to lose: a restart may reuse its folder
        if not replace and (earlier or (jsonl.is_file() and jsonl.stat().st_size > 0)):
            raise InputError(f"sink files:{folder}: {folder} holds an earlier run's payloads or frames.jsonl; "
                             "choose another folder or remove them")
        try:
            for path in earlier:
                path.unlink()
            (self.folder / "payloads").mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.folder / "frames.jsonl", "w", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"sink files:{folder}: cannot write there ({exc.strerror or exc})") from None
        self.frames = 0

    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None:
        if result.payload is not None:
            (self.folder / "payloads" / f"{result.sequence:08d}.kbit").write_bytes(result.payload)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.frames += 1

    def close(self) -> dict[str, Any]:
        self._jsonl.close()
        return {"kind": "files", "path": str(self.folder), "frames": self.frames}


#: Longest side (pixels) a small picture is enlarged to (:func:`enlargement`): a 1×20000 strip
#: enlarged to a 224-pixel short side would take gigabytes.
MAX_SIDE = 4096


def enlargement(height: int, width: int, min_side: int, max_side: int = MAX_SIDE) -> int:
    """The whole factor that enlarges a ``height`` × ``width`` picture to a short side of at least
    ``min_side``, as far as its long side stays within ``max_side`` (1: not enlarged).

    Example:
        >>> from keepbits.runtime.sinks import enlargement
        >>> enlargement(28, 28, 224), enlargement(1, 20000, 224), enlargement(10, 1000, 224)
        (8, 1, 4)
    """
    wanted = -(-min_side // max(1, min(height, width)))
    return max(1, min(wanted, max_side // max(1, height, width)))


def annotate(image: np.ndarray, result: Any, record: dict[str, Any], min_side: int = 0) -> np.ndarray:
    """BGR frame: dropped pixels dimmed, kept region outlined, label/score/bytes printed; for a
    result without a mask (SimpleBits) the simplified image in place of ``image``, mapped back
    to the source frame.

    Example:
        >>> import numpy as np, tempfile
        >>> from keepbits.runtime import Pipeline
        >>> from keepbits.runtime.sinks import annotate
        >>> from keepbits.runtime.synthetic import toy_bundle
        >>> r = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))(np.zeros((20, 30, 3), np.uint8))
        >>> annotate(np.zeros((20, 30, 3), np.uint8), r, {"payload_bytes": 10}, min_side=60).shape
        (60, 90, 3)
    """
    if result.mask is None:
        image = result.fit.image_to_source(result.simplified)
        keep = np.ones(image.shape[:2], np.uint8)
    else:
        keep = (result.fit.mask_to_source(result.mask) > result.threshold).astype(np.uint8)
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if image.ndim == 2 or image.shape[2] == 1 else cv2.COLOR_RGB2BGR)
    up = enlargement(*bgr.shape[:2], min_side) if min_side else 1
    if up > 1:
        bgr = cv2.resize(bgr, None, fx=up, fy=up, interpolation=cv2.INTER_NEAREST)
        keep = cv2.resize(keep, None, fx=up, fy=up, interpolation=cv2.INTER_NEAREST)
    out = np.where(keep[:, :, None].astype(bool), bgr, (bgr * 0.35).astype(np.uint8))
    contours, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    text = f"{result.label} {result.score:.2f}"
    if record.get("payload_bytes") is not None:
        text += f"  {record['payload_bytes']} B"
        reference = next((name for name in ("jpeg", "png") if record.get(f"{name}_bytes")), None)
        if reference:
            text += f" ({reference.upper()} {record[f'{reference}_bytes']} B)"
    scale = max(0.35, out.shape[0] / 700)
    org = (4, int(16 * scale / 0.5))
    # white text on a dark band (a thick black copy of the text as outline runs wider than the text
    # with some OpenCV builds and leaves ghost letters after it)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top, bottom = max(0, org[1] - height - 3), min(out.shape[0], org[1] + baseline + 1)
    out[top:bottom, :min(out.shape[1], org[0] + width + 4)] //= 4
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


class VideoSink:
    """Annotated source frames as a video (``.mp4``/``.mov``: H.264 when OpenCV writes it, else
    mp4v; ``.avi``: MJPEG; :func:`keepbits.runtime.video.open_video_writer`); small frames are
    upscaled to ``min_side`` (within :data:`MAX_SIDE`). The container and the path are checked when
    the sink opens (a probe writer is opened there and removed), so a sink that cannot write fails
    before the run; a file already at ``path`` is refused, never overwritten. ``fps`` is the
    source's; 25 where it has none a video can take (finite, at most :data:`MAX_FPS`)."""

    def __init__(self, path: str | Path, fps: float | None = None, min_side: int = 360):
        from keepbits._fs import writable_file

        self.path = Path(path)
        try:
            codecs = video_codecs(self.path)
        except InputError as exc:
            raise InputError(f"sink video:{path}: {exc}") from None
        new_video_path(self.path, f"sink video:{path}:")
        writable_file(self.path, "video sink")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the sink opens after the model and the source are checked
        probe = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codecs[-1]), 25.0, (16, 16))  # the container's baseline codec
        opened = probe.isOpened()
        probe.release()
        self.path.unlink(missing_ok=True)  # nothing was there before the probe
        if not opened:
            raise InputError(f"sink video:{path}: OpenCV cannot write {self.path.suffix} video there (no {codecs[-1]} encoder?)")
        self.fps = fps if fps and math.isfinite(fps) and 0 < fps <= MAX_FPS else 25.0  # the source's rate where a video takes it
        self.min_side = min_side
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None:
        out = annotate(frame.image, result, record, self.min_side)
        if self._writer is None:
            self._size = even_size(out.shape[1], out.shape[0])
            self._writer = open_video_writer(self.path, self.fps, self._size)
        if (out.shape[1], out.shape[0]) != self._size:
            out = cv2.resize(out, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(out)
        self.frames += 1

    def close(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.release()
        return {"kind": "video", "path": str(self.path), "frames": self.frames}


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); :class:`InputError` if malformed.

    Example:
        >>> from keepbits.runtime.sinks import parse_hostport
        >>> parse_hostport("127.0.0.1:9000")
        ('127.0.0.1', 9000)
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def open_sink(spec: str, *, fps: float | None = None) -> Sink:
    """A sink from ``files:DIR``, ``video:OUT.mp4``, ``tcp:HOST:PORT`` or ``mqtt://HOST:PORT/TOPIC``;
    paths are checked here (:class:`InputError` for a file where a folder belongs, an unwritable
    place, an unknown video container)."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise InputError(f"sink {spec!r}: expected files:DIR, video:OUT.mp4, tcp:HOST:PORT or mqtt://HOST:PORT/TOPIC")
    if kind == "files":
        return FilesSink(arg)
    if kind == "video":
        return VideoSink(arg, fps)
    if kind == "tcp":
        from keepbits.runtime.net import TcpSink

        return TcpSink(*parse_hostport(arg))
    if kind == "mqtt":
        from keepbits.runtime.mqtt import MqttSink

        return MqttSink(spec)
    raise InputError(f"unknown sink kind {kind!r} in {spec!r} (files, video, tcp, mqtt)")
