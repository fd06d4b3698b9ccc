"""Shared fixtures. Tests never read ../shared: data is generated or the bundled MNIST sample."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tiny_npz(tmp_path):
    """A 3-class colour data set (60 images of 16×16) whose class is the bright quadrant."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, 16, 16, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 150
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
