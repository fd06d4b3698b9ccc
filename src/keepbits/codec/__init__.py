"""The payload codec: what crosses the link (format spec: ``docs/codec.md``).

Example:
    >>> import numpy as np
    >>> from keepbits.codec import encode, decode
    >>> frame = np.full((32, 32, 3), 200, np.uint8)
    >>> image, mask, meta = decode(encode(frame, np.zeros((32, 32)), block=8))
    >>> image.shape, meta.kept_blocks, meta.total_blocks
    ((32, 32, 3), 0, 16)
"""
from keepbits.codec.container import MAGIC, VERSION
from keepbits.codec.images import decode_image, encode_image
from keepbits.codec.payload import (
    DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_PER_BYTE, FrameRecord, PayloadMeta, decode, encode, mixed_image,
)

__all__ = ["MAGIC", "VERSION", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_PIXELS_PER_BYTE", "FrameRecord", "PayloadMeta", "decode",
           "decode_image", "encode", "encode_image", "mixed_image"]
