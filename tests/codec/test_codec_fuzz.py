"""Decoder safety: random bytes, every truncation, bit flips and crafted headers with a
valid checksum only ever raise DecodeError, quickly and without large allocations."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from keepbits.codec import decode, encode
from keepbits.codec.container import CRC, HEADER, SECTION
from keepbits.errors import DecodeError


def _payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    mask = np.zeros((24, 20))
    mask[4:14, 3:11] = 1
    return [
        encode(frame, mask, block=4, label=1, score=0.9, name="one"),
        encode(frame, mask, block=4, codec="jpeg", background="png", quality=50),
        encode(frame, mask, block=8, codec="webp", background="webp"),
        encode(frame, mask, block=3, mode="paper"),
        encode(frame[:, :, :1], mask, block=5),
        encode(frame, mode="simplified", label=2, name="two"),
        encode(frame[:, :, :1], mode="simplified", codec="jpeg", quality=60),
        encode(frame, mask, block=4, mode="mixed", codec="webp", quality=60, label=3),
        encode(frame[:, :, :1], mask, block=2, mode="mixed"),
    ]


def _resign(body: bytes) -> bytes:
    """Replace the trailer with a correct CRC so the parser itself is exercised."""
    body = body[: -CRC.size]
    return body + CRC.pack(zlib.crc32(body))


def _expect_decode_error(data: bytes, budget_s: float = 1.0) -> None:
    start = time.perf_counter()
    with pytest.raises(DecodeError):
        decode(data)
    assert time.perf_counter() - start < budget_s


def test_random_bytes():
    rng = np.random.default_rng(1)
    for n in [0, 1, 3, 10, 53, 54, 55, 200, 5000]:
        for _ in range(20):
            _expect_decode_error(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    _expect_decode_error(b"KBIT\x01" + bytes(100))


def test_every_truncation_of_valid_payloads():
    for payload in _payloads():
        decode(payload)
        for n in range(len(payload)):
            _expect_decode_error(payload[:n])


def test_bit_flips_fail_the_checksum():
    rng = np.random.default_rng(2)
    for payload in _payloads():
        for pos in rng.choice(len(payload) * 8, size=min(400, len(payload) * 8), replace=False):
            flipped = bytearray(payload)
            flipped[pos // 8] ^= 1 << (pos % 8)
            _expect_decode_error(bytes(flipped))


def test_resigned_random_mutations_never_crash():
    """Mutations behind a valid checksum reach every parser path: DecodeError or a valid image."""
    rng = np.random.default_rng(3)
    for payload in _payloads():
        for _ in range(300):
            mutated = bytearray(payload)
            for pos in rng.integers(4, len(payload) - CRC.size, int(rng.integers(1, 4))):
                mutated[pos] = int(rng.integers(0, 256))
            start = time.perf_counter()
            try:
                image, _, meta = decode(_resign(bytes(mutated)))
                assert image.shape == (meta.height, meta.width, meta.channels)
            except DecodeError:
                pass
            assert time.perf_counter() - start < 1.0


def _with_header(payload: bytes, **fields) -> bytes:
    names = ["magic", "version", "mode", "channels", "flags", "height", "width", "block", "label", "score",
             "sequence", "timestamp", "x0", "y0", "rw", "rh", "sw", "sh", "name_len", "count"]
    values = dict(zip(names, HEADER.unpack_from(payload)))
    values.update(fields)
    return _resign(HEADER.pack(*values.values()) + payload[HEADER.size:])


def _inflating_bomb() -> bytes:
    """A blocks payload whose mask section inflates to 64 MB (the frame needs 60 bytes)."""
    payload = _payloads()[0]
    name_len = HEADER.unpack_from(payload)[-2]
    pos = HEADER.size + name_len
    _, codec, q, _, length = SECTION.unpack_from(payload, pos)  # background
    pos += SECTION.size + length
    bomb = zlib.compress(bytes(64 << 20), 9)
    head = payload[:pos] + SECTION.pack(2, 4, 0, 0, len(bomb)) + bomb
    _, _, _, _, mlen = SECTION.unpack_from(payload, pos)
    return _resign(head + payload[pos + SECTION.size + mlen:])


def _png_bomb(index: int = 3, tag: int = 4) -> bytes:
    """A one-image payload (paper: ``_payloads()[3]``, tag 4 mixed; simplified: ``[5]``, tag 5)
    whose PNG's IHDR claims 12000×12000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 12000, 12000)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    payload = _payloads()[index]
    name_len = HEADER.unpack_from(payload)[-2]
    pos = HEADER.size + name_len
    return _resign(payload[:pos] + SECTION.pack(tag, 1, 0, 0, len(png)) + bytes(png) + bytes(CRC.size))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: _with_header(p, height=60000, width=60000), "max_pixels"),
        (lambda p: _with_header(p, block=65535), "background"),
        (lambda p: _with_header(p, channels=4), "channel"),
        (lambda p: _with_header(p, mode=7), "mode"),
        (lambda p: _with_header(p, count=200), "sections"),
        (lambda p: _with_header(p, name_len=255), "UTF-8|truncated|section"),
        (lambda p: _with_header(p, version=2), "version"),
        (lambda p: _with_header(p, x0=30), "box"),
        (lambda p: _inflating_bomb(), "inflates"),
        (lambda p: _png_bomb(), "header says"),
        (lambda p: _png_bomb(5, 5), "header says"),
        (lambda p: _with_header(_payloads()[5], mode=0), "sections"),
        (lambda p: _with_header(_payloads()[7], mode=0), "sections"),
        (lambda p: _with_header(p, mode=3), "sections"),
    ],
)
def test_crafted_headers_are_bounded(make, reason):
    data = make(_payloads()[0])
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=reason):
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak


def test_non_bytes_input():
    with pytest.raises(DecodeError, match="bytes"):
        decode("KBIT")  # type: ignore[arg-type]
