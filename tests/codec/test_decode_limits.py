"""Decoder work per payload byte (issue 20, item 12): a few kilobytes may not declare a frame of
hundreds of megabytes, and a frame that is decoded costs about its own size, not a multiple."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from keepbits.codec import DEFAULT_MAX_PIXELS, decode, encode, mixed_image
from keepbits.codec.container import RATIO_FLOOR_PIXELS
from keepbits.errors import DecodeError


def _blank(side: int, block: int = 8) -> bytes:
    """A CRC-valid blocks payload of a constant side×side frame with every block dropped (tiny)."""
    return encode(np.zeros((side, side, 3), np.uint8), np.zeros((side, side), bool), block=block)


def test_small_payload_declaring_a_large_frame_is_refused():
    payload = _blank(2048)  # 4.2 MP from < 1 kB: under the old 2**25 pixel limit, decoded at 12 MB
    assert len(payload) < 2048 and 2048 * 2048 <= DEFAULT_MAX_PIXELS
    with pytest.raises(DecodeError, match="max_pixels_per_byte"):
        decode(payload)
    image, keep, _ = decode(payload, max_pixels_per_byte=None)  # configured: decoded
    assert image.shape == (2048, 2048, 3) and not keep.any()


def test_frames_up_to_the_floor_decode_whatever_their_size():
    side = int(RATIO_FLOOR_PIXELS ** 0.5)
    payload = _blank(side)
    assert side * side / len(payload) > 1024  # over the ratio, under the floor
    assert decode(payload)[0].shape == (side, side, 3)


def test_default_limit_fits_an_edge_device():
    assert DEFAULT_MAX_PIXELS <= 1 << 22
    with pytest.raises(DecodeError, match="max_pixels"):
        decode(_blank(2049, block=1))


@pytest.mark.parametrize("kept", [0.0, 0.3])
def test_decoding_costs_about_the_image_not_a_multiple(kept):
    """Peak traced memory of a blocks decode stays under twice the decoded image (the old
    decoder built several frame-size temporaries: about 4.4x), and the result is exact."""
    side, block = 1024, 16
    rng = np.random.default_rng(0)
    frame = np.repeat(np.repeat(rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8), 64, 0), 64, 1)
    mask = np.zeros((side, side), bool)
    if kept:
        mask[: int(side * kept), : side // 2] = True
    payload = encode(frame, mask, block=block)
    decode(encode(frame[:64, :64], mask[:64, :64], block=block))  # Pillow imports its PNG plugin on first use: not traced
    tracemalloc.start()
    try:
        image, keep, meta = decode(payload, max_pixels_per_byte=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(image, mixed_image(frame, mask, block)) and np.array_equal(keep, mask)
    budget = 1.5 if not kept else 1.8  # x̃ + the mask (1/3 of x̃), plus the kept tiles when there are any
    assert peak < budget * image.nbytes, (peak / image.nbytes, meta.kept_blocks)
