"""Reference transport: payloads over TCP, length-prefixed.

Wire format: on connect the sender writes ``PREAMBLE`` (``b"KBST"`` + version byte 1);
then each payload as a 4-byte big-endian length followed by that many bytes. At the end the
sender shuts its side down and waits for the receiver to close: that confirms the receiver
read everything. The receiver serves up to ``max_connections`` senders at once, refuses
lengths above ``max_payload``, times out idle reads, decodes each payload with
:class:`keepbits.runtime.receiver.PayloadWriter` (bad payloads are counted and skipped) into PNG
images and mask PNGs (cropped to the source box, named per sender session: a restarted sender never
overwrites earlier frames, nor a sender that repeats a sequence number: ``renamed``),
``frames.jsonl`` (appended) and optionally a video. A frame that cannot be written counts in
``write_errors``; an error of the receiver itself drops that connection only (``protocol_errors``).

Example:
    >>> import threading, tempfile, numpy as np
    >>> from keepbits.codec import encode
    >>> from keepbits.runtime.net import TcpSink, receive
    >>> out, ready = tempfile.mkdtemp(), threading.Event()
    >>> box = {}
    >>> t = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, out, once=True, ready=ready, idle_timeout=10)))
    >>> t.start(); _ = ready.wait(5)
    >>> sink = TcpSink("127.0.0.1", ready.port)
    >>> sink.send(encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4)); stats = sink.close(); t.join(10)
    >>> box["frames"], box["bad_payloads"], stats["delivered"]
    (1, 0, 1)
"""
from __future__ import annotations

import logging
import math
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from keepbits.codec import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_PER_BYTE
from keepbits.errors import DecodeError, InputError
from keepbits.runtime.receiver import PayloadWriter

log = logging.getLogger(__name__)

PREAMBLE = b"KBST\x01"
LENGTH = struct.Struct(">I")
#: Largest payload the receiver accepts by default (bytes): a lossless frame of the decoder's
#: default ``max_pixels`` (2048×2048×3) fits.
MAX_PAYLOAD = 16 << 20
#: Senders the receiver serves at once by default; more wait in the listen backlog.
MAX_CONNECTIONS = 4
_LINGER_RESET = struct.pack("ii", 1, 0)


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value!r}")


class TcpSink:
    """Send payloads to ``host:port``, policy ``block``: a slow receiver slows the stream down
    (its bounded queues then back-pressure the model, and a live source drops frames at its
    input, counted there); nothing is counted as delivered that the receiver did not read.

    A send waits as long as the receiver keeps reading. A connection on which nothing moves for
    ``timeout`` seconds, or that fails, is reset (no data left queued in the kernel) and
    replaced, up to ``retries`` times per payload with backoff; once a payload has failed every
    retry, later payloads get one attempt each until one goes through. :meth:`close` shuts the
    sending side down and waits up to ``timeout`` s for the receiver to close after reading
    everything. Counters: ``sent`` (written completely to a connection), ``delivered`` (= ``frames``:
    sent on a connection the receiver then closed cleanly), ``unconfirmed`` (sent on a
    connection that was reset: some may have been read), ``unsent`` (given up),
    ``undelivered`` = unsent + unconfirmed.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 5.0, retries: int = 3):
        _positive("tcp sink timeout", timeout)
        self.host, self.port, self.timeout, self.retries = host, port, timeout, retries
        self._sock: socket.socket | None = None
        self._on_connection = 0  # payloads sent on the current connection, not yet confirmed
        self._down = False
        self.stats: dict[str, Any] = {"kind": "tcp", "address": f"{host}:{port}", "frames": 0, "sent": 0, "delivered": 0,
                                      "unconfirmed": 0, "unsent": 0, "undelivered": 0, "bytes": 0, "errors": 0,
                                      "reconnects": 0, "last_error": None}

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.settimeout(self.timeout)
        try:
            self._send_all(sock, PREAMBLE)
        except OSError:
            self._reset(sock)
            raise
        return sock

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        """Write ``data``; ``socket.timeout`` only when no byte could be written for ``timeout`` s."""
        view = memoryview(data)
        while view:
            view = view[sock.send(view):]

    def _reset(self, sock: socket.socket) -> None:
        """Close with an RST: the kernel drops what is still queued instead of lingering with it."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        sock.close()

    def _abandon(self) -> None:
        if self._sock is not None:
            self._reset(self._sock)
            self._sock = None
            self.stats["unconfirmed"] += self._on_connection
            self._on_connection = 0

    def send(self, payload: bytes) -> None:
        """Send one payload; :class:`InputError` once every retry failed (counted in ``unsent``)."""
        attempts = 1 if self._down else self.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            try:
                if self._sock is None:
                    if attempt or self.stats["sent"]:
                        self.stats["reconnects"] += 1
                    self._sock = self._connect()
                self._send_all(self._sock, LENGTH.pack(len(payload)) + payload)
                self.stats["sent"] += 1
                self.stats["bytes"] += len(payload)
                self._on_connection += 1
                self._down = False
                return
            except OSError as exc:
                last = exc
                self._abandon()
                if attempt + 1 < attempts:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
        self._down = True
        self.stats["errors"] += 1
        self.stats["unsent"] += 1
        self.stats["last_error"] = f"{type(last).__name__}: {last}"
        raise InputError(f"tcp sink {self.host}:{self.port}: cannot send ({last})")

    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None:
        if result.payload is not None:
            self.send(result.payload)

    def close(self) -> dict[str, Any]:
        """Shut the sending side down, wait for the receiver to close (``delivered``), or reset."""
        sock, self._sock = self._sock, None
        if sock is not None:
            clean = False
            try:
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + self.timeout
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv(4096):
                        clean = True
                        break
            except OSError as exc:
                self.stats["last_error"] = f"closing: {type(exc).__name__}: {exc}"
            if clean:
                sock.close()
                self.stats["delivered"] += self._on_connection
                self._on_connection = 0
            else:
                self.stats["last_error"] = self.stats["last_error"] or f"the receiver did not confirm within {self.timeout:g} s"
                self._sock = sock
                self._abandon()
        self.stats["frames"] = self.stats["delivered"]
        self.stats["undelivered"] = self.stats["unsent"] + self.stats["unconfirmed"]
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


def _session_name(peer: Any) -> str:
    """A file-name-safe id of one sender connection: UTC time, sender host and port."""
    host, port = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else (str(peer), 0)
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{re.sub(r'[^A-Za-z0-9.]+', '_', str(host))}-{port}"


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
    masks: bool = True,
    max_payload: int = MAX_PAYLOAD,
    max_connections: int = MAX_CONNECTIONS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pixels_per_byte: int | None = DEFAULT_MAX_PIXELS_PER_BYTE,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Listen on ``host:port``, decode incoming payloads into ``out``; returns counters.

    Serves up to ``max_connections`` senders at once (one thread each; more wait in the listen
    backlog); returns after ``max_frames``, after ``idle_timeout`` seconds without a connection
    or data, when the first sender disconnects if ``once`` (no other is accepted then), or when
    ``stop`` is set. ``max_pixels``/``max_pixels_per_byte`` go to :func:`keepbits.codec.decode`.
    ``ready`` (if given) is set once listening, with ``ready.port``. Counters: ``frames``, ``bytes``,
    ``bad_payloads``, ``protocol_errors``, ``write_errors``, ``connections``, ``sessions`` and
    ``renamed`` (frames written under a suffixed name, :class:`PayloadWriter`).
    """
    _positive("idle_timeout", idle_timeout)
    for name, value in (("max_payload", max_payload), ("max_connections", max_connections)):
        if not (isinstance(value, int) and value >= 1):
            raise InputError(f"{name} must be an int >= 1, got {value!r}")
    stop = stop or threading.Event()
    writer = PayloadWriter(out, video=video, fps=fps, images=images, masks=masks, append=True, what="receive --out",
                           max_pixels=max_pixels, max_pixels_per_byte=max_pixels_per_byte)
    stats: dict[str, Any] = {"frames": 0, "bytes": 0, "bad_payloads": 0, "protocol_errors": 0, "write_errors": 0, "connections": 0,
                             "sessions": []}
    try:
        server = socket.create_server((host, port), backlog=max(8, max_connections))
    except OSError as exc:
        writer.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc})") from None
    server.settimeout(0.2)
    if ready is not None:
        ready.port = server.getsockname()[1]  # type: ignore[attr-defined]
        ready.set()
    shared = {"lock": threading.Lock(), "last": time.monotonic(), "max_frames": max_frames}
    halt = threading.Event()  # the serving threads stop: ``stop``, or max_frames reached
    slots = threading.BoundedSemaphore(max_connections)
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket, peer: Any) -> None:
        try:
            with conn:
                conn.settimeout(min(idle_timeout, 1.0))
                _serve(conn, peer, writer, stats, shared, max_payload, idle_timeout, halt)
        except Exception as exc:  # a fault of this receiver, not the sender's: logged and counted, the others served on
            with shared["lock"]:
                stats["protocol_errors"] += 1
            log.warning("%s: connection dropped by an error of the receiver (%s: %s)", peer, type(exc).__name__, exc)
        finally:
            with shared["lock"]:
                shared["last"] = time.monotonic()
            slots.release()

    try:
        with server:
            while True:
                if stop.is_set():
                    halt.set()
                if halt.is_set():
                    break
                if once and threads:  # serve the first sender to its end, accept no other
                    threads[0].join(0.2)
                    if not threads[0].is_alive():
                        break
                    continue
                if not slots.acquire(timeout=0.2):
                    continue  # every slot busy: new senders wait in the backlog
                try:
                    conn, peer = server.accept()
                except socket.timeout:
                    slots.release()
                    with shared["lock"]:
                        idle = time.monotonic() - shared["last"]
                    if idle > idle_timeout and not any(t.is_alive() for t in threads):
                        break
                    continue
                stats["connections"] += 1
                thread = threading.Thread(target=serve, args=(conn, peer), name=f"keepbits-receive-{peer}", daemon=True)
                threads.append(thread)
                thread.start()
    finally:
        if stop.is_set():
            halt.set()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
                if stop.is_set():
                    halt.set()
        writer.close()
    stats["renamed"] = writer.renamed
    return stats


def _serve(conn: socket.socket, peer: Any, writer: PayloadWriter, stats: dict[str, Any], shared: dict[str, Any],
           max_payload: int, idle_timeout: float, halt: threading.Event) -> None:
    def read(n: int) -> bytes | None:
        data = _recv_exact(conn, n, idle_timeout, halt)
        with shared["lock"]:
            shared["last"] = time.monotonic()
        return data

    def count(key: str, n: int = 1) -> None:
        with shared["lock"]:
            stats[key] += n

    session, sender = _session_name(peer), f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    with shared["lock"]:
        stats["sessions"].append(session)
    max_frames = shared["max_frames"]
    try:
        if read(len(PREAMBLE)) != PREAMBLE:
            count("protocol_errors")
            log.warning("%s: not a keepbits stream (bad preamble); closing", sender)
            return
        while not halt.is_set():
            head = read(LENGTH.size)
            if head is None:
                return
            (n,) = LENGTH.unpack(head)
            if n > max_payload:
                count("protocol_errors")
                log.warning("%s: payload of %d bytes exceeds max_payload=%d; closing", sender, n, max_payload)
                return
            payload = read(n)
            if payload is None:
                raise ConnectionError("connection closed mid-frame")
            count("bytes", n)
            try:
                writer.write(payload, prefix=f"{session}-", session=session, sender=sender)
            except DecodeError as exc:
                count("bad_payloads")
                log.warning("%s: bad payload skipped (%s)", sender, exc)
                continue
            except (OSError, InputError) as exc:  # our disk or --video, not the sender: counted apart from connection errors
                count("write_errors")
                log.warning("%s: a received frame could not be written (%s)", sender, exc)
                continue
            with shared["lock"]:
                stats["frames"] += 1
                if max_frames is not None and stats["frames"] >= max_frames:
                    halt.set()
    except OSError as exc:
        count("protocol_errors")
        log.warning("%s: connection error (%s)", sender, exc)
