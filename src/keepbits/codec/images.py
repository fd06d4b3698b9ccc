"""Whole images as PNG, JPEG or WebP bytes and back: the one image encoder/decoder of keepbits
(payload sections, the runtime's whole-frame reference sizes, the NICE rate benchmark).

Images are uint8 H×W×C, C = 1 (grey) or 3 (**RGB**). PNG is lossless; with ``png_level`` None
it is :func:`keepbits.codec.png.encode_png` (Paeth filter, run-length deflate: fast, and the
smallest on camera content), with ``png_level`` 0–9 OpenCV's writer at that zlib level (LZ77,
adaptive filters: better on long-range repeats). JPEG and WebP are lossy at ``quality`` 1–100
(OpenCV's libjpeg / libwebp, whose WebP effort is libwebp's method 4; ``webp_method`` 0–6 picks
another effort through Pillow's libwebp: 0–2 encode faster for slightly more bytes, 5–6 the
reverse; a grey image is sent as WebP's RGB). Decoding uses Pillow, checks
the size before it allocates the pixels and raises :class:`keepbits.errors.DecodeError`.

Example:
    >>> import numpy as np
    >>> from keepbits.codec.images import decode_image, encode_image
    >>> img = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    >>> bool((decode_image(encode_image(img, "png")) == img).all())
    True
    >>> decode_image(encode_image(img, "jpeg", quality=50), "jpeg").shape
    (6, 9, 3)
"""
from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np

from keepbits.codec.png import encode_png
from keepbits.errors import DecodeError, InputError

#: Image formats, by the names the payload, the runtime and the benchmarks use.
FORMATS = ("png", "jpeg", "webp")
#: Largest image :func:`decode_image`, and frame :func:`keepbits.codec.decode`, accept by default
#: (pixels: 2048×2048, an edge device's budget); pass ``max_pixels`` to change it.
DEFAULT_MAX_PIXELS = 1 << 22
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MODES = {1: "L", 3: "RGB"}


def _check_image(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in _MODES or 0 in arr.shape:
        raise InputError(f"image must be H×W or H×W×{{1,3}} with H, W >= 1, got shape {arr.shape}")
    return arr


def check_webp_method(method: Any) -> None:
    """:class:`InputError` unless ``method`` is None (OpenCV's encoder) or a libwebp method 0–6."""
    if method is not None and not (isinstance(method, int) and 0 <= method <= 6):
        raise InputError(f"WebP method must be 0..6 (or None: OpenCV's, 4), got {method!r}")


def encode_image(image: Any, fmt: str, quality: int = 90, png_level: int | None = None, webp_method: int | None = None) -> bytes:
    """``image`` (uint8 H×W, H×W×1 or H×W×3 RGB) as ``fmt`` bytes: ``"png"`` (lossless;
    ``png_level`` None: keepbits' Paeth + run-length writer, 0–9: that zlib level), ``"jpeg"``
    or ``"webp"`` at ``quality`` (1–100; ``webp_method`` None: OpenCV's encoder, libwebp method 4;
    0–6: that libwebp method through Pillow).

    Example:
        >>> import numpy as np
        >>> from keepbits.codec.images import encode_image
        >>> encode_image(np.zeros((4, 4), np.uint8), "png")[:4]
        b'\\x89PNG'
        >>> encode_image(np.zeros((4, 4, 3), np.uint8), "webp", 75, webp_method=2)[8:12]
        b'WEBP'
    """
    img = np.ascontiguousarray(_check_image(image))
    if fmt not in FORMATS:
        raise InputError(f"image format must be one of {FORMATS}, got {fmt!r}")
    check_webp_method(webp_method)
    if fmt == "png":
        if png_level is None:
            return encode_png(img)
        if not 0 <= png_level <= 9:
            raise InputError(f"PNG level must be 0..9, got {png_level}")
    elif not 1 <= quality <= 100:
        raise InputError(f"quality must be 1..100, got {quality}")
    if fmt == "webp" and webp_method is not None:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(img if img.shape[2] == 3 else np.repeat(img, 3, axis=2)).save(out, "WEBP", quality=quality, method=webp_method)
        return out.getvalue()
    if img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    params = {"png": [cv2.IMWRITE_PNG_COMPRESSION, png_level], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, quality]}[fmt]
    ok, buf = cv2.imencode(_EXTENSIONS[fmt], img, params)
    if not ok:
        raise InputError(f"OpenCV could not encode a {img.shape} image as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes, fmt: str | None = None, *, shape: tuple[int, int, int] | None = None, channels: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> np.ndarray:
    """uint8 H×W×C pixels of ``data`` (a PNG, JPEG or WebP; only ``fmt`` when given).

    ``shape`` (H, W, C): the image must be exactly that size and channel count (a payload
    section), checked from the file header before the pixels are decoded; without it the image
    may have at most ``max_pixels`` pixels. ``channels`` (1 or 3):
    convert to grey or RGB whatever the file holds (a WebP of a grey image decodes as RGB).
    Otherwise grey files give C = 1 and everything else RGB. ``what`` names the image in errors.

    Example:
        >>> import numpy as np
        >>> from keepbits.codec.images import decode_image, encode_image
        >>> decode_image(encode_image(np.zeros((4, 4), np.uint8), "webp"), channels=1).shape
        (4, 4, 1)
    """
    from PIL import Image

    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"image format must be one of {FORMATS}, got {fmt!r}")
    if channels is not None and channels not in _MODES:
        raise InputError(f"channels must be 1 or 3, got {channels}")
    formats = [_PIL_FORMATS[fmt]] if fmt else list(_PIL_FORMATS.values())
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            if shape is not None:
                h, w, c = shape
                if im.size != (w, h):
                    raise DecodeError(f"{what}: image is {im.size[0]}x{im.size[1]}, the header says {w}x{h}")
                if im.mode != _MODES.get(c):
                    raise DecodeError(f"{what}: image mode {im.mode} does not match {c} channel(s)")
            elif im.size[0] * im.size[1] > max_pixels:
                raise DecodeError(f"{what}: {im.size[0]}x{im.size[1]} pixels exceed max_pixels={max_pixels}")
            mode = _MODES[channels] if channels else ("L" if im.mode == "L" else "RGB")
            arr = np.asarray(im if im.mode == mode else im.convert(mode))
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DecodeError(f"{what}: corrupt {fmt or 'image'} data ({type(exc).__name__}: {exc})") from None
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


__all__ = ["DEFAULT_MAX_PIXELS", "FORMATS", "decode_image", "encode_image"]
