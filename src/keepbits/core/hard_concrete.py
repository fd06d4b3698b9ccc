"""Hard-concrete gates (Louizos et al. 2018) as used by NICE (Li & Ji).

Constants and the two deterministic quantities the runtime needs:

* ``deterministic_mask``: NICE Eq. 11, ẑ = min(1, max(0, σ(log α / β)(ζ − γ) + γ)).
  NICE's Eq. 11 keeps the temperature β inside the sigmoid (Louizos et al.'s Eq. 13 drops
  it); keepbits follows NICE, and every backend (torch, ONNX function bodies, C++/CUDA
  kernels) must use this same form.
* ``expected_gate``: NICE Eq. 9, y = E[z > 0] = σ(log α − β log(−γ / ζ)); its sum is
  the expected L0 penalty of Eq. 6.

Example:
    >>> import numpy as np
    >>> from keepbits.core import deterministic_mask
    >>> deterministic_mask(np.array([-20.0, 0.0, 20.0])).round(3).tolist()
    [0.0, 0.5, 1.0]
"""
from __future__ import annotations

import math

import numpy as np

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
#: log(−γ/ζ): the shift that turns log α into the logit of P(z > 0).
LOG_RATIO = math.log(-GAMMA / ZETA)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, split by sign so that exp never overflows (no warnings at ±1000)."""
    x = np.asarray(x)
    out = np.empty_like(x, dtype=np.result_type(x.dtype, np.float32))
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def deterministic_mask(log_alpha: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Test-time mask ẑ of NICE Eq. 11 (σ(log α / β)), in [0, 1] with exact 0 and 1 reachable."""
    stretched = sigmoid(np.asarray(log_alpha) / beta) * (ZETA - GAMMA) + GAMMA
    return np.clip(stretched, 0.0, 1.0)


def expected_gate(log_alpha: np.ndarray, beta: float = BETA) -> np.ndarray:
    """P(z > 0) = σ(log α − β log(−γ/ζ)) (NICE Eq. 9); sums to the L0 term of Eq. 6."""
    return sigmoid(np.asarray(log_alpha) - beta * LOG_RATIO)
