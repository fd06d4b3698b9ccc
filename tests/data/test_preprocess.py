"""Preprocessing: validation and round trip, the three resize policies and their geometry, and
the runtime applying exactly the bundle's policy through fit_into."""
import json

import cv2
import numpy as np
import pytest

from keepbits.data import ImageFit, Preprocessing, fit_into, load_image_folder
from keepbits.data.stream import decode_image
from keepbits.errors import InputError


def _frame(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(48, 64, 3), (360, 640, 3), (100, 30, 3), (32, 32, 3), (7, 300, 3), (20, 24, 0), (33, 17, 0)])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy, crop", [("letterbox", 1.0), ("center-crop", 0.875), ("center-crop", 1.0), ("resize", 1.0)])
def test_the_runtime_applies_the_bundles_policy(tmp_path, shape, channels, policy, crop):
    from keepbits.runtime import Pipeline
    from keepbits.runtime.synthetic import toy_bundle

    pipe = Pipeline.from_bundle(toy_bundle(tmp_path / "b", size=32, channels=channels, resize_policy=policy, crop_fraction=crop))
    frame = _frame(*shape)
    prepared = pipe.prepare([frame])
    out = np.full((32, 32, channels), 77, np.uint8)  # stale content: padding must be zeroed
    fit = fit_into(frame, out, policy, crop)
    assert np.array_equal(out, prepared.batch[0]) and prepared.boxes[0] == fit
    result = pipe.infer(prepared)[0]
    assert result.source_size == (fit.crop[2], fit.crop[3]) and result.roi == fit.roi


def test_fit_writes_into_the_given_buffer_only():
    out = np.empty((40, 50, 3), np.uint8)
    image, fit = Preprocessing((40, 50)).fit(_frame(200, 120), out)
    assert image is out and fit.roi[3] == 40
    with pytest.raises(InputError, match="output buffer shape"):
        Preprocessing((40, 50)).fit(_frame(20, 20), np.empty((40, 50, 1), np.uint8))


def test_resize_stretches_the_whole_frame():
    frame = _frame(90, 160)
    image, fit = Preprocessing((45, 40), resize_policy="resize").fit(frame)
    assert np.array_equal(image, cv2.resize(frame, (40, 45), interpolation=cv2.INTER_AREA))
    assert fit.crop == (0, 0, 160, 90) and fit.roi == (0, 0, 40, 45) and fit.scale == (0.25, 0.5)


def test_center_crop_imagenet_geometry_and_inverse_mapping():
    # short side 256 → centre 224×224 with no resampling (crop_fraction 224/256)
    frame = _frame(256, 341)
    pre = Preprocessing((224, 224), resize_policy="center-crop", crop_fraction=0.875)
    image, fit = pre.fit(frame)
    assert fit.crop == (58, 16, 224, 224) and np.array_equal(image, frame[16:240, 58:282])
    # a larger frame is scaled so its short side becomes 256 before the crop
    fit = ImageFit.plan((1000, 512), (224, 224), "center-crop", 0.875)
    assert fit.crop == (276, 32, 448, 448) and fit.scale == (0.5, 0.5)
    points = np.array([[0.0, 0.0], [223.0, 100.0], [17.5, 3.25]])
    assert np.allclose(fit.to_model(fit.to_source(points)), points)
    assert np.allclose(fit.to_source([[0, 0], [224, 224]]), [[276, 32], [724, 480]])


def test_center_crop_maps_back_with_zeros_outside_the_crop():
    fit = ImageFit.plan((640, 360), (224, 224), "center-crop")
    assert fit.crop == (140, 0, 360, 360)
    back = fit.mask_to_source(np.ones((224, 224), np.float32))
    assert back.shape == (360, 640) and back[:, :140].max() == 0 and back[:, 140:500].min() == 1 and back[:, 500:].max() == 0


def test_grey_and_colour_conversions():
    grey = _frame(30, 40, 0)
    image, _ = Preprocessing((30, 40), resize_policy="resize").fit(grey)
    assert image.shape == (30, 40, 3) and np.array_equal(image[..., 0], grey) and np.array_equal(image[..., 2], grey)
    colour = _frame(30, 40)
    image, _ = Preprocessing((30, 40), mean=(0.5,), std=(0.5,), resize_policy="resize").fit(colour)
    assert image.shape == (30, 40, 1) and np.array_equal(image[..., 0], cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY))


def test_normalize_is_per_channel_on_the_unit_scale():
    pre = Preprocessing((2, 3), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = _frame(2, 3)[None].repeat(2, 0)
    x = pre.normalize(batch)
    expected = (batch.transpose(0, 3, 1, 2) / 255.0 - np.array(pre.mean)[None, :, None, None]) / np.array(pre.std)[None, :, None, None]
    assert x.dtype == np.float32 and x.shape == (2, 3, 2, 3) and np.allclose(x, expected, atol=1e-5)


def test_round_trip_through_json():
    pre = Preprocessing((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "center-crop", 0.875, ("cat", "dog"))
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocessing(input_size=[8, 9], mean=[0.1, 0.2, 0.3], class_names=["a"]) == Preprocessing((8, 9), (0.1, 0.2, 0.3), class_names=("a",))


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_size=(0, 10)), "two positive integers"),
    (dict(input_size=(10,)), "two positive integers"),
    (dict(input_size=(10.5, 10)), "two positive integers"),
    (dict(input_size=(8, 8), mean=(0.5, 0.5)), "1 or 3 finite numbers"),
    (dict(input_size=(8, 8), mean=(0.5,), std=(0.5, 0.5, 0.5)), "one value per channel"),
    (dict(input_size=(8, 8), std=(1.0, 0.0, 1.0)), "std must be positive"),
    (dict(input_size=(8, 8), resize_policy="pad"), "unknown resize policy"),
    (dict(input_size=(8, 8), resize_policy="letterbox", crop_fraction=0.875), "center-crop policy only"),
    (dict(input_size=(8, 8), resize_policy="center-crop", crop_fraction=1.5), r"crop_fraction must be in \(0, 1\]"),
    (dict(input_size=(8, 8), class_names="cat"), "list of strings"),
])
def test_validation_names_the_problem(kwargs, match):
    with pytest.raises(InputError, match=match):
        Preprocessing(**kwargs)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(InputError, match="unknown preprocessing fields"):
        Preprocessing.from_dict({"input_size": [8, 8], "interpolation": "area"})
    with pytest.raises(InputError, match="needs input_size"):
        Preprocessing.from_dict({"mean": [0.5]})


def test_image_folder_loader_uses_the_same_fit(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    frame = _frame(50, 90)
    Image.fromarray(frame).save(tmp_path / "a" / "x.png")
    for policy in ("resize", "center-crop", "letterbox"):
        ds = load_image_folder(tmp_path, size=(24, 32), policy=policy)
        image, _ = Preprocessing((24, 32), resize_policy=policy).fit(decode_image(tmp_path / "a" / "x.png"))
        assert np.array_equal(ds.x[0], image)
