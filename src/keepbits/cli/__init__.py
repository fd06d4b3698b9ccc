"""The ``keepbits`` command line.

Every command lives in its own module under ``keepbits.cli`` exposing ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules import torch only
inside ``run``, so ``keepbits --help`` is instant. Errors a user can fix
(:class:`keepbits.errors.KeepbitsError`) print one line and exit 2; ``--debug`` shows the
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from keepbits._version import __version__
from keepbits.errors import KeepbitsError

#: group -> {subcommand -> module}; a group whose table is a str is a single command.
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": {
        "classifier": "keepbits.cli.train_classifier",
        "nice": "keepbits.cli.train_nice",
        "density": "keepbits.cli.train_density",
        "simplebits": "keepbits.cli.train_simplebits",
    },
    "export": {
        "onnx": "keepbits.cli.export_onnx",
        "tensorrt": "keepbits.cli.export_tensorrt",
    },
    "run": "keepbits.cli.run",
    "receive": "keepbits.cli.receive",
    "audit": {
        "sis": "keepbits.cli.audit_sis",
        "overinterpretation": "keepbits.cli.audit_overinterpretation",
        "cid": "keepbits.cli.audit_cid",
        "simplify": "keepbits.cli.audit_simplify",
    },
    "bench": {
        "classifier": "keepbits.cli.bench_classifier",
        "nice": "keepbits.cli.bench_nice",
    },
    "demo": "keepbits.cli.demo",
}


#: Modules of the optional install sets -> how to get them (pyproject.toml extras).
OPTIONAL_MODULES = {
    "torch": "pip install 'keepbits[train]' (CPU-only machines: install torch's CPU wheel first, see the README)",
    "onnx": "pip install 'keepbits[train]'",
    "onnxscript": "pip install 'keepbits[train]'",
    "onnxruntime": "pip install onnxruntime (or 'keepbits[gpu]' for onnxruntime-gpu, see docs/install.md)",
}


def _import_command(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # not built yet in this version: leave it out of the CLI
            return None
        raise


def _add_command(subparsers, name: str, module_name: str) -> None:
    module = _import_command(module_name)
    if module is None:
        return
    parser = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keepbits",
        description="Which pixels does your classifier need? Train, export, run and audit.",
    )
    parser.add_argument("--version", action="version", version=f"keepbits {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    groups = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, table in COMMANDS.items():
        if isinstance(table, str):
            _add_command(groups, group, table)
            continue
        present = {n: m for n, m in table.items() if _import_command(m) is not None}
        if not present:
            continue
        gp = groups.add_parser(group, help=f"{group} commands: {', '.join(present)}")
        sub = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for name, module_name in present.items():
            _add_command(sub, name, module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="keepbits: %(message)s",
    )
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeepbitsError as exc:
        if args.debug:
            raise
        print(f"keepbits: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_MODULES.get((exc.name or "").split(".")[0])
        if extra is None or args.debug:
            raise
        print(f"keepbits: error: this command needs {exc.name}, which is not installed: {extra}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keepbits: interrupted", file=sys.stderr)
        return 130
