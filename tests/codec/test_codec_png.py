"""keepbits.codec.png: the default lossless writer is a standard PNG with Paeth scanlines."""
from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from keepbits.codec import deflate as deflate_module
from keepbits.codec import png


def paeth_reference(image: np.ndarray) -> np.ndarray:
    """Filter type 4 byte by byte, as the PNG specification states it."""
    h, w, c = image.shape
    rows = image.reshape(h, w * c).astype(int)
    out = np.zeros((h, 1 + w * c), np.uint8)
    out[:, 0] = 4
    for y in range(h):
        for i in range(w * c):
            a = rows[y, i - c] if i >= c else 0
            b = rows[y - 1, i] if y else 0
            up_left = rows[y - 1, i - c] if y and i >= c else 0
            p = a + b - up_left
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - up_left)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else up_left
            out[y, 1 + i] = (rows[y, i] - pred) % 256
    return out


@pytest.fixture(params=["native", "opencv"])
def paeth_filter(request, monkeypatch):
    """Both filter implementations: the native library's C loop (built by ``make test``) and
    the OpenCV path every install has."""
    if request.param == "native" and png._native_filter() is None:
        pytest.skip("native library not built (native/build.sh)")
    if request.param == "opencv":
        monkeypatch.setattr(png, "_native_filter", lambda: None)
    return request.param


@pytest.mark.parametrize("band_bytes", [png.BAND_BYTES, 1, 40])
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 1), (7, 1, 3), (5, 6, 3), (6, 5, 1), (13, 11, 3)])
def test_paeth_scanlines_match_the_specification(monkeypatch, paeth_filter, shape, band_bytes):
    """Whole image in one band, one row per band, and bands of a few rows: the same scanlines."""
    monkeypatch.setattr(png, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(sum(shape))
    for image in (rng.integers(0, 256, shape, dtype=np.uint8),  # random: every tie rule and wrap occurs
                  np.cumsum(rng.integers(0, 3, shape), axis=1).clip(0, 255).astype(np.uint8)):  # smooth ramps
        scanlines = np.concatenate([band.copy() for band in png._paeth_bands(image)])
        assert np.array_equal(scanlines, paeth_reference(image)), (paeth_filter, shape)
    strided = np.random.default_rng(1).integers(0, 256, (shape[0], 2 * shape[1], shape[2]), dtype=np.uint8)[:, ::2]
    scanlines = np.concatenate([band.copy() for band in png._paeth_bands(strided)])  # a non-contiguous view
    assert np.array_equal(scanlines, paeth_reference(strided)), (paeth_filter, shape)


def test_native_and_opencv_filters_write_the_same_png(monkeypatch):
    """Camera-like content at a real frame size: byte-identical files from both paths."""
    if png._native_filter() is None:
        pytest.skip("native library not built (native/build.sh)")
    rng = np.random.default_rng(2)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), (7, 7), 2)
    frame[:40] = 0  # letterbox band
    native_bytes = png.encode_png(frame)
    monkeypatch.setattr(png, "_native_filter", lambda: None)
    assert png.encode_png(frame) == native_bytes and np.array_equal(_decode(native_bytes), frame)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        return np.asarray(im)


@pytest.mark.parametrize("deflate", ["default", "stdlib"])
def test_encode_png_decodes_to_the_same_pixels(monkeypatch, deflate):
    """Grey, grey with a channel axis, RGB, odd sizes; with zlib-ng and with the standard library."""
    if deflate == "stdlib":
        monkeypatch.setattr(deflate_module, "_impl", zlib)
        assert deflate_module.name() == "zlib"
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 300, 3), (300, 1, 3), (37, 53), (37, 53, 1), (64, 48, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        image[: shape[0] // 2] //= 16  # some compressible content too
        decoded = _decode(png.encode_png(image))
        assert np.array_equal(decoded, image.reshape(decoded.shape)) and decoded.shape == image.shape[:2] + (
            (3,) if len(shape) == 3 and shape[2] == 3 else ()), shape


def test_encode_png_sizes_change_between_calls_in_one_thread_and_scratch_stays_bounded():
    """Scratch buffers are reused across sizes (a small image after a large one is unaffected)
    and never exceed a band, however large the image."""
    rng = np.random.default_rng(5)
    large, small = rng.integers(0, 256, (900, 700, 3), dtype=np.uint8), rng.integers(0, 256, (9, 4, 3), dtype=np.uint8)
    png.encode_png(large)
    assert np.array_equal(_decode(png.encode_png(small)), small)
    assert np.array_equal(_decode(png.encode_png(large)), large)
    assert max(buf.nbytes for buf in png._scratch.buffers.values()) <= png.BAND_BYTES + 2 * 700 * 3 + 3


def test_flat_content_compresses_and_bad_input_is_refused():
    assert len(png.encode_png(np.full((200, 200, 3), 7, np.uint8))) < 1000
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="encode_png needs"):
            png.encode_png(bad)


def test_codec_works_without_zlib_ng():
    """A platform without zlib-ng wheels: keepbits falls back to the standard library's zlib."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'zlib_ng':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from keepbits.codec import decode, deflate, encode, mixed_image\n"
        "frame = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)\n"
        "mask = np.zeros((24, 40)); mask[4:12, 8:30] = 1\n"
        "image, _, _ = decode(encode(frame, mask, block=4))\n"
        "print(deflate.name(), bool((image == mixed_image(frame, mask, 4)).all()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["zlib", "True"]
