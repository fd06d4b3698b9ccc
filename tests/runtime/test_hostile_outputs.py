"""Outputs under hostile input: pictures enlarged within bounds (``keepbits explain``, the video
sink), video files never overwritten, frame rates a video writer can take."""
from __future__ import annotations

import numpy as np
import pytest

from keepbits.errors import InputError
from keepbits.runtime.explain import Look
from keepbits.runtime.sinks import MAX_SIDE, VideoSink, enlargement
from keepbits.runtime.video import check_fps, open_video_writer


def _look(height: int, width: int) -> Look:
    frame = np.full((height, width, 3), 90, np.uint8)
    mask = np.full((height, width), 0.7, np.float32)
    return Look(name="a", label="x", label_index=0, score=0.5, top=[], kept_fraction=1.0, payload_bytes=10, frame=frame,
                mask=mask, keep=mask > 0.5, mixed=frame)


@pytest.mark.parametrize("shape, min_side, size", [
    ((1, 20000), 224, (1, 20000)),  # the old scale, 224, made a 224×4,480,000 picture (6 GB)
    ((1, 60000), 224, (1, 60000)),
    ((10, 1000), 224, (40, 4000)),  # enlarged as far as the long side allows
    ((28, 28), 224, (224, 224)),
    ((28, 28), MAX_SIDE, (28 * 146, 28 * 146)),
])
def test_explain_enlarges_small_pictures_within_max_side(tmp_path, shape, min_side, size):
    from PIL import Image

    files = _look(*shape).write(tmp_path, min_side)
    for name in files.values():
        with Image.open(tmp_path / name) as image:
            assert image.size[::-1] == size
    assert max(size) <= max(MAX_SIDE, *shape)


def test_enlargement_of_degenerate_sizes():
    assert enlargement(1, 1, 224) == 224 and enlargement(1, 5000, 224) == 1 and enlargement(300, 400, 224) == 1


def test_video_sink_never_overwrites_a_file(tmp_path):
    """The old sink opened a probe cv2.VideoWriter on the path: an existing file was truncated
    when the sink was made, even when the run then delivered nothing."""
    earlier = tmp_path / "earlier.mp4"
    earlier.write_bytes(b"an earlier run's video")
    with pytest.raises(InputError, match=r"exists \(an earlier run.s\?\): keepbits never overwrites it"):
        VideoSink(earlier)
    assert earlier.read_bytes() == b"an earlier run's video"
    sink = VideoSink(tmp_path / "new.mp4", fps=float("nan"))  # a source without a usable rate: 25
    assert sink.fps == 25.0 and not (tmp_path / "new.mp4").exists()


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), 0.0, -5.0, 1e9])
def test_frame_rates_a_video_cannot_take_are_refused(tmp_path, fps):
    """cv2.VideoWriter hung on fps=inf; nan gave a misleading 'no codec' message."""
    with pytest.raises(InputError, match="must be a number > 0 and <= 1000"):
        check_fps(fps)
    with pytest.raises(InputError, match="must be a number > 0 and <= 1000"):
        open_video_writer(tmp_path / "v.mp4", fps, (16, 16))
    assert not (tmp_path / "v.mp4").exists()
