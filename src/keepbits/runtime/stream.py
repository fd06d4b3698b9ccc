"""Run a :class:`Pipeline` over a :class:`Source` into sinks, with bounded queues.

Threads: the source's grabber → ``workers`` model threads (each takes the next batch in
source order, letterboxes it and runs the model) → a bounded queue (policy ``block``,
``queue_size`` batches) → one writer thread (encode, compare sizes, sinks). The writer
encodes batch t while the model runs t+1 (ONNX Runtime, OpenCV and zlib release the GIL):
throughput is set by the slower stage. A batch goes to the writer as soon as it and every
earlier batch are inferred (never held back waiting for input); results reach the writer,
and the sinks, in sequence order. A slow sink fills the queue and back-pressures the model
loop; a live source then drops frames at its input (counted), a file source simply waits:
memory stays bounded either way.

Shutdown: setting ``stop`` (SIGINT/SIGTERM under :func:`handle_signals`) stops taking
new frames; every frame already taken from the source is encoded and written, sinks are
closed (videos finalised, JSONL flushed) and the summary is returned. A second signal
aborts: the frames still queued are dropped, threads are given :data:`ABORT_WAIT_S` and
``KeyboardInterrupt`` is raised.

The summary's ``status`` (one of :data:`STATUSES`) and ``reason`` say whether the frames got
through; ``keepbits run`` exits with the status's code.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.runtime import Pipeline, open_source
    >>> from keepbits.runtime.stream import run_stream
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))
    >>> summary = run_stream(pipe, open_source([np.zeros((16, 16, 3), np.uint8)] * 5))
    >>> summary["frames"], summary["written"]
    (5, 5)
"""
from __future__ import annotations

import collections
import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np

from keepbits.codec import encode, encode_image
from keepbits.runtime.pipeline import Pipeline, Result
from keepbits.runtime.queues import BoundedQueue, QueueClosed
from keepbits.runtime.sinks import Sink
from keepbits.runtime.sources import Frame, Source

log = logging.getLogger(__name__)

#: Latency percentiles are over this many most recent frames (bounded memory on endless streams).
LATENCY_WINDOW = 10_000
COMPARE = ("jpeg", "png", "paper", "lossless")
#: Seconds an aborted run (second signal) waits for its threads before giving up on them.
ABORT_WAIT_S = 2.0
#: A run's ``status``, the first that applies in this order: ``source_failed`` (no frame, or a
#: file source that ended on a read error), ``undelivered`` (a sink reports frames it could not
#: deliver), ``frame_errors`` (frames failed in the model, the encoder or a sink), else ``ok``.
#: ``keepbits run`` maps them to exit codes (``keepbits.cli.run.EXIT_CODES``).
STATUSES = ("ok", "source_failed", "undelivered", "frame_errors")


@contextlib.contextmanager
def handle_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """While active, SIGINT/SIGTERM set ``stop``; a second one (either) raises ``KeyboardInterrupt``.

    Example:
        >>> import threading
        >>> from keepbits.runtime.stream import handle_signals
        >>> with handle_signals(threading.Event()) as stop:
        ...     stop.is_set()
        False
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # the second SIGINT or SIGTERM: abort
            raise KeyboardInterrupt
        log.warning("%s: finishing the frames already accepted (again to abort)", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def reference_sizes(image: np.ndarray, formats: Sequence[str], jpeg_quality: int = 90) -> dict[str, int]:
    """Bytes of ``image`` (RGB) as a whole-frame JPEG (``jpeg_quality``) and/or PNG (the codec's
    default PNG writer), by :func:`keepbits.codec.encode_image`.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.stream import reference_sizes
        >>> sorted(reference_sizes(np.zeros((8, 8, 3), np.uint8), ["jpeg", "png"]))
        ['jpeg_bytes', 'png_bytes']
    """
    return {f"{fmt}_bytes": len(encode_image(image, fmt, jpeg_quality)) for fmt in formats}


#: Distinct failure messages a stream remembers as logged (past them, a new wording is logged each time).
MAX_LOGGED_FAILURES = 1000


class _Stats:
    """Running totals and recent per-stage latencies, shared by the two threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        self.seen: set[str] = set()  # failure messages logged so far
        self.bytes = collections.Counter()
        self.labels: collections.Counter[str] = collections.Counter()
        self.kept = 0.0
        self.masked = 0  # frames with a mask (SimpleBits results have none): the kept-fraction mean is over these
        self.latency: dict[str, collections.deque[float]] = collections.defaultdict(lambda: collections.deque(maxlen=LATENCY_WINDOW))

    def add(self, record: dict[str, Any], timings: dict[str, float]) -> None:
        with self.lock:
            self.written += 1
            self.labels[record["label"]] += 1
            if record["kept_fraction"] is not None:
                self.kept += record["kept_fraction"]
                self.masked += 1
            for key in ("payload_bytes", "jpeg_bytes", "png_bytes", "paper_bytes", "lossless_bytes"):
                if record.get(key) is not None:
                    self.bytes[key] += record[key]
            for stage, ms in timings.items():
                self.latency[stage].append(ms)

    def fail(self, sequence: int, exc: Exception, counted: bool = True) -> None:
        """Count a frame that failed (``counted``: once per frame, whichever of its steps or sinks
        failed) and log the failure; the same failure again (a receiver still down) only at debug
        level, with the number of repeats in the summary's ``errors``."""
        message = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.errors += counted
            self.last_error = f"frame {sequence}: {message}"
            repeated = message in self.seen
            if len(self.seen) < MAX_LOGGED_FAILURES:  # bounded: a stream may run for days, each failure worded its own way
                self.seen.add(message)
        (log.debug if repeated else log.warning)("frame %d: %s%s", sequence, message,
                                                 "" if repeated else " (the same error again is counted, not logged)")

    def latency_summary(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {s: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))}
                    for s, v in self.latency.items() if v}


def _record(frame: Frame, r: Result, compare: Sequence[str], jpeg_quality: int) -> dict[str, Any]:
    references = [c for c in compare if c in ("jpeg", "png")]
    sizes = {}
    if references:
        sizes = reference_sizes(r.image, references, jpeg_quality)
    if "paper" in compare and r.mask is not None:
        sizes["paper_bytes"] = len(encode(r.image, r.frame_record(), mode="paper"))
    if "lossless" in compare:
        sizes["lossless_bytes"] = len(encode(r.image, r.frame_record()) if r.mask is not None
                                      else encode(r.simplified, r.frame_record(), mode="simplified"))
    kept = r.kept_fraction
    return {
        "sequence": r.sequence, "source_index": frame.index, **({} if frame.file is None else {"source_file": frame.file}),
        "timestamp": r.timestamp, "label": r.label,
        "label_index": r.label_index, "score": round(r.score, 5), "kept_fraction": None if kept is None else round(kept, 5),
        "payload_bytes": None if r.payload is None else len(r.payload), **sizes,
        "timings_ms": {k: round(v, 3) for k, v in r.timings.items()},
    }


def _compress_here(pipeline: Pipeline, results: Sequence[Any]) -> list[Exception | None]:
    """Encode ``results`` in the calling model worker; per result the exception it raised or None
    (the writer counts it as that frame's error, as if it had encoded the frame itself)."""
    failures: list[Exception | None] = []
    for r in results:
        try:
            pipeline.compress(r)
            failures.append(None)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the stream
            failures.append(exc)
    return failures


def _writer(queue: BoundedQueue, pipeline: Pipeline, sinks: Sequence[Sink], stats: _Stats,
            compare: Sequence[str], jpeg_quality: int, abort: threading.Event) -> None:
    while not abort.is_set():
        try:
            frames, results, failures = queue.get()
        except QueueClosed:
            return
        for frame, r, failure in zip(frames, results, failures):
            try:
                if failure is not None:
                    raise failure
                if pipeline.compress_enabled and r.payload is None:
                    pipeline.compress(r)
                record = _record(frame, r.checked(), compare, jpeg_quality)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not end the stream
                stats.fail(r.sequence, exc)
                continue
            failed = 0
            for sink in sinks:  # every sink gets the frame, whatever another one does with it
                try:
                    sink.write(frame, r, record)
                except Exception as exc:  # noqa: BLE001 - one failing sink must not end the stream or starve the others
                    stats.fail(r.sequence, exc, counted=not failed)
                    failed += 1
            if failed < len(sinks) or not sinks:  # written: the frame reached a sink at least (or there are none)
                r.timings["total"] = (time.time() - frame.timestamp) * 1e3
                stats.add(record, r.timings)


class _InOrder:
    """Hands batches to the writer's queue in ticket order, whatever order the model workers
    finish them in; a failed batch's ticket is released with ``None`` so later ones still flow."""

    def __init__(self, queue: BoundedQueue):
        self.queue, self.next, self.done, self.lock = queue, 0, {}, threading.Lock()

    def put(self, ticket: int, item: Any) -> None:
        with self.lock:  # held while a full queue blocks: back-pressure for every worker alike
            self.done[ticket] = item
            while self.next in self.done:
                ready = self.done.pop(self.next)
                self.next += 1
                if ready is not None:
                    self.queue.put(ready)


def run_stream(
    pipeline: Pipeline,
    source: Source,
    sinks: Sequence[Sink] = (),
    *,
    max_frames: int | None = None,
    batch_size: int = 1,
    queue_size: int = 8,
    workers: int = 1,
    compare: Sequence[str] = ("jpeg",),
    jpeg_quality: int = 90,
    stop: threading.Event | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval: float = 0.5,
    opencv_threads: int | None = None,
) -> dict[str, Any]:
    """Process ``source`` until it ends, ``max_frames`` or ``stop``; returns the JSON summary.

    ``workers`` model threads each take a batch (in source order), letterbox it and run the
    model; results reach the writer in sequence order. One worker with ONNX Runtime's
    intra-op threads on every core is the low-latency setting; on CPUs, ``workers`` = cores
    with a one-thread session (``Pipeline.from_bundle(..., threads=1)``) gives more frames per
    second (no thread-pool hand-offs inside the small operators), at one frame's latency more.
    With one worker the writer thread encodes frame t while the model runs t+1; with several,
    each worker encodes its own frames right after the model (no third busy thread competing
    for the cores) and the writer only orders them for the sinks.
    ``compare`` lists references whose sizes are recorded per frame for the compression
    ratios: ``jpeg``/``png`` of the whole model-size frame, ``paper`` (x̃ as one PNG; skipped
    for SimpleBits results, which have no mask), ``lossless`` (the blocks payload, or the
    simplified image as PNG, with lossless codecs, when the pipeline's is lossy);
    ``progress(snapshot)`` is called every ``progress_interval`` seconds. ``opencv_threads`` sets
    OpenCV's own thread pool for the run (process-wide, restored on return); None (default)
    leaves it; 1 keeps OpenCV to the calling threads (``bench/runtime_throughput.py`` measures
    both: no consistent difference on 2 cores, ``docs/runtime.md``). Sinks are
    closed before returning. An error in the model stage (after every frame already accepted
    is written) is raised again here.
    """
    unknown = set(compare) - set(COMPARE)
    if unknown:
        raise ValueError(f"compare formats {sorted(unknown)} not in {COMPARE}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if opencv_threads is not None and opencv_threads < 1:
        raise ValueError(f"opencv_threads must be >= 1 or None, got {opencv_threads}")
    stop = stop or threading.Event()
    abort = threading.Event()
    stats = _Stats()
    queue = BoundedQueue(queue_size, "block")
    writer = threading.Thread(target=_writer, args=(queue, pipeline, sinks, stats, compare, jpeg_quality, abort),
                              name="keepbits-writer", daemon=True)
    batch_size = 1 if source.live else max(1, batch_size)
    encode_in_workers = workers > 1 and pipeline.compress_enabled
    limit = max_frames if max_frames is not None else 1 << 62
    in_order = _InOrder(queue)
    take_lock = threading.Lock()
    shared: dict[str, Any] = {"accepted": 0, "tickets": 0, "error": None}

    def take() -> tuple[int, list[Frame], list[int]] | None:
        """Under ``take_lock``: the next batch from the source, its ticket and its sequence numbers
        (both in source order; the batch is fitted outside the lock, workers in parallel)."""
        frames: list[Frame] = []
        while not stop.is_set() and shared["error"] is None and len(frames) < min(batch_size, limit - shared["accepted"]):
            frame = source.get(stop)
            if frame is None:
                break
            frames.append(frame)
        if not frames:
            return None
        shared["accepted"] += len(frames)
        ticket, shared["tickets"] = shared["tickets"], shared["tickets"] + 1
        return ticket, frames, pipeline.reserve_sequences(len(frames))

    def work() -> None:
        try:
            while True:
                with take_lock:
                    taken = take()
                if taken is None:
                    return
                ticket, frames, sequences = taken
                try:
                    prepared = pipeline.prepare([f.image for f in frames], sequences=sequences)
                    results = pipeline.infer(prepared, timestamps=[f.timestamp for f in frames])
                except BaseException:
                    in_order.put(ticket, None)
                    raise
                failures = _compress_here(pipeline, results) if encode_in_workers else [None] * len(results)
                in_order.put(ticket, (frames, results, failures))
        except BaseException as exc:  # noqa: BLE001 - re-raised by run_stream once the accepted frames are written
            with take_lock:
                shared["error"] = shared["error"] or exc

    threads = [threading.Thread(target=work, name=f"keepbits-model-{i}", daemon=True) for i in range(workers)]
    opencv_before = cv2.getNumThreads()
    if opencv_threads is not None:
        cv2.setNumThreads(opencv_threads)
    start = time.perf_counter()
    writer.start()
    try:
        source.start(stop)
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(max(progress_interval, 0.005))
                if progress is not None:
                    progress(_snapshot(stats, source, shared["accepted"], time.perf_counter() - start))
    except BaseException:
        # aborted (a second signal, or an error here): queued frames are dropped, threads get ABORT_WAIT_S
        stop.set()
        abort.set()
        queue.close()
        raise
    finally:
        deadline = time.monotonic() + ABORT_WAIT_S if abort.is_set() else None
        for t in (*threads, writer):
            if t is writer:
                queue.close()
            if t.ident is not None:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        cv2.setNumThreads(opencv_before)
        source.close()
        # a sink still in use by a stuck writer is left alone: the run is being abandoned
        sink_stats = [sink.close() for sink in sinks] if not writer.is_alive() else []
    if shared["error"] is not None:
        raise shared["error"]
    elapsed = time.perf_counter() - start
    summary = _snapshot(stats, source, shared["accepted"], elapsed)
    summary.update(
        interrupted=stop.is_set(), latency_ms=stats.latency_summary(), labels=dict(stats.labels.most_common()),
        sinks=sink_stats, queue={"size": queue_size, "policy": queue.policy, "high_water": queue.high_water},
        workers=workers, opencv_threads=cv2.getNumThreads() if opencv_threads is None else opencv_threads,
        pipeline=pipeline.describe(),
    )
    summary["status"], summary["reason"] = _status(summary, stats.last_error)
    if progress is not None:
        progress(summary)
    return summary


def _status(summary: dict[str, Any], last_error: str | None) -> tuple[str, str | None]:
    """The run's ``status`` (one of :data:`STATUSES`) and the reason when it is not ``ok``."""
    source = summary["source"]
    if summary["frames"] == 0:
        if summary["interrupted"]:  # stopped (a signal) while waiting for a live source
            when, detail = f"stopped after {summary['seconds']:.1f} s before the source gave a frame", source["last_error"]
        else:
            when, detail = "no frame from the source", source["last_error"] or "it was empty"
        return "source_failed", when + (f" ({detail})" if detail else "")
    lost = [s for s in summary["sinks"] if s.get("undelivered")]
    if lost:
        return "undelivered", "; ".join(
            f"{s['kind']} sink {s.get('address') or s.get('path')}: {s['undelivered']} frames not delivered "
            f"({s.get('unsent', 0)} unsent, {s.get('unconfirmed', 0)} unconfirmed; {s.get('last_error')})" for s in lost)
    if summary["errors"]:
        return "frame_errors", f"{summary['errors']} of {summary['frames']} frames failed (last: {last_error})"
    if not source["live"] and source["errors"]:
        return "source_failed", f"the source ended on a read error ({source['last_error']})"
    if source.get("stalled"):
        return "source_failed", f"the source stalled ({source['last_error']})"
    return "ok", None


def _snapshot(stats: _Stats, source: Source, accepted: int, elapsed: float) -> dict[str, Any]:
    with stats.lock:
        written, b, kept, masked, errors = stats.written, dict(stats.bytes), stats.kept, stats.masked, stats.errors
    payload = b.get("payload_bytes", 0)
    snap: dict[str, Any] = {
        "frames": accepted, "written": written, "errors": errors, "seconds": round(elapsed, 3),
        "fps": round(written / elapsed, 3) if elapsed > 0 else 0.0,
        "payload_bytes": payload, "payload_bytes_per_frame": round(payload / written, 1) if written else None,
        "kbit_per_s": round(payload * 8 / 1000 / elapsed, 3) if elapsed > 0 else 0.0,
        "kept_fraction_mean": round(kept / masked, 5) if masked else None,
        "source": source.stats(),
    }
    for key in ("jpeg_bytes", "png_bytes", "paper_bytes", "lossless_bytes"):
        if b.get(key):
            snap[key] = b[key]
            snap[f"ratio_vs_{key.split('_')[0]}"] = round(b[key] / payload, 3) if payload else None
    return snap
