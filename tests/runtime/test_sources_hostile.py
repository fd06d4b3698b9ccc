"""Hostile sources (issue 20, items 6-8): a FIFO whose writer stalls, timeouts that would
busy-wait, image folders with 16-bit and oversized images."""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

from keepbits.errors import InputError
from keepbits.runtime import open_source


def _avi_head(tmp_path, frames: int = 3) -> bytes:
    """The bytes of a small MJPEG AVI (a format FFmpeg reads from a pipe)."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(frames):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    return path.read_bytes()


class _StalledWriter:
    """Opens ``fifo`` for writing (blocks until a reader opens it), writes ``data``, then stalls
    until :meth:`release` (which closes it: the reader sees the end of the stream)."""

    def __init__(self, fifo, data: bytes):
        self.opened, self.fd = threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(fifo, data), daemon=True)
        self.fifo = fifo
        self.thread.start()

    def _run(self, fifo, data):
        self.fd = os.open(fifo, os.O_WRONLY)
        self.opened.set()
        os.write(self.fd, data)

    def release(self):
        if self.fd is None:  # no reader ever came: open our own end so the writer's open returns
            reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(5)
            os.close(reader)
        self.thread.join(5)
        if self.fd is not None:
            os.close(self.fd)


def test_fifo_whose_writer_stalls_never_blocks_the_caller(tmp_path):
    """The old source opened the FIFO on the caller's thread (OpenCV blocked there for ever);
    now start() gives up after stall_timeout, and the stream ends with the reason."""
    fifo = tmp_path / "stream.avi"
    os.mkfifo(fifo)
    writer = _StalledWriter(fifo, _avi_head(tmp_path)[:200])
    box = {}

    def consume():
        src = open_source(fifo, read_timeout=0.1, stall_timeout=0.5)
        src.start()
        box["frame"], box["stats"] = src.get(), src.stats()

    t = threading.Thread(target=consume, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(10)
    try:
        assert not t.is_alive(), "open_source/start blocked on the stalled FIFO"
        assert time.monotonic() - start < 5
        assert box["frame"] is None and "did not open within 0.5 s" in box["stats"]["last_error"]
    finally:
        writer.release()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_timeouts_must_be_positive(bad):
    """``--read-timeout 0`` made every wait return at once: one core spinning on a stalled stream."""
    with pytest.raises(InputError, match="read_timeout"):
        open_source([np.zeros((4, 4, 3), np.uint8)], read_timeout=bad)
    with pytest.raises(InputError, match="stall_timeout"):
        open_source([np.zeros((4, 4, 3), np.uint8)], stall_timeout=bad)


def test_stalled_stream_waits_without_spinning():
    def gen():
        yield np.zeros((4, 4, 3), np.uint8)
        time.sleep(3)

    src = open_source(gen(), live=True, read_timeout=0.05, stall_timeout=0.4)
    cpu = time.process_time()
    assert src.get() is not None and src.get() is None
    assert src.stats()["stale"] <= 10 and time.process_time() - cpu < 0.3


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height grey pixels (the data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_folder_converts_16_bit_and_skips_oversized_images(tmp_path):
    """A valid 16-bit PNG ended the old stream ("frames must be uint8"); a 20000x20000 header
    was decoded in full. Now: 16-bit converted, oversized skipped before decoding, both counted."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i:02d}_a.png"), np.full((12, 16, 3), 10 * i, np.uint8))
    cv2.imwrite(str(folder / "01_b16.png"), np.full((12, 16, 3), 0x8000 + 0x0100 * 7, np.uint16))
    (folder / "02_bomb.png").write_bytes(_png_header_only(20000, 20000))
    cv2.imwrite(str(folder / "03_big.png"), np.zeros((1100, 1000), np.uint8))
    src = open_source(folder, max_pixels=1_000_000)
    images = [f.image for f in src]
    stats = src.stats()
    assert len(images) == 5 and stats["skipped"] == 2 and stats["errors"] == 0
    assert images[2].dtype == np.uint8 and int(images[2][0, 0, 0]) == 0x87  # 16-bit: the high byte
    assert "03_big.png: 1000x1100 pixels exceed max_pixels=1000000" in stats["last_error"]
    default = open_source(folder)  # the default limit refuses the 20000x20000 header too
    assert len(list(default)) == 6 and default.stats()["skipped"] == 1


def test_folder_source_reads_recorded_footage_at_any_depth_in_path_order(tmp_path):
    """A camera's recordings (day/camera folders) stream like a flat folder: every image file below
    the folder, sorted by path; a folder with no image anywhere below it is one clear error."""
    for day, cam, value in (("day2", "cam0", 30), ("day1", "cam1", 20), ("day1", "cam0", 10)):
        (tmp_path / "rec" / day / cam).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "rec" / day / cam / "f.png"), np.full((6, 8, 3), value, np.uint8))
    (tmp_path / "rec" / "notes.txt").write_text("not an image")
    assert [int(f.image[0, 0, 0]) for f in open_source(tmp_path / "rec")] == [10, 20, 30]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="no images .* in it or its subfolders"):
        open_source(tmp_path / "empty")


def test_frame_step_keeps_every_kth_frame_and_counts_the_rest():
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(10)]
    src = open_source(frames, frame_step=3)
    assert [(f.index, int(f.image[0, 0, 0])) for f in src] == [(0, 0), (3, 3), (6, 6), (9, 9)]  # the source's frame numbers
    assert src.stats()["stepped"] == 6 and src.stats()["read"] == 4
    with pytest.raises(InputError, match="frame_step must be an int >= 1"):
        open_source(frames, frame_step=0)


def test_iterator_frames_that_are_no_images_are_skipped():
    frames = [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8)]
    src = open_source(frames)
    assert [f.index for f in src] == [0, 2] and src.stats()["skipped"] == 1  # indices are places in the source


def test_a_camera_password_never_reaches_logs_errors_or_counters(caplog):
    """rtsp://user:password@… is how cameras are addressed; what keepbits shows of it is redacted."""
    src = open_source("rtsp://admin:s3cret@127.0.0.1:1/stream", read_timeout=0.3, stall_timeout=0.8)
    with caplog.at_level("WARNING"):
        assert list(src) == []
    stats = src.stats()
    assert stats["errors"] >= 1 and "admin:***@127.0.0.1:1" in stats["last_error"] and "admin:***" in src.name
    assert "s3cret" not in caplog.text + stats["last_error"] + src.name
    with pytest.raises(InputError) as error:
        open_source(object.__new__(type("NotASource", (), {})))
    assert "NotASource" in str(error.value)


def test_a_skipped_file_keeps_its_place_in_the_frame_indices(tmp_path):
    """A folder's frame index is the file's place in sorted path order: an unreadable file in
    between does not shift the files after it, so a payload traces back to its file."""
    for name, value in (("a.png", 10), ("c.png", 30)):
        cv2.imwrite(str(tmp_path / name), np.full((4, 4, 3), value, np.uint8))
    (tmp_path / "b.png").write_bytes(b"not a png")
    src = open_source(tmp_path)
    assert [(f.index, int(f.image[0, 0, 0])) for f in src] == [(0, 10), (2, 30)]
    assert src.stats()["skipped"] == 1


def test_a_looping_folder_starts_again_and_a_folder_of_nothing_does_not_spin(tmp_path, caplog):
    for name, value in (("a.png", 10), ("b.png", 20)):
        cv2.imwrite(str(tmp_path / name), np.full((4, 4, 3), value, np.uint8))
    (tmp_path / "c.png").write_bytes(b"broken")
    src = open_source(tmp_path, loop=True)
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        seen = [int(frame.image[0, 0, 0]) for frame, _ in zip(src, range(5))]
    src.close()
    assert seen == [10, 20, 10, 20, 10]  # --loop was ignored for folders
    # the broken file is counted every pass and logged once (it was logged on every pass)
    assert src.stats()["skipped"] >= 2 and caplog.text.count("skipped c.png") == 1
    (tmp_path / "c.png").unlink()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    assert list(open_source(tmp_path / "bad", loop=True)) == []


def test_a_cut_off_picture_is_skipped_as_the_data_loaders_skip_it(tmp_path):
    """OpenCV decodes a truncated JPEG or PNG as a partly grey frame (delivered, exit 0) where
    train, eval and compare skip the same file as corrupt."""
    for name, value in (("a.jpg", 10), ("b.png", 20)):
        cv2.imwrite(str(tmp_path / name), np.full((64, 64, 3), value, np.uint8))
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) * 2 // 3])
    src = open_source(tmp_path)
    seen = [frame.image[0, 0, 0] for frame in src]
    assert len(seen) == 2 and src.stats()["skipped"] == 2 and "truncated" in src.stats()["last_error"]
