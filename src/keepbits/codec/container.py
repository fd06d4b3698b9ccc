"""The keepbits payload container, version 1 (spec: ``docs/codec.md``).

Layout (little-endian)::

    header   HEADER struct (fixed size), then ``name_len`` bytes of UTF-8 class name
    sections ``section_count`` × (SECTION struct + ``length`` bytes)
    trailer  CRC-32 (zlib) of every byte before it

The decoder bounds every size it reads (frame pixels, section lengths, decompressed
sizes), verifies the checksum before parsing sections, and turns any malformed input into
:class:`keepbits.errors.DecodeError` with the reason.

Example:
    >>> from keepbits.codec.container import Header, pack, unpack
    >>> h = Header(mode=1, channels=3, height=2, width=2, block=1)
    >>> header, sections = unpack(pack(h, [(4, 1, 0, b"x")]))
    >>> header.width, sections[4].data
    (2, b'x')
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from keepbits.errors import DecodeError

MAGIC = b"KBIT"
VERSION = 1
#: magic, version, mode, channels, flags, height, width, block, label, score, sequence,
#: timestamp, roi x0, y0, w, h, source width, source height, name length, section count.
HEADER = struct.Struct("<4sBBBBHHHhfQdHHHHHHBB")
#: tag, codec, quality, reserved, length.
SECTION = struct.Struct("<BBBBI")
CRC = struct.Struct("<I")

MODE_BLOCKS, MODE_PAPER, MODE_SIMPLIFIED, MODE_MIXED = 0, 1, 2, 3
MODES = {"blocks": MODE_BLOCKS, "paper": MODE_PAPER, "simplified": MODE_SIMPLIFIED, "mixed": MODE_MIXED}
TAG_BACKGROUND, TAG_MASK, TAG_FOREGROUND, TAG_MIXED, TAG_SIMPLIFIED = 1, 2, 3, 4, 5
CODEC_RAW, CODEC_PNG, CODEC_JPEG, CODEC_WEBP, CODEC_BITS = 0, 1, 2, 3, 4
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_PNG: "png", CODEC_JPEG: "jpeg", CODEC_WEBP: "webp", CODEC_BITS: "bits"}
MAX_SECTIONS = 8
MAX_SIDE = 0xFFFF
#: Frames up to this many pixels are decoded whatever the payload's size; beyond it a
#: frame needs at least one payload byte per ``max_pixels_per_byte`` pixels (:func:`unpack`).
RATIO_FLOOR_PIXELS = 1 << 20


@dataclass
class Header:
    """Fixed header fields; ``label`` −1 means no class, ``roi`` (x0, y0, w, h) is the source frame's box."""

    mode: int
    channels: int
    height: int
    width: int
    block: int
    label: int = -1
    score: float = float("nan")
    sequence: int = 0
    timestamp: float = 0.0
    roi: tuple[int, int, int, int] = (0, 0, 0, 0)
    source_size: tuple[int, int] = (0, 0)
    name: str = ""
    flags: int = 0


@dataclass
class Section:
    codec: int
    quality: int
    data: bytes = field(repr=False)


def pack(header: Header, sections: list[tuple[int, int, int, bytes]]) -> bytes:
    """Serialise ``header`` and ``(tag, codec, quality, data)`` sections, append the CRC."""
    # at most 255 bytes, cut at a character boundary (a cut inside a multi-byte character would not decode)
    name = header.name.encode("utf-8")[:255].decode("utf-8", "ignore").encode("utf-8")
    parts = [
        HEADER.pack(
            MAGIC, VERSION, header.mode, header.channels, header.flags, header.height, header.width,
            header.block, header.label, header.score, header.sequence, header.timestamp,
            *header.roi, *header.source_size, len(name), len(sections),
        ),
        name,
    ]
    for tag, codec, quality, data in sections:
        parts += [SECTION.pack(tag, codec, quality, 0, len(data)), data]
    body = b"".join(parts)
    return body + CRC.pack(zlib.crc32(body))


def unpack(data: bytes, max_pixels: int = 1 << 26, max_pixels_per_byte: int | None = None) -> tuple[Header, dict[int, Section]]:
    """Parse and check a payload's framing; :class:`DecodeError` on anything malformed.

    Bounds the decoder's work: at most ``max_pixels`` pixels, and, beyond
    :data:`RATIO_FLOOR_PIXELS`, at most ``max_pixels_per_byte`` pixels per byte of ``data``
    (None: no ratio bound), so that a few kilobytes cannot declare a frame of hundreds of MB.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER.size + CRC.size:
        raise DecodeError(f"truncated payload: {len(data)} bytes, the header alone needs {HEADER.size + CRC.size}")
    if data[:4] != MAGIC:
        raise DecodeError(f"not a keepbits payload (magic {data[:4]!r}, expected {MAGIC!r})")
    if data[4] != VERSION:
        raise DecodeError(f"payload version {data[4]} is not supported (this keepbits reads {VERSION})")
    (stored_crc,) = CRC.unpack_from(data, len(data) - CRC.size)
    if zlib.crc32(memoryview(data)[: -CRC.size]) != stored_crc:
        raise DecodeError("checksum mismatch: the payload is corrupt or truncated")
    (_, _, mode, channels, flags, height, width, block, label, score, sequence, timestamp,
     x0, y0, rw, rh, sw, sh, name_len, count) = HEADER.unpack_from(data)
    if mode not in MODES.values():
        raise DecodeError(f"unknown payload mode {mode}")
    if channels not in (1, 3):
        raise DecodeError(f"unsupported channel count {channels} (1 or 3)")
    if height < 1 or width < 1 or block < 1:
        raise DecodeError(f"bad frame geometry {height}x{width}, block {block}")
    if height * width > max_pixels:
        raise DecodeError(f"frame of {height}x{width} pixels exceeds max_pixels={max_pixels}")
    if max_pixels_per_byte is not None and height * width > max(RATIO_FLOOR_PIXELS, max_pixels_per_byte * len(data)):
        raise DecodeError(f"frame of {height}x{width} pixels from a {len(data)}-byte payload exceeds "
                          f"max_pixels_per_byte={max_pixels_per_byte} (frames over {RATIO_FLOOR_PIXELS} pixels)")
    if x0 + rw > width or y0 + rh > height:
        raise DecodeError(f"source box {(x0, y0, rw, rh)} lies outside the {width}x{height} frame")
    if count > MAX_SECTIONS:
        raise DecodeError(f"{count} sections (at most {MAX_SECTIONS})")
    end = len(data) - CRC.size
    pos = HEADER.size + name_len
    if pos > end:
        raise DecodeError("truncated payload: class name runs past the end")
    try:
        name = data[HEADER.size:pos].decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("class name is not valid UTF-8") from None
    if not name.isprintable():  # written to logs, JSONL and videos: no newlines or escape sequences
        raise DecodeError("class name holds control characters")
    sections: dict[int, Section] = {}
    for _ in range(count):
        if pos + SECTION.size > end:
            raise DecodeError("truncated payload: section header runs past the end")
        tag, codec, quality, _reserved, length = SECTION.unpack_from(data, pos)
        pos += SECTION.size
        if length > end - pos:
            raise DecodeError(f"section {tag} claims {length} bytes, only {end - pos} remain")
        if tag in sections:
            raise DecodeError(f"section {tag} appears twice")
        if codec not in CODEC_NAMES:
            raise DecodeError(f"section {tag} uses unknown codec {codec}")
        sections[tag] = Section(codec, quality, data[pos:pos + length])
        pos += length
    if pos != end:
        raise DecodeError(f"{end - pos} unexpected bytes after the last section")
    header = Header(
        mode=mode, channels=channels, height=height, width=width, block=block, label=label,
        score=score, sequence=sequence, timestamp=timestamp, roi=(x0, y0, rw, rh),
        source_size=(sw, sh), name=name, flags=flags,
    )
    return header, sections

