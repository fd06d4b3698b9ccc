"""Exceptions raised by keepbits. The CLI turns every :class:`KeepbitsError` into one
line on stderr and exit code 2 (``--debug`` shows the traceback)."""
from __future__ import annotations


class KeepbitsError(Exception):
    """Base class: an error a user can act on, with a message naming the problem."""


class InputError(KeepbitsError):
    """Bad user input: missing path, malformed file, wrong shape or dtype, bad option."""


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded or does not match what was asked for."""


class BundleError(InputError):
    """A model bundle that is malformed, tampered with, or refers outside itself."""


class DecodeError(KeepbitsError):
    """A payload that cannot be decoded: truncated, corrupt, oversized or of another version."""
