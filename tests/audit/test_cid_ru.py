"""Reconstruction uncertainty (Ma, Zhang et al. ICML 2022, Eq. 6–7) against analytic answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from keepbits.audit.cid import GAUSS_ENTROPY, CIDConfig  # noqa: E402
from keepbits.audit.cid_ru import reconstruction_uncertainty  # noqa: E402


class Gain(nn.Module):
    """The linear layer h(x) = a ⊙ x (per-pixel gains)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x):
        return self.a * x


class AffineDecoder(nn.Module):
    """g(f) = c ⊙ f / a + (1 − c) ⊙ x₀: exact at x₀'s feature, amplifies a feature change by c."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor, x0: torch.Tensor):
        super().__init__()
        self.a, self.c, self.x0 = a, c, x0

    def forward(self, f):
        return self.c * f / self.a + (1 - self.c) * self.x0


def test_ru_of_a_linear_layer_matches_the_analytic_optimum():
    # h = a ⊙ x, g as above: x̂' − x = c ⊙ σ ⊙ δ, so Eq. 6 is min Σa²σ²/Σa² − λ Σ ½ log(2πe c²σ²).
    # Stationary point σ_i² = λD/(2a_i²), and the constraint Σa²σ² = βD gives λ = 2β/n, hence
    # RU_i = ½ log(2πe β mean(a²) c_i² / a_i²): CID's answer for this layer plus log c_i.
    n, beta = 12, 1e-3
    a = torch.ones(1, 1, n, n)
    a[..., n // 2 :] = 2.0
    c = torch.ones(1, 1, n, n)
    c[..., n // 2 :, :] = 3.0
    torch.manual_seed(0)
    x = torch.randn(1, 1, n, n)
    ru, fit = reconstruction_uncertainty(nn.Sequential(Gain(a)), "0", AffineDecoder(a, c, x), x, CIDConfig(beta=beta))
    want = (0.5 * torch.log(2 * math.pi * math.e * beta * (a**2).mean() * c**2 / a**2))[0, 0].numpy()
    assert fit["converged"].all() and abs(fit["ratio"][0] / beta - 1) < 0.1
    for rows in (slice(0, n // 2), slice(n // 2, n)):
        for cols in (slice(0, n // 2), slice(n // 2, n)):  # quadrants: four analytic values, 1.8 nats apart
            assert ru[0, rows, cols].mean() == pytest.approx(want[rows, cols].mean(), abs=0.06)
    # the decoder's gain enters RU (log 3 between the halves), not CID's σ alone
    assert ru[0, n // 2 :].mean() - ru[0, : n // 2].mean() == pytest.approx(math.log(3.0), abs=0.08)
    assert (fit["floor"] < -10).all()  # exact decoder: no reconstruction error at σ = 0
    # an unbiased decoder: the spread around the reconstructions' own mean is RU (32 draws apart)
    assert abs(float(fit["spread"].mean() - ru.mean())) < 0.1


def test_ru_is_the_decoder_error_where_the_layer_is_blind():
    # h zeroes the left half, g copies the feature back: the left half is rebuilt as 0 whatever
    # the perturbation, so RU there is ½ log(2πe x²) (the floor). On the seen half the optimum is
    # σ_i² = λD/2 with Σ_seen σ² = βD and D = n_seen: σ² = β, RU = ½ log(2πe β).
    n, beta = 8, 1e-3
    keep = torch.ones(1, 1, n, n)
    keep[..., : n // 2] = 0.0
    torch.manual_seed(1)
    x = torch.randn(2, 1, n, n)
    ru, fit = reconstruction_uncertainty(nn.Sequential(Gain(keep)), "0", nn.Identity(), x, CIDConfig(beta=beta))
    left = 0.5 * np.log(2 * math.pi * math.e * x[..., : n // 2].numpy() ** 2)[:, 0]
    np.testing.assert_allclose(ru[:, :, : n // 2], left, atol=1e-4)
    np.testing.assert_allclose(fit["floor"][:, :, : n // 2], left, atol=1e-4)
    seen = 0.5 * math.log(beta) + GAUSS_ENTROPY
    assert ru[:, :, n // 2 :].mean() == pytest.approx(seen, abs=0.06)
    # the spread leaves the decoder's error out: nothing varies where the layer is blind
    assert (fit["spread"][:, :, : n // 2] < -10).all()
    assert fit["spread"][:, :, n // 2 :].mean() == pytest.approx(seen, abs=0.1)
