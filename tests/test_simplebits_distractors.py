"""Distractor data sets (SimpleBits Fig. 4) and the removal measure."""
from __future__ import annotations

import numpy as np
import pytest

from keepbits.data import load_dataset, sample_mnist_path
from keepbits.errors import InputError
from keepbits.training.distractors import KINDS, build_distractor, removal_scores


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
