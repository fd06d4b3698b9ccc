"""``keepbits run``: a model bundle on a stream: predict, explain, compress, send.

NICE bundles send the mask and x̃ (``--mode blocks``, ``mixed`` or ``paper``); SimpleBits bundles
(``explain: "simplify"``) send the simplified image (``--mode simplified``, the default for them).

Example:
    keepbits run --model bundle.zip --source video.mp4 --sink files:out --sink video:out.mp4 --max-frames 100
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from keepbits.cli._common import add_threads_option, number
from keepbits.codec.payload import BACKGROUNDS
from keepbits.errors import InputError

log = logging.getLogger("keepbits.cli.run")
HELP = "run a model bundle on a video/camera/URL/folder: predict, explain, compress, send payloads"


#: Exit codes of ``keepbits run``: the summary's ``status`` (``keepbits.runtime.stream.STATUSES``) ->
#: (code, meaning); 2 (bad input, before the run) and 130 (aborted) come from ``keepbits.cli.main``.
EXIT_CODES = {
    "ok": (0, "every frame taken from the source was written to every sink"),
    "source_failed": (3, "the source gave no frame (never opened, stalled, nothing decodable) or, a file source, "
                         "ended on a read error"),
    "frame_errors": (4, "frames failed in the model, the encoder or a sink (the summary's errors)"),
    "undelivered": (5, "a sink could not deliver frames it was given (TCP: unsent, or sent on a connection the "
                       "receiver never confirmed; MQTT: dropped, lost at a disconnect, or never acknowledged by the broker)"),
}
EXIT_HELP = ("exit codes (the JSON summary's status and reason say the same): "
             + "; ".join(f"{code} {status}: {meaning}" for status, (code, meaning) in EXIT_CODES.items())
             + "; 2: bad input before the run (one line on stderr naming the problem); "
             "130: aborted by a second SIGINT/SIGTERM.")


def add_codec_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Codec options shared by ``run`` and ``demo``; ``defaults`` (the demo's) replace the run defaults
    in the help (the command applies them)."""
    shown = {"mode": "blocks for NICE bundles, simplified for SimpleBits bundles", "codec": "png", "background": "auto",
             "quality": 90, **(defaults or {})}
    parser.add_argument("--mode", choices=["blocks", "mixed", "paper", "simplified"], default=None,
                        help="blocks: background means + mask + kept blocks; mixed: x̃ as one --codec image + mask (with "
                             "jpeg/webp smaller and closer than blocks); paper: x̃ as one PNG (NICE protocol); simplified "
                             f"(SimpleBits bundles only): the simplified image (default: {shown['mode']})")
    parser.add_argument("--codec", choices=["png", "jpeg", "webp"], default="png",
                        help=f"kept blocks, x̃ (mixed mode) or the simplified image (png = lossless) (default: {shown['codec']})")
    parser.add_argument("--background", choices=BACKGROUNDS, default="auto",
                        help="block means in blocks mode (lossless: raw, png, or auto = png for grids of >= 256 blocks, "
                             f"raw below) (default: {shown['background']})")
    parser.add_argument("--quality", type=number(int, minimum=1, maximum=100), default=90,
                        help=f"jpeg/webp quality 1..100 (default: {shown['quality']})")
    parser.add_argument("--webp-method", type=int, choices=range(7), default=None, metavar="0..6",
                        help="libwebp effort: 0-2 encode faster for a few %% more bytes, 5-6 the reverse "
                             "(default: OpenCV's encoder, method 4)")
    add_backend_arguments(parser)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """ONNX Runtime options shared by the commands that run a bundle."""
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto",
                        help="ONNX Runtime providers: auto (CUDA when available, else CPU), onnxruntime (CPU) or tensorrt")
    add_threads_option(parser, "onnxruntime")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_HELP
    parser.add_argument("--model", required=True, help="model bundle folder or .zip (keepbits export onnx)")
    parser.add_argument("--expect-digest", metavar="SHA256", default=None,
                        help="refuse the bundle unless the sha256 of its manifest.json is this (pins one bundle)")
    parser.add_argument("--source", required=True,
                        help="video file, image folder, camera index (0) or device (/dev/video0), rtsp/http URL, or a GStreamer "
                             "pipeline ('... ! appsink', needs OpenCV with GStreamer)")
    parser.add_argument("--sink", action="append", default=[], metavar="KIND:ARG",
                        help="files:DIR, video:OUT.mp4, tcp:HOST:PORT or mqtt://HOST:PORT/TOPIC[?qos=1&queue=100...] "
                             "(repeatable; MQTT options: docs/runtime.md)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: the whole source)")
    parser.add_argument("--loop", action="store_true", help="loop a video file or an image folder (from its first frame again after the last)")
    parser.add_argument("--frame-step", type=int, default=1, help="keep every k-th frame of the source (frames 0, k, 2k, …)")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per model call (file sources)")
    parser.add_argument("--queue-size", type=int, default=8, help="bounded queue between model and writer")
    parser.add_argument("--workers", type=int, default=1,
                        help="model threads; on CPUs --workers N --threads 1 (N = cores) gives the most frames/s, "
                             "1 worker with all cores the lowest latency")
    parser.add_argument("--read-timeout", type=float, default=5.0,
                        help="seconds before a read counts as stale (> 0); also FFmpeg's open and read timeout of cameras and URLs")
    parser.add_argument("--rtsp-transport", choices=["tcp", "udp"], default=None,
                        help="RTSP transport of rtsp:// sources (default: FFmpeg's, UDP then TCP)")
    parser.add_argument("--stall-timeout", type=float, default=30.0,
                        help="seconds without a frame (or for a file to open) before the stream ends (> 0)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest source frame in pixels (images are checked before decoding; default 2**25)")
    parser.add_argument("--compare", nargs="*", choices=["jpeg", "png", "paper", "lossless"], default=None,
                        help="references to compare payload bytes with: JPEG q90 / PNG of the same frame, "
                             "paper mode (x̃ as one PNG), the lossless blocks payload; give no value for none "
                             "(default: the whole frame in the payload's kind: png for a lossless payload, jpeg for a lossy one)")
    parser.add_argument("--summary", type=Path, help="also write the JSON summary here")
    add_codec_arguments(parser)


def codec_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"codec": args.codec, "background": args.background, "quality": args.quality}
    if args.webp_method is not None:
        options["webp_method"] = args.webp_method
    return options if args.mode is None else {"mode": args.mode, **options}


def default_references(options: dict[str, Any]) -> list[str]:
    """``--compare``'s default for a pipeline's ``codec_options``: the whole frame coded the
    payload's way, lossless (PNG) against a lossless payload, lossy (JPEG q90) against a lossy one
    (:func:`keepbits.codec.payload.is_lossless`)."""
    from keepbits.codec.payload import is_lossless

    lossless = is_lossless(options.get("mode", "blocks"), options.get("codec", "png"), options.get("background", "auto"))
    return ["png" if lossless else "jpeg"]


#: How the progress line names each reference of ``--compare``.
REFERENCE_NAMES = {"jpeg": "JPEG q90", "png": "PNG", "paper": "paper-mode PNG", "lossless": "the lossless payload"}


class ProgressLine:
    """One refreshing status line on stderr (a plain line every 5 s when not a terminal)."""

    def __init__(self, quiet: bool = False, references: list[str] | None = None):
        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.reference = (references or [None])[0]
        self._last = 0.0

    def __call__(self, snap: dict[str, Any]) -> None:
        if self.quiet:
            return
        final = "latency_ms" in snap
        now = time.monotonic()
        if not (self.tty or final or now - self._last >= 5.0):
            return
        self._last = now
        src = snap["source"]
        ratio = snap.get(f"ratio_vs_{self.reference}") if self.reference else None
        line = (f"{snap['written']} frames  {snap['fps']:.1f} fps  {snap['kbit_per_s']:.1f} kbit/s"
                + (f"  {compared(ratio, REFERENCE_NAMES[self.reference])}" if ratio else "")
                + f"  dropped {src['dropped']}  stale {src['stale']}  errors {snap['errors'] + src['errors']}")
        print(("\r" if self.tty else "") + line + ("\n" if final or not self.tty else ""), end="", file=sys.stderr, flush=True)


def compared(ratio: float, reference: str) -> str:
    """``ratio`` (reference bytes over payload bytes) in words, e.g. ``2.5x smaller than PNG``."""
    return f"{ratio:.1f}x smaller than {reference}" if ratio >= 1 else f"{1 / ratio:.1f}x larger than {reference}"


def _check_sinks(specs: list[str], source: str) -> None:
    """Refuse, before any work, a sink given twice, a ``video:`` sink at the ``--source`` or where a
    file already is: a run never overwrites a video (:func:`keepbits.runtime.video.new_video_path`);
    an ``mqtt://`` sink whose address is malformed or whose client (paho-mqtt) is not installed."""
    from keepbits.runtime.mqtt import require_client, sink_address
    from keepbits.runtime.video import new_video_path

    places = [(spec.partition(":")[0], str(Path(spec.partition(":")[2]).resolve()) if spec.startswith(("files:", "video:")) else spec)
              for spec in specs]
    twice = next((spec for spec, place in zip(specs, places) if places.count(place) > 1), None)
    if twice is not None:
        raise InputError(f"sink {twice} is given twice: two sinks would write the same place")
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "mqtt":
            sink_address(spec)
            require_client()
        if kind != "video" or not arg:
            continue
        if Path(arg).is_file() and Path(source).is_file() and Path(arg).samefile(source):
            raise InputError(f"sink {spec} is the --source: a run never writes over what it reads")
        new_video_path(arg, f"sink {spec}:")


def run(args: argparse.Namespace) -> int:
    from keepbits._fs import writable_file, write_text_atomic
    from keepbits.cli._common import existing_path
    from keepbits.runtime import Pipeline, open_source
    from keepbits.runtime.sinks import open_sink
    from keepbits.runtime.stream import handle_signals, run_stream

    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.batch_size < 1 or args.queue_size < 1 or args.workers < 1:
        raise InputError("--batch-size, --queue-size and --workers must be >= 1")
    if args.expect_digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.expect_digest):
        raise InputError(f"--expect-digest must be 64 hex digits (a sha256), got {args.expect_digest!r}")
    if args.summary:
        writable_file(args.summary, "--summary")
    _check_sinks(args.sink, args.source)
    source_options = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    with Pipeline.from_bundle(existing_path(args.model, "model bundle"), backend=args.backend, threads=args.threads,
                              expected_digest=args.expect_digest, **codec_options(args)) as pipeline, \
            handle_signals(threading.Event()) as stop:
        if not args.sink:
            log.warning("no --sink: payloads are encoded and measured, then discarded (keep them with --sink files:DIR, "
                        "video:OUT.mp4, tcp:HOST:PORT or mqtt://HOST/TOPIC)")
        references = default_references(pipeline.codec_options) if args.compare is None else args.compare
        source = open_source(args.source, loop=args.loop, read_timeout=args.read_timeout, stall_timeout=args.stall_timeout,
                             rtsp_transport=args.rtsp_transport, frame_step=args.frame_step, **source_options)
        try:
            source.start(stop)  # a file source opens here (its errors are bad input); its fps is then known
            sinks = [open_sink(spec, fps=source.fps) for spec in args.sink]
        except BaseException:
            source.close()
            raise
        summary = run_stream(pipeline, source, sinks, max_frames=args.max_frames, batch_size=args.batch_size,
                             queue_size=args.queue_size, workers=args.workers, compare=references, stop=stop,
                             progress=ProgressLine(args.quiet, references))
    text = json.dumps(summary, indent=2)
    if args.summary:
        write_text_atomic(args.summary, text + "\n")
    print(text)
    if summary["reason"]:
        print(f"keepbits: {summary['status']}: {summary['reason']}", file=sys.stderr)
    return EXIT_CODES[summary["status"]][0]
