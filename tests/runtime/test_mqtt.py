"""MQTT sink and receiver against a real Mosquitto broker on a free loopback port (no mock):
round trip, broker restart (both sides reconnect), frozen broker (the sink never blocks the
stream and stays bounded), slow receiver (oldest messages dropped, counted), bad payloads."""
from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

from keepbits.codec import decode, encode
from keepbits.errors import InputError
from keepbits.runtime import open_source
from keepbits.runtime.mqtt import MqttSink, parse_address, receive_mqtt
from keepbits.runtime.receiver import PayloadWriter
from keepbits.runtime.sinks import open_sink
from keepbits.runtime.stream import run_stream

FAST = "reconnect_min=0.1&reconnect_max=0.5&connect_timeout=5"


def _frames(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        f = np.full((24, 32, 3), 40, np.uint8)
        f[4:14, (i % 10) + 2:(i % 10) + 12] = 240
        out.append(f)
    return out


def _payload(sequence: int) -> bytes:
    frame = np.full((16, 16, 3), sequence % 256, np.uint8)
    return encode(frame, np.ones((16, 16)), block=4, sequence=sequence)


def _until(condition, timeout: float = 15.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` s pass (a wait, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _sequences(folder) -> list[int]:
    path = folder / "frames.jsonl"
    return [json.loads(line)["sequence"] for line in path.read_text().splitlines()] if path.exists() else []


class _Receiver:
    """``receive_mqtt`` in a thread; ``stop()`` ends it and returns its counters."""

    def __init__(self, url: str, out, **kwargs):
        self.ready, self.halt, self.box = threading.Event(), threading.Event(), {}
        self.thread = threading.Thread(target=lambda: self.box.update(receive_mqtt(url, out, ready=self.ready, stop=self.halt, **kwargs)))
        self.thread.start()
        assert self.ready.wait(10), "receiver did not subscribe"

    def stop(self) -> dict:
        self.halt.set()
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.box


def test_parse_address_options_and_errors():
    a = parse_address("mqtt://user:p%40ss@host/a/b?qos=2&queue=7&retain=1&client_id=cam1&keepalive=10")
    assert (a.host, a.port, a.topic, a.qos, a.queue, a.retain, a.client_id, a.username, a.password) == \
        ("host", 1883, "a/b", 2, 7, True, "cam1", "user", "p@ss")
    assert "p@ss" not in str(a)
    # MQTT's multi-level wildcard is the topic's, not a URL fragment (it was dropped: "h/" subscribed nothing)
    assert parse_address("mqtt://h/cams/#?qos=0").topic == "cams/#" and parse_address("mqtt://h/cams/#?qos=0").qos == 0
    with pytest.raises(InputError, match="wildcards"):
        MqttSink("mqtt://127.0.0.1:1/cams/+")
    for bad in ("cams/#/x", "cams/a#", "ca+ms"):  # a paho thread's traceback, then "cannot reach the broker"
        with pytest.raises(InputError, match="not a valid MQTT topic filter"):
            receive_mqtt(f"mqtt://127.0.0.1:1/{bad}", "unused")
    for bad, message in (("a" * 70000, "at most 65,535 bytes"), ("a%00b", "no NUL"), ("a%FFb", "not UTF-8")):
        with pytest.raises(InputError, match=message):
            parse_address(f"mqtt://h/{bad}")
    for bad, message in [("tcp://h/t", "mqtt://"), ("mqtt://h", "topic"), ("mqtt://h/t?qos=3", "qos"),
                         ("mqtt://h/t?speed=1", "unknown option"), ("mqtt://h/t?queue=x", "valid"), ("mqtt://h:99999/t", "port"),
                         ("mqtt://h/t?reconnect_min=2&reconnect_max=1", "reconnect_max"),
                         # NaN passed the "<= 0" check; inf is no timeout either
                         ("mqtt://h/t?connect_timeout=nan", "positive and finite"), ("mqtt://h/t?flush_timeout=inf", "positive and finite"),
                         ("mqtt://h/t?reconnect_max=nan", "positive and finite"), ("mqtt://h/t?connect_timeout=0", "positive and finite")]:
        with pytest.raises(InputError, match=message):
            parse_address(bad)


def test_sink_refuses_a_broker_that_is_not_there_and_says_why(free_port):
    """A refused connection says so at once (it was reported as "no answer within 5 s" after
    waiting them out)."""
    pytest.importorskip("paho.mqtt")
    started = time.monotonic()
    with pytest.raises(InputError, match="cannot reach the MQTT broker .*[Rr]efused"):
        MqttSink(f"mqtt://127.0.0.1:{free_port}/t?connect_timeout=5")
    assert time.monotonic() - started < 4


def test_stream_to_receiver_through_the_broker(pipe, mosquitto, tmp_path):
    receiver = _Receiver(f"{mosquitto.url}/cams/+/kbit?{FAST}", tmp_path / "rx", idle_timeout=30, video=tmp_path / "rx.mp4")
    frames = _frames(8)
    summary = run_stream(pipe, open_source(frames), [open_sink(f"{mosquitto.url}/cams/1/kbit?qos=1&{FAST}")])
    assert _until(lambda: len(_sequences(tmp_path / "rx")) == 8)
    stats = receiver.stop()
    sink = summary["sinks"][0]
    assert sink["kind"] == "mqtt" and sink["published"] == sink["delivered"] == 8 and sink["dropped"] == 0 and sink["pending_at_close"] == 0
    assert stats["frames"] == 8 and stats["bad_payloads"] == 0 and stats["dropped"] == 0 and stats["connects"] == 1
    records = [json.loads(line) for line in (tmp_path / "rx" / "frames.jsonl").read_text().splitlines()]
    assert {r["topic"] for r in records} == {"cams/1/kbit"} and records[0]["image"] == "cams_1_kbit-0-00000000.png"
    first = cv2.imread(str(tmp_path / "rx" / records[0]["image"]))[:, :, ::-1]
    ref = pipe(frames[0])
    x0, y0, w, h = ref.roi
    assert np.array_equal(first, ref.mixed[y0:y0 + h, x0:x0 + w])
    assert (tmp_path / "rx.mp4").stat().st_size > 0


def test_broker_restart_both_sides_reconnect_and_queued_messages_go_out(mosquitto, tmp_path):
    url = f"{mosquitto.url}/t?qos=1&queue=50&{FAST}"
    receiver = _Receiver(url, tmp_path / "rx", idle_timeout=60)
    sink = MqttSink(url)
    for k in range(5):
        assert sink.send(_payload(k))
    assert _until(lambda: len(_sequences(tmp_path / "rx")) == 5)
    mosquitto.stop()
    assert _until(lambda: sink.stats["disconnects"] == 1)
    for k in range(5, 10):  # QoS 1 while the broker is away: kept for the reconnect
        assert sink.send(_payload(k))
    assert sink.pending() == 5
    mosquitto.start()
    assert _until(lambda: sink.stats["connects"] == 2 and sink.pending() == 0), sink.stats
    k = 100
    while not any(s >= 100 for s in _sequences(tmp_path / "rx")) and k < 400:  # until the receiver has re-subscribed
        sink.send(_payload(k))
        k += 1
        time.sleep(0.05)
    stats, closed = receiver.stop(), sink.close()
    assert any(s >= 100 for s in _sequences(tmp_path / "rx"))
    assert stats["connects"] >= 2 and stats["disconnects"] >= 1 and stats["bad_payloads"] == 0
    assert closed["connects"] == 2 and closed["disconnects"] == 1 and closed["dropped"] == 0 and closed["pending_at_close"] == 0
    assert closed["delivered"] == closed["published"] == 10 + (k - 100)


def test_frozen_broker_never_blocks_the_stream_and_memory_stays_bounded(pipe, mosquitto):
    sink = MqttSink(f"{mosquitto.url}/t?qos=1&queue=6&flush_timeout=0.3&{FAST}")
    mosquitto.pause()
    try:
        accepted = [sink.send(_payload(k)) for k in range(30)]
        assert sum(accepted) == 6 and sink.pending() == 6 and sink.stats["dropped"] == 24
        summary = run_stream(pipe, open_source(_frames(20)), [_Unclosed(sink)])
        assert summary["written"] == 20 and summary["errors"] == 0 and sink.stats["dropped"] == 44 and sink.pending() == 6
    finally:
        mosquitto.resume()
    assert _until(lambda: sink.pending() == 0)  # thawed: the held messages are acknowledged
    assert sink.send(_payload(99))
    closed = sink.close()
    assert closed["delivered"] == closed["published"] == 7 and closed["pending_at_close"] == 0


class _Unclosed:
    """A sink run_stream cannot close, to look at the MQTT sink after the stream."""

    def __init__(self, sink):
        self.sink = sink

    def write(self, frame, result, record):
        self.sink.write(frame, result, record)

    def close(self):
        return {}


def test_receiver_of_a_frozen_broker_ends_after_its_idle_timeout(mosquitto, tmp_path):
    ready = threading.Event()
    mosquitto_url = f"{mosquitto.url}/t?{FAST}"
    box = {}
    thread = threading.Thread(target=lambda: box.update(receive_mqtt(mosquitto_url, tmp_path, idle_timeout=1.0, ready=ready)))
    thread.start()
    assert ready.wait(10)
    mosquitto.pause()
    try:
        thread.join(20)
    finally:
        mosquitto.resume()
    assert not thread.is_alive() and box["frames"] == 0


class _SlowWriter(PayloadWriter):
    def write(self, payload, name=None, **extra):
        time.sleep(0.03)
        return super().write(payload, name, **extra)


def test_slow_receiver_drops_oldest_and_counts(mosquitto, tmp_path):
    url = f"{mosquitto.url}/t?qos=1&queue=4&{FAST}"
    writer = _SlowWriter(tmp_path / "rx", masks=False)
    ready, box = threading.Event(), {}
    thread = threading.Thread(target=lambda: box.update(receive_mqtt(url, tmp_path / "rx", idle_timeout=2.0, writer=writer, ready=ready)))
    thread.start()
    assert ready.wait(10)
    sink = MqttSink(f"{mosquitto.url}/t?qos=1&queue=100&{FAST}")
    for k in range(60):
        assert sink.send(_payload(k))
    closed = sink.close()
    thread.join(30)
    writer.close()
    assert not thread.is_alive() and closed["delivered"] == 60
    assert box["dropped"] > 0 and box["frames"] + box["dropped"] == 60 and box["bad_payloads"] == 0
    sequences = _sequences(tmp_path / "rx")
    assert sequences == sorted(sequences) and sequences[-1] == 59  # the newest frames survive


def test_a_restarted_sender_starts_a_new_session_of_file_names(mosquitto, tmp_path):
    receiver = _Receiver(f"{mosquitto.url}/cams/+?{FAST}", tmp_path / "rx", idle_timeout=30)
    for topic in ("cams/a", "cams/b"):
        sink = MqttSink(f"{mosquitto.url}/{topic}?qos=1&{FAST}")
        for k in (0, 1, 0, 1):  # a sender that restarts after two frames
            sink.send(_payload(k))
        sink.close()
    assert _until(lambda: len(_sequences(tmp_path / "rx")) == 8)
    receiver.stop()
    names = sorted(p.name for p in (tmp_path / "rx").glob("*.png") if not p.stem.endswith("_mask"))
    assert names == [f"cams_{t}-{s}-0000000{k}.png" for t in "ab" for s in (0, 1) for k in (0, 1)]


def test_receiver_counts_bad_and_oversize_payloads(mosquitto, tmp_path):
    receiver = _Receiver(f"{mosquitto.url}/t?{FAST}", tmp_path / "rx", idle_timeout=30, max_payload=2000)
    sink = MqttSink(f"{mosquitto.url}/t?qos=1&{FAST}")
    for data in (b"not a payload", bytes(5000), _payload(1)):
        sink.send(data)
    assert _until(lambda: len(_sequences(tmp_path / "rx")) == 1)
    sink.close()
    stats = receiver.stop()
    assert stats["frames"] == 1 and stats["bad_payloads"] == 1 and stats["oversize"] == 1


def test_receiver_counts_frames_it_cannot_write_and_keeps_going(mosquitto, tmp_path):
    """A topic of 300 characters is cut in the file name (file names end at 255 bytes); a frame
    whose files cannot be written (here: the disk refuses frame 1) is a write error, not the end of
    the receiver, and the next frame is taken."""
    class FullDiskAtFrame1(PayloadWriter):
        def write(self, payload, name=None, **extra):
            if decode(payload)[2].sequence == 1:
                raise OSError(28, "No space left on device")
            return super().write(payload, name, **extra)

    long_topic = "cams/" + "x" * 300
    writer = FullDiskAtFrame1(tmp_path / "rx", masks=False, append=True)
    receiver = _Receiver(f"{mosquitto.url}/cams/+?{FAST}", tmp_path / "rx", idle_timeout=30, writer=writer)
    sink = MqttSink(f"{mosquitto.url}/{long_topic}?qos=1&{FAST}")
    for k in range(3):
        sink.send(_payload(k))
    assert _until(lambda: _sequences(tmp_path / "rx") == [0, 2])
    sink.close()
    stats = receiver.stop()
    writer.close()
    assert stats["frames"] == 2 and stats["write_errors"] == 1
    names = sorted(p.name for p in (tmp_path / "rx").glob("*.png") if not p.stem.endswith("_mask"))
    assert len(names) == 2 and all(len(n) < 255 and n.startswith("cams_xxx") for n in names)


class _FailingOnceWriter(PayloadWriter):
    """A writer whose first frame fails as a video writer that cannot open would (InputError)."""

    def write(self, payload, name=None, **extra):
        if not getattr(self, "failed", False):
            self.failed = True
            raise InputError("video rx.mp4: OpenCV cannot open a writer")
        return super().write(payload, name, **extra)


def test_a_frame_the_writer_cannot_write_is_counted_and_the_receiver_goes_on(mosquitto, tmp_path):
    writer = _FailingOnceWriter(tmp_path / "rx", masks=False, append=True)
    receiver = _Receiver(f"{mosquitto.url}/t?{FAST}", tmp_path / "rx", idle_timeout=30, writer=writer)
    sink = MqttSink(f"{mosquitto.url}/t?qos=1&{FAST}")
    for k in range(3):
        assert sink.send(_payload(k))
    sink.close()
    assert _until(lambda: len(_sequences(tmp_path / "rx")) == 2)
    stats = receiver.stop()
    writer.close()
    assert stats["write_errors"] == 1 and stats["frames"] == 2 and _sequences(tmp_path / "rx") == [1, 2]
