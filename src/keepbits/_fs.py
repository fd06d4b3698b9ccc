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
