"""File-system helpers shared by the writers of reports, checkpoints and caches."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def sibling_temp(path: str | Path) -> Path:
    """A fresh name next to ``path`` for an atomic write (write there, then ``os.replace``).

    Unlike ``tempfile.mkstemp`` (always mode 0600), a file created under this name gets the
    process umask's permissions, as ``path`` itself would.

    Example:
        >>> from keepbits._fs import sibling_temp
        >>> sibling_temp("/tmp/report.html").name.startswith(".report.html.")
        True
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def writable_file(path: str | Path, what: str = "output") -> Path:
    """``path`` as a file this process can write, checked before any work and without leaving
    anything behind: not a folder; its folder, or the nearest one above it that exists, writable
    (a probe file written and removed where the folder exists; missing folders are created only
    when the file is written, :func:`write_text_atomic`); :class:`InputError` if not.

    Example:
        >>> import tempfile
        >>> from keepbits._fs import writable_file
        >>> writable_file(tempfile.mkdtemp(), "summary")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.InputError: summary /tmp/tmpabcd is a folder, not a file
    """
    from keepbits.errors import InputError

    if str(path).endswith(("/", os.sep)) or Path(path).is_dir():  # "out/" names a folder even before it exists
        raise InputError(f"{what} {path} is a folder, not a file")
    path = Path(path)
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise InputError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    try:
        if existing != path.parent:
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, f"{existing} is not writable")
            return path
        probe = sibling_temp(path)
        with open(probe, "x"):
            pass
        probe.unlink()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise InputError(f"cannot write {what} {path} ({exc.strerror or exc})") from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a sibling temp file, then ``os.replace``), creating
    its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
