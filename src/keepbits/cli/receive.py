"""``keepbits receive``: the reference receiver for ``keepbits run --sink tcp:HOST:PORT``.

Example:
    keepbits receive --listen 127.0.0.1:9000 --out received/ --video received.mp4
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from keepbits.errors import InputError

HELP = "receive payloads over TCP (from keepbits run --sink tcp:...) and decode them to images/video"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on, e.g. 127.0.0.1:9000")
    parser.add_argument("--out", required=True, type=Path, help="folder for decoded PNGs and frames.jsonl")
    parser.add_argument("--video", type=Path, help="also write the decoded frames as this MP4 (default: none)")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of --video")
    parser.add_argument("--no-images", action="store_true", help="do not write one PNG per frame")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: no limit)")
    parser.add_argument("--idle-timeout", type=float, default=30.0, help="stop after this many seconds without data")
    parser.add_argument("--once", action="store_true", help="stop when the first sender disconnects")
    parser.add_argument("--max-payload", type=int, default=64 << 20, help="largest payload accepted (bytes)")


def run(args: argparse.Namespace) -> int:
    from keepbits.runtime.net import receive
    from keepbits.runtime.sinks import parse_hostport
    from keepbits.runtime.stream import handle_signals

    host, port = parse_hostport(args.listen)
    if args.idle_timeout <= 0 or args.max_payload < 1:
        raise InputError("--idle-timeout and --max-payload must be positive")
    with handle_signals(threading.Event()) as stop:
        stats = receive(host, port, args.out, max_frames=args.max_frames, idle_timeout=args.idle_timeout, once=args.once,
                        video=args.video, fps=args.fps, images=not args.no_images, max_payload=args.max_payload, stop=stop)
    print(json.dumps(stats, indent=2))
    return 0
