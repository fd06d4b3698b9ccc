"""Streams: queue policies, sources that stall/raise/end, corrupt files, sinks, slow
sinks, TCP sender → receiver on loopback, stop flushing every accepted frame."""
from __future__ import annotations

import json
import threading
from unittest import mock
import time

import cv2
import numpy as np
import pytest

from keepbits.codec import decode
from keepbits.errors import InputError
from keepbits.runtime import BoundedQueue, Pipeline, QueueClosed, open_source
from keepbits.runtime.net import PREAMBLE, TcpSink, receive
from keepbits.runtime.sinks import open_sink
from keepbits.runtime.stream import run_stream
from keepbits.runtime.synthetic import toy_bundle


def _frames(n: int, h: int = 24, w: int = 32) -> list[np.ndarray]:
    out = []
    for i in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[4:14, (i % 10) + 2:(i % 10) + 12] = 240
        out.append(f)
    return out


# -- queues ---------------------------------------------------------------------------
def test_queue_policies():
    q = BoundedQueue(2, "block")
    assert q.put(1) and q.put(2)
    assert not q.put(3, timeout=0.05)
    assert q.get() == 1 and q.dropped == 0
    d = BoundedQueue(2, "drop_oldest")
    for i in range(5):
        d.put(i)
    assert (d.get(), d.get(), d.dropped, d.high_water) == (3, 4, 3, 2)
    with pytest.raises(TimeoutError):
        d.get(timeout=0.01)
    d.put(9)
    d.close()
    assert d.get() == 9
    with pytest.raises(QueueClosed):
        d.get()
    with pytest.raises(QueueClosed):
        d.put(1)


# -- sources --------------------------------------------------------------------------
def test_folder_and_video_sources(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = _frames(5)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f[:, :, ::-1])
    (folder / "notes.txt").write_text("ignored")
    (folder / "999.png").write_bytes(b"broken")
    got = [fr.image for fr in open_source(folder)]
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, frames))

    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 24))
    for f in frames:
        writer.write(f[:, :, ::-1])
    writer.release()
    src = open_source(video)
    assert src.fps == pytest.approx(10) and len(list(src)) == 5
    looped = open_source(video, loop=True)
    with looped:
        assert [looped.get().index for _ in range(12)] == list(range(12))


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="bad.mp4"):
        open_source(bad).start()
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "missing.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        open_source(empty)
    with pytest.raises(InputError, match="unsupported source"):
        open_source(3.5)


def test_live_source_that_stalls_raises_and_ends_reconnects():
    """Connection 1 yields 3 frames, stalls past read_timeout, then raises; 2 ends after
    2 frames; 3 and 4 end at once, which exhausts max_reconnects=2 consecutive failures."""
    attempts = []

    def opener():
        attempts.append(len(attempts))
        k = len(attempts)

        def gen():
            if k == 1:
                yield from _frames(3)
                time.sleep(0.35)
                raise OSError("camera unplugged")
            if k == 2:
                yield from _frames(2)

        return gen()

    from keepbits.runtime import Source

    src = Source(opener, name="fake", live=True, read_timeout=0.1, stall_timeout=5, backoff=(0.01, 0.02), max_reconnects=2)
    got = []
    with src:
        while (f := src.get()) is not None:
            got.append(f.index)
            time.sleep(0.02)
    stats = src.stats()
    assert len(attempts) == 4 and stats["reconnects"] == 3 and stats["errors"] == 1
    assert stats["stale"] >= 2 and stats["read"] == 5 and stats["delivered"] + stats["dropped"] == 5
    assert got == sorted(got) and "ended" in stats["last_error"]


def test_live_source_silent_past_stall_timeout_ends():
    def opener():
        def gen():
            yield _frames(1)[0]
            time.sleep(3)
            yield _frames(1)[0]

        return gen()

    src = open_source(opener(), live=True, read_timeout=0.05, stall_timeout=0.3)
    start = time.monotonic()
    assert src.get() is not None and src.get() is None
    assert time.monotonic() - start < 2 and "no frame" in src.stats()["last_error"]
    # the stall timeout is kept when it is no multiple of the read timeout (6 s took 10 s at 5 s reads)
    src = open_source(opener(), live=True, read_timeout=1.0, stall_timeout=0.25)
    start = time.monotonic()
    assert src.get() is not None and src.get() is None
    assert time.monotonic() - start < 0.9 and "no frame for 0.25 s" in src.stats()["last_error"]


def test_iterator_that_raises_ends_cleanly():
    def gen():
        yield from _frames(2)
        raise RuntimeError("decoder exploded")

    src = open_source(gen())
    assert len(list(src)) == 2 and src.stats()["errors"] == 1


# -- stream runner + sinks -------------------------------------------------------------
def test_run_stream_files_and_video_sinks(pipe, tmp_path):
    sinks = [open_sink(f"files:{tmp_path / 'out'}"), open_sink(f"video:{tmp_path / 'a.mp4'}", fps=10)]
    summary = run_stream(pipe, open_source(_frames(12)), sinks, compare=("jpeg", "png"), batch_size=3)
    assert summary["frames"] == summary["written"] == 12 and summary["errors"] == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    payloads = sorted((tmp_path / "out" / "payloads").iterdir())
    assert len(lines) == len(payloads) == 12
    assert sum(r["payload_bytes"] for r in lines) == summary["payload_bytes"]
    assert summary["ratio_vs_jpeg"] > 0 and summary["ratio_vs_png"] > 0
    assert {"model", "encode", "total"} <= set(summary["latency_ms"])
    decode(payloads[0].read_bytes())
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12 and cap.get(cv2.CAP_PROP_FRAME_WIDTH) >= 360
    cap.release()


class _SlowSink:
    def __init__(self, delay: float):
        self.delay, self.frames = delay, 0

    def write(self, frame, result, record):
        time.sleep(self.delay)
        self.frames += 1

    def close(self):
        return {"frames": self.frames}


def test_slow_sink_bounds_memory_live_drops_files_wait(pipe):
    def endless():
        frame = _frames(1)[0]
        while True:
            time.sleep(0.001)
            yield frame

    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    live = run_stream(pipe, open_source(endless(), live=True), [_SlowSink(0.02)], queue_size=3, stop=stop)
    assert live["queue"]["high_water"] <= 3 and live["source"]["dropped"] > 0
    assert live["written"] == live["frames"] and live["interrupted"]
    files = run_stream(pipe, open_source(_frames(20)), [_SlowSink(0.01)], queue_size=2)
    assert files["written"] == 20 and files["source"]["dropped"] == 0 and files["queue"]["high_water"] <= 2


def test_stop_flushes_every_accepted_frame(pipe, tmp_path):
    stop = threading.Event()
    sink = _SlowSink(0.01)
    frames = _frames(400)

    def progress(snap):
        if snap["frames"] >= 30:
            stop.set()

    summary = run_stream(pipe, open_source(frames), [sink], stop=stop, progress=progress, progress_interval=0.0)
    assert summary["interrupted"] and 30 <= summary["frames"] < 400
    assert sink.frames == summary["written"] == summary["frames"]


def test_tcp_sink_to_receiver_on_loopback(pipe, tmp_path):
    ready, box = threading.Event(), {}
    server = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, tmp_path / "rx", once=True, idle_timeout=20,
                                                                ready=ready, video=tmp_path / "rx.mp4")))
    server.start()
    assert ready.wait(10)
    frames = _frames(6)
    summary = run_stream(pipe, open_source(frames), [open_sink(f"tcp:127.0.0.1:{ready.port}")])
    server.join(20)
    assert not server.is_alive()
    assert box["frames"] == 6 and box["bad_payloads"] == 0 and summary["sinks"][0]["frames"] == 6
    images = sorted(p for p in (tmp_path / "rx").glob("*.png") if not p.stem.endswith("_mask"))
    assert len(images) == 6
    first = cv2.imread(str(images[0]))[:, :, ::-1]
    ref = pipe(frames[0])
    x0, y0, w, h = ref.roi
    assert np.array_equal(first, ref.mixed[y0:y0 + h, x0:x0 + w])
    mask = cv2.imread(str(images[0].with_name(images[0].stem + "_mask.png")), cv2.IMREAD_GRAYSCALE)  # as decode writes it
    assert np.array_equal(mask > 0, (ref.mask > ref.threshold)[y0:y0 + h, x0:x0 + w])
    assert (tmp_path / "rx.mp4").stat().st_size > 0


def test_receiver_survives_garbage_and_oversize(tmp_path):
    import socket

    ready, box = threading.Event(), {}
    t = threading.Thread(target=lambda: box.update(receive("127.0.0.1", 0, tmp_path, idle_timeout=1.0, ready=ready, max_payload=1000)))
    t.start()
    assert ready.wait(10)
    with socket.create_connection(("127.0.0.1", ready.port), timeout=5) as s:
        s.sendall(b"HTTP/1.1 GET /\r\n")
    with socket.create_connection(("127.0.0.1", ready.port), timeout=5) as s:
        s.sendall(PREAMBLE + (10).to_bytes(4, "big") + b"0123456789" + (10**6).to_bytes(4, "big"))
    t.join(15)
    assert not t.is_alive()
    assert box["connections"] == 2 and box["bad_payloads"] == 1 and box["protocol_errors"] == 2 and box["frames"] == 0


def test_tcp_sink_without_receiver_fails_clearly():
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = TcpSink("127.0.0.1", port, timeout=0.5, retries=1)
    with pytest.raises(InputError, match="cannot send"):
        sink.send(b"x")
    assert sink.close()["errors"] == 1


class _OrderSink:
    def __init__(self):
        self.sequences, self.threads = [], set()

    def write(self, frame, result, record):
        self.sequences.append(result.sequence)
        self.threads.add(threading.current_thread().name)
        assert decode(result.payload)[2].sequence == result.sequence

    def close(self):
        return {"frames": len(self.sequences)}


def test_encode_worker_overlaps_inference_and_keeps_order(tmp_path):
    """Payloads are encoded in the writer thread while the model loop runs ahead (bounded by the
    queue), and sinks see every frame once, in sequence order, also with batches."""
    for batch in (1, 3):
        pipe = Pipeline.from_bundle(toy_bundle(tmp_path / f"toy{batch}", size=32, block=4))
        infer, compress = pipe.infer, pipe.compress
        predicted, ahead, encoders = [-1], [], set()

        def counting_infer(prepared, **kwargs):
            results = infer(prepared, **kwargs)
            predicted[0] = results[-1].sequence
            return results

        def slow_compress(result):
            encoders.add(threading.current_thread().name)
            time.sleep(0.005)
            ahead.append(predicted[0] - result.sequence)  # frames the model loop is ahead of the encoder
            return compress(result)

        pipe.infer, pipe.compress = counting_infer, slow_compress
        sink = _OrderSink()
        summary = run_stream(pipe, open_source(_frames(40)), [sink], batch_size=batch, queue_size=4)
        assert summary["written"] == 40 and sink.sequences == list(range(40))
        assert sink.threads == {"keepbits-writer"} and encoders == {"keepbits-writer"}
        # ran ahead; at most the queued batches, the one being written and the one waiting to be queued
        # (+1 batch: the one inferred but not yet queued while the next is letterboxed)
        assert 1 <= max(ahead) <= (4 + 3) * batch - 1, (batch, max(ahead))


def test_live_source_results_are_not_held_back_waiting_for_the_next_frame(pipe):
    """With no next frame waiting, batch t goes to the writer at once (no added latency)."""
    written = threading.Event()

    class _Sink:
        def write(self, frame, result, record):
            written.set()

        def close(self):
            return {}

    def slow():
        yield _frames(1)[0]
        assert written.wait(5.0), "frame 0 was not written before frame 1 arrived"
        yield _frames(2)[1]

    summary = run_stream(pipe, open_source(slow(), live=True), [_Sink()], max_frames=2)
    assert summary["written"] == 2


def test_workers_finish_out_of_order_sinks_see_sequence_order(tmp_path):
    """Several model threads: batches that finish early wait for earlier ones; every frame
    reaches the sinks once, in sequence order, with the sequence its source position gave it."""
    pipe = Pipeline.from_bundle(toy_bundle(tmp_path / "toy", size=32, block=4), threads=1)
    infer, delays = pipe.infer, iter(np.random.default_rng(0).uniform(0, 0.01, 1000))
    finished = []

    def jittery_infer(prepared, **kwargs):
        time.sleep(next(delays))
        results = infer(prepared, **kwargs)
        finished.append(results[0].sequence)
        return results

    pipe.infer = jittery_infer
    frames, pairs = _frames(60), []

    class _PairSink(_OrderSink):
        def write(self, frame, result, record):
            super().write(frame, result, record)
            pairs.append((frame.index, result.sequence, result.image.copy()))

    sink = _PairSink()
    summary = run_stream(pipe, open_source(frames), [sink], workers=3, batch_size=2)
    assert summary["written"] == 60 and summary["workers"] == 3
    assert sink.sequences == list(range(60))
    assert finished != sorted(finished)  # the workers did overtake each other
    for index, sequence, image in pairs:  # each result belongs to the frame at its source position
        assert index == sequence
        assert np.array_equal(image, pipe.prepare([frames[index]]).batch[0])


def test_worker_error_is_raised_after_the_accepted_frames_are_written(tmp_path):
    pipe = Pipeline.from_bundle(toy_bundle(tmp_path / "toy", size=32, block=4), threads=1)
    infer = pipe.infer

    def failing_infer(prepared, **kwargs):
        if prepared.sequences[0] == 10:
            raise RuntimeError("model failed on frame 10")
        return infer(prepared, **kwargs)

    pipe.infer = failing_infer
    sink = _OrderSink()
    with pytest.raises(RuntimeError, match="frame 10"):
        run_stream(pipe, open_source(_frames(40)), [sink], workers=2)
    assert sink.sequences[:10] == list(range(10)) and 10 not in sink.sequences


def test_several_workers_encode_their_own_frames_same_payloads_and_a_failure_is_one_frame_error(tmp_path):
    """With several workers the payloads are made in the model threads (the writer only orders
    them): the same bytes, in the same order, as one worker whose writer encodes; an encode that
    fails is that frame's error, counted, and the stream goes on."""
    bundle = toy_bundle(tmp_path / "toy", size=32, block=4)
    frames = _frames(24)
    threads: dict[str, set[str]] = {"one": set(), "two": set()}

    def recording(pipe, run, fail_at=None):
        compress = pipe.compress

        def compress_and_record(result):
            threads[run].add(threading.current_thread().name)
            if result.sequence == fail_at:
                raise ValueError(f"encoder failed on frame {fail_at}")
            return compress(result)

        pipe.compress = compress_and_record
        return pipe

    class _PayloadSink:
        def __init__(self):
            self.payloads = []

        def write(self, frame, result, record):
            self.payloads.append((result.sequence, result.payload))

        def close(self):
            return {}

    one, two = _PayloadSink(), _PayloadSink()
    # the toy model is deterministic, so only the timestamp in each payload's header could differ
    with mock.patch("keepbits.codec.payload.time.time", return_value=1.0):
        run_stream(recording(Pipeline.from_bundle(bundle, threads=1), "one"), open_source(frames), [one], workers=1)
        summary = run_stream(recording(Pipeline.from_bundle(bundle, threads=1), "two", fail_at=7), open_source(frames), [two], workers=2)
    assert threads == {"one": {"keepbits-writer"}, "two": {"keepbits-model-0", "keepbits-model-1"}}
    assert summary["written"] == 23 and summary["errors"] == 1 and "encoder failed on frame 7" in summary["reason"]
    assert [seq for seq, _ in two.payloads] == [i for i in range(24) if i != 7]
    assert [pl for _, pl in two.payloads] == [pl for seq, pl in one.payloads if seq != 7]


def test_opencv_thread_pool_is_set_for_the_run_and_restored(pipe):
    """Model workers and the writer see OpenCV's pool at ``opencv_threads``; the caller's
    setting comes back afterwards, also when the model stage fails; None (default) leaves it."""
    before = cv2.getNumThreads()
    seen = []

    class _Sink:
        def write(self, frame, result, record):
            seen.append(cv2.getNumThreads())

        def close(self):
            return {}

    cv2.setNumThreads(3)
    try:
        summary = run_stream(pipe, open_source(_frames(4)), [_Sink()], workers=2, opencv_threads=1)
        assert seen == [1] * 4 and summary["opencv_threads"] == 1 and cv2.getNumThreads() == 3
        seen.clear()
        assert run_stream(pipe, open_source(_frames(2)), [_Sink()])["opencv_threads"] == 3  # default: left alone
        assert seen == [3, 3]
        infer = pipe.infer
        pipe.infer = lambda prepared, **kwargs: (_ for _ in ()).throw(RuntimeError("model failed"))
        try:
            with pytest.raises(RuntimeError, match="model failed"):
                run_stream(pipe, open_source(_frames(2)), [], opencv_threads=2)
        finally:
            pipe.infer = infer
        assert cv2.getNumThreads() == 3
        with pytest.raises(ValueError, match="opencv_threads"):
            run_stream(pipe, open_source(_frames(1)), [], opencv_threads=0)
    finally:
        cv2.setNumThreads(before)


def test_workers_fit_their_frames_in_parallel(tmp_path):
    """Only taking a frame from the source is serialised: two workers are inside ``prepare`` (the
    letterbox) at the same time, each with the sequence number of its frame's source position."""
    pipe = Pipeline.from_bundle(toy_bundle(tmp_path / "toy", size=32, block=4), threads=1)
    prepare, both_inside = pipe.prepare, threading.Barrier(2, timeout=20)

    def meeting_prepare(frames, **kwargs):
        if kwargs["sequences"][0] < 2:
            both_inside.wait()  # broken (an error for both frames) if the other worker cannot get here meanwhile
        return prepare(frames, **kwargs)

    pipe.prepare = meeting_prepare
    sink = _OrderSink()
    summary = run_stream(pipe, open_source(_frames(6)), [sink], workers=2)
    assert summary["written"] == 6 and summary["errors"] == 0
    assert sink.sequences == list(range(6))


def test_a_repeated_failure_is_logged_once_even_when_the_stall_rewrites_last_error(caplog):
    """Under load the stall check (another thread) rewrote last_error between two failed opens, and
    the same refused connection was logged again; after frames came back a failure is news again."""
    import logging

    from keepbits.runtime import Source

    attempts, rewritten = [], threading.Event()

    def opener():
        attempts.append(len(attempts))
        if len(attempts) == 4:
            return iter(_frames(1))  # the camera is back for one frame
        if len(attempts) == 2:
            src.last_error = "no frame for 1 s; last error: ..."  # as the stall check writes it
            rewritten.set()
        raise OSError("connection refused")

    src = Source(opener, name="fake", live=True, read_timeout=0.05, stall_timeout=5, backoff=(0.01, 0.01), max_reconnects=5)
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        with src:
            while src.get() is not None:
                pass
    retrying = [r.getMessage() for r in caplog.records if r.getMessage().endswith("; retrying")]
    assert rewritten.is_set() and len(attempts) == 9  # 3 refused, 1 with a frame, 5 refused (max_reconnects after it)
    assert retrying == ["source fake: OSError: connection refused; retrying"] * 2  # once before the frame, once after
