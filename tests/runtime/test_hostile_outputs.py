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


def _nan_bundle(path, only: str = "both"):
    """The toy bundle with its brightness scale (logits) and/or mask span made NaN."""
    import onnx
    from onnx import numpy_helper

    from keepbits.bundle import load_bundle, write_bundle
    from keepbits.runtime.synthetic import toy_bundle

    toy = load_bundle(toy_bundle(path.with_name("toy_" + path.name), size=16))
    model = onnx.load(str(toy.model_path))
    names = {"both": ("c_scale", "c_span"), "logits": ("c_scale",), "mask": ("c_span",)}[only]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([np.nan], np.float32), node.output[0]))
    return write_bundle(path, toy.manifest, {"model.onnx": model.SerializeToString()})


@pytest.mark.parametrize("only, message", [("both", "the model's logits and mask are NaN or infinite"),
                                           ("logits", "the model's logits are NaN or infinite"),
                                           ("mask", "the model's mask is NaN or infinite")])
def test_frames_whose_model_outputs_are_not_finite_fail_and_are_never_written(tmp_path, only, message):
    """They were written with "score": NaN (not JSON) and the arg-max of NaN logits as the label."""
    from keepbits.runtime import Pipeline, open_source
    from keepbits.runtime.sinks import FilesSink
    from keepbits.runtime.stream import run_stream

    pipe = Pipeline.from_bundle(_nan_bundle(tmp_path / "nan.zip", only))
    frames = [np.full((12, 20, 3), 40 * i, np.uint8) for i in range(4)]
    result = pipe.predict(frames[:1])[0]
    assert result.error == message
    with pytest.raises(InputError, match=message):
        pipe.compress(result)
    for workers in (1, 2):  # the writer encodes (one worker) or each worker encodes its own frames
        summary = run_stream(pipe, open_source(frames), [FilesSink(tmp_path / f"out{workers}")], workers=workers, compare=())
        assert (summary["written"], summary["errors"], summary["status"]) == (0, 4, "frame_errors")
        assert message in summary["reason"]
        assert not (tmp_path / f"out{workers}" / "frames.jsonl").read_text()


def test_evaluation_refuses_a_model_whose_outputs_are_not_finite(tmp_path):
    from keepbits.runtime import Pipeline
    from keepbits.runtime.evaluate import rate_accuracy

    images = list(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="logits and mask are NaN or infinite"):
        rate_accuracy(Pipeline.from_bundle(_nan_bundle(tmp_path / "nan.zip")), images)
