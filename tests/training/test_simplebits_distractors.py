"""Distractor data sets (SimpleBits Fig. 4) and the removal measure."""
from __future__ import annotations

import numpy as np
import pytest

from keepbits.data import load_dataset, sample_mnist_path
from keepbits.errors import InputError
from keepbits.training.distractors import KINDS, build_distractor, removal_scores, write_distractor_npz


@pytest.fixture
def parts():
    mn = load_dataset(sample_mnist_path(), "test")
    cifar = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return mn.x[:6], mn.y[:6], cifar


@pytest.mark.parametrize("kind", KINDS)
def test_builders_shapes_labels_and_components(kind, parts):
    x, y, target, distractor = build_distractor(kind, *parts, seed=0)
    assert x.dtype == np.uint8 and x.shape == target.shape == distractor.shape and len(y) == 6
    assert np.abs(x.astype(int) - (target.astype(int) + distractor.astype(int))).max() <= 1
    if kind == "cifar_stripes":
        assert set(y.tolist()) <= {0, 1}
    else:
        assert (y == parts[1]).all()
    if kind == "mnist_beside_cifar":
        assert x.shape[1:] == (32, 64, 3)
        # the digit sits in exactly one half of every image
        halves = target[:, :, :32].reshape(6, -1).any(1) ^ target[:, :, 32:].reshape(6, -1).any(1)
        assert halves.all()


def test_removal_scores_tell_target_from_distractor(parts):
    x, y, target, distractor = build_distractor("mnist_noise", *parts, seed=0)
    kept = removal_scores(target, target, distractor)
    assert kept["corr_target"] == pytest.approx(1.0) and abs(kept["corr_distractor"]) < 0.2
    mixed = removal_scores(x, target, distractor)
    assert 0.2 < mixed["corr_target"] < 1.0 and mixed["corr_distractor"] > 0.2
    with pytest.raises(InputError):
        build_distractor("nope", *parts)


def test_write_distractor_npz_draws_cifar_across_classes(tmp_path):
    """CIFAR-10 files are sorted by class: the distractors must not all come from the first classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "cifar10").mkdir(exist_ok=True)
        np.savez(tmp_path / "mnist" / f"{split}.npz", x=rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8), y=np.arange(40) % 10)
        # class k's CIFAR images are the constant value 20·k, files sorted by class
        np.savez(tmp_path / "cifar10" / f"{split}.npz", x=np.repeat(np.arange(10, dtype=np.uint8) * 20, 40)[:, None, None, None]
                 * np.ones((1, 32, 32, 3), np.uint8), y=np.repeat(np.arange(10), 40))
    out = write_distractor_npz("mnist_cifar", tmp_path, tmp_path / "set.npz", n_train=20, n_test=10)
    with np.load(out) as f:
        assert f["x_train"].shape == (20, 32, 32, 3) and f["x_test"].shape == (10, 32, 32, 3)
        classes = {int(v) for v in np.unique(f["distractor_train"][:, 0, 0, 0].astype(int) * 2 // 20)}
    assert len(classes) >= 4
