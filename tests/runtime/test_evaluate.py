"""Rate–accuracy through the real payload, the single-image look and the report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from keepbits.codec import decode, encode, encode_image
from keepbits.errors import InputError
from keepbits.runtime import Pipeline
from keepbits.runtime.evaluate import map_labels, operating_points, rate_accuracy, smallest_within, whole_frame, write_report
from keepbits.runtime.explain import explain_images, look
from keepbits.runtime.synthetic import toy_bundle


def _images(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames of random sizes, a bright patch on a dark or mid background; the toy bundle calls
    a frame 'bright' (1) when its mean exceeds 128."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        frame = rng.integers(0, 60 if i % 2 else 200, (h, w, 3), dtype=np.uint8)
        frame[2:10, 2:10] = 250
        frames.append(frame)
        labels.append(int(frame.mean() > 128))
    return frames, np.array(labels)


def test_payload_points_are_encoded_decoded_and_classified(pipe):
    frames, labels = _images(12)
    result = rate_accuracy(pipe, frames, labels, thresholds=[0.5, 0.9], codecs=["png", "jpeg"], qualities=[30, 90],
                           baselines=["png", "jpeg", "webp"], baseline_qualities=[50], batch_size=5)
    full = np.array([r.label_index for r in pipe.predict(frames)])
    assert result["full_frame"]["accuracy"] == pytest.approx(np.mean(full == labels))
    assert len(result["payload"]) == 2 * 3 and len(result["baselines"]) == 3
    png = next(r for r in result["payload"] if r["codec"] == "png" and r["threshold"] == 0.5)
    # the same numbers by hand: lossless payload at t=0.5, b=4, decoded and classified
    sizes, predicted, kept = [], [], []
    for r in pipe.predict(frames):
        data = encode(r.image, r.frame_record(), threshold=0.5, block=4)
        image, mask, _ = decode(data)
        assert np.array_equal(image, r.mixed)
        sizes.append(len(data))
        kept.append(mask.mean())
        predicted.append(pipe.predict([image])[0].label_index)
    assert png["bytes_per_image"] == pytest.approx(np.mean(sizes)) and png["kept_fraction"] == pytest.approx(np.mean(kept))
    assert png["agreement"] == pytest.approx(np.mean(np.array(predicted) == full))
    assert png["accuracy"] == pytest.approx(np.mean(np.array(predicted) == labels))
    # the discordant pairs with the full frame, for the paired comparison
    right, full_right = np.array(predicted) == labels, full == labels
    assert png["gained"] == int((right & ~full_right).sum()) and png["lost"] == int((full_right & ~right).sum())
    assert png["accuracy"] - result["full_frame"]["accuracy"] == pytest.approx((png["gained"] - png["lost"]) / len(frames))
    lossless = next(r for r in result["baselines"] if r["format"] == "png")
    assert lossless["agreement"] == 1.0 and lossless["accuracy"] == result["full_frame"]["accuracy"]
    strict = next(r for r in result["payload"] if r["codec"] == "png" and r["threshold"] == 0.9)
    assert strict["kept_fraction"] <= png["kept_fraction"]
    jpeg = sorted((r for r in result["payload"] if r["codec"] == "jpeg" and r["threshold"] == 0.5), key=lambda r: r["quality"])
    assert jpeg[0]["bytes_per_image"] < jpeg[1]["bytes_per_image"]


def test_mixed_mode_points_send_the_mixed_image(pipe):
    frames, labels = _images(6, seed=2)
    result = rate_accuracy(pipe, frames, labels, codecs=["png", "webp"], qualities=[70], modes=["mixed"], baselines=[])
    lossless, lossy = result["payload"]
    assert (lossless["mode"], lossless["codec"], lossy["codec"], lossy["background"]) == ("mixed", "png", "webp", None)
    sizes = []
    for r in pipe.predict(frames):
        data = encode(r.image, r.frame_record(), mode="mixed")
        image, mask, meta = decode(data)
        assert np.array_equal(image, r.mixed) and meta.mode == "mixed" and mask is not None
        sizes.append(len(data))
    assert lossless["bytes_per_image"] == pytest.approx(np.mean(sizes))


def test_unlabelled_images_score_agreement(pipe):
    frames, _ = _images(6, seed=1)
    result = rate_accuracy(pipe, frames, None, codecs=["webp"], qualities=[80], baselines=[])
    assert not result["labelled"] and result["full_frame"]["accuracy"] is None
    assert result["payload"][0]["accuracy"] is None and 0.0 <= result["payload"][0]["agreement"] <= 1.0
    assert "gained" not in result["payload"][0]
    assert result["baselines"] == []


def test_whole_frame_baseline_is_the_codec_image_and_grey_webp_round_trips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    size, decoded = whole_frame(image, "png", None)
    assert np.array_equal(decoded, image) and size == len(encode_image(image, "png"))
    size, decoded = whole_frame(image, "jpeg", 40)
    assert size == len(encode_image(image, "jpeg", 40)) and decoded.shape == image.shape
    size, decoded = whole_frame(image[:, :, :1], "webp", 80)
    assert decoded.shape == (20, 30, 1) and size > 0


def test_operating_points_and_bad_settings(pipe, tmp_path):
    points = operating_points(pipe, thresholds=[0.3], block_sizes=[2, 8], codecs=["png", "webp"], qualities=[40, 60])
    assert [(p.block, p.codec, p.quality) for p in points] == [(2, "png", None), (2, "webp", 40), (2, "webp", 60),
                                                              (8, "png", None), (8, "webp", 40), (8, "webp", 60)]
    grey = Pipeline.from_bundle(toy_bundle(tmp_path / "grey", size=16, channels=1))
    assert {p.codec for p in operating_points(grey, codecs=["png", "webp"])} == {"png"}
    with pytest.raises(InputError, match="webp needs 3-channel"):
        operating_points(grey, codecs=["webp"])
    mixed = operating_points(pipe, codecs=["png", "jpeg"], qualities=[50], backgrounds=["raw", "webp"], modes=["blocks", "mixed"])
    assert [(p.mode, p.codec, p.background) for p in mixed] == [("blocks", "png", "raw"), ("blocks", "jpeg", "raw"), ("blocks", "jpeg", "webp"),
                                                                ("mixed", "png", None), ("mixed", "jpeg", None)]
    assert mixed[-1].series == "payload mixed jpeg t=0.5 b=4"
    assert [p.webp_method for p in operating_points(pipe, codecs=["webp"], qualities=[50], webp_method=2)] == [2]
    for kwargs, message in [({"thresholds": [1.5]}, "thresholds"), ({"block_sizes": [0]}, "block sizes"),
                            ({"codecs": ["gif"]}, "formats"), ({"qualities": [0]}, "qualities"), ({"modes": ["paper"]}, "modes"),
                            ({"webp_method": 7}, "WebP method")]:
        with pytest.raises(InputError, match=message):
            operating_points(pipe, **kwargs)
    with pytest.raises(InputError, match="no images"):
        rate_accuracy(pipe, [])


def test_labels_are_matched_by_name_or_index():
    labels, how = map_labels(np.array([0, 1, 1]), ["b", "a"], ["a", "b", "c"])
    assert labels.tolist() == [1, 0, 0] and how == "by name"
    labels, how = map_labels(np.array([1]), ["x", "y"], ["a", "b"])
    assert labels.tolist() == [1] and how.startswith("by index")
    with pytest.raises(InputError, match="neither names nor counts"):
        map_labels(np.array([0]), ["x"], ["a", "b"])


def test_report_and_look(pipe, tmp_path):
    frames, labels = _images(6)
    result = rate_accuracy(pipe, frames, labels, codecs=["png", "jpeg"], qualities=[50], baselines=["jpeg"], baseline_qualities=[20, 90])
    written = write_report(result, tmp_path / "rep", title="t", meta={"model": "toy"}, examples=[look(pipe, frames[0], "f0")])
    html = (tmp_path / "rep" / "eval.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "src=\"http" not in html
    assert (tmp_path / "rep" / "rate_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "rep" / "eval.json").read_text())["data"]
    assert saved["smallest_within"] == written["smallest_within"] == smallest_within(result)
    assert saved["payload"][0]["bytes_per_image"] == pytest.approx(result["payload"][0]["bytes_per_image"])

    report = explain_images(pipe, frames[:2] + frames[:1], ["a.png", "b.jpg", "a.jpg"], tmp_path / "look", min_side=64)
    names = [r["name"] for r in report["images"]]
    assert names == ["a", "b", "a-1"]
    seen = look(pipe, frames[0])
    assert seen.mixed.shape == frames[0].shape and seen.keep.shape == frames[0].shape[:2]
    assert report["images"][0]["label"] == seen.label and report["images"][0]["kept_fraction"] == pytest.approx(seen.kept_fraction)
    for record in report["images"]:
        for file in record["files"].values():
            assert (tmp_path / "look" / file).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "look" / "explain.json").read_text())["images"] == report["images"]
