"""NICE math: hard-concrete gates, L0 and smoothness losses, mixed-resolution compose.

numpy reference (keepbits.core) and torch twin (keepbits.training.functional) must agree.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from keepbits import core
from keepbits.core.hard_concrete import BETA, GAMMA, ZETA
from keepbits.training import functional as tf


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _analytic_mean(log_alpha: float) -> float:
    """E[z] = ∫_0^1 P(z > t) dt with P(z > t) = σ(log α − β logit((t − γ)/(ζ − γ)))."""
    t = np.linspace(0.0, 1.0, 200_001)
    survival = _sigmoid(log_alpha - BETA * _logit((t - GAMMA) / (ZETA - GAMMA)))
    return float(np.trapezoid(survival, t))


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_sampled_gate_statistics_match_analytic(log_alpha):
    torch.manual_seed(0)
    n = 400_000
    z = tf.hard_concrete_sample(torch.full((n,), log_alpha, dtype=torch.float64)).numpy()
    # P(z > 0) is the expected-L0 term (Eq. 6) and y of Eq. 9
    p_nonzero = float(core.expected_gate(np.array(log_alpha)))
    assert abs((z > 0).mean() - p_nonzero) < 4 * math.sqrt(p_nonzero * (1 - p_nonzero) / n)
    # P(z = 1) = σ(log α − β logit((1 − γ)/(ζ − γ)))
    p_one = float(_sigmoid(log_alpha - BETA * math.log((1 - GAMMA) / (ZETA - 1))))
    assert abs((z == 1).mean() - p_one) < 4 * math.sqrt(p_one * (1 - p_one) / n)
    mean = _analytic_mean(log_alpha)
    assert abs(z.mean() - mean) < 4 * z.std() / math.sqrt(n)
    assert z.min() >= 0.0 and z.max() <= 1.0


def test_expected_l0_penalty_is_sum_of_gate_probabilities():
    log_alpha = torch.tensor([[[[-3.0, 0.0], [2.0, 10.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    expected = _sigmoid(log_alpha.numpy() - BETA * math.log(-GAMMA / ZETA)).reshape(2, -1).sum(1).mean()
    assert tf.l0_penalty(log_alpha).item() == pytest.approx(expected, rel=1e-6)


def test_deterministic_mask_range_exact_ends_and_formula():
    log_alpha = np.array([-1e4, -30.0, -2.5, -1.0, 0.0, 0.7, 2.5, 30.0, 1e4], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in exp
        z_hat = core.deterministic_mask(log_alpha)
    assert z_hat.min() == 0.0 and z_hat.max() == 1.0  # exact 0 and 1 are reachable
    assert np.all((z_hat >= 0) & (z_hat <= 1))
    assert np.all(np.diff(z_hat) >= 0)
    # Eq. 11 as keepbits states it (temperature inside): min(1, max(0, σ(log α / β)(ζ − γ) + γ))
    manual = np.clip(_sigmoid(log_alpha[2:7].astype(np.float64) / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)
    np.testing.assert_allclose(z_hat[2:7], manual, rtol=1e-6)
    assert float(core.deterministic_mask(np.float32(0.0))) == pytest.approx(0.5)


def test_numpy_and_torch_gates_agree():
    log_alpha = np.random.default_rng(0).normal(0, 5, size=(3, 1, 7, 9)).astype(np.float32)
    t = torch.from_numpy(log_alpha)
    np.testing.assert_allclose(core.deterministic_mask(log_alpha), tf.deterministic_mask(t).numpy(), atol=1e-6)
    np.testing.assert_allclose(core.expected_gate(log_alpha), tf.expected_gate(t).numpy(), atol=1e-6)


def test_gradient_flows_through_sample():
    torch.manual_seed(0)
    log_alpha = torch.zeros(1000, requires_grad=True)
    z = tf.hard_concrete_sample(log_alpha)
    z.sum().backward()
    grad = log_alpha.grad
    assert torch.isfinite(grad).all()
    inside = (z > 0) & (z < 1)
    assert inside.any() and (grad[inside] > 0).all()  # z is increasing in log α
    assert (grad[~inside] == 0).all()  # the clamps stop it where the gate is exactly 0 or 1


def test_smoothness_hand_computed_cases():
    def s(rows):
        return tf.smoothness_loss(torch.tensor(rows, dtype=torch.float32)[None, None]).item()

    # 2×2, one corner on: vertical 1 + horizontal 1 + up-left diagonal 1 + up-right 0
    assert s([[1, 0], [0, 0]]) == pytest.approx(3.0)
    # anti-diagonal pair (1,0) vs (0,1) is the only up-right term
    assert s([[0, 1], [0, 0]]) == pytest.approx(3.0)
    # centre of 3×3: every one of the 8 neighbours differs once
    assert s([[0, 0, 0], [0, 1, 0], [0, 0, 0]]) == pytest.approx(8.0)
    # corner of 3×3: only 3 neighbours exist, nothing wraps around
    assert s([[1, 0, 0], [0, 0, 0], [0, 0, 0]]) == pytest.approx(3.0)
    assert s([[0, 0, 0], [0, 0, 0], [0, 0, 1]]) == pytest.approx(3.0)
    # single row / column / pixel and constant images
    assert s([[0, 1, 0, 0.5]]) == pytest.approx(1 + 1 + 0.5)
    assert s([[0], [1], [1]]) == pytest.approx(1.0)
    assert s([[0.3]]) == 0.0
    assert s([[0.7] * 5] * 4) == 0.0
    # batch: per-image sums averaged over the batch
    batch = torch.zeros(2, 1, 3, 3)
    batch[0, 0, 1, 1] = 1.0
    assert tf.smoothness_loss(batch).item() == pytest.approx(4.0)


def test_block_average_edge_blocks_by_hand():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    out = core.block_average(x, 2)
    assert out[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[0, 4] == pytest.approx((4 + 9) / 2)  # right edge block: 2 rows × 1 column
    assert out[4, 0] == pytest.approx((20 + 21) / 2)  # bottom edge block
    assert out[4, 4] == pytest.approx(24.0)  # the corner block holds one pixel
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape,b", [((3, 37, 51), 8), ((1, 5, 4), 3), ((2, 6, 6), 1), ((3, 9, 4), 20)])
def test_block_means_grid_is_block_average_sampled_per_block(dtype, shape, b):
    x = np.random.default_rng(3).integers(0, 256, shape).astype(dtype)
    grid = core.block_means(x, b)
    step = min(b, max(shape[1:]))
    assert grid.shape == (shape[0], -(-shape[1] // step), -(-shape[2] // step))
    np.testing.assert_array_equal(grid.astype(np.float32), core.block_average(x, b)[:, ::step, ::step])
    assert grid[0, 0, 0] == x[0, :step, :step].astype(np.float64).mean()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 9), (1, 1, 13, 4), (2, 1, 28, 28), (1, 3, 32, 31)])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 8, 16, 28, 33, 10**9])
def test_compose_numpy_equals_torch_on_odd_sizes(shape, b):
    rng = np.random.default_rng(b)
    x = rng.normal(size=shape).astype(np.float32)
    mask = rng.uniform(size=(shape[0], 1, *shape[2:])).astype(np.float32)
    ref = core.mixed_resolution(x, mask, b)
    out = tf.mixed_resolution(torch.from_numpy(x), torch.from_numpy(mask), b).numpy()
    assert ref.shape == out.shape == shape
    np.testing.assert_allclose(ref, out, atol=1e-5)
    np.testing.assert_allclose(core.block_average(x, b), tf.block_average(torch.from_numpy(x), b).numpy(), atol=1e-5)


def test_compose_extreme_block_sizes():
    x = np.random.default_rng(1).normal(size=(2, 3, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(core.block_average(x, 1), x)
    for b in (7, 8, 1000, 10**12):  # b >= max(H, W): one block, the per-image, per-channel mean
        np.testing.assert_allclose(core.block_average(x, b), np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape), atol=1e-6)
        np.testing.assert_allclose(tf.block_average(torch.from_numpy(x), b).numpy(), core.block_average(x, b), atol=1e-6)
    # 5 <= b < 7: one block column, rows in blocks of b
    out = core.block_average(x, 5)
    np.testing.assert_allclose(out[:, :, :5], np.broadcast_to(x[:, :, :5].mean(axis=(2, 3), keepdims=True), (2, 3, 5, 5)), atol=1e-6)
    np.testing.assert_allclose(out[:, :, 5:], np.broadcast_to(x[:, :, 5:].mean(axis=(2, 3), keepdims=True), (2, 3, 2, 5)), atol=1e-6)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            core.block_average(x, bad)
        with pytest.raises(ValueError):
            tf.block_average(torch.from_numpy(x), bad)


def test_mixed_resolution_is_eq12():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    ones, zeros = np.ones((1, 1, 6, 6), np.float32), np.zeros((1, 1, 6, 6), np.float32)
    np.testing.assert_allclose(core.mixed_resolution(x, ones, 3), x, atol=1e-6)
    np.testing.assert_allclose(core.mixed_resolution(x, zeros, 3), core.block_average(x, 3), atol=1e-6)
    mask = rng.uniform(size=(1, 1, 6, 6)).astype(np.float32)
    expected = x * mask + core.block_average(x, 3) * (1 - mask)
    np.testing.assert_allclose(core.mixed_resolution(x, mask, 3), expected, atol=1e-6)
    np.testing.assert_allclose(core.mixed_resolution(x, mask, 1), x, atol=1e-6)  # b = 1: x whatever the mask


def test_runtime_reference_of_z_hat_and_x_tilde_matches_torch():
    """The numpy path a torch-free runtime uses (log α → ẑ → x̃) equals the torch path."""
    rng = np.random.default_rng(3)
    log_alpha = rng.normal(0, 3, size=(2, 1, 11, 13)).astype(np.float32)
    x = rng.normal(size=(2, 3, 11, 13)).astype(np.float32)
    for b in (1, 4, 11, 16):
        ref = core.mixed_resolution(x, core.deterministic_mask(log_alpha), b)
        out = tf.mixed_resolution(torch.from_numpy(x), tf.deterministic_mask(torch.from_numpy(log_alpha)), b)
        np.testing.assert_allclose(ref, out.numpy(), atol=1e-5)
