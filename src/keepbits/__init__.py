"""keepbits: which pixels does your classifier need? Learned sparse masks (NICE), input
simplification (SimpleBits), audits (SIS, CID), and a runtime that turns the answer into
bandwidth.

``import keepbits`` needs only numpy; torch is imported by training, export and the
gradient-based audits when they are used.

Example:
    >>> import keepbits
    >>> keepbits.__version__
    '0.1.0'
"""
from __future__ import annotations

import importlib
from typing import Any

from keepbits._version import __version__
from keepbits.errors import BundleError, CheckpointError, DecodeError, InputError, KeepbitsError

#: public name -> module that defines it (imported on first use)
_LAZY = {
    "Pipeline": "keepbits.runtime",
    "load_bundle": "keepbits.bundle",
}

__all__ = [
    "__version__",
    "BundleError",
    "CheckpointError",
    "DecodeError",
    "InputError",
    "KeepbitsError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keepbits' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
