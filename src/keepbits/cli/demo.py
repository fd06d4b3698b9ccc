"""``keepbits demo``: the bundled model on the bundled sample stream (nothing downloaded).

MNIST digits move over Kodak photographs; a LeNet-5 classifier with a NICE mask
generator (trained by the commands in ``docs/runtime.md``) labels each frame and keeps
only the pixels it needs. Writes an annotated video, the payloads and a summary comparing
payload bytes with JPEG and PNG of the same frames.

Example:
    keepbits demo --out keepbits-demo
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from keepbits.errors import InputError

HELP = "run the bundled demo model on the bundled sample stream: annotated video, payloads, byte comparison"

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_BUNDLE = ASSETS / "demo_bundle.zip"
DEMO_STREAM = ASSETS / "demo_stream.mp4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli.run import add_codec_arguments

    parser.add_argument("--out", type=Path, default=Path("keepbits-demo"), help="output folder")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: the whole stream)")
    parser.add_argument("--model", type=Path, default=DEMO_BUNDLE, help="model bundle (default: the bundled demo model)")
    parser.add_argument("--source", default=str(DEMO_STREAM), help="stream (default: the bundled sample video)")
    add_codec_arguments(parser)
    parser.set_defaults(codec="webp")  # lossy kept blocks: compared with JPEG; the lossless size is reported too


def _report(summary: dict, out: Path) -> str:
    n = max(1, summary["written"])
    per = {k: summary.get(f"{k}_bytes", 0) / n for k in ("payload", "jpeg", "png", "paper", "lossless")}
    p = summary["pipeline"]
    codec = p["codec"]
    lines = [
        f"keepbits demo: {summary['written']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} fps, "
        f"{', '.join(p['providers'])}), model input {p['input'][2]}x{p['input'][1]}, block {p['block']}",
        f"  payload ({codec['mode']}, kept blocks {codec['codec']} q{codec['quality']}): {per['payload']:7.0f} B/frame",
        f"  JPEG q90 of the same frame:          {per['jpeg']:7.0f} B/frame  ({summary.get('ratio_vs_jpeg') or 0:.2f}x the payload)",
        f"  lossless payload (blocks, PNG):      {per['lossless']:7.0f} B/frame",
        f"  PNG of the same frame:               {per['png']:7.0f} B/frame  ({per['png'] / max(per['lossless'], 1):.2f}x the lossless payload)",
        f"  paper mode (x̃ as one PNG):           {per['paper']:7.0f} B/frame",
        f"  pixels kept at full resolution: {100 * (summary['kept_fraction_mean'] or 0):.1f}%",
        f"  labels: {summary['labels']}",
        f"  wrote {out / 'annotated.mp4'}, {out / 'payloads'}/, {out / 'frames.jsonl'}, {out / 'summary.json'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from keepbits.cli.run import ProgressLine, codec_options
    from keepbits.runtime import Pipeline, open_source
    from keepbits.runtime.sinks import FilesSink, VideoSink
    from keepbits.runtime.stream import handle_signals, run_stream

    if not Path(args.model).exists():
        raise InputError(f"demo bundle not found: {args.model} (docs/runtime.md shows how to build it)")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    pipeline = Pipeline.from_bundle(args.model, backend=args.backend, threads=args.threads, **codec_options(args))
    source = open_source(args.source)
    sinks = [FilesSink(args.out), VideoSink(args.out / "annotated.mp4", source.fps)]
    with handle_signals(threading.Event()) as stop:
        summary = run_stream(pipeline, source, sinks, max_frames=args.max_frames, compare=("jpeg", "png", "paper", "lossless"),
                             stop=stop, progress=ProgressLine(args.quiet))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_report(summary, args.out), file=sys.stdout)
    return 0
