"""Footage streamed from disk: nested image trees, video frames every k-th, .npz in chunks,
corrupt files skipped and counted, the pixel limit, labels, bounded memory."""
import io
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from keepbits.data import Footage, decode_image
from keepbits.data.stream import discover
from keepbits.errors import InputError


def _png(path, value, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def _video(path, values, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    assert writer.isOpened()
    for v in values:
        writer.write(np.full((size[1], size[0], 3), v, np.uint8))
    writer.release()


def test_nested_folders_without_class_structure(tmp_path):
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "x" / "y" / "z" / "b.png", 20)
    _png(tmp_path / "x" / "c.png", 30)
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    footage = Footage([tmp_path])
    assert [u.kind for u in footage.units] == ["image"] * 3 and not footage.labelled
    values = sorted(int(s.image[0, 0, 0]) for s in footage.read())
    assert values == [10, 20, 30] and all(s.label == -1 for s in footage.read())
    assert footage.counts.as_dict() == {"images": 6, "frames": 0, "skipped": 0}


def test_video_every_kth_frame(tmp_path):
    values = [10 * i + 20 for i in range(10)]
    _video(tmp_path / "clip.mp4", values)
    samples = list(Footage([tmp_path / "clip.mp4"], frame_step=3).read())
    assert [s.position for s in samples] == [0, 3, 6, 9]
    assert all(s.image.shape == (48, 64, 3) and s.label == -1 for s in samples)
    # lossy codec: the frame's grey level within a few steps
    assert np.allclose([s.image.mean() for s in samples], [values[p] for p in (0, 3, 6, 9)], atol=4)


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    _png(tmp_path / "good" / "a.png", 50)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "bad" / "corrupt.jpg").parent.mkdir()
    (tmp_path / "bad" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (tmp_path / "bad" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (tmp_path / "bad" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "bad" / "noise.mp4").write_bytes(b"\x00\x01" * 500)
    footage = Footage([tmp_path])
    assert len(footage.units) == 5
    assert [int(s.image[0, 0, 0]) for s in footage.read()] == [50]
    assert footage.counts.as_dict() == {"images": 1, "frames": 0, "skipped": 4}


def test_pixel_limit_checked_before_decoding(tmp_path):
    _png(tmp_path / "big.png", 1, size=(300, 200))
    _png(tmp_path / "small.png", 2, size=(10, 10))
    footage = Footage([tmp_path], max_pixels=10_000)
    assert [int(s.image[0, 0, 0]) for s in footage.read()] == [2] and footage.counts.as_dict()["skipped"] == 1
    with pytest.raises(InputError, match="exceeds the 10000 pixel limit"):
        decode_image(tmp_path / "big.png", max_pixels=10_000)


def test_npz_streams_in_chunks_with_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (23, 8, 6, 3), dtype=np.uint8)
    y = np.arange(23) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "grey.npz", x=x[:, :, :, 0])  # N×H×W, no labels
    footage = Footage([tmp_path / "a.npz"], npz_chunk=10)
    assert [(u.start, u.stop) for u in footage.units] == [(0, 10), (10, 20), (20, 23)] and footage.labelled
    samples = list(footage.read(footage.units[1:2]))
    assert [s.position for s in samples] == list(range(10, 20))
    assert np.array_equal(np.stack([s.image for s in samples]), x[10:20]) and [s.label for s in samples] == y[10:20].tolist()
    grey = Footage([tmp_path / "grey.npz"], npz_chunk=10)  # compressed: one unit, read in order
    assert [(u.start, u.stop) for u in grey.units] == [(0, 23)]
    samples = list(grey.read())
    assert np.array_equal(np.stack([s.image for s in samples])[..., 0], x[..., 0]) and samples[0].label == -1


def test_npz_truncated_after_discovery_is_skipped_and_counted(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((50, 16, 16, 3), np.uint8))
    _png(tmp_path / "b.png", 5)
    footage = Footage([tmp_path])
    raw = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(raw[: len(raw) // 2])  # ends mid-array, without its zip directory
    assert [s.image.shape for s in footage.read()] == [(12, 20, 3)]
    assert footage.counts.as_dict() == {"images": 1, "frames": 0, "skipped": 1}


def test_class_folders_give_labels(tmp_path):
    _png(tmp_path / "n02" / "a.png", 1)
    _png(tmp_path / "n01" / "deep" / "b.png", 2)
    footage = Footage([tmp_path], class_folders=["n01", "n02"])
    assert footage.labelled and sorted((int(s.image[0, 0, 0]), s.label) for s in footage.read()) == [(1, 1), (2, 0)]
    _png(tmp_path / "n99" / "c.png", 3)
    with pytest.raises(InputError, match="'n99' is not one of the 2 class folders"):
        Footage([tmp_path], class_folders=["n01", "n02"])


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "data path not found"),
    (lambda p: p.mkdir(), "no images, videos or .npz files"),
    (lambda p: p.write_text("x"), "unsupported file"),
])
def test_bad_paths_are_clear_errors(tmp_path, make, match):
    make(tmp_path / "thing")
    with pytest.raises(InputError, match=match):
        discover([tmp_path / "thing"])


def test_npz_without_images_is_an_error_at_discovery(tmp_path):
    np.savez(tmp_path / "a.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(InputError, match="expected an array 'x'"):
        Footage([tmp_path / "a.npz"])
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="must be uint8"):
        Footage([tmp_path / "b.npz"])


def test_reading_holds_one_sample_at_a_time(tmp_path):
    # 800 images of 64×64×3 = 9.8 MB in two .npz files (plain and compressed) + 30 PNGs; reading
    # them all holds one image (and the reader's buffers) at a time, far less than one file's images
    x = np.random.default_rng(0).integers(0, 255, (400, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x)
    np.savez_compressed(tmp_path / "b.npz", x=x)
    for i in range(30):
        Image.fromarray(x[i]).save(tmp_path / f"{i:02d}.png")
    footage = Footage([tmp_path])
    del x
    tracemalloc.start()
    try:
        count = sum(1 for _ in footage.read())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 830 and peak < 400 * 64 * 64 * 3 / 10
