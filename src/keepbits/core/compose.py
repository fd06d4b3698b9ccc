"""Mixed-resolution images, NICE Eq. 12: x̃ = x ⊙ ẑ + x_b ⊙ (1 − ẑ).

x_b is the b×b block average of x upsampled back with nearest neighbour. Edge blocks:
when H or W is not a multiple of b, the last block row/column is smaller (it covers the
remaining ``H mod b`` rows / ``W mod b`` columns) and is averaged over the pixels it
actually holds, so no padding value ever leaks in. Hence b = 1 gives x, and b ≥ max(H, W)
gives one constant per image and channel (its mean).

Arrays are NCHW (or CHW / HW, broadcast over leading axes); the mask broadcasts over
channels (N1HW or HW).

Example:
    >>> import numpy as np
    >>> from keepbits.core import mixed_resolution
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> mixed_resolution(x, np.zeros((1, 1, 4, 4)), 2)[0, 0, 0].tolist()
    [2.5, 2.5, 4.5, 4.5]
"""
from __future__ import annotations

import numpy as np


def block_means(x: np.ndarray, b: int) -> np.ndarray:
    """The b×b block means of ``x`` (…×H×W) as a float64 grid (…×⌈H/b⌉×⌈W/b⌉), edge blocks partial.

    Integer images are summed exactly in int64.

    Example:
        >>> import numpy as np
        >>> from keepbits.core import block_means
        >>> block_means(np.arange(9, dtype=np.uint8).reshape(3, 3), 2).tolist()
        [[2.0, 3.5], [6.5, 8.0]]
    """
    if b < 1:
        raise ValueError(f"block size b must be >= 1, got {b}")
    x = np.asarray(x)
    h, w = x.shape[-2:]
    b = min(b, max(h, w))  # any b beyond the image gives the same blocks; avoids huge padding
    bh, bw = -(-h // b), -(-w // b)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, bh * b - h), (0, bw * b - w)]
    exact = np.int64 if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_ else np.float64
    sums = np.pad(x, pad).reshape(*x.shape[:-2], bh, b, bw, b).sum(axis=(-3, -1), dtype=exact)
    rows = np.full(bh, b, dtype=np.float64)
    cols = np.full(bw, b, dtype=np.float64)
    rows[-1] = h - (bh - 1) * b
    cols[-1] = w - (bw - 1) * b
    return sums / np.outer(rows, cols)


def block_average(x: np.ndarray, b: int) -> np.ndarray:
    """x_b: b×b block means of ``x`` (…×H×W) upsampled back to H×W (nearest), edge blocks partial."""
    if b < 1:
        raise ValueError(f"block size b must be >= 1, got {b}")
    x = np.asarray(x)
    h, w = x.shape[-2:]
    if b == 1:
        return x.astype(np.result_type(x.dtype, np.float32), copy=True)
    b = min(b, max(h, w))
    up = np.repeat(np.repeat(block_means(x, b), b, axis=-2), b, axis=-1)[..., :h, :w]
    return up.astype(np.result_type(x.dtype, np.float32))


def mixed_resolution(x: np.ndarray, mask: np.ndarray, b: int) -> np.ndarray:
    """x̃ = x ⊙ ẑ + x_b ⊙ (1 − ẑ) (NICE Eq. 12)."""
    x = np.asarray(x)
    mask = np.asarray(mask, dtype=np.float32)
    xb = block_average(x, b)
    return (x * mask + xb * (1.0 - mask)).astype(xb.dtype)
