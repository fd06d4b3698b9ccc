"""The user's images for eval / compare / explain: a data set, a folder of files, one file."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from keepbits.data import sample_mnist_path
from keepbits.data.images import load_images
from keepbits.errors import InputError


def test_labelled_sets_sample_class_balanced_from_the_test_split():
    images = load_images(sample_mnist_path(), num_images=30, seed=1)
    assert images.labelled and len(images) == 30 and images.class_names == [str(i) for i in range(10)]
    assert np.bincount(images.labels, minlength=10).tolist() == [3] * 10 and "sample 30, seed 1" in images.source
    assert len(load_images(sample_mnist_path())) == 500  # the test split, whole


def test_class_folders_are_fitted_to_the_model_size(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), np.full((30 + i, 50, 3), 100, np.uint8))
    images = load_images(tmp_path, size=(16, 16))
    assert images.labels.tolist() == [0, 0, 1, 1] and {im.shape for im in images.images} == {(16, 16, 3)}


def test_files_keep_their_sizes_and_are_sampled_before_reading(tmp_path):
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((10 + i, 12, 3), i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(tmp_path)
    assert not images.labelled and images.names == [f"f{i}.png" for i in range(6)]
    assert [im.shape for im in images.images] == [(10 + i, 12, 3) for i in range(6)]
    sample = load_images(tmp_path, num_images=2, seed=3)
    assert len(sample) == 2 and set(sample.names) <= set(images.names) and sample.names == sorted(sample.names)
    one = load_images(tmp_path / "f2.png")
    assert one.names == ["f2.png"] and one.images[0].shape == (12, 12, 3)
    (tmp_path / "f9.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="f9.png"):
        load_images(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_images(tmp_path / "empty")
