"""Scores of classifier outputs: softmax, the target margin of SIS, accuracy (numpy).

Example:
    >>> import numpy as np
    >>> from keepbits.core import accuracy, softmax
    >>> softmax(np.array([[0.0, 0.0]])).tolist()
    [[0.5, 0.5]]
    >>> accuracy(np.array([[2.0, 1.0], [0.0, 3.0]]), np.array([0, 0]))
    0.5
"""
from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: Any, dtype: Any = np.float64) -> np.ndarray:
    """Row-wise softmax of N×K ``logits``, computed stably in ``dtype`` (float64 by default;
    the runtime uses float32)."""
    z = np.array(logits, dtype=dtype)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def target_margin(logits: Any, target: Any) -> np.ndarray:
    """Per row, ``m = z_t − log Σ_{j≠t} exp z_j`` in float64; the softmax confidence of the
    target is ``σ(m)`` exactly, and ``m`` keeps ranking inputs where that confidence has
    rounded to 1 (Carter et al.'s f, in log-odds). ``target``: one class, or one per row.

    Example:
        >>> import numpy as np
        >>> from keepbits.core import target_margin
        >>> target_margin(np.array([[50.0, 0.0, 0.0], [60.0, 0.0, 0.0]]), 0).round(3).tolist()
        [49.307, 59.307]
        >>> target_margin(np.array([[50.0, 0.0, 0.0], [0.0, 0.0, 60.0]]), [0, 2]).round(3).tolist()
        [49.307, 59.307]
    """
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    t = np.broadcast_to(np.asarray(target, dtype=np.int64), rows.shape)
    others = z.copy()
    others[rows, t] = -np.inf
    top = others.max(axis=1)
    return z[rows, t] - top - np.log(np.exp(others - top[:, None]).sum(axis=1))


def accuracy(logits: Any, labels: Any) -> float:
    """Share of rows whose argmax equals the label (0.0 for no rows)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    return float(np.mean(logits.argmax(axis=1) == labels)) if len(labels) else 0.0


__all__ = ["accuracy", "softmax", "target_margin"]
