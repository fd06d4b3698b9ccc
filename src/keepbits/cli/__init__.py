"""The ``keepbits`` command line.

Every command lives in its own module under ``keepbits.cli`` exposing ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules import torch only
inside ``run``, so ``keepbits --help`` is instant. Errors a user can fix
(:class:`keepbits.errors.KeepbitsError`) print one line and exit 2; ``--debug`` shows the
traceback.

One grammar for every command (docs/DEVELOPING.md, "Command line"): ``--model`` the model the
command acts on, ``--data`` a data set, ``--num-images`` (``--num-train-images``,
``--num-test-images``) counts drawn by :func:`keepbits.data.sample_indices`, ``--out`` the output;
``--help`` shows defaults; ``-q`` and ``--debug`` go before or after the command. Renamed options
keep their old spelling for one release (:func:`keepbits.cli._common.add_argument`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Iterator, NoReturn, Sequence

from keepbits._version import __version__
from keepbits.cli._common import HelpFormatter
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
        "int8": "keepbits.cli.export_int8",
        "tensorrt": "keepbits.cli.export_tensorrt",
    },
    "run": "keepbits.cli.run",
    "receive": "keepbits.cli.receive",
    "info": "keepbits.cli.info",
    "decode": "keepbits.cli.decode",
    "compare": "keepbits.cli.compare",
    "eval": "keepbits.cli.eval",
    "explain": "keepbits.cli.explain",
    "doctor": "keepbits.cli.doctor",
    "audit": {
        "sis": "keepbits.cli.audit_sis",
        "overinterpretation": "keepbits.cli.audit_overinterpretation",
        "cid": "keepbits.cli.audit_cid",
        "simplify": "keepbits.cli.audit_simplify",
    },
    "bench": {
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
    "paho": "pip install 'keepbits[mqtt]'",
}


#: Exit codes of a run aborted by a second SIGINT / SIGTERM and of one whose stdout reader went
#: away (128 + SIGINT, 128 + SIGPIPE: what a shell reports for a process those signals end).
ABORTED, BROKEN_PIPE = 130, 141


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors (an unknown option, a missing one, a value its ``type`` refuses) as
    one line, ``keepbits: error: argument --fps: must be …; see keepbits decode --help``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"keepbits: error: {message}; see {self.prog} --help\n")


def _global_options(default: bool | str) -> argparse.ArgumentParser:
    """``--debug`` and ``-q``: the top level sets the defaults; every command accepts them too,
    with ``default=SUPPRESS`` so that leaving them out there keeps the value given before it."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings only")
    return parser


def _add_command(subparsers, name: str, module_name: str, common: argparse.ArgumentParser) -> None:
    module = importlib.import_module(module_name)
    # ``help`` is %-formatted by argparse (``%%`` for a percent sign), ``description`` is printed as written
    parser = subparsers.add_parser(name, help=module.HELP, description=module.HELP.replace("%%", "%"), parents=[common],
                                   formatter_class=HelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in :data:`COMMANDS` (built for one parse)."""
    parser = _Parser(
        prog="keepbits", parents=[_global_options(False)], formatter_class=HelpFormatter,
        description="Which pixels does your classifier need? Train, export, run and audit.",
    )
    parser.add_argument("--version", action="version", version=f"keepbits {__version__}")
    common = _global_options(argparse.SUPPRESS)
    groups = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, table in COMMANDS.items():
        if isinstance(table, str):
            _add_command(groups, group, table, common)
            continue
        gp = groups.add_parser(group, help=f"{group} commands: {', '.join(table)}", parents=[common], formatter_class=HelpFormatter)
        sub = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        for name, module_name in table.items():
            _add_command(sub, name, module_name, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker: its work is done and the group torn down
        _exit_without_finalization(code)
    if code == ABORTED and argv is None:
        # aborted by a second signal (the keepbits process, not an in-process call): the source, model and
        # writer threads may still be inside native code, and finalizing the interpreter under them can
        # end in SIGABRT (exit 134 in 2 of 8 tries) instead of the documented 130
        _exit_without_finalization(code)
    return code


@contextlib.contextmanager
def _quiet_native_logs(quiet: bool) -> Iterator[None]:
    """While a command runs, silence OpenCV's and FFmpeg's own warnings (a camera index that does
    not open, a refused RTSP connection, each retry again): keepbits' one line per failure says the
    same, named by source. ``--debug`` (``quiet`` False) keeps them; so do ``OPENCV_LOG_LEVEL`` /
    ``OPENCV_FFMPEG_LOGLEVEL`` set by the user. The process's environment and OpenCV's level are
    restored afterwards (``main`` called in-process leaves them, and the children it starts later,
    as they were)."""
    if not quiet or "OPENCV_FFMPEG_LOGLEVEL" in os.environ or "OPENCV_LOG_LEVEL" in os.environ:
        yield
        return
    import cv2

    level = cv2.utils.logging.getLogLevel()
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "-8"  # AV_LOG_QUIET, read when FFmpeg first opens a source
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        del os.environ["OPENCV_FFMPEG_LOGLEVEL"]
        cv2.utils.logging.setLogLevel(level)


def _exit_without_finalization(code: int) -> None:
    """End the process now, skipping interpreter finalization (a ``torchrun`` worker, an aborted
    run): C++ threads (gloo's, ONNX Runtime's, OpenCV's) can outlive their Python owners and abort
    the process (SIGABRT, "terminate called without an active exception") while the interpreter
    shuts down, turning the run's exit code into 134."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (its line printed) returns its code; --help and --version exit
        if exc.code in (0, None):
            raise
        return int(exc.code)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="keepbits: %(message)s",
    )
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        with _quiet_native_logs(not args.debug):
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
        if args.command == "audit":  # the audits' own install set holds what they need
            extra = extra.replace("keepbits[train]", "keepbits[audit]")
        print(f"keepbits: error: this command needs {exc.name}, which is not installed: {extra}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`keepbits info | head`): no error line, as other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout must not fail again
        return BROKEN_PIPE
    except OSError as exc:  # the machine, not the input: a disk full or a folder removed while the command ran
        if args.debug:
            raise
        print(f"keepbits: error: {exc.filename}: {exc.strerror or exc}" if exc.filename else f"keepbits: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("keepbits: interrupted", file=sys.stderr)
        return ABORTED
