"""Small-sample statistics the reports state: Student's t quantile for confidence intervals
(numpy only; no SciPy on the device).

Example:
    >>> from keepbits.core.stats import t_quantile
    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 8), 3), round(t_quantile(0.975, 10**6), 3)
    (12.706, 2.306, 1.96)
"""
from __future__ import annotations

import math

import numpy as np


def _t_cdf_above_zero(t: float, dof: float) -> float:
    """P(0 ≤ T ≤ t) of Student's t with ``dof`` degrees of freedom, by Simpson's rule on the
    density after the substitution x = tan θ (a finite interval whatever ``t``)."""
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    theta = np.linspace(0.0, math.atan(t), 2001)
    x = np.tan(theta)
    density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(x * x / dof)) / np.cos(theta) ** 2
    h = theta[1] - theta[0]
    return float(h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum()))


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``dof`` ≥ 1 degrees of freedom, by
    bisection on its distribution function (to 1e-6): a 95 % interval of a mean of n values is
    mean ± t_quantile(0.975, n − 1)·s/√n."""
    if not 0.5 < p < 1 or not dof >= 1:
        raise ValueError(f"need 0.5 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    low, high = 0.0, 1.0
    while 0.5 + _t_cdf_above_zero(high, dof) < p:
        high *= 2
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if 0.5 + _t_cdf_above_zero(mid, dof) < p else (low, mid)
    return (low + high) / 2


__all__ = ["t_quantile"]
