"""Deflate for the payload's sections: zlib-ng when installed, the standard library otherwise.

`zlib-ng <https://pypi.org/project/zlib-ng/>`_ (a declared dependency) writes standard zlib
streams faster than the standard library's zlib (``bench/codec_png.py``: the PNG writer on a
224×224 camera frame takes 0.44 ms with zlib-ng, 0.67 ms with the standard library). Where it
is missing (a platform without its wheels) the standard library takes over and payloads
decode the same.

Example:
    >>> import zlib
    >>> from keepbits.codec import deflate
    >>> zlib.decompress(deflate.compress(b"keepbits " * 8, 6)) == b"keepbits " * 8
    True
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable

try:
    from zlib_ng import zlib_ng as _impl
except ImportError:  # pragma: no cover - exercised by forcing the fallback in the tests
    _impl = zlib


def name() -> str:
    """``"zlib-ng"`` or ``"zlib"``: the implementation in use.

    Example:
        >>> from keepbits.codec import deflate
        >>> deflate.name() in ("zlib-ng", "zlib")
        True
    """
    return "zlib" if _impl is zlib else "zlib-ng"


def compress(data: Any, level: int) -> bytes:
    """A zlib stream of ``data`` (bytes or a contiguous buffer) at ``level`` (LZ77, default strategy)."""
    return _impl.compress(data, level)


def compress_rle(chunks: Iterable[Any]) -> bytes:
    """One zlib stream of the concatenated ``chunks`` (bytes or contiguous buffers, each free to
    be reused once the next is asked for) at level 1 with the run-length strategy (matches at
    distance 1 only).

    Example:
        >>> import zlib
        >>> from keepbits.codec import deflate
        >>> zlib.decompress(deflate.compress_rle([b"aaaa", b"abab"]))
        b'aaaaabab'
    """
    packer = _impl.compressobj(1, _impl.DEFLATED, 15, 9, _impl.Z_RLE)
    return b"".join([*(packer.compress(chunk) for chunk in chunks), packer.flush()])


__all__ = ["compress", "compress_rle", "name"]
