"""Condensation by gradient matching (SimpleBits Eq. 7)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from keepbits.errors import InputError
from keepbits.training.condensation import CondensationConfig, condense, layerwise_cosine_distance, matching_distance


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def test_matching_loss_is_zero_when_synthetic_equals_real():
    torch.manual_seed(0)
    net, x, y = _net(), torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    assert matching_distance(net, x, y, x.clone(), y).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(6, 1, 8, 8, requires_grad=True)
    d = matching_distance(net, other, y, x, y)
    assert float(d) > 1e-3
    d.backward()
    assert other.grad.abs().sum() > 0


def test_layerwise_distance_ignores_scale_and_counts_layers():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    assert float(layerwise_cosine_distance(a, [3 * t for t in a])) == pytest.approx(0.0, abs=1e-6)
    assert float(layerwise_cosine_distance(a, [-t for t in a])) == pytest.approx(4.0)


def test_condense_shapes_range_and_errors():
    torch.manual_seed(0)
    x, y = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    cfg = CondensationConfig(images_per_class=2, outer_loops=1, inner_loops=2, net_steps=1, real_batch=4)
    syn, y_syn = condense(x, y, 3, _net, cfg, bpd=lambda v: v.flatten(1).mean(1))
    assert syn.shape == (6, 1, 8, 8) and syn.min() >= 0 and syn.max() <= 1
    assert y_syn.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(InputError, match="density"):
        condense(x, y, 3, _net, CondensationConfig(lambda_sim=1.0))


def test_adam_moves_saturated_binary_images_that_sgd_barely_moves():
    torch.manual_seed(0)
    x, y = (torch.rand(30, 1, 8, 8) > 0.5).float(), torch.arange(30) % 3  # 0/1 pixels, like MNIST
    change = {}
    for opt in ("sgd", "adam"):
        cfg = CondensationConfig(images_per_class=2, outer_loops=1, inner_loops=3, net_steps=1, real_batch=4,
                                 image_optimizer=opt, lr_images=0.1)
        start, _ = condense(x, y, 3, _net, CondensationConfig(images_per_class=2, outer_loops=0))
        syn, _ = condense(x, y, 3, _net, cfg)
        change[opt] = float((syn - start).abs().mean())
    assert change["adam"] > 10 * change["sgd"]
    with pytest.raises(InputError, match="image optimizer"):
        condense(x, y, 3, _net, CondensationConfig(images_per_class=2, image_optimizer="lbfgs"))
