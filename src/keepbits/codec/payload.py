"""Encode a frame and its NICE mask (or a SimpleBits simplified image) into the payload
that crosses the link, and back.

The sender's mixed-resolution image x̃ (NICE Eq. 12) uses the *hard* mask
m = ẑ > threshold and the b×b block means rounded to uint8, so that the receiver can
rebuild it bit-exactly: x̃ = x where m, round(x_b) elsewhere (:func:`mixed_image`).
Frames are uint8 H×W (grey) or H×W×3 in **RGB** order (JPEG/WebP chroma assumes it).
Mode ``"simplified"`` sends the frame itself as one image, no mask: the output of a
SimpleBits simplifier (bundles with ``explain: "simplify"``).

Example:
    >>> import numpy as np
    >>> from keepbits.codec import encode, decode, mixed_image
    >>> rng = np.random.default_rng(0)
    >>> frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    >>> mask = np.zeros((30, 40), np.float32); mask[8:20, 10:25] = 1
    >>> image, m, meta = decode(encode(frame, mask, block=8, label=3, score=0.9))
    >>> bool((image == mixed_image(frame, mask, 8)).all()), meta.label, int(m.sum())
    (True, 3, 180)
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from keepbits.codec.container import (
    CODEC_BITS, CODEC_JPEG, CODEC_NAMES, CODEC_PNG, CODEC_RAW, CODEC_WEBP, MAX_SIDE, MODE_BLOCKS,
    MODE_MIXED, MODE_PAPER, MODE_SIMPLIFIED, MODES, TAG_BACKGROUND, TAG_FOREGROUND, TAG_MASK, TAG_MIXED, TAG_SIMPLIFIED,
    VERSION, Header, Section, pack, unpack,
)
from keepbits import native
from keepbits.codec import deflate
from keepbits.codec.images import DEFAULT_MAX_PIXELS, check_webp_method, decode_image, encode_image
from keepbits.codec.png import png_from_scanlines
from keepbits.core import block_means
from keepbits.errors import DecodeError, InputError

#: Beyond :data:`keepbits.codec.container.RATIO_FLOOR_PIXELS` (1 MP), :func:`decode` accepts by default
#: at most this many declared pixels per payload byte; pass ``max_pixels_per_byte`` (None: off).
DEFAULT_MAX_PIXELS_PER_BYTE = 1024
IMAGE_CODECS = {"png": CODEC_PNG, "jpeg": CODEC_JPEG, "webp": CODEC_WEBP}
BACKGROUND_CODECS = {"raw": CODEC_RAW, **IMAGE_CODECS}
#: ``background="auto"`` codes a grid of at least this many blocks as PNG (keepbits' Paeth +
#: run-length writer) and a smaller one raw: on the grids measured PNG is 14–32 % smaller from
#: 28×28 blocks up, within 3 % at 14×14–16×16, and up to 2.7× larger on tiny grey grids, where
#: its chunk headers outweigh the filter (``bench/results/codec_background.json``).
PNG_BACKGROUND_MIN_BLOCKS = 256
#: every ``background`` that :func:`encode` takes: ``auto`` and the codecs of :data:`BACKGROUND_CODECS`
BACKGROUNDS = ("auto", *BACKGROUND_CODECS)
_TAG_NAMES = {TAG_BACKGROUND: "background", TAG_MASK: "mask", TAG_FOREGROUND: "foreground", TAG_MIXED: "mixed",
              TAG_SIMPLIFIED: "simplified"}
_MODE_NAMES = {v: k for k, v in MODES.items()}
#: The sections each mode must carry (blocks may add a foreground).
_MODE_SECTIONS = {MODE_BLOCKS: {TAG_BACKGROUND, TAG_MASK}, MODE_PAPER: {TAG_MIXED}, MODE_SIMPLIFIED: {TAG_SIMPLIFIED},
                  MODE_MIXED: {TAG_MIXED, TAG_MASK}}


@dataclass(frozen=True, eq=False)
class FrameRecord:
    """What :func:`encode` takes from a processed frame besides its pixels, every field required
    (:meth:`keepbits.runtime.Result.frame_record` builds it). ``mask`` is ẑ (H×W floats or bool),
    None for a simplified frame; ``label_index`` −1 and ``label`` "" mean no class."""

    mask: np.ndarray | None
    block: int
    threshold: float
    label_index: int
    label: str
    score: float
    sequence: int
    timestamp: float
    #: (x0, y0, w, h): where the source frame lies in the model image (letterbox).
    roi: tuple[int, int, int, int]
    #: (width, height) of the source frame.
    source_size: tuple[int, int]


@dataclass
class PayloadMeta:
    """What :func:`decode` read besides the pixels."""

    version: int
    mode: str
    height: int
    width: int
    channels: int
    block: int
    label: int | None
    name: str
    score: float | None
    sequence: int
    timestamp: float
    #: (x0, y0, w, h): where the source frame lies in the payload image (letterbox).
    roi: tuple[int, int, int, int]
    #: (width, height) of the source frame the roi maps back to.
    source_size: tuple[int, int]
    codecs: dict[str, str] = field(default_factory=dict)
    section_bytes: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0
    kept_blocks: int = 0
    total_blocks: int = 0


def _check_frame(frame: Any) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise InputError(f"frame must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise InputError(f"frame must be H×W or H×W×{{1,3}}, got shape {arr.shape}")
    if not (1 <= arr.shape[0] <= MAX_SIDE and 1 <= arr.shape[1] <= MAX_SIDE):
        raise InputError(f"frame sides must be 1..{MAX_SIDE}, got {arr.shape[:2]}")
    return arr


def _hard_mask(mask: Any, shape: tuple[int, int], threshold: float) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != shape:
        raise InputError(f"mask shape {m.shape} does not match the frame's {shape}")
    return m if m.dtype == np.bool_ else m > threshold


def _grid(h: int, w: int, b: int) -> tuple[int, int, int, int]:
    """Blocks per column/row and tile height/width (a block never exceeds the frame)."""
    return -(-h // b), -(-w // b), min(b, h), min(b, w)


def _native_block_means() -> Any:
    """``keepbits_block_means`` of the native library (``native/cpu/codec_kernels.cc``), or None."""
    return native.c_function("keepbits_block_means")


def _grid_means(frame: np.ndarray, b: int) -> np.ndarray:
    """Rounded b×b block means x_b of an H×W×C uint8 frame, one per block (⌈H/b⌉×⌈W/b⌉×C uint8).

    Exact integer block sums divided in float64 and rounded half to even, as
    :func:`keepbits.core.block_means`. The native library computes the same in one pass; without
    it, frames that tile exactly and whose total fits int32 take a faster route to the same sums:
    differences of OpenCV's integral image.
    """
    h, w, c = frame.shape
    native_means = _native_block_means()
    if native_means is not None:  # it refuses (non-zero) sizes beyond its 32-bit column sums
        frame = np.ascontiguousarray(frame)
        out = np.empty((-(-h // b), -(-w // b), c), np.uint8)
        if native_means(frame.ctypes.data, h, w, c, b, out.ctypes.data) == 0:
            return out
    if b <= min(h, w) and h % b == 0 and w % b == 0 and 255 * h * w < 1 << 31:
        integral = cv2.integral(frame)  # (H+1)×(W+1)×C int32 prefix sums
        sums = integral[b::b, b::b] - integral[:-b:b, b::b] - integral[b::b, :-b:b] + integral[:-b:b, :-b:b]
        return np.rint(sums.reshape(h // b, w // b, c) / float(b * b)).astype(np.uint8)
    return np.rint(block_means(frame.transpose(2, 0, 1), b)).astype(np.uint8).transpose(1, 2, 0)


def background_codec(background: str, bh: int, bw: int) -> int:
    """The section codec of a ``bh``×``bw`` block-means grid for ``background`` (a name of
    :data:`BACKGROUND_CODECS`, or ``"auto"``: lossless, PNG from :data:`PNG_BACKGROUND_MIN_BLOCKS`
    blocks up, raw below).

    Example:
        >>> from keepbits.codec import payload
        >>> [payload.CODEC_NAMES[payload.background_codec("auto", n, n)] for n in (8, 56)]
        ['raw', 'png']
    """
    if background == "auto":
        return CODEC_PNG if bh * bw >= PNG_BACKGROUND_MIN_BLOCKS else CODEC_RAW
    return BACKGROUND_CODECS[background]


def is_lossless(mode: str = "blocks", codec: str = "png", background: str = "auto") -> bool:
    """Whether :func:`encode` with these settings decodes to exactly what it was given (x̃, or the
    simplified image): paper mode always; blocks mode with a PNG foreground and a lossless
    background; mixed and simplified modes with PNG. What a payload's size is fairly compared
    with: lossless against a lossless whole-frame format, lossy against a lossy one.

    Example:
        >>> from keepbits.codec.payload import is_lossless
        >>> is_lossless(), is_lossless(codec="webp"), is_lossless("blocks", "png", "jpeg"), is_lossless("paper", "webp")
        (True, False, False, True)
    """
    if mode == "paper":
        return True
    if mode == "blocks" and background not in ("auto", "raw", "png"):
        return False
    return codec == "png"


def _upsample(grid: np.ndarray, h: int, w: int, th: int, tw: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a block grid back to H×W×C."""
    return np.repeat(np.repeat(grid, th, axis=0), tw, axis=1)[:h, :w]


def mixed_image(frame: Any, mask: Any, block: int, threshold: float = 0.5) -> np.ndarray:
    """The sender's x̃ with the hard mask ``mask > threshold`` and uint8 block means (H×W×C).

    Example:
        >>> import numpy as np
        >>> from keepbits.codec import mixed_image
        >>> mixed_image(np.arange(16, dtype=np.uint8).reshape(4, 4), np.zeros((4, 4)), 2)[0, :, 0].tolist()
        [2, 2, 4, 4]
    """
    x = _check_frame(frame)
    keep = _hard_mask(mask, x.shape[:2], threshold)
    _, _, th, tw = _grid(*x.shape[:2], block)
    return np.where(keep[:, :, None], x, _upsample(_grid_means(x, block), *x.shape[:2], th, tw))


def _encode_image(img: np.ndarray, codec: int, quality: int, effort: dict[str, int | None]) -> bytes:
    """One image section (:func:`keepbits.codec.images.encode_image` with ``effort``: its
    ``png_level`` and ``webp_method``; PNG with ``png_level`` None: Paeth + run-length deflate, on
    camera frames and foreground mosaics both faster and smaller than zlib's LZ77 levels,
    ``docs/codec.md``)."""
    return encode_image(img, CODEC_NAMES[codec], quality, **effort)


def _encode_section(img: np.ndarray, codec: int, quality: int, effort: dict[str, int | None]) -> bytes:
    if codec == CODEC_RAW:
        return deflate.compress(img.tobytes(), 6)
    return _encode_image(img, codec, quality, effort)


def _mask_section(keep: np.ndarray) -> tuple[int, int, int, bytes]:
    """The H×W hard mask as a section: bit-packed, deflated."""
    return TAG_MASK, CODEC_BITS, 0, deflate.compress(np.packbits(keep).tobytes(), 6)


def _decode_section(sec: Section, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """Decode an image section that must be exactly ``shape`` (H, W, C); sizes checked first."""
    h, w, c = shape
    if sec.codec == CODEC_RAW:
        return _inflate(sec.data, h * w * c, what).reshape(h, w, c)
    if sec.codec not in (CODEC_PNG, CODEC_JPEG, CODEC_WEBP):
        raise DecodeError(f"{what}: codec {CODEC_NAMES[sec.codec]} is not an image codec")
    return decode_image(sec.data, CODEC_NAMES[sec.codec], shape=shape, what=what)


def _inflate(data: bytes, size: int, what: str) -> np.ndarray:
    """zlib-inflate exactly ``size`` bytes, never more (no decompression bombs)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size + 1)
    except zlib.error as exc:
        raise DecodeError(f"{what}: corrupt zlib data ({exc})") from None
    if len(out) != size or not d.eof or d.unconsumed_tail:
        raise DecodeError(f"{what}: inflates to a different size than the {size} bytes the header implies")
    return np.frombuffer(out, np.uint8)


def _native_foreground() -> tuple[Any, Any] | None:
    """``keepbits_kept_blocks`` and ``keepbits_mosaic`` of the native library (``native/cpu/codec_kernels.cc``), or None."""
    kept_blocks, mosaic = native.c_function("keepbits_kept_blocks"), native.c_function("keepbits_mosaic")
    return None if kept_blocks is None or mosaic is None else (kept_blocks, mosaic)


def _kept_blocks(keep: np.ndarray, b: int) -> np.ndarray:
    """bh×bw: does the block hold any kept pixel (rows of a block first: contiguous reductions;
    one C pass with the native library)."""
    h, w = keep.shape
    bh, bw, th, tw = _grid(h, w, b)
    fast = _native_foreground()
    if fast is not None:
        flags, keep_bytes = np.empty((bh, bw), np.uint8), np.ascontiguousarray(keep).view(np.uint8)  # named: alive during the call
        if fast[0](keep_bytes.ctypes.data, h, w, b, flags.ctypes.data) >= 0:
            return flags.view(np.bool_)
    if (bh * th, bw * tw) != (h, w):
        padded = np.zeros((bh * th, bw * tw), bool)
        padded[:h, :w] = keep
        keep = padded
    return keep.reshape(bh, th, bw * tw).any(axis=1).reshape(bh, bw, tw).any(axis=2)


def _mosaic_shape(k: int, th: int, tw: int, c: int) -> tuple[int, int, int]:
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols) * th, cols * tw, c


def _mosaic(x: np.ndarray, keep: np.ndarray, grid: np.ndarray, kept: np.ndarray, k: int, th: int, tw: int) -> np.ndarray:
    """The K kept tiles of x̃ (x where ``keep``, else the block mean) laid out row-major in
    ``⌈√K⌉`` columns (``docs/codec.md``). When every block is kept and the mosaic has the
    frame's own block grid, the mosaic *is* x̃ (or ``x`` itself, no copy, when every pixel is kept).
    One C pass with the native library, else numpy; the same bytes."""
    h, w, c = x.shape
    bh, bw = kept.shape
    mh, mw, _ = _mosaic_shape(k, th, tw, c)
    rows, cols = mh // th, mw // tw
    exact = (bh * th, bw * tw) == (h, w)
    if exact and k == bh * bw and (rows, cols) == (bh, bw):  # every block kept, in the frame's own layout
        if keep.all():
            return x
        return np.where(keep[:, :, None], x, _upsample(grid, h, w, th, tw))
    fast = _native_foreground()
    if fast is not None:
        mosaic = np.zeros((mh, mw, c), np.uint8)
        # named arrays: each must stay alive while C reads it
        x_c, keep_c, grid_c = np.ascontiguousarray(x), np.ascontiguousarray(keep).view(np.uint8), np.ascontiguousarray(grid)
        kept_c = np.ascontiguousarray(kept).view(np.uint8)
        if fast[1](x_c.ctypes.data, keep_c.ctypes.data, grid_c.ctypes.data, kept_c.ctypes.data, h, w, c, th, tw, cols, mosaic.ctypes.data) == 0:
            return mosaic
    pad = ((0, bh * th - h), (0, bw * tw - w))
    xp = x if exact else np.pad(x, (*pad, (0, 0)), mode="edge")
    kp = keep if exact else np.pad(keep, pad)
    mosaic = np.zeros((rows * cols, th, tw, c), np.uint8)
    tiles = mosaic[:k]
    tiles[...] = xp.reshape(bh, th, bw, tw, c).transpose(0, 2, 1, 3, 4)[kept]
    tile_drop = ~kp.reshape(bh, th, bw, tw).transpose(0, 2, 1, 3)[kept]
    if tile_drop.any():
        np.copyto(tiles, np.broadcast_to(grid[kept][:, None, None, :], tiles.shape), where=tile_drop[..., None])
    return mosaic.reshape(rows, cols, th, tw, c).transpose(0, 2, 1, 3, 4).reshape(mh, mw, c)


def _native_blocks() -> Any:
    """``keepbits_blocks_scanlines`` of the native library (``native/cpu/codec_kernels.cc``), or None."""
    return native.c_function("keepbits_blocks_scanlines")


def _lossless_blocks(x: np.ndarray, keep: np.ndarray, b: int, background_png: bool) -> tuple[np.ndarray, bytes | None, bytes | None] | None:
    """The block means, the means grid's PNG (when ``background_png``) and the mosaic's PNG (None
    when no tile is kept) of a lossless blocks payload, the pixel work in one call of the native
    library (``keepbits_blocks_scanlines``: the interpreter lock is released around all of it);
    the same bytes as the step-by-step path. None without the library (or when it refuses)."""
    fused = _native_blocks()
    if fused is None:
        return None
    h, w, c = x.shape
    bh, bw, th, tw = _grid(h, w, b)
    cols = math.isqrt(bh * bw - 1) + 1  # ⌈√K⌉ of the most tiles there can be; a mosaic has at most that many rows
    capacity = cols * th + (bh * bw + cols) * th * tw * c
    # named arrays: each must stay alive while C reads or writes it
    frame, keep_bytes = np.ascontiguousarray(x), np.ascontiguousarray(keep).view(np.uint8)
    grid, kept = np.empty((bh, bw, c), np.uint8), np.empty((bh, bw), np.uint8)
    background = np.empty(bh * (1 + bw * c), np.uint8) if background_png else None
    foreground, size = np.empty(capacity, np.uint8), np.zeros(2, np.int64)
    k = fused(frame.ctypes.data, keep_bytes.ctypes.data, h, w, c, b, grid.ctypes.data, kept.ctypes.data,
              None if background is None else background.ctypes.data, foreground.ctypes.data, capacity, size.ctypes.data)
    if k < 0:
        return None
    return (grid, None if background is None else png_from_scanlines(background, bh, bw, c),
            png_from_scanlines(foreground, int(size[0]), int(size[1]), c) if k else None)


def encode(
    frame: Any,
    record: FrameRecord | np.ndarray | None = None,
    *,
    mask: Any = None,
    block: int | None = None,
    mode: str = "blocks",
    codec: str = "png",
    quality: int = 90,
    background: str = "auto",
    threshold: float | None = None,
    label: int | None = None,
    name: str | None = None,
    score: float | None = None,
    sequence: int | None = None,
    timestamp: float | None = None,
    roi: tuple[int, int, int, int] | None = None,
    source_size: tuple[int, int] | None = None,
    png_level: int | None = None,
    webp_method: int | None = None,
) -> bytes:
    """Pack ``frame`` (uint8 RGB/grey) and its mask into a versioned payload.

    ``record`` is the mask array itself or a :class:`FrameRecord` (from a
    :class:`keepbits.runtime.Result`: ``result.frame_record()``); keywords override its fields.
    ``mode="blocks"`` sends background means + mask + kept blocks (``codec``
    png = lossless, jpeg/webp at ``quality``; ``background`` auto/raw/png = lossless, auto: PNG for grids
    of ≥ :data:`PNG_BACKGROUND_MIN_BLOCKS` blocks, raw below);
    ``mode="paper"`` sends x̃ as one PNG (the NICE protocol); ``mode="mixed"`` sends x̃ as one
    ``codec`` image plus the mask (with JPEG/WebP smaller and more accurate than lossy blocks:
    the codec sees whole neighbourhoods, not a mosaic of tiles); ``mode="simplified"`` sends
    ``frame`` itself (a SimpleBits simplified image) as one ``codec`` image and needs no mask.
    ``png_level`` None (default) codes PNGs with the Paeth filter and zlib's run-length strategy
    (fast, and smallest on camera content); 0–9 uses that zlib level (LZ77) with OpenCV's
    adaptive filters, better for long-range repeats. Either way the PNG decodes to the same pixels.
    ``webp_method`` None (default) codes WebP with OpenCV's encoder (libwebp method 4); 0–6 with
    that libwebp method (Pillow): on the demo bundle's frames method 2 codes x̃ in 1.79 instead of
    3.31 ms for 3.5 % more bytes (``bench/results/pipeline_parts.json``).

    Example:
        >>> import numpy as np
        >>> from keepbits.codec import encode
        >>> len(encode(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16)), block=4)) > 0
        True
        >>> len(encode(np.zeros((16, 16, 3), np.uint8), mode="simplified", codec="webp", quality=80)) > 0
        True
        >>> len(encode(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16)), block=4, mode="mixed", codec="webp")) > 0
        True
    """
    x = _check_frame(frame)
    h, w, c = x.shape
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    if isinstance(record, np.ndarray):
        mask = record if mask is None else mask
    elif isinstance(record, FrameRecord):
        mask = record.mask if mask is None else mask
        block = record.block if block is None else block
        threshold = record.threshold if threshold is None else threshold
        label = record.label_index if label is None else label
        name = record.label if name is None else name
        score = record.score if score is None else score
        sequence = record.sequence if sequence is None else sequence
        timestamp = record.timestamp if timestamp is None else timestamp
        roi = record.roi if roi is None else roi
        source_size = record.source_size if source_size is None else source_size
    elif record is not None:
        raise TypeError(f"encode takes a FrameRecord or a mask array, got {type(record).__name__} "
                        "(from a keepbits.runtime.Result pass result.frame_record())")
    if mode == "simplified":
        block = 1
    else:
        if mask is None:
            raise InputError(f"{mode} mode needs a mask (pass the mask array or a FrameRecord with one)")
        block = int(block or 0)
        if not 1 <= block <= MAX_SIDE:
            raise InputError(f"block size must be 1..{MAX_SIDE}, got {block}")
    if codec not in IMAGE_CODECS or background not in BACKGROUNDS:
        raise InputError(f"unknown codec {codec!r}/{background!r}; codecs {sorted(IMAGE_CODECS)}, backgrounds {list(BACKGROUNDS)}")
    if c == 1 and CODEC_WEBP in (IMAGE_CODECS[codec], BACKGROUND_CODECS.get(background)):
        raise InputError("webp needs 3-channel frames; use png or jpeg for grey frames")
    if not 1 <= quality <= 100:
        raise InputError(f"quality must be 1..100, got {quality}")
    check_webp_method(webp_method)
    threshold = 0.5 if threshold is None else float(threshold)
    effort = {"png_level": png_level, "webp_method": webp_method}
    label = -1 if label is None else int(label)
    if not -1 <= label < 1 << 15:
        raise InputError(f"label index must be -1..32767, got {label}")
    name = "" if name is None else str(name)
    if not name.isprintable():
        raise InputError(f"class name {name[:40]!r} holds control characters")
    header = Header(
        mode=MODES[mode], channels=c, height=h, width=w, block=block, label=label,
        score=float("nan") if score is None else float(score),
        sequence=0 if sequence is None else int(sequence),
        timestamp=time.time() if timestamp is None else float(timestamp),
        roi=tuple(roi or (0, 0, w, h)),
        source_size=tuple(source_size or (w, h)),
        name=name,
    )
    if mode == "simplified":
        img_codec = IMAGE_CODECS[codec]
        section_quality = 0 if img_codec == CODEC_PNG else quality
        return pack(header, [(TAG_SIMPLIFIED, img_codec, section_quality, _encode_image(x, img_codec, quality, effort))])
    keep = _hard_mask(mask, (h, w), threshold)
    bh, bw, th, tw = _grid(h, w, block)
    bg_codec, fg_codec = background_codec(background, bh, bw), IMAGE_CODECS[codec]
    one_call = mode == "blocks" and fg_codec == CODEC_PNG and png_level is None and bg_codec in (CODEC_PNG, CODEC_RAW)
    fused = _lossless_blocks(x, keep, block, bg_codec == CODEC_PNG) if one_call else None
    grid = _grid_means(x, block) if fused is None else fused[0]
    if mode in ("paper", "mixed"):
        mixed = np.where(keep[:, :, None], x, _upsample(grid, h, w, th, tw))
        if mode == "paper":
            return pack(header, [(TAG_MIXED, CODEC_PNG, 0, _encode_image(mixed, CODEC_PNG, 0, effort))])
        img_codec = IMAGE_CODECS[codec]
        return pack(header, [(TAG_MIXED, img_codec, 0 if img_codec == CODEC_PNG else quality,
                              _encode_image(mixed, img_codec, quality, effort)), _mask_section(keep)])
    if fused is not None:
        background_bytes, foreground = fused[1] or _encode_section(grid, bg_codec, quality, effort), fused[2]
    else:
        background_bytes, foreground = _encode_section(grid, bg_codec, quality, effort), None
        kept = _kept_blocks(keep, block)
        k = int(kept.sum())
        if k:
            foreground = _encode_image(_mosaic(x, keep, grid, kept, k, th, tw), fg_codec, quality, effort)
    sections = [(TAG_BACKGROUND, bg_codec, quality, background_bytes), _mask_section(keep)]
    if foreground is not None:
        sections.append((TAG_FOREGROUND, fg_codec, quality, foreground))
    return pack(header, sections)


def decode(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_pixels_per_byte: int | None = DEFAULT_MAX_PIXELS_PER_BYTE,
) -> tuple[np.ndarray, np.ndarray | None, PayloadMeta]:
    """Rebuild ``(image H×W×C uint8, mask H×W bool or None in paper and simplified modes, meta)``.

    Every size is checked against the header, ``max_pixels`` and (frames over 1 MP)
    ``max_pixels_per_byte`` before anything is allocated; malformed input raises
    :class:`keepbits.errors.DecodeError` with the reason. A blocks payload is rebuilt in one
    output-size buffer plus the H×W mask (``docs/codec.md``, "Decoder safety", states the bound).

    Example:
        >>> from keepbits.codec import decode
        >>> decode(b"not a payload")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.DecodeError: truncated payload: 13 bytes, the header alone needs 54
    """
    header, sections = unpack(data, max_pixels, max_pixels_per_byte)
    h, w, c, b = header.height, header.width, header.channels, header.block
    bh, bw, th, tw = _grid(h, w, b)
    meta = PayloadMeta(
        version=VERSION, mode=_MODE_NAMES[header.mode], height=h, width=w,
        channels=c, block=b, label=None if header.label < 0 else header.label, name=header.name,
        score=None if math.isnan(header.score) else header.score, sequence=header.sequence,
        timestamp=header.timestamp, roi=header.roi, source_size=header.source_size,
        codecs={_TAG_NAMES[t]: CODEC_NAMES[s.codec] for t, s in sections.items() if t in _TAG_NAMES},
        section_bytes={_TAG_NAMES[t]: len(s.data) for t, s in sections.items() if t in _TAG_NAMES},
        total_bytes=len(data), total_blocks=0 if header.mode == MODE_SIMPLIFIED else bh * bw,
    )
    expected = _MODE_SECTIONS[header.mode]
    if not expected <= set(sections) or set(sections) - expected - ({TAG_FOREGROUND} if header.mode == MODE_BLOCKS else set()):
        raise DecodeError(f"{meta.mode} payload has sections {sorted(sections)}, expected {sorted(expected)}")
    if header.mode == MODE_PAPER:
        return _decode_section(sections[TAG_MIXED], (h, w, c), "mixed image"), None, meta
    if header.mode == MODE_SIMPLIFIED:
        return _decode_section(sections[TAG_SIMPLIFIED], (h, w, c), "simplified image"), None, meta
    mask_sec = sections[TAG_MASK]
    if mask_sec.codec != CODEC_BITS:
        raise DecodeError(f"mask uses codec {CODEC_NAMES[mask_sec.codec]}, expected bits")
    keep = np.unpackbits(_inflate(mask_sec.data, -(-h * w // 8), "mask"), count=h * w).view(bool).reshape(h, w)
    if header.mode == MODE_MIXED:
        meta.kept_blocks = int(_kept_blocks(keep, b).sum())
        return _decode_section(sections[TAG_MIXED], (h, w, c), "mixed image"), keep, meta
    grid = _decode_section(sections[TAG_BACKGROUND], (bh, bw, c), "background")
    kept = _kept_blocks(keep, b)
    k = meta.kept_blocks = int(kept.sum())
    # x̃ built in place, block-major (bh, th, bw, tw, C) over the frame padded to whole tiles:
    # the block means first, then the kept pixels of the kept blocks; no other frame-size buffer
    canvas = np.empty((bh, th, bw, tw, c), np.uint8)
    canvas[...] = grid[:, None, :, None, :]
    if k:
        if TAG_FOREGROUND not in sections:
            raise DecodeError(f"mask keeps {k} blocks but the payload has no foreground section")
        mh, mw, _ = _mosaic_shape(k, th, tw, c)
        tiles = _decode_section(sections[TAG_FOREGROUND], (mh, mw, c), "foreground")
        tiles = tiles.reshape(mh // th, th, mw // tw, tw, c).transpose(0, 2, 1, 3, 4).reshape(-1, th, tw, c)[:k]
        if not tiles.flags.writeable:  # one row or column of tiles: the reshapes were views of the decoded image
            tiles = tiles.copy()
        padded = keep
        if (bh * th, bw * tw) != (h, w):
            padded = np.zeros((bh * th, bw * tw), bool)
            padded[:h, :w] = keep
        tile_drop = ~padded.reshape(bh, th, bw, tw).transpose(0, 2, 1, 3)[kept]
        np.copyto(tiles, np.broadcast_to(grid[kept][:, None, None, :], tiles.shape), where=tile_drop[..., None])
        canvas.transpose(0, 2, 1, 3, 4)[kept] = tiles
    elif TAG_FOREGROUND in sections:
        raise DecodeError("mask keeps no block but the payload has a foreground section")
    return canvas.reshape(bh * th, bw * tw, c)[:h, :w], keep, meta
