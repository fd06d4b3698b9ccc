"""Helpers shared by CLI commands: the help formatter, old option names kept for one release,
paths that must exist, the command line for provenance records."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from keepbits.errors import InputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default after its help text, except for flags, for a
    default of None and where the help text already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Deprecated(argparse.Action):
    """A hidden old spelling of ``replacement``: stores into its destination, says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, replacement: argparse.Action, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        old = option_string or f"positional {self.dest.upper()}"
        print(f"keepbits: {old} is deprecated; use {self.replacement.option_strings[-1]}", file=sys.stderr)
        setattr(namespace, self.replacement.dest, values)
        self.replacement.required = False  # given under its old name: satisfied for this parse


def add_argument(parser: argparse.ArgumentParser, *names: str, deprecated: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*names, **kwargs)`` that also accepts the old spellings ``deprecated``
    for one release: hidden from ``--help``, each use prints one line
    ``keepbits: OLD is deprecated; use NEW`` on stderr. An old name without a leading ``-`` was a
    positional argument.

    Example:
        >>> import argparse, contextlib, io
        >>> p = argparse.ArgumentParser()
        >>> _ = add_argument(p, "--model", required=True, deprecated=["--checkpoint"], help="model")
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     args = p.parse_args(["--checkpoint", "m.pt"])
        >>> args.model, err.getvalue()
        ('m.pt', 'keepbits: --checkpoint is deprecated; use --model\\n')
    """
    new = parser.add_argument(*names, **kwargs)
    same = {k: getattr(new, k) for k in ("type", "choices", "metavar")}
    for old in deprecated:
        if old.startswith("-"):
            parser.add_argument(old, action=_Deprecated, replacement=new, nargs=new.nargs, dest="_deprecated_" + old.lstrip("-").replace("-", "_"),
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **same)
        else:  # one optional positional; absent, it keeps SUPPRESS and stores nothing
            parser.add_argument(old, action=_Deprecated, replacement=new, nargs="?" if new.nargs is None else "*",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **same)
    return new


def existing_path(value: str | Path, what: str = "path") -> Path:
    path = Path(value)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    return path


def command_line() -> str:
    """The command as typed, for provenance records."""
    return shlex.join(["keepbits", *sys.argv[1:]])
