"""The one whole-image encoder/decoder (keepbits.codec.images): PNG exact, JPEG/WebP close,
sizes kept, bad input refused."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from keepbits.codec.images import decode_image, encode_image
from keepbits.errors import DecodeError, InputError


def _smooth(h: int, w: int, c: int) -> np.ndarray:
    """A smooth gradient image (lossy codecs keep it within a few levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    planes = [(xx * 200 // max(w - 1, 1) + 20), (yy * 180 // max(h - 1, 1) + 30), ((xx + yy) * 90 // max(h + w - 2, 1) + 60)]
    return np.stack(planes[:c], -1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 1), (13, 17, 3), (32, 24, 3)])
@pytest.mark.parametrize("level", [None, 0, 9])
def test_png_round_trip_is_exact_and_keeps_the_shape(shape, level):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = encode_image(img, "png", png_level=level)
    out = decode_image(data, "png", shape=shape)
    assert out.shape == shape and out.dtype == np.uint8 and np.array_equal(out, img)
    with Image.open(io.BytesIO(data)) as im:  # an ordinary PNG for any decoder
        assert im.size == (shape[1], shape[0]) and im.mode == ("L" if shape[2] == 1 else "RGB")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_keep_size_and_colour_order(fmt):
    img = _smooth(40, 48, 3)
    low, high = encode_image(img, fmt, quality=20), encode_image(img, fmt, quality=95)
    out = decode_image(high, fmt)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() < 3  # channels not swapped (R and B differ by ~100 here)
    assert len(low) < len(high)


def test_webp_method_trades_encode_effort_for_bytes():
    """libwebp's method (Pillow) on a frame of the shipped clip: the fastest setting takes more
    bytes than the slowest, every method decodes close to the frame, and the default (None)
    stays OpenCV's encoder."""
    import cv2
    from importlib.resources import files

    capture = cv2.VideoCapture(str(files("keepbits.assets") / "bottle_clip.mp4"))
    ok, frame = capture.read()
    capture.release()
    assert ok
    img = np.ascontiguousarray(cv2.resize(frame, (160, 96), interpolation=cv2.INTER_AREA)[:, :, ::-1])
    sizes = {}
    for method in (0, 2, 6):
        data = encode_image(img, "webp", 75, webp_method=method)
        out = decode_image(data, "webp", shape=img.shape)
        assert 10 * np.log10(255**2 / np.mean((out - img.astype(float)) ** 2)) > 28, method
        sizes[method] = len(data)
    assert sizes[0] > sizes[6]
    default = cv2.imencode(".webp", img[:, :, ::-1], [cv2.IMWRITE_WEBP_QUALITY, 75])[1].tobytes()
    assert encode_image(img, "webp", 75) == default
    assert decode_image(encode_image(img[:, :, :1], "webp", 75, webp_method=1), channels=1).shape == (96, 160, 1)


def test_grey_images_and_channel_conversion():
    grey = _smooth(16, 16, 1)
    assert decode_image(encode_image(grey[..., 0], "jpeg", 95)).shape == (16, 16, 1)
    webp = decode_image(encode_image(grey, "webp", 95), channels=1)  # WebP stores grey as RGB
    assert webp.shape == (16, 16, 1) and np.abs(webp.astype(int) - grey).mean() < 3
    assert decode_image(encode_image(grey, "png"), channels=3).shape == (16, 16, 3)


def test_decode_checks_shape_format_and_size_first():
    data = encode_image(np.zeros((8, 6, 3), np.uint8), "png")
    with pytest.raises(DecodeError, match="header says 5x8"):
        decode_image(data, shape=(8, 5, 3), what="header")
    with pytest.raises(DecodeError, match="mode RGB"):
        decode_image(data, shape=(8, 6, 1))
    with pytest.raises(DecodeError, match="max_pixels"):
        decode_image(data, max_pixels=47)
    with pytest.raises(DecodeError, match="corrupt jpeg"):
        decode_image(data, "jpeg")  # a PNG is not accepted where a JPEG is expected
    with pytest.raises(DecodeError, match="corrupt"):
        decode_image(data[:30])


@pytest.mark.parametrize("image, fmt, kwargs, match", [
    (np.zeros((4, 4), np.float32), "png", {}, "uint8"),
    (np.zeros((4, 4, 2), np.uint8), "png", {}, "H×W"),
    (np.zeros((0, 4), np.uint8), "png", {}, "H×W"),
    (np.zeros((4, 4), np.uint8), "gif", {}, "format"),
    (np.zeros((4, 4), np.uint8), "jpeg", {"quality": 0}, "quality"),
    (np.zeros((4, 4), np.uint8), "png", {"png_level": 10}, "PNG level"),
    (np.zeros((4, 4, 3), np.uint8), "webp", {"webp_method": 7}, "WebP method"),
    (np.zeros((4, 4, 3), np.uint8), "webp", {"webp_method": 2, "quality": 0}, "quality"),
])
def test_bad_encode_input(image, fmt, kwargs, match):
    with pytest.raises(InputError, match=match):
        encode_image(image, fmt, **kwargs)
