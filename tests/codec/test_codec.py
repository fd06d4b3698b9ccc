"""Payload codec: exact lossless round trips, lossy bounds, paper mode, bad input."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from keepbits.codec import FrameRecord, decode, encode, mixed_image
from keepbits.core import mixed_resolution
from keepbits.errors import DecodeError, InputError


def _case(rng: np.random.Generator, h: int, w: int, c: int):
    frame = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    mask = (rng.random((h, w)) < rng.random()).astype(np.float32) * rng.uniform(0.6, 1.0)
    return frame, mask


def test_mixed_image_is_core_mixed_resolution_with_hard_mask():
    rng = np.random.default_rng(1)
    for h, w, b in [(7, 9, 2), (32, 32, 8), (5, 3, 10), (16, 24, 1)]:
        frame, soft = _case(rng, h, w, 3)
        keep = (soft > 0.5).astype(np.float32)
        ref = np.rint(mixed_resolution(frame.transpose(2, 0, 1).astype(np.float32), keep, b)).astype(np.uint8)
        assert np.array_equal(mixed_image(frame, soft, b), ref.transpose(1, 2, 0))


@pytest.mark.parametrize("background", ["auto", "raw", "png"])
def test_lossless_round_trip_exact_on_random_sizes_and_blocks(background):
    rng = np.random.default_rng(2)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        b = int(rng.integers(1, 40))
        c = int(rng.choice([1, 3]))
        frame, mask = _case(rng, h, w, c)
        payload = encode(frame, mask, block=b, background=background, label=int(rng.integers(0, 10)), score=0.5, sequence=7)
        image, keep, meta = decode(payload)
        assert np.array_equal(image, mixed_image(frame, mask, b)), (h, w, b, c)
        assert np.array_equal(keep, mask > 0.5)
        assert (meta.height, meta.width, meta.channels, meta.block, meta.sequence) == (h, w, c, b, 7)
        assert meta.total_bytes == len(payload)


@pytest.mark.parametrize("grid, codec", [((15, 17), "raw"), ((16, 16), "png"), ((56, 56), "png")])
def test_auto_background_is_png_from_256_blocks_and_raw_below(grid, codec):
    """The default background picks its lossless codec by the grid's block count; the pixels
    are those of raw and PNG alike."""
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (grid[0] * 4, grid[1] * 4, 3), dtype=np.uint8)
    mask = (rng.random(frame.shape[:2]) > 0.7).astype(np.float32)
    payload = encode(frame, mask, block=4)
    image, _, meta = decode(payload)
    assert meta.codecs["background"] == codec
    for explicit in ("raw", "png"):
        assert np.array_equal(image, decode(encode(frame, mask, block=4, background=explicit))[0])
    assert len(payload) == len(encode(frame, mask, block=4, background=codec))


def test_every_kept_block_count_round_trips_on_an_exact_grid():
    """32×32 at b = 4 is an 8×8 block grid; K kept blocks in 57..63 also make an 8×8 mosaic,
    which must still be the K kept tiles, not the frame's own layout."""
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    order = rng.permutation(64)
    for k in range(65):
        blocks = np.zeros(64, bool)
        blocks[order[:k]] = True
        mask = np.repeat(np.repeat(blocks.reshape(8, 8), 4, 0), 4, 1).astype(np.float32)
        mask[0, 0] = 0.0  # a kept block with a dropped pixel
        image, keep, meta = decode(encode(frame, mask, block=4))
        assert np.array_equal(image, mixed_image(frame, mask, 4)), k
        assert meta.kept_blocks == k


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_lossy_codecs_stay_close_and_keep_the_mask_exact(codec):
    yy, xx = np.mgrid[0:96, 0:128]
    frame = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    mask = np.zeros((96, 128), np.float32)
    mask[20:60, 30:90] = 1
    image, keep, meta = decode(encode(frame, mask, block=8, codec=codec, background=codec, quality=95))
    ref = mixed_image(frame, mask, 8).astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((image - ref) ** 2))
    assert psnr > 30, psnr
    assert np.array_equal(keep, mask > 0.5)
    assert meta.codecs == {"background": codec, "mask": "bits", "foreground": codec}


def test_paper_mode_is_one_png_of_the_mixed_image():
    rng = np.random.default_rng(4)
    frame, mask = _case(rng, 40, 50, 3)
    image, keep, meta = decode(encode(frame, mask, block=4, mode="paper"))
    assert keep is None and meta.mode == "paper" and list(meta.codecs) == ["mixed"]
    assert np.array_equal(image, mixed_image(frame, mask, 4))


def test_mixed_mode_sends_the_mixed_image_and_the_mask():
    rng = np.random.default_rng(5)
    for h, w, b, c in [(40, 50, 4, 3), (17, 9, 5, 1), (8, 8, 8, 3)]:
        frame, mask = _case(rng, h, w, c)
        image, keep, meta = decode(encode(frame, mask, block=b, mode="mixed", label=1))
        assert np.array_equal(image, mixed_image(frame, mask, b)) and np.array_equal(keep, mask > 0.5)
        assert (meta.mode, meta.codecs, meta.label) == ("mixed", {"mixed": "png", "mask": "bits"}, 1)
        padded = np.zeros((-(-h // b) * b, -(-w // b) * b), bool)
        padded[:h, :w] = keep
        assert meta.kept_blocks == padded.reshape(-(-h // b), b, -1, b).any(axis=(1, 3)).sum()


def _clip_frame() -> np.ndarray:
    """The first frame of the shipped demo clip (real camera content), 224 wide, RGB."""
    from importlib.resources import files

    capture = cv2.VideoCapture(str(files("keepbits.assets") / "bottle_clip.mp4"))
    ok, frame = capture.read()
    capture.release()
    assert ok
    return cv2.resize(frame[:, :, ::-1], (224, 126), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_lossy_mixed_mode_beats_lossy_blocks(codec):
    """Blocks mode codes the kept blocks as a mosaic of b×b tiles whose seams JPEG/WebP pay for;
    mixed mode codes x̃ whole. On a camera frame with a fragmented mask (kept 8×8 cells at random)
    it is smaller and closer to x̃ at every quality; with one compact region it is closer at every
    quality and at q75 both smaller and closer than blocks at q90."""
    frame = _clip_frame()
    cells = np.random.default_rng(0).random((16, 28)) < 0.5
    fragmented = np.repeat(np.repeat(cells, 8, 0), 8, 1)[:126].astype(np.float32)
    compact = np.zeros((126, 224), np.float32)
    compact[25:100, 56:168] = 1

    def coded(mask, mode, quality):
        data = encode(frame, mask, block=4, mode=mode, codec=codec, background=codec, quality=quality)
        image, keep, _ = decode(data)
        assert np.array_equal(keep, mask > 0.5)
        return len(data), np.mean((image - mixed_image(frame, mask, 4).astype(np.float64)) ** 2)

    for quality in (50, 75, 90):
        (mixed_bytes, mixed_mse), (blocks_bytes, blocks_mse) = coded(fragmented, "mixed", quality), coded(fragmented, "blocks", quality)
        assert mixed_bytes < blocks_bytes and mixed_mse < blocks_mse, (quality, mixed_bytes, blocks_bytes, mixed_mse, blocks_mse)
        assert coded(compact, "mixed", quality)[1] < coded(compact, "blocks", quality)[1], quality
    (mixed_bytes, mixed_mse), (blocks_bytes, blocks_mse) = coded(compact, "mixed", 75), coded(compact, "blocks", 90)
    assert mixed_bytes < blocks_bytes and mixed_mse < blocks_mse


def test_webp_method_reaches_every_webp_section():
    frame = _clip_frame()
    mask = np.zeros(frame.shape[:2], np.float32)
    mask[20:90, 40:150] = 1
    for options in ({"mode": "mixed"}, {"mode": "blocks", "background": "webp"}, {"mode": "simplified"}):
        default = encode(frame, mask, block=4, codec="webp", quality=60, timestamp=0.0, **options)
        fast = encode(frame, mask, block=4, codec="webp", quality=60, timestamp=0.0, webp_method=0, **options)
        assert fast != default and decode(fast)[2].codecs == decode(default)[2].codecs, options
    with pytest.raises(InputError, match="WebP method"):
        encode(frame, mask, block=4, webp_method=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_simplified_mode_sends_the_image_itself(channels):
    """Mode "simplified" (SimpleBits): no mask; PNG is exact, JPEG/WebP close; blocks/paper need a mask."""
    rng = np.random.default_rng(6)
    image = cv2.GaussianBlur(rng.integers(0, 256, (30, 44, channels), dtype=np.uint8), (0, 0), 3).reshape(30, 44, channels)
    out, keep, meta = decode(encode(image, mode="simplified", label=4, name="four", roi=(0, 2, 44, 26), source_size=(88, 52)))
    assert keep is None and np.array_equal(out, image)
    assert (meta.mode, meta.codecs, meta.label, meta.name, meta.roi, meta.total_blocks) == ("simplified", {"simplified": "png"}, 4, "four", (0, 2, 44, 26), 0)
    for codec in ("jpeg", "webp") if channels == 3 else ("jpeg",):
        lossy, _, meta = decode(encode(image, mode="simplified", codec=codec, quality=85))
        assert meta.codecs == {"simplified": codec} and 10 * np.log10(255**2 / np.mean((lossy - image.astype(float)) ** 2)) > 30
    with pytest.raises(InputError, match="needs a mask"):
        encode(image, mode="paper", block=2)


def _record(**changes):
    fields = dict(mask=np.ones((8, 8)), block=4, threshold=0.5, label_index=2, label="two", score=0.75, sequence=11,
                  timestamp=123.5, roi=(0, 1, 8, 6), source_size=(16, 12))
    return FrameRecord(**{**fields, **changes})


def test_frame_record_fields_are_written():
    _, keep, meta = decode(encode(np.zeros((8, 8, 3), np.uint8), _record()))
    assert (meta.label, meta.name, meta.sequence, meta.timestamp, meta.block) == (2, "two", 11, 123.5, 4)
    assert meta.roi == (0, 1, 8, 6) and meta.source_size == (16, 12) and meta.score == pytest.approx(0.75) and keep.all()
    # keywords override the record; a zero timestamp is kept, not replaced by the clock
    _, _, meta = decode(encode(np.zeros((8, 8, 3), np.uint8), _record(timestamp=0.0), label=5, name="five"))
    assert (meta.label, meta.name, meta.timestamp) == (5, "five", 0.0)


def test_class_names_of_any_script_round_trip_and_control_characters_are_refused():
    """The header holds at most 255 bytes of name, cut at a character boundary (a cut inside a
    multi-byte character made a payload its own decoder refused)."""
    frame, mask = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8))
    for name in ("é" + "猫" * 100, "猫" * 100, "a" * 300, "Ünïcödé label"):
        decoded = decode(encode(frame, mask, block=4, name=name))[2].name
        size = len(decoded.encode("utf-8"))
        assert decoded == name if len(name.encode("utf-8")) <= 255 else (name.startswith(decoded) and 252 < size <= 255)
    with pytest.raises(InputError, match="control characters"):
        encode(frame, mask, block=4, name="cat\x1b[2J")
    payload = bytearray(encode(frame, mask, block=4, name="cat!"))
    at = payload.index(b"cat!")
    payload[at + 3] = 0x1B  # an escape in a received payload's name: refused, CRC fixed so only the name is wrong
    payload[-4:] = struct.pack("<I", zlib.crc32(bytes(payload[:-4])))
    with pytest.raises(DecodeError, match="control characters"):
        decode(bytes(payload))


def test_frame_record_is_required_not_any_object():
    class Duck:  # what encode once read by attribute name, with defaults for whatever was missing
        mask = np.ones((8, 8))
        block = 4
        label = 2

    with pytest.raises(TypeError, match="FrameRecord"):
        encode(np.zeros((8, 8, 3), np.uint8), Duck())
    with pytest.raises(TypeError, match="label_index"):
        FrameRecord(mask=None, block=1, threshold=0.5, label=0, score=1.0, sequence=0, timestamp=0.0, roi=(0, 0, 1, 1),
                    source_size=(1, 1))


def test_all_background_sends_no_foreground_and_is_small():
    frame = np.full((64, 64, 3), 90, np.uint8)
    payload = encode(frame, np.zeros((64, 64)), block=8)
    image, keep, meta = decode(payload)
    assert meta.kept_blocks == 0 and "foreground" not in meta.codecs and not keep.any()
    assert np.all(image == 90) and len(payload) < 150


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frame": np.zeros((4, 4), np.float32)}, "uint8"),
        ({"frame": np.zeros((4, 4, 2), np.uint8)}, "H×W"),
        ({"mask": np.zeros((3, 4))}, "mask shape"),
        ({"block": 0}, "block size"),
        ({"codec": "gif"}, "unknown codec"),
        ({"quality": 0}, "quality"),
        ({"mode": "fast"}, "unknown mode"),
    ],
)
def test_bad_encode_input_raises_input_error(kwargs, match):
    args = {"frame": np.zeros((4, 4, 3), np.uint8), "mask": np.zeros((4, 4)), "block": 2, **kwargs}
    with pytest.raises(InputError, match=match):
        encode(args.pop("frame"), **args)


def test_max_pixels_is_enforced():
    payload = encode(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64)), block=8)
    with pytest.raises(DecodeError, match="max_pixels"):
        decode(payload, max_pixels=1000)


def test_png_settings_change_bytes_not_pixels():
    """Default PNG (zlib RLE + Paeth) and any explicit ``png_level`` decode to the same x̃; all
    kept blocks on an exact grid (the mosaic is the frame itself) and partial masks included."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([(xx * 3) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    cases = [(smooth, np.ones((64, 64))), (smooth, (rng.random((64, 64)) < 0.97).astype(float)),
             (rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.random((40, 56))),
             (rng.integers(0, 256, (37, 45, 1), dtype=np.uint8), np.ones((37, 45)))]
    for frame, mask in cases:
        ref = mixed_image(frame, mask, 8)
        for level in (None, 0, 1, 6, 9):
            for mode in ("blocks", "paper"):
                image, _, _ = decode(encode(frame, mask, block=8, mode=mode, png_level=level))
                assert np.array_equal(image, ref), (frame.shape, level, mode)


@pytest.mark.parametrize("route", ["native", "python"])
def test_fast_grid_means_equal_core_block_means(monkeypatch, route):
    """The native library's pass and the integral-image shortcut round the same block means as
    ``keepbits.core.block_means`` (ties to even at b = 2; partial edge blocks; b beyond the frame)."""
    from keepbits.codec import payload
    from keepbits.codec.payload import _grid_means
    from keepbits.core import block_means

    if route == "native" and payload._native_block_means() is None:
        pytest.skip("native library not built (native/build.sh)")
    if route == "python":
        monkeypatch.setattr(payload, "_native_block_means", lambda: None)
    rng = np.random.default_rng(8)
    for h, w, b, c in [(224, 224, 8, 3), (32, 48, 4, 1), (64, 64, 16, 3), (30, 30, 2, 3), (256, 256, 256, 1),
                       (37, 53, 8, 3), (5, 300, 8, 1), (7, 9, 16, 3), (1, 1, 1, 3),
                       (2912, 2912, 32, 1)]:  # sum over the frame beyond int32: the general route
        frame = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        frame[:b, :b] = 255  # block sums at their maximum
        ref = np.rint(block_means(frame.transpose(2, 0, 1), b)).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(_grid_means(frame, b), ref), (h, w, b, c)


def test_default_png_wins_on_camera_like_content_png_level_on_repeats():
    """The default (Paeth + zlib RLE) is smaller than LZ77 level 6 on smooth content with sensor
    noise (camera frames); on long-range repeats, where RLE fails, ``png_level`` restores LZ77."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    smooth = np.stack([100 + 50 * np.sin(xx / 40 + yy / 55), 120 + 40 * np.cos(yy / 35), 90 + (xx + yy) / 4], -1)
    camera = np.clip(smooth + rng.normal(0, 2, smooth.shape), 0, 255).astype(np.uint8)
    periodic = np.clip(np.stack([128 + 60 * np.sin(xx / 9), 128 + 60 * np.cos(yy / 13), (xx + yy) / 2], -1), 0, 255).astype(np.uint8)
    keep = np.ones((128, 128))
    assert len(encode(camera, keep, block=8)) < len(encode(camera, keep, block=8, png_level=6))
    assert 3 * len(encode(periodic, keep, block=8, png_level=6)) < len(encode(periodic, keep, block=8))

def test_one_call_lossless_blocks_equal_the_step_by_step_payload(monkeypatch):
    """``keepbits_blocks_scanlines`` (the lossless blocks payload's pixel work in one native call)
    gives the bytes of the step-by-step path: raw and PNG means, grey and RGB, partial edge tiles,
    b beyond the frame, nothing / everything / scattered pixels kept, a mosaic of several deflate bands."""
    from keepbits.codec import payload

    if payload._native_blocks() is None:
        pytest.skip("native library not built (native/build.sh)")
    calls, real = [], payload._lossless_blocks

    def spy(*args):
        parts = real(*args)
        calls.append(parts is not None)
        return parts

    monkeypatch.setattr(payload, "_lossless_blocks", spy)
    rng = np.random.default_rng(5)
    cases = [(224, 224, 8, 3), (37, 53, 8, 3), (5, 300, 8, 1), (7, 9, 16, 3), (1, 1, 1, 3), (30, 31, 2, 3), (400, 400, 1, 3)]
    for h, w, b, c in cases:
        frame = rng.integers(0, 256, (h, w + 2, c), dtype=np.uint8)[:, 2:]  # a view, not a contiguous array
        for share in (0.0, 0.03, 0.5, 1.0):
            keep = rng.random((h, w)) < share
            for background in ("auto", "raw", "png"):
                fused = encode(frame, keep, block=b, background=background, timestamp=0.0)
                with monkeypatch.context() as m:
                    m.setattr(payload, "_native_blocks", lambda: None)
                    assert encode(frame, keep, block=b, background=background, timestamp=0.0) == fused, (h, w, b, c, share, background)
    assert sum(calls) == len(cases) * 4 * 3  # every payload encoded with the library took the one-call path
    image, mask, _ = decode(fused)
    assert np.array_equal(mask, keep) and np.array_equal(image[keep], frame[keep])


def test_native_foreground_equals_the_numpy_path(monkeypatch):
    """The native library's kept-tile flags and mosaic (``keepbits_kept_blocks``, ``keepbits_mosaic``)
    are the numpy path's, byte for byte: partial edge tiles, b beyond the frame, grey and RGB,
    nothing / everything / scattered pixels kept; so are whole payloads."""
    from keepbits.codec import payload

    fast = payload._native_foreground()
    if fast is None:
        pytest.skip("native library not built (native/build.sh)")
    rng = np.random.default_rng(11)
    cases = [(224, 224, 8, 3), (37, 53, 8, 3), (5, 300, 8, 1), (7, 9, 16, 3), (1, 1, 1, 3), (64, 48, 4, 1), (30, 31, 2, 3)]
    for h, w, b, c in cases:
        frame = rng.integers(0, 256, (h + 3, w + 5, c), dtype=np.uint8)[3:, :w]  # views, not contiguous arrays
        for share in (0.0, 0.05, 0.5, 1.0):
            keep = (rng.random((h + 2, w + 4)) < share)[2:, 4:]
            keep[: h // 3, : w // 3] = share > 0.2  # a solid region besides the scattered pixels
            _, _, th, tw = payload._grid(h, w, b)
            grid = payload._grid_means(frame, b)
            native_kept = payload._kept_blocks(keep, b)
            native_payload = encode(frame, keep, block=b, timestamp=0.0)
            k = int(native_kept.sum())
            native_mosaic = payload._mosaic(frame, keep, grid, native_kept, k, th, tw) if k else None
            with monkeypatch.context() as m:
                m.setattr(payload, "_native_foreground", lambda: None)
                m.setattr(payload, "_native_blocks", lambda: None)
                numpy_kept = payload._kept_blocks(keep, b)
                assert np.array_equal(native_kept, numpy_kept), (h, w, b, c, share)
                if k:
                    assert np.array_equal(native_mosaic, payload._mosaic(frame, keep, grid, numpy_kept, k, th, tw)), (h, w, b, c, share)
                assert encode(frame, keep, block=b, timestamp=0.0) == native_payload
