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


def test_class_folders_keep_their_sizes_for_the_bundle_and_are_fitted_for_a_model(tmp_path):
    """For a bundle (eval, explain, compare) the drawn files keep their sizes, named by their path:
    the bundle fits each once (they were letterboxed to the model size here, then centre-cropped
    again by the bundle: ImageNet top-1 62.8 % instead of 77.7 %); model_images fits them once."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), np.full((30 + i, 50, 3), 100, np.uint8))
    images = load_images(tmp_path)
    assert images.labels.tolist() == [0, 0, 1, 1] and [im.shape for im in images.images] == [(30, 50, 3), (31, 50, 3)] * 2
    assert images.names == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    from keepbits.data import Preprocessing
    from keepbits.data.images import model_images

    grey = model_images(tmp_path, Preprocessing((16, 16), (0.5,), (0.5,), "resize"))  # a grey model: grey images
    assert grey.images.shape == (4, 16, 16, 1) and grey.labels.tolist() == [0, 0, 1, 1] and int(grey.images[0, 0, 0, 0]) == 100
    assert grey.class_names == ["cat", "dog"]
    (tmp_path / "dog" / "1.png").write_bytes(b"broken")  # skipped and counted, not fatal
    left = load_images(tmp_path)
    assert left.names == ["cat/0.png", "cat/1.png", "dog/0.png"] and "1 unreadable drawn images skipped" in left.source


def test_files_keep_their_sizes_and_are_sampled_before_reading(tmp_path):
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((10 + i, 12, 3), i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(tmp_path)
    assert not images.labelled and images.names == [f"f{i}.png" for i in range(6)]
    assert [im.shape for im in images.images] == [(10 + i, 12, 3) for i in range(6)]
    sample = load_images(tmp_path, num_images=2, seed=3)
    assert len(sample) == 2 and set(sample.names) <= set(images.names) and sample.names == sorted(sample.names)
    assert "[sample 2, seed 3]" in sample.source and "sample" not in load_images(tmp_path, num_images=50).source  # all 6 taken
    one = load_images(tmp_path / "f2.png")
    assert one.names == ["f2.png"] and one.images[0].shape == (12, 12, 3)
    (tmp_path / "f9.png").write_bytes(b"broken")  # skipped and counted, not fatal
    images = load_images(tmp_path)
    assert images.names == [f"f{i}.png" for i in range(6)] and images.counts == {"images": 6, "frames": 0, "skipped": 1}
    assert "1 unreadable files skipped" in images.source
    with pytest.raises(InputError, match="f9.png"):  # the one file asked for
        load_images(tmp_path / "f9.png")
    with pytest.raises(InputError, match="not found"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_images(tmp_path / "empty")
    with pytest.raises(InputError, match="unsupported data file"):
        load_images(tmp_path / "notes.txt")


def _video(path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(frames):
        writer.write(np.full((24, 32, 3), 6 * i, np.uint8))
    writer.release()


def test_footage_of_any_nesting_and_videos_is_unlabelled_and_keeps_every_kth_frame(tmp_path):
    """A camera's folders (day/camera/…) are footage, not classes: nested deeper than class
    folders, or with videos or loose files beside the folders."""
    for day, cam in (("day1", "cam0"), ("day1", "cam1"), ("day2", "cam0")):
        (tmp_path / day / cam).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / day / cam / "a.png"), np.full((20, 30, 3), 50, np.uint8))
    _video(tmp_path / "day2" / "clip.avi", 10)
    images = load_images(tmp_path, frame_step=3)
    assert not images.labelled and images.counts == {"images": 3, "frames": 4, "skipped": 0}
    assert images.names == ["day1/cam0/a.png", "day1/cam1/a.png", "day2/cam0/a.png"] + [f"day2/clip.avi#frame{k}" for k in (0, 3, 6, 9)]
    assert {im.shape for im in images.images} == {(20, 30, 3), (24, 32, 3)} and "one video frame in 3" in images.source
    one_video = load_images(tmp_path / "day2" / "clip.avi")
    assert len(one_video) == 10 and one_video.names[0] == "clip.avi#frame0"
    # class folders stay a labelled set: every entry a folder holding images directly
    assert load_images(tmp_path / "day1").class_names == ["cam0", "cam1"]


def test_footage_samples_are_seeded_uniform_and_read_in_stream_order(tmp_path):
    _video(tmp_path / "clip.avi", 40)
    first = load_images(tmp_path, num_images=5, seed=0)
    again = load_images(tmp_path, num_images=5, seed=0)
    other = load_images(tmp_path, num_images=5, seed=1)
    frame = [int(name.split("#frame")[1]) for name in first.names]
    assert len(first) == 5 and frame == sorted(frame) and first.names == again.names and other.names != first.names
    assert "sample 5, seed 0" in first.source and first.counts["frames"] == 40  # the whole video streamed past
    # Algorithm R keeps each of the 40 frames with probability 5/40: over 400 seeds each frame's count is near 50
    hits = np.zeros(40)
    from keepbits.data.images import _reservoir

    for seed in range(400):
        for t in _reservoir(iter(range(40)), 5, seed):
            hits[t] += 1
    assert hits.sum() == 2000 and hits.min() > 20 and hits.max() < 85
