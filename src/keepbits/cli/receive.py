"""``keepbits receive``: the reference receiver for ``keepbits run --sink tcp:HOST:PORT`` and
``--sink mqtt://HOST:PORT/TOPIC``.

Exits 0 when frames were written and none was lost, else 1 with one line saying how many were
lost and how (bad payloads, oversize, not written, broken connections, dropped), or that nothing
arrived; 2 for bad input.

Example:
    keepbits receive --listen 127.0.0.1:9000 --out received/ --video received.mp4
    keepbits receive --mqtt mqtt://broker:1883/cams/+/kbit --out received/
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from keepbits.errors import InputError

#: Summary counters of frames a receiver lost, and how its exit line names them.
LOSSES = {"bad_payloads": "bad payloads", "oversize": "payloads over --max-payload", "write_errors": "frames not written (disk)",
          "protocol_errors": "broken connections or streams (TCP)", "dropped": "messages dropped while the decoder fell behind (MQTT)"}
HELP = "receive payloads over TCP or MQTT (from keepbits run --sink tcp:/mqtt://) and decode them to images/video"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli._common import add_fps_option, positive_int

    parser.epilog = ("exit codes: 0: frames written and none lost; 1: frames lost (" + ", ".join(LOSSES.values())
                     + ") or nothing received, one line on stderr says which; 2: bad input; 130: aborted")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT", help="TCP address to listen on, e.g. 127.0.0.1:9000")
    where.add_argument("--mqtt", metavar="URL",
                       help="subscribe to mqtt://[USER:PASSWORD@]HOST[:PORT]/TOPIC[?qos=1&queue=100...] (keepbits[mqtt]; "
                            "wildcards allowed; options: docs/runtime.md)")
    parser.add_argument("--out", required=True, type=Path, help="folder for decoded PNGs and frames.jsonl")
    parser.add_argument("--video", type=Path, help="also write the decoded frames as this MP4 (default: none)")
    add_fps_option(parser)
    parser.add_argument("--no-images", action="store_true", help="do not write one PNG per frame")
    parser.add_argument("--no-masks", action="store_true", help="do not write the kept-pixel mask PNG of each frame")
    parser.add_argument("--max-frames", type=positive_int, default=None, help="stop after N frames (default: no limit)")
    parser.add_argument("--idle-timeout", type=float, default=30.0, help="stop after this many seconds without data")
    parser.add_argument("--once", action="store_true", help="TCP: stop when the first sender disconnects")
    parser.add_argument("--max-payload", type=int, default=None, help="largest payload accepted (bytes; default 16 MiB)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="TCP: senders served at once (default 4); more wait until one disconnects")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest decoded frame in pixels (default 2**22 = 2048x2048)")
    parser.add_argument("--max-pixels-per-byte", type=int, default=None,
                        help="frames over 1 MP may declare at most this many pixels per payload byte (default 1024; 0: no bound)")


def run(args: argparse.Namespace) -> int:
    from keepbits.runtime.stream import handle_signals

    limits = {name: value for name, value in (("max_payload", args.max_payload), ("max_connections", args.max_connections))
              if value is not None}
    if args.max_pixels is not None:
        if args.max_pixels < 1:
            raise InputError(f"--max-pixels must be >= 1, got {args.max_pixels}")
        limits["max_pixels"] = args.max_pixels
    if args.max_pixels_per_byte is not None:
        if args.max_pixels_per_byte < 0:
            raise InputError(f"--max-pixels-per-byte must be >= 0, got {args.max_pixels_per_byte}")
        limits["max_pixels_per_byte"] = args.max_pixels_per_byte or None
    common = {"max_frames": args.max_frames, "idle_timeout": args.idle_timeout, "video": args.video, "fps": args.fps,
              "images": not args.no_images, "masks": not args.no_masks}
    with handle_signals(threading.Event()) as stop:
        if args.mqtt:
            from keepbits.runtime.mqtt import receive_mqtt

            if args.once or args.max_connections is not None:
                raise InputError("--once and --max-connections are TCP options (--listen)")
            stats = receive_mqtt(args.mqtt, args.out, stop=stop, **common, **limits)
        else:
            from keepbits.runtime.net import receive
            from keepbits.runtime.sinks import parse_hostport

            host, port = parse_hostport(args.listen)
            stats = receive(host, port, args.out, once=args.once, stop=stop, **common, **limits)
    print(json.dumps(stats, indent=2))
    lost = ", ".join(f"{stats[key]} {what}" for key, what in LOSSES.items() if stats.get(key))
    if stats["frames"] and not lost:
        return 0
    print(f"keepbits: receive: {stats['frames']} frames written" + (f"; lost: {lost}" if lost else "; nothing received"),
          file=sys.stderr)
    return 1
