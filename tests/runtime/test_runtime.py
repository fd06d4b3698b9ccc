"""Runtime pipeline: frame fit, colour orders, batches, payloads, thread safety, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from keepbits.codec import decode, deflate
from keepbits.errors import BundleError, InputError
from keepbits.data import ImageFit
from keepbits.runtime import Pipeline
from keepbits.runtime.synthetic import toy_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return toy_bundle(tmp_path_factory.mktemp("b") / "toy", size=32, block=4)


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline.from_bundle(bundle, backend="onnxruntime")


def _frame(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    img[h // 4:h // 2, w // 4:w // 2] = 230
    return img


def test_letterbox_mapping_round_trips():
    box = ImageFit.plan((640, 360), (224, 224))
    assert box.roi == (0, 49, 224, 126)
    x0, y0, w, h = box.roi
    assert np.allclose(box.to_source([[x0, y0], [x0 + w, y0 + h]]), [[0, 0], [640, 360]])
    tall = ImageFit.plan((100, 400), (64, 64))
    assert tall.roi == (24, 0, 16, 64)


def test_result_fields_and_payload_is_the_mixed_image(pipe):
    r = pipe(_frame())
    assert r.label in ("dark", "bright") and 0 <= r.score <= 1
    assert r.probabilities.shape == (2,) and np.isclose(r.probabilities.sum(), 1)
    assert r.mask.shape == (32, 32) and r.image.shape == (32, 32, 3)
    assert r.fit.roi == (0, 4, 32, 24) and r.source_size == (64, 48)
    assert set(r.timings) == {"preprocess", "model", "postprocess", "encode"}
    image, keep, meta = decode(r.payload)
    assert np.array_equal(image, r.mixed) and np.array_equal(keep, r.mask > 0.5)
    assert (meta.label, meta.name, meta.sequence, meta.roi, meta.source_size) == (r.label_index, r.label, r.sequence, (0, 4, 32, 24), (64, 48))
    assert 0 < r.kept_fraction < 1


def test_bgr_rgb_pil_and_grey_inputs_agree(pipe):
    rgb = _frame(1)
    a = pipe(rgb)
    b = pipe(np.ascontiguousarray(rgb[:, :, ::-1]), color="bgr")
    c = pipe(Image.fromarray(rgb))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)
    assert np.allclose(a.mask, b.mask) and a.label == b.label == c.label
    grey = pipe(rgb[:, :, 0])
    assert grey.image.shape == (32, 32, 3)


def test_batch_equals_single_calls(pipe):
    frames = [_frame(i, 40 + i, 50) for i in range(4)]
    batch = pipe.process_batch(frames)
    for f, r in zip(frames, batch):
        single = pipe(f)
        assert np.allclose(single.probabilities, r.probabilities) and np.array_equal(single.mask, r.mask)
        assert np.array_equal(decode(single.payload)[0], decode(r.payload)[0])
    assert len({r.sequence for r in batch}) == 4


def test_thread_safe_shared_pipeline(pipe):
    frames = [_frame(i) for i in range(6)]
    expected = [pipe(f).mask for f in frames]
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                for f, m in zip(frames, expected):
                    assert np.array_equal(pipe(f).mask, m)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_codec_options_and_no_compress(bundle):
    jpeg = Pipeline.from_bundle(bundle, codec="jpeg", quality=70)
    assert decode(jpeg(_frame()).payload)[2].codecs["foreground"] == "jpeg"
    bare = Pipeline.from_bundle(bundle, compress=False)
    assert bare(_frame()).payload is None


def test_bad_inputs_raise_clear_errors(bundle, pipe, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Pipeline.from_bundle(tmp_path / "nope")
    with pytest.raises(InputError, match="backend"):
        Pipeline.from_bundle(bundle, backend="torchscript")
    with pytest.raises(InputError, match="not available"):
        Pipeline.from_bundle(bundle, providers=["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match="tensorrt"):
        Pipeline.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(InputError, match="uint8"):
        pipe(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        pipe(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(InputError, match="color"):
        pipe(_frame(), color="hsv")


def test_letterbox_writes_into_a_dirty_buffer_and_zeroes_only_padding(pipe):
    """``_fit`` resizes straight into the batch buffer: padding is zero, the roi is the resized frame."""
    import cv2

    for h, w in [(48, 64), (64, 48), (32, 32), (10, 100), (33, 31)]:
        frame = _frame(h=h, w=w)
        out = np.full((32, 32, 3), 77, np.uint8)
        box = pipe._fit(frame, out)
        x0, y0, bw, bh = box.roi
        expected = np.zeros_like(out)
        resized = frame if (bw, bh) == (w, h) else cv2.resize(frame, (bw, bh), interpolation=cv2.INTER_AREA if box.scale[0] < 1 else cv2.INTER_LINEAR)
        expected[y0:y0 + bh, x0:x0 + bw] = resized
        assert np.array_equal(out, expected), (h, w)


def test_session_options_threads_and_spinning(bundle):
    from keepbits.native import session_options

    assert session_options(3).intra_op_num_threads == 3
    assert session_options(None, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    described = Pipeline.from_bundle(bundle, threads=1, spinning=True).describe()
    assert (described["threads"], described["spinning"]) == (1, True)
    assert described["codec"]["deflate"] == deflate.name()


def test_result_frame_record_carries_every_field_by_name(bundle):
    """The codec's FrameRecord fields are Result attributes of the same name and value: renaming
    one on Result breaks frame_record() (and compress) loudly instead of writing a default."""
    import dataclasses

    from keepbits.codec import FrameRecord

    result = Pipeline.from_bundle(bundle)(np.full((20, 30, 3), 200, np.uint8))
    record = result.frame_record()
    for f in dataclasses.fields(FrameRecord):
        assert getattr(record, f.name) is getattr(result, f.name) or getattr(record, f.name) == getattr(result, f.name), f.name
    image, _, meta = decode(result.payload)
    assert (meta.label, meta.name, meta.sequence, meta.roi) == (result.label_index, result.label, result.sequence, result.roi)
