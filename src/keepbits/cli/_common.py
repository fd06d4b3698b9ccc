"""Helpers shared by CLI commands: paths that must exist, progress bars."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from keepbits.errors import InputError


def existing_path(value: str | Path, what: str = "path") -> Path:
    path = Path(value)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    return path


def command_line() -> str:
    """The command as typed, for provenance records."""
    return shlex.join(["keepbits", *sys.argv[1:]])


def progress(iterable=None, *, total=None, desc: str = "", disable: bool = False, **kwargs):
    """A tqdm progress bar on stderr (quiet when not a terminal and under CI is fine too)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
