"""FootageDataset: worker processes give the same samples as one process, labels optional,
random crops/flips at the classifier's size, corrupt files counted across workers."""
import hashlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from keepbits.data import Footage, Preprocessing
from keepbits.errors import InputError
from keepbits.training.footage import FootageDataset, footage_loader


@pytest.fixture
def footage_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = tmp_path / "cam" / f"day{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), 15 * i, np.uint8))
    writer.release()
    np.savez(tmp_path / "frames.npz", x=rng.integers(0, 255, (9, 40, 40, 3), dtype=np.uint8))
    (tmp_path / "cam" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return tmp_path


def _digests(loader):
    return sorted(hashlib.sha1(image.numpy().tobytes()).hexdigest() for batch in loader for image in batch)


def test_workers_give_the_same_samples_as_one_process(footage_dir):
    pre = Preprocessing((24, 32), resize_policy="center-crop")
    footage = Footage([footage_dir], frame_step=4, npz_chunk=4)
    data = FootageDataset(footage, pre, augment=True, seed=3)
    serial = _digests(footage_loader(data, batch_size=5))
    parallel = _digests(footage_loader(data, batch_size=5, num_workers=2))
    assert len(serial) == 7 + 3 + 9 and serial == parallel
    # the broken JPEG is counted once per pass, in whichever process read it
    assert footage.counts.as_dict() == {"images": 2 * 16, "frames": 2 * 3, "skipped": 2}


def test_items_are_uint8_at_the_model_size_and_augmentation_varies_by_epoch(footage_dir):
    footage = Footage([footage_dir / "frames.npz"])
    data = FootageDataset(footage, Preprocessing((24, 32)), augment=True)
    first = torch.stack(list(data))
    assert first.dtype == torch.uint8 and first.shape == (9, 3, 24, 32)
    assert torch.equal(first, torch.stack(list(data)))  # same epoch, same draw
    data.set_epoch(1)
    assert not torch.equal(first, torch.stack(list(data)))
    plain = torch.stack(list(FootageDataset(footage, Preprocessing((40, 40)), augment=False)))
    stored = np.load(footage_dir / "frames.npz")["x"]
    assert torch.equal(plain, torch.from_numpy(stored.transpose(0, 3, 1, 2)))


def test_labels_only_when_the_footage_has_them(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([3, 1, 2, 0]))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 8, 8, 3), np.uint8))
    labelled = FootageDataset(Footage([tmp_path / "a.npz"]), Preprocessing((8, 8)), labels=True)
    images, labels = next(iter(footage_loader(labelled, batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [3, 1, 2, 0]
    with pytest.raises(InputError, match="b.npz has none"):
        FootageDataset(Footage([tmp_path]), Preprocessing((8, 8)), labels=True)


def test_random_crops_cover_the_requested_area_share():
    from keepbits.training.footage import random_crop_box

    rng = np.random.default_rng(0)
    boxes = [random_crop_box(640, 360, 1.0, 0.25, rng) for _ in range(200)]
    areas = np.array([w * h for _, _, w, h in boxes]) / (640 * 360)
    assert all(0 <= x0 and x0 + w <= 640 and 0 <= y0 and y0 + h <= 360 for x0, y0, w, h in boxes)
    assert areas.min() > 0.18 and areas.max() <= 1.0 and areas.std() > 0.1
