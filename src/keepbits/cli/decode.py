"""``keepbits decode``: the receiver's side for payload files (``keepbits run --sink files:DIR``).

Writes, per payload, x̃ (or the simplified image) as ``<name>.png`` cropped to the source frame,
the kept-pixel mask as ``<name>_mask.png``, one line of ``frames.jsonl``, and optionally a video.
Nothing is overwritten: an ``--out`` that holds a ``frames.jsonl`` (a ``files:`` sink folder, an
earlier decode) and an existing ``--video`` are refused; a PNG already there keeps its name (the
new one gets a suffix). Bad payloads are reported and skipped (``bad_payloads`` in the summary;
``write_errors`` for frames decoded but not written): exit 1 when there were any, 0 when every
payload decoded, 2 on input errors (nothing to decode, an output that exists).

Example:
    keepbits decode --payloads out/payloads --out decoded/ --video decoded.mp4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keepbits.errors import InputError

HELP = "decode payload files (.kbit, from keepbits run --sink files:DIR) to PNG images, masks, JSONL and video"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli._common import add_fps_option

    parser.add_argument("--payloads", required=True, nargs="+", metavar="PATH",
                        help="payload files and/or folders of .kbit files (a files: sink folder: its payloads/)")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the PNGs and frames.jsonl (one that holds a frames.jsonl already is refused)")
    parser.add_argument("--video", type=Path, default=None,
                        help="also write the decoded frames as this MP4, a new file (default: none)")
    add_fps_option(parser)
    parser.add_argument("--no-images", action="store_true", help="do not write one PNG per payload")
    parser.add_argument("--no-masks", action="store_true", help="do not write the mask PNGs")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest frame a payload may declare (default: the codec's DEFAULT_MAX_PIXELS)")


def run(args: argparse.Namespace) -> int:
    from keepbits.codec import DEFAULT_MAX_PIXELS
    from keepbits.runtime.receiver import decode_files

    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    summary = decode_files(args.payloads, args.out, video=args.video, fps=args.fps, images=not args.no_images,
                           masks=not args.no_masks, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    if not args.quiet:
        print(f"keepbits: decoded {summary['decoded']} of {summary['payloads']} payloads into {summary['out']}"
              + (f"; {summary['bad_payloads']} bad payloads skipped" if summary["bad_payloads"] else "")
              + (f"; {summary['write_errors']} decoded but not written" if summary["write_errors"] else ""), file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 1 if summary["bad_payloads"] or summary["write_errors"] else 0
