"""A run's status and reason (issue 20, item 4) and the second signal aborting it (item 6)."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from keepbits.runtime import Pipeline, open_source
from keepbits.runtime.stream import handle_signals, run_stream
from keepbits.runtime.synthetic import toy_bundle


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_bundle(toy_bundle(tmp_path_factory.mktemp("b") / "toy", size=16))


def _frames(n: int) -> list[np.ndarray]:
    return [np.full((12, 16, 3), 10 * i, np.uint8) for i in range(n)]


class _Sink:
    def __init__(self, fail: bool = False, delay: float = 0.0, undelivered: int = 0):
        self.fail, self.delay, self.undelivered, self.frames = fail, delay, undelivered, 0

    def write(self, frame, result, record):
        time.sleep(self.delay)
        if self.fail:
            raise OSError("disk on fire")
        self.frames += 1

    def close(self):
        return {"kind": "test", "path": "here", "frames": self.frames, "undelivered": self.undelivered, "last_error": "gone"}


def test_status_and_reason(pipe):
    from keepbits.runtime.stream import STATUSES

    ok = run_stream(pipe, open_source(_frames(3)), [_Sink()])
    assert (ok["status"], ok["reason"]) == ("ok", None)
    failing = run_stream(pipe, open_source(_frames(3)), [_Sink(fail=True)])
    assert failing["status"] == "frame_errors" and failing["written"] == 0
    assert re.fullmatch(r"3 of 3 frames failed \(last: frame \d+: OSError: disk on fire\)", failing["reason"])
    empty = run_stream(pipe, open_source([]), [_Sink()])
    assert empty["status"] == "source_failed" and "no frame" in empty["reason"]
    lost = run_stream(pipe, open_source(_frames(2)), [_Sink(undelivered=2)])
    assert lost["status"] == "undelivered" and "2 frames not delivered" in lost["reason"]

    def broken():
        yield from _frames(2)
        raise OSError("read error at frame 2")

    cut = run_stream(pipe, open_source(broken()), [_Sink()])
    assert cut["status"] == "source_failed" and "read error" in cut["reason"] and cut["written"] == 2
    assert set(STATUSES) == {"ok", "frame_errors", "source_failed", "undelivered"}


def test_a_failing_sink_does_not_starve_the_others_and_is_logged_once(pipe, caplog):
    """A receiver that is down (the first sink) must not cost the local files (the second) their
    frames, and its failure is one warning, not one a frame."""
    dead, files = _Sink(fail=True), _Sink()
    with caplog.at_level("WARNING", logger="keepbits.runtime.stream"):
        summary = run_stream(pipe, open_source(_frames(4)), [dead, files])
    assert files.frames == 4 and summary["written"] == 4
    assert summary["status"] == "frame_errors" and summary["errors"] == 4
    assert sum("disk on fire" in r.getMessage() for r in caplog.records) == 1


def test_a_live_source_that_stalls_is_a_failed_source_not_an_ok_run(pipe):
    """A camera that stops sending (after some frames) ends the stream at its stall timeout: the
    run is ``source_failed`` (exit 3), so a supervisor tells a frozen camera from a finished run."""
    release = threading.Event()

    def camera():
        yield from _frames(2)
        release.wait(10)  # frozen: no frame, no end

    try:
        summary = run_stream(pipe, open_source(camera(), live=True, read_timeout=0.05, stall_timeout=0.3), [_Sink()])
    finally:
        release.set()
    assert summary["written"] >= 1 and summary["source"]["stalled"] == 1  # a live queue keeps the newest frame only
    assert summary["status"] == "source_failed" and "stalled" in summary["reason"]


def test_a_run_stopped_before_the_first_frame_says_so(pipe):
    """Stopped (SIGINT) while a live camera had given nothing yet: still no exit 0 (nothing was
    delivered), but the reason names the stop instead of blaming an empty source."""
    release, stop = threading.Event(), threading.Event()

    def camera():
        release.wait(10)
        yield from ()

    threading.Timer(0.3, stop.set).start()
    try:
        summary = run_stream(pipe, open_source(camera(), live=True, read_timeout=0.05, stall_timeout=30), [_Sink()], stop=stop)
    finally:
        release.set()
    assert summary["status"] == "source_failed" and summary["interrupted"]
    assert summary["reason"].startswith("stopped after") and "before the source gave a frame" in summary["reason"]


def test_second_signal_aborts_the_run(pipe):
    """The first SIGTERM finishes the accepted frames; the second aborts at once (the old code
    ignored a second SIGTERM and went on writing through a slow sink)."""
    def endless():
        frame = _frames(1)[0]
        while True:
            yield frame

    sink = _Sink(delay=0.5)
    stop = threading.Event()
    pid = os.getpid()
    killer = threading.Timer(0.8, lambda: (os.kill(pid, signal.SIGTERM), time.sleep(0.3), os.kill(pid, signal.SIGTERM)))
    start = time.monotonic()
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt), handle_signals(stop):
            run_stream(pipe, open_source(endless()), [sink], queue_size=8, batch_size=1)
    finally:
        killer.join()
    # graceful would have written the 8+ queued frames at 0.5 s each
    assert stop.is_set() and time.monotonic() - start < 4.5 and sink.frames < 8
