"""Reference transport: payloads over TCP, length-prefixed.

Wire format: on connect the sender writes ``PREAMBLE`` (``b"KBST"`` + version byte 1);
then each payload as a 4-byte big-endian length followed by that many bytes. The
receiver refuses lengths above ``max_payload``, times out idle reads, decodes each
payload with :class:`keepbits.runtime.receiver.PayloadWriter` (bad payloads are counted and
skipped) into PNG images (cropped to the source box), ``frames.jsonl`` and optionally a video.

Example:
    >>> import threading, tempfile, numpy as np
    >>> from keepbits.codec import encode
    >>> from keepbits.runtime.net import TcpSink, receive
    >>> out, ready = tempfile.mkdtemp(), threading.Event()
    >>> box = {}
    >>> t = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, out, once=True, ready=ready, idle_timeout=10)))
    >>> t.start(); _ = ready.wait(5)
    >>> sink = TcpSink("127.0.0.1", ready.port)
    >>> sink.send(encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4)); _ = sink.close(); t.join(10)
    >>> box["frames"], box["bad_payloads"]
    (1, 0)
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from keepbits.errors import DecodeError, InputError
from keepbits.runtime.receiver import PayloadWriter

log = logging.getLogger(__name__)

PREAMBLE = b"KBST\x01"
LENGTH = struct.Struct(">I")
#: Largest payload the receiver accepts by default (bytes).
MAX_PAYLOAD = 64 << 20


class TcpSink:
    """Send payloads to ``host:port``; reconnects (with backoff) up to ``retries`` times per frame."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0, retries: int = 3):
        self.host, self.port, self.timeout, self.retries = host, port, timeout, retries
        self._sock: socket.socket | None = None
        self.stats = {"kind": "tcp", "address": f"{host}:{port}", "frames": 0, "bytes": 0, "errors": 0, "reconnects": 0}

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.settimeout(self.timeout)
        sock.sendall(PREAMBLE)
        return sock

    def send(self, payload: bytes) -> None:
        """Send one payload; :class:`InputError` once every retry failed."""
        for attempt in range(self.retries + 1):
            try:
                if self._sock is None:
                    if attempt or self.stats["frames"]:
                        self.stats["reconnects"] += 1
                    self._sock = self._connect()
                self._sock.sendall(LENGTH.pack(len(payload)) + payload)
                self.stats["frames"] += 1
                self.stats["bytes"] += len(payload)
                return
            except OSError as exc:
                self._drop()
                last = exc
                time.sleep(min(0.2 * 2**attempt, 2.0))
        self.stats["errors"] += 1
        raise InputError(f"tcp sink {self.host}:{self.port}: cannot send ({last})")

    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None:
        if result.payload is not None:
            self.send(result.payload)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> dict[str, Any]:
        self._drop()
        return dict(self.stats)


def _recv_exact(conn: socket.socket, n: int, idle_timeout: float, stop: threading.Event) -> bytes | None:
    """Exactly ``n`` bytes; None on a clean close before the first byte; OSError on a
    close mid-way, on ``stop`` or after ``idle_timeout`` s without progress."""
    buf = bytearray(n)
    view, got, last = memoryview(buf), 0, time.monotonic()
    while got < n:
        try:
            k = conn.recv_into(view[got:])
        except socket.timeout:
            if stop.is_set() or time.monotonic() - last > idle_timeout:
                raise TimeoutError(f"no data for {time.monotonic() - last:.1f} s") from None
            continue
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got, last = got + k, time.monotonic()
    return bytes(buf)


def receive(
    host: str,
    port: int,
    out: str | Path,
    *,
    max_frames: int | None = None,
    idle_timeout: float = 30.0,
    once: bool = False,
    video: str | Path | None = None,
    fps: float = 25.0,
    images: bool = True,
    max_payload: int = MAX_PAYLOAD,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Listen on ``host:port``, decode incoming payloads into ``out``; returns counters.

    Serves one connection at a time; returns after ``max_frames``, after ``idle_timeout``
    seconds without a connection or data, after the first connection when ``once``, or
    when ``stop`` is set. ``ready`` (if given) is set once listening, with ``ready.port``.
    """
    stop = stop or threading.Event()
    writer = PayloadWriter(out, video=video, fps=fps, images=images, masks=False)
    stats: dict[str, Any] = {"frames": 0, "bytes": 0, "bad_payloads": 0, "protocol_errors": 0, "connections": 0}
    try:
        server = socket.create_server((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc})") from None
    server.settimeout(0.2)
    if ready is not None:
        ready.port = server.getsockname()[1]  # type: ignore[attr-defined]
        ready.set()
    idle_since = time.monotonic()
    try:
        with server:
            while not stop.is_set() and (max_frames is None or stats["frames"] < max_frames):
                try:
                    conn, peer = server.accept()
                except socket.timeout:
                    if time.monotonic() - idle_since > idle_timeout:
                        break
                    continue
                stats["connections"] += 1
                with conn:
                    conn.settimeout(min(idle_timeout, 1.0))
                    _serve(conn, peer, writer, stats, max_frames, max_payload, idle_timeout, stop)
                idle_since = time.monotonic()
                if once:
                    break
    finally:
        writer.close()
    return stats


def _serve(conn: socket.socket, peer: Any, writer: PayloadWriter, stats: dict[str, Any], max_frames: int | None,
           max_payload: int, idle_timeout: float, stop: threading.Event) -> None:
    def read(n: int) -> bytes | None:
        return _recv_exact(conn, n, idle_timeout, stop)

    try:
        if read(len(PREAMBLE)) != PREAMBLE:
            stats["protocol_errors"] += 1
            log.warning("%s: not a keepbits stream (bad preamble); closing", peer)
            return
        while max_frames is None or stats["frames"] < max_frames:
            head = read(LENGTH.size)
            if head is None:
                return
            (n,) = LENGTH.unpack(head)
            if n > max_payload:
                stats["protocol_errors"] += 1
                log.warning("%s: payload of %d bytes exceeds max_payload=%d; closing", peer, n, max_payload)
                return
            payload = read(n)
            if payload is None:
                raise ConnectionError("connection closed mid-frame")
            stats["bytes"] += n
            try:
                writer.write(payload)
                stats["frames"] += 1
            except DecodeError as exc:
                stats["bad_payloads"] += 1
                log.warning("%s: bad payload skipped (%s)", peer, exc)
    except OSError as exc:
        stats["protocol_errors"] += 1
        log.warning("%s: connection error (%s)", peer, exc)
