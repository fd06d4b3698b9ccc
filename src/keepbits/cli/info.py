"""``keepbits info``: what is inside a model bundle and how this machine runs it.

Prints JSON: manifest, provenance (command, commit, data), input size/layout/normalisation/resize
policy, outputs, custom ops (native kernels or ONNX function bodies here), file sizes and the
digest check. A bundle whose files do not match its manifest is an error (exit 2).

Example:
    keepbits info --model bundle.zip
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "show what is inside a model bundle: manifest, provenance, input/outputs, custom ops, files, digest check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle folder or .zip")
    parser.add_argument("--expect-digest", metavar="SHA256", default=None,
                        help="refuse the bundle unless the sha256 of its manifest.json is this (default: not pinned; docs/bundle.md)")


def run(args: argparse.Namespace) -> int:
    from keepbits.runtime.info import bundle_info

    info = bundle_info(args.model, args.expect_digest)
    if not args.quiet:
        i, ops = info["input"], info["custom_ops"]
        print(f"keepbits: {info['bundle']}: {info['explain']} bundle ({info['generator']} + {info['classifier']}), "
              f"{info['classes']['count']} classes, input {i['shape']} {i['dtype']} {i['layout']}, "
              f"custom ops {ops['ops'] or 'none'} -> {ops['runs_with']}, digest {info['digest'][:12]}… verified", file=sys.stderr)
    print(json.dumps(info, indent=2))
    return 0
