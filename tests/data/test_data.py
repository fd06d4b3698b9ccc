import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from keepbits.data import (
    ImageDataset, channel_stats, has_split, load_dataset, load_idx, load_image_folder, load_npz,
    sample_indices, sample_mnist_path, train_val_split,
)
from keepbits.errors import InputError


def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_plain_and_gzip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 255, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    ds = load_dataset(tmp_path, "train")
    assert ds.x.shape == (7, 28, 28, 1) and np.array_equal(ds.x[..., 0], images)
    assert ds.y.tolist() == labels.tolist()


def test_idx_truncated_is_a_clear_error(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    _write_idx(tmp_path / "img", images, False)
    raw = (tmp_path / "img").read_bytes()
    (tmp_path / "img").write_bytes(raw[:-5])
    _write_idx(tmp_path / "lab", np.zeros(3, np.uint8), False)
    with pytest.raises(InputError, match="does not match its header"):
        load_idx(tmp_path / "img", tmp_path / "lab")


def test_npz_round_trip_and_split_keys(tiny_npz):
    ds = load_npz(tiny_npz)
    assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"] and ds.x.dtype == np.uint8
    sample = sample_mnist_path()
    assert has_split(sample, "test") and not has_split(tiny_npz, "test")
    assert len(load_dataset(sample, "train")) == 2000 and len(load_dataset(sample, "test")) == 500


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, int), "must be uint8"),
        (np.zeros((4, 8, 8, 5), np.uint8), np.zeros(4, int), "N×H×W×C"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, int), "length 4"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 3]), "label out of range"),
    ],
)
def test_bad_arrays_name_the_problem(tmp_path, x, y, match):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    with pytest.raises(InputError, match=match) as exc:
        load_npz(path)
    assert "bad.npz" in str(exc.value)


def test_not_an_npz_and_missing_path(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nope")


def _image_tree(root):
    rng = np.random.default_rng(1)
    for cls, (ext, size) in {"cat": (".png", (40, 30)), "dog": (".jpg", (64, 48)), "eel": (".webp", (20, 50))}.items():
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / cls / f"{i}{ext}")


@pytest.mark.parametrize("policy", ["resize", "center-crop", "letterbox"])
def test_image_folder_any_sizes(tmp_path, policy):
    _image_tree(tmp_path)
    ds = load_image_folder(tmp_path, size=(24, 32), policy=policy)
    assert ds.x.shape == (6, 24, 32, 3) and ds.class_names == ["cat", "dog", "eel"]
    assert ds.y.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_letterbox_pads_black(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 10), (255, 255, 255)).save(tmp_path / "a" / "wide.png")
    ds = load_image_folder(tmp_path, size=(40, 40), policy="letterbox")
    assert ds.x[0, 0].max() == 0 and ds.x[0, 20].min() == 255


def test_a_corrupt_image_is_skipped_named_and_counted(tmp_path, caplog):
    """As in footage, one unreadable file in class folders (or camera folders read as such) is
    skipped, logged by name and counted, not fatal (it ended `keepbits eval` with exit 2)."""
    _image_tree(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = load_image_folder(tmp_path, size=(16, 16))
    assert ds.x.shape[0] == 6 and ds.y.tolist() == [0, 0, 1, 1, 2, 2] and "broken.png" in caplog.text
    assert [p.rsplit("/", 1)[-1] for p in ds.meta["skipped"]] == ["broken.png"] and "1 unreadable of 7 images skipped" in ds.source
    for file in (tmp_path / "eel").iterdir():
        file.write_bytes(b"not an image")
    assert load_image_folder(tmp_path, size=(16, 16)).class_names == ["cat", "dog", "eel"]
    assert "class folder(s) eel hold no readable image" in caplog.text
    for file in tmp_path.rglob("*.*"):
        file.write_bytes(b"not an image")
    with pytest.raises(InputError, match="none of the 7 images"):
        load_image_folder(tmp_path, size=(16, 16))


def test_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), 25)  # class-sorted, like CIFAR-10's files
    a_train, a_val = train_val_split(labels, 0.2, seed=3)
    b_train, b_val = train_val_split(labels, 0.2, seed=3)
    c_train, _ = train_val_split(labels, 0.2, seed=4)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert not np.array_equal(a_train, c_train)
    assert len(a_val) == 20 and not set(a_train) & set(a_val) and len(set(a_train) | set(a_val)) == 100
    assert np.bincount(labels[a_val]).tolist() == [5, 5, 5, 5]
    assert len(train_val_split(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(InputError, match="validation fraction"):
        train_val_split(labels, 1.0, seed=0)


def _first_n(labels, count, seed):
    return np.arange(count)


@pytest.mark.parametrize("sampler", [sample_indices, pytest.param(_first_n, marks=pytest.mark.xfail(strict=True, reason="first N of class-sorted data"))])
def test_sample_is_class_balanced_on_class_sorted_data(sampler):
    labels = np.repeat(np.arange(10), 40)  # stored sorted by class, like CIFAR-10's files
    for count in (10, 30, 57):
        for seed in (0, 1, 2):
            index = sampler(labels, count, seed)
            counts = np.bincount(labels[index], minlength=10)
            assert len(np.unique(index)) == count and counts.max() - counts.min() <= 1, (count, seed, counts)
            assert np.all(np.diff(index) > 0)  # file order


def test_sample_is_seeded_and_fills_up_from_larger_classes():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    index = sample_indices(labels, 22, seed=4)
    assert np.bincount(labels[index]).tolist() == [2, 10, 10]
    assert np.array_equal(index, sample_indices(labels, 22, seed=4))
    assert not np.array_equal(index, sample_indices(labels, 22, seed=5))
    assert np.array_equal(sample_indices(labels, None), np.arange(102)) and len(sample_indices(labels, 500)) == 102
    with pytest.raises(InputError, match=">= 0"):
        sample_indices(labels, -1)
    ds = ImageDataset(np.zeros((102, 2, 2, 1), np.uint8), labels, ["a", "b", "c"])
    assert np.array_equal(ds.sample(22, seed=4).y, labels[index])


def test_channel_stats_known_values():
    x = np.zeros((2, 2, 2, 3), np.uint8)
    x[0, ..., 0] = 255
    x[..., 2] = 51
    mean, std = channel_stats(x)
    assert mean == pytest.approx([0.5, 0.0, 0.2])
    assert std == pytest.approx([0.5, 1.0, 1.0])  # zero std is replaced by 1


def test_channel_stats_chunked_equals_direct():
    x = np.random.default_rng(0).integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    direct = x.astype(np.float64) / 255.0
    for chunk in (1, 90, 1 << 24):  # one value (clamped to one image), one image, everything
        mean, std = channel_stats(x, chunk_values=chunk)
        assert mean == pytest.approx(direct.mean(axis=(0, 1, 2)).tolist(), abs=1e-12)
        assert std == pytest.approx(direct.std(axis=(0, 1, 2)).tolist(), abs=1e-12)


def test_dataset_accepts_gray_nhw():
    ds = ImageDataset(np.zeros((3, 5, 5), np.uint8), np.array([0, 1, 1]), [])
    assert ds.x.shape == (3, 5, 5, 1) and ds.num_classes == 2


def test_grey_class_folders_are_read_grey_unless_a_model_takes_colour(tmp_path):
    """PNGs written grey (cv2.imwrite of H×W) were read as RGB: a grey classifier's NICE training
    and INT8 calibration refused them (3 channels), a classifier trained on them took 3."""
    for cls in ("0", "1"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((12, 12), 40 * (int(cls) + 1), np.uint8)).save(tmp_path / "train" / cls / "a.png")
    assert load_dataset(tmp_path, "train", (8, 8)).x.shape == (2, 8, 8, 1)
    assert load_dataset(tmp_path, "train", (8, 8), channels=3).x.shape == (2, 8, 8, 3)
    Image.new("RGB", (12, 12), (1, 2, 3)).save(tmp_path / "train" / "1" / "b.png")  # one colour file: the set is colour
    assert load_dataset(tmp_path, "train", (8, 8)).x.shape == (3, 8, 8, 3)
    assert load_dataset(tmp_path, "train", (8, 8), channels=1).x.shape == (3, 8, 8, 1)
