"""TCP sink to slow and stalled receivers, and a receiver with several senders (issue 20,
items 9 and 13). Real sockets on loopback, small kernel buffers so that back-pressure shows."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from keepbits.codec import encode
from keepbits.errors import InputError
from keepbits.runtime.net import PREAMBLE, TcpSink, receive

SMALL_BUFFER = 4096


@pytest.fixture
def small_send_buffers(monkeypatch):
    """The sink's sockets get a 4 KiB send buffer (fixed before connecting: no autotuning)."""
    real = socket.create_connection

    def create_connection(address, timeout=None, *args, **kwargs):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield real


class _Server:
    """A listener with a 4 KiB receive buffer; ``handler(conn)`` serves the first connection."""

    def __init__(self, handler):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler):
        conn, _ = self.sock.accept()
        with conn:
            handler(conn, self.result)

    def close(self):
        self.thread.join(10)
        self.sock.close()


def _slow_reader(conn, result):
    """Reads 4 KiB every 20 ms (about 200 kB/s) until the sender closes, then closes."""
    got = 0
    while chunk := conn.recv(4096):
        got += len(chunk)
        time.sleep(0.02)
    result["bytes"] = got


def test_slow_reader_is_waited_for_not_abandoned(small_send_buffers):
    """Each 128 KiB payload takes ~0.6 s to drain, longer than the sink's 0.3 s timeout. The
    old sink gave up after 0.3 s per payload, reconnected and counted frames as sent that the
    receiver never read; a receiver that keeps reading is now waited for."""
    server = _Server(_slow_reader)
    sink = TcpSink("127.0.0.1", server.port, timeout=0.3, retries=2)
    payloads = [bytes([i]) * (128 << 10) for i in range(2)]
    for p in payloads:
        sink.send(p)
    stats = sink.close()
    server.close()
    assert stats["reconnects"] == 0 and stats["errors"] == 0
    assert stats["sent"] == stats["delivered"] == stats["frames"] == 2 and stats["undelivered"] == 0
    assert server.result["bytes"] == len(PREAMBLE) + sum(4 + len(p) for p in payloads)


def _stalled_reader(conn, result):
    """Never reads; waits for the sender to give up, then reads what is left: a reset or EOF."""
    time.sleep(1.5)
    try:
        while conn.recv(65536):
            pass
        result["end"] = "eof"
    except ConnectionResetError:
        result["end"] = "reset"


def test_stalled_reader_gets_reset_and_nothing_counts_as_delivered(small_send_buffers):
    server = _Server(_stalled_reader)
    sink = TcpSink("127.0.0.1", server.port, timeout=0.2, retries=1)
    for i in range(3):
        with pytest.raises(InputError, match="cannot send"):
            sink.send(bytes([i]) * (64 << 10))
    stats = sink.close()
    server.close()
    assert stats["delivered"] == stats["frames"] == 0 and stats["unsent"] == 3 and stats["undelivered"] == 3
    assert stats["errors"] == 3 and "timed out" in stats["last_error"]
    # the abandoned connection was reset, not closed with 100s of kB left queued (FIN-WAIT-1)
    assert server.result["end"] == "reset"


def test_close_without_confirmation_counts_unconfirmed(small_send_buffers):
    """A peer that reads everything but never closes: the sink cannot know the frames arrived."""
    done = threading.Event()

    def reader_that_never_closes(conn, result):
        while len(conn.recv(65536)):
            pass
        done.wait(5)

    server = _Server(reader_that_never_closes)
    sink = TcpSink("127.0.0.1", server.port, timeout=0.3)
    sink.send(b"x" * 100)
    stats = sink.close()
    done.set()
    server.close()
    assert stats["sent"] == 1 and stats["delivered"] == 0 and stats["unconfirmed"] == 1 and stats["undelivered"] == 1


def _send_raw(port: int, payloads: list[bytes], timeout: float = 3.0) -> bool:
    """Send ``payloads`` on one connection, shut it down; True if the receiver closed within ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(PREAMBLE + b"".join(len(p).to_bytes(4, "big") + p for p in payloads))
        sock.shutdown(socket.SHUT_WR)
        try:
            return sock.recv(1) == b""
        except socket.timeout:
            return False


def _payload(sequence: int) -> bytes:
    frame = np.full((16, 16, 3), 40 * sequence, np.uint8)
    return encode(frame, np.ones((16, 16)), block=4, sequence=sequence)


def test_receiver_serves_senders_concurrently_and_names_files_per_session(tmp_path):
    """One sender trickling bytes held the old receiver while another waited; two senders (or a
    restarted one) with the same sequence numbers overwrote each other's PNGs."""
    ready, stop, box = threading.Event(), threading.Event(), {}
    rx = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, tmp_path / "rx", idle_timeout=10, ready=ready,
                                                            stop=stop)))
    rx.start()
    assert ready.wait(10)
    trickler = socket.create_connection(("127.0.0.1", ready.port), timeout=5)
    trickler.sendall(PREAMBLE[:1])  # and nothing more for now
    jsonl = tmp_path / "rx" / "frames.jsonl"
    try:
        for _ in range(2):  # a sender, then the same sender restarted: sequences 0 and 1 twice
            assert _send_raw(ready.port, [_payload(0), _payload(1)]), "the receiver did not serve this sender"
        lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
        assert len(lines) == 4, "frames of the second sender waited for the trickling one"
    finally:
        trickler.close()
        stop.set()
        rx.join(10)
    assert not rx.is_alive()
    assert box["frames"] == 4 and box["connections"] == 3 and len(set(box["sessions"])) == 3
    pngs = sorted(p for p in (tmp_path / "rx").glob("*.png") if not p.stem.endswith("_mask"))  # and a mask PNG beside each
    assert len(pngs) == 4 and len({line["session"] for line in lines}) == 2
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"00000000.png", "00000001.png"}


def test_receiver_appends_and_refuses_bad_limits(tmp_path):
    (tmp_path / "rx").mkdir()
    (tmp_path / "rx" / "frames.jsonl").write_text('{"earlier": true}\n')
    with pytest.raises(InputError, match="idle_timeout"):
        receive("127.0.0.1", 0, tmp_path / "rx", idle_timeout=0)
    with pytest.raises(InputError, match="max_connections"):
        receive("127.0.0.1", 0, tmp_path / "rx", max_connections=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        receive("127.0.0.1", 0, tmp_path / "file", idle_timeout=0.2)
    ready, box = threading.Event(), {}
    rx = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, tmp_path / "rx", once=True, ready=ready, idle_timeout=5)))
    rx.start()
    assert ready.wait(10)
    sink = TcpSink("127.0.0.1", ready.port)
    sink.send(_payload(0))
    sink.close()
    rx.join(10)
    assert (tmp_path / "rx" / "frames.jsonl").read_text().splitlines()[0] == '{"earlier": true}'


def _receive_once(tmp_path, **kwargs) -> tuple[threading.Thread, threading.Event, dict]:
    ready, box = threading.Event(), {}
    rx = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, tmp_path / "rx", once=True, ready=ready, idle_timeout=10,
                                                            **kwargs)))
    rx.start()
    assert ready.wait(10)
    return rx, ready, box


def test_a_repeated_sequence_number_is_written_beside_the_first(tmp_path):
    """Frames are named <session>-<sequence>: a sender repeating a sequence number replaced its
    first frame's PNG while both were counted."""
    rx, ready, box = _receive_once(tmp_path)
    assert _send_raw(ready.port, [_payload(3), _payload(3)])
    rx.join(10)
    assert box["frames"] == 2 and box["renamed"] == 1
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "rx").glob("*.png")) == [
        "00000003.png", "00000003_mask.png", "00000003~1.png", "00000003~1_mask.png"]


def test_an_error_of_the_receiver_is_counted_not_a_dead_thread(tmp_path, monkeypatch):
    """receive --fps nan raised InputError in the serving thread at the first frame: 'Exception in
    thread' and a traceback, the frame lost and not counted. The frame rate is now checked before
    listening; an error while writing counts as a write error, any other drops that connection only."""
    import keepbits.runtime.receiver as receiver

    with pytest.raises(InputError, match="must be a number > 0"):
        receive("127.0.0.1", 0, tmp_path / "rx", video=tmp_path / "rx.mp4", fps=float("nan"), idle_timeout=1)
    died = []
    monkeypatch.setattr(threading, "excepthook", died.append)

    def no_writer(*args, **kwargs):
        raise InputError("cannot write video (no codec)")

    monkeypatch.setattr(receiver, "open_video_writer", no_writer)
    rx, ready, box = _receive_once(tmp_path, video=tmp_path / "rx.mp4")
    assert _send_raw(ready.port, [_payload(0), _payload(1)])
    rx.join(10)
    assert box["frames"] == 0 and box["write_errors"] == 2 and box["protocol_errors"] == 0

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(receiver.PayloadWriter, "write", broken)
    rx, ready, box = _receive_once(tmp_path)
    assert _send_raw(ready.port, [_payload(0)])
    rx.join(10)
    assert box["frames"] == 0 and box["protocol_errors"] == 1 and not died
