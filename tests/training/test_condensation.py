"""Condensation by gradient matching (SimpleBits Eq. 7)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from keepbits.errors import InputError
from keepbits.training.condensation import CondensationConfig, condense, initial_indices, layerwise_cosine_distance, matching_distance


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


def test_gradient_distance_is_per_output_channel_and_skips_biases():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 output channels
    bias = torch.tensor([1.0, -1.0, 2.0])
    # each row rescaled by its own positive factor: cosine 1 per channel, distance 0
    assert float(layerwise_cosine_distance([w, bias], [w * torch.tensor([[3.0], [0.5], [7.0]]), -bias])) == pytest.approx(0.0, abs=1e-6)
    # the same per-channel rescaling changes the cosine of the flattened tensor
    assert float(layerwise_cosine_distance([w], [w * torch.tensor([[3.0], [0.5], [7.0]])], per_output_channel=False)) > 0.05
    # one channel reversed counts 2, the others 0; a conv weight (out, in, k, k) is split by its first axis
    flipped = w.clone()
    flipped[1] *= -1
    assert float(layerwise_cosine_distance([w], [flipped])) == pytest.approx(2.0)
    conv = torch.randn(4, 2, 3, 3)
    assert float(layerwise_cosine_distance([conv], [-conv])) == pytest.approx(8.0)


def test_initial_images_are_a_class_balanced_sample_in_class_order():
    y = torch.arange(3).repeat_interleave(10)  # sorted by class, as CIFAR-10's files
    idx = initial_indices(y, 3, 4, seed=0)
    assert y[idx].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(set(idx.tolist())) == 12
    assert idx[:4].tolist() != [0, 1, 2, 3]  # not the first N of each class
    with pytest.raises(InputError, match="at least 11"):
        initial_indices(y, 3, 11, seed=0)


def test_condense_shapes_range_and_errors():
    torch.manual_seed(0)
    x, y = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    cfg = CondensationConfig(images_per_class=2, outer_loops=1, inner_loops=2, net_steps=1, real_batch=4)
    syn, y_syn = condense(x, y, 3, _net, cfg, bpd=lambda v: v.flatten(1).mean(1))
    assert syn.shape == (6, 1, 8, 8) and syn.min() >= 0 and syn.max() <= 1
    assert torch.equal(syn * 255, (syn * 255).round())  # 8-bit images, like the real ones they are compared with
    # with no optimisation the condensed images are the real ones they start from (the 0.01 clamp rounded 0 to 3/255)
    real = (torch.rand(30, 1, 8, 8) * 255).round() / 255
    real[:, :, :2] = 0.0
    real[:, :, -2:] = 1.0
    start, _ = condense(real, y, 3, _net, CondensationConfig(images_per_class=2, outer_loops=0))
    assert torch.equal(start, real[initial_indices(y, 3, 2, 0)])
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
