"""``keepbits info``: what is inside a model bundle and how this machine runs it.

Prints a summary (``--json``: everything as JSON): manifest, provenance (command, commit, data),
input size/layout/normalisation/resize policy, outputs, custom ops (native kernels or ONNX
function bodies here), file sizes and the digest check. A bundle whose files do not match its
manifest is an error (exit 2).

Example:
    keepbits info --model bundle.zip
    keepbits info --model bundle.zip --json > bundle_info.json
"""
from __future__ import annotations

import argparse
import json

HELP = "show what is inside a model bundle: manifest, provenance, input/outputs, custom ops, files, digest check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle folder or .zip")
    parser.add_argument("--expect-digest", metavar="SHA256", default=None,
                        help="refuse the bundle unless the sha256 of its manifest.json is this (default: not pinned; docs/bundle.md)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole report as JSON (every class name, the full provenance record and training history)")


def run(args: argparse.Namespace) -> int:
    from keepbits.runtime.info import bundle_info, info_report

    info = bundle_info(args.model, args.expect_digest)
    print(json.dumps(info, indent=2) if args.json else info_report(info))
    return 0
