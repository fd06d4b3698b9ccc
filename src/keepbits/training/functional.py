"""Torch versions of the NICE math (the numpy reference is :mod:`keepbits.core`).

Equation numbers refer to Li & Ji, "Neural Image Compression and Explanation".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from keepbits.core.hard_concrete import BETA, GAMMA, LOG_RATIO, ZETA

_EPS = 1e-6


def hard_concrete_sample(log_alpha: torch.Tensor, beta: float = BETA, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised training gate (Eq. 7): s = σ((log u − log(1−u) + log α)/β),
    z = min(1, max(0, s(ζ−γ)+γ)), u ~ U(0, 1) (``noise``, drawn here when not given).
    Differentiable in ``log_alpha``."""
    u = (torch.rand_like(log_alpha) if noise is None else noise.to(log_alpha)).clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_mask(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Test-time mask ẑ = min(1, max(0, σ(log α/β)(ζ−γ)+γ)) (NICE Eq. 11, temperature inside
    the sigmoid as NICE writes it; see :mod:`keepbits.core.hard_concrete`)."""
    return (torch.sigmoid(log_alpha / beta) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_gate(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """y = P(z > 0) = σ(log α − β log(−γ/ζ)) (Eq. 9)."""
    return torch.sigmoid(log_alpha - beta * LOG_RATIO)


def l0_penalty(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Expected L0 norm per image (Eq. 6, second term), averaged over the batch."""
    return expected_gate(log_alpha, beta).flatten(1).sum(1).mean()


def smoothness_loss(gate: torch.Tensor) -> torch.Tensor:
    """Eq. 8 on y (N×1×H×W): |y(m,n)−y(m−1,n)| + |y(m,n)−y(m,n−1)| + |y(m,n)−y(m−1,n−1)|
    + |y(m,n)−y(m−1,n+1)|, each term only where both pixels exist (no wrap-around);
    summed per image, averaged over the batch."""
    up = (gate[..., 1:, :] - gate[..., :-1, :]).abs().flatten(1).sum(1)
    left = (gate[..., :, 1:] - gate[..., :, :-1]).abs().flatten(1).sum(1)
    up_left = (gate[..., 1:, 1:] - gate[..., :-1, :-1]).abs().flatten(1).sum(1)
    up_right = (gate[..., 1:, :-1] - gate[..., :-1, 1:]).abs().flatten(1).sum(1)
    return (up + left + up_left + up_right).mean()


def block_average(x: torch.Tensor, b: int) -> torch.Tensor:
    """b×b block means upsampled back (nearest); edge blocks average the pixels they hold
    (same convention as :func:`keepbits.core.block_average`)."""
    if b < 1:
        raise ValueError(f"block size b must be >= 1, got {b}")
    if b == 1:
        return x
    h, w = x.shape[-2:]
    # ceil_mode average pooling without padding divides edge windows by their real size.
    kernel = (min(b, h), min(b, w))  # b beyond the image: one block along that axis
    means = F.avg_pool2d(x, kernel_size=kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
    return means.repeat_interleave(kernel[0], dim=-2).repeat_interleave(kernel[1], dim=-1)[..., :h, :w]


def mixed_resolution(x: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """x̃ = x ⊙ z + x_b ⊙ (1 − z) (Eq. 12); ``mask`` N×1×H×W broadcasts over channels."""
    return x * mask + block_average(x, b) * (1.0 - mask)
