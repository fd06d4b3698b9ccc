"""Pure math shared by training, export, runtime and audits (numpy reference, no torch).

The torch twins live in :mod:`keepbits.training.functional` and are tested equal.
"""
from keepbits.core.hard_concrete import (
    BETA,
    GAMMA,
    ZETA,
    deterministic_mask,
    expected_gate,
    sigmoid,
)
from keepbits.core.compose import block_average, block_means, mixed_resolution
from keepbits.core.scores import accuracy, softmax, target_margin

__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "deterministic_mask",
    "expected_gate",
    "sigmoid",
    "block_average",
    "block_means",
    "mixed_resolution",
    "accuracy",
    "softmax",
    "target_margin",
]
