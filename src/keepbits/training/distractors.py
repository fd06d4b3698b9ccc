"""Distractor data sets of SimpleBits Fig. 4, built from real MNIST and CIFAR-10 images,
and a measure of how much of the distractor a simplifier removes.

Every builder returns ``(x, y, target, distractor)``: uint8 N×H×W×C images, labels, and the
two components the images were made of (each placed where it appears in the image, zero
elsewhere), so a simplified image can be compared with both parts.

| kind | image | label |
|---|---|---|
| ``mnist_noise`` | (digit + U(0, 1) noise)/2, 28×28×1 | digit |
| ``mnist_cifar`` | (digit + CIFAR image)/2, digit padded to 32×32 and replicated to RGB | digit |
| ``cifar_stripes`` | (CIFAR image + stripes)/2, stripes of period 4 px, 32×32×3 | 0 horizontal, 1 vertical |
| ``mnist_beside_cifar`` | digit (padded, RGB) and CIFAR image side by side in random order, 32×64×3 | digit |

Example:
    >>> import numpy as np
    >>> from keepbits.training.distractors import build_distractor, removal_scores
    >>> mnist = np.zeros((16, 28, 28, 1), np.uint8); cifar = np.full((4, 32, 32, 3), 200, np.uint8)
    >>> x, y, target, distractor = build_distractor("cifar_stripes", mnist, np.arange(16), cifar, seed=0)
    >>> x.shape, sorted(set(y.tolist()))
    ((16, 32, 32, 3), [0, 1])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from keepbits.errors import InputError

KINDS = ("mnist_noise", "mnist_cifar", "cifar_stripes", "mnist_beside_cifar")


def _digit_rgb32(mnist: np.ndarray) -> np.ndarray:
    """28×28×1 digits → 32×32×3 (zero padding of 2 px, gray replicated)."""
    return np.repeat(np.pad(mnist, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def build_distractor(kind: str, mnist: np.ndarray, mnist_labels: np.ndarray, cifar: np.ndarray, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Build ``kind`` (see module doc) from uint8 MNIST (N×28×28×1) and CIFAR (M×32×32×3)
    images; N images come out, CIFAR images are drawn at random (with replacement if M < N)."""
    if kind not in KINDS:
        raise InputError(f"unknown distractor set {kind!r}; choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    n = len(mnist)
    m = mnist.astype(np.float32)
    pick = cifar[rng.integers(0, len(cifar), n)].astype(np.float32) if len(cifar) else None
    if kind != "mnist_noise" and pick is None:
        raise InputError(f"{kind} needs CIFAR-10 images")
    if kind == "mnist_noise":
        noise = rng.uniform(0, 255, m.shape).astype(np.float32)
        parts, y = (m / 2, noise / 2), mnist_labels
    elif kind == "mnist_cifar":
        parts, y = (_digit_rgb32(mnist).astype(np.float32) / 2, pick / 2), mnist_labels
    elif kind == "cifar_stripes":
        y = rng.integers(0, 2, n)
        phase = (np.arange(32) // 2) % 2 * 255.0
        stripes = np.where(y[:, None, None] == 0, phase[None, :, None], phase[None, None, :]) * np.ones((n, 32, 32))
        parts = (np.repeat(stripes[..., None], 3, -1).astype(np.float32) / 2, pick / 2)
    else:
        digit, zeros = _digit_rgb32(mnist).astype(np.float32), np.zeros_like(pick)
        left = rng.integers(0, 2, n).astype(bool)[:, None, None, None]
        target = np.concatenate([np.where(left, digit, zeros), np.where(left, zeros, digit)], axis=2)
        distractor = np.concatenate([np.where(left, zeros, pick), np.where(left, pick, zeros)], axis=2)
        parts, y = (target, distractor), mnist_labels
    target, distractor = parts
    x = np.clip(np.rint(target + distractor), 0, 255).astype(np.uint8)
    as_u8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return x, np.asarray(y, np.int64), as_u8(target), as_u8(distractor)


def write_distractor_npz(kind: str, data_root: str | Path, out: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write ``out`` (.npz with x_train/y_train/x_test/y_test and the component arrays) from
    ``data_root/mnist`` and ``data_root/cifar10``; usable as ``--data`` of any command."""
    from keepbits.data import load_dataset

    root = Path(data_root)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        mn = load_dataset(root / "mnist", split).sample(n, seed)
        cf = load_dataset(root / "cifar10", split).sample(4 * n, seed)  # CIFAR-10 files are sorted by class
        x, y, target, distractor = build_distractor(kind, mn.x, mn.y, cf.x, seed + (split == "test"))
        arrays |= {f"x_{split}": x, f"y_{split}": y, f"target_{split}": target, f"distractor_{split}": distractor}
    names = ["horizontal", "vertical"] if kind == "cifar_stripes" else [str(i) for i in range(10)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, class_names=np.array(names), **arrays)
    return out


def removal_scores(simplified: np.ndarray, target: np.ndarray, distractor: np.ndarray) -> dict[str, float]:
    """Mean per-image Pearson correlation of the simplified images with the target part and
    with the distractor part (all N×H×W×C, any scale; gray simplified images are compared
    with channel means). A simplifier that removes the distractor keeps ρ_target high and
    drives ρ_distractor towards 0."""

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        vals = []
        for u, v in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
            su, sv = u.std(), v.std()
            vals.append(0.0 if su == 0 or sv == 0 else float(((u - u.mean()) * (v - v.mean())).mean() / (su * sv)))
        return float(np.mean(vals))

    if simplified.shape != target.shape:
        raise InputError(f"simplified images {simplified.shape} and components {target.shape} differ in shape")
    return {"corr_target": corr(simplified, target), "corr_distractor": corr(simplified, distractor)}
