"""SimpleBits Fig. 2 check: bpd under the density model orders an all-black image <
MNIST < CIFAR-10, and correlates with the PNG size of the same images (Spearman ρ).

    nice -n 5 .venv/bin/python bench/simplebits_bpd.py [--data ../shared/data] [--density CKPT] [--n 300]

Writes ``bench/results/simplebits_bpd.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import default_data_dir, write_result  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties share their mean rank)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v[np.diff(np.sort(v), prepend=np.nan) == 0]):
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def png_bits_per_dim(img_hwc: np.ndarray) -> float:
    """Size of the PNG at zlib level 9 (:func:`keepbits.codec.encode_image`), in bits per sub-pixel of the image as stored."""
    from keepbits.codec import encode_image

    return 8.0 * len(encode_image(img_hwc, "png", png_level=9)) / img_hwc.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(default_data_dir() or "../shared/data"))
    p.add_argument("--density", default=None, help="density checkpoint (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--n", type=int, default=300, help="images per data set")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from keepbits.data import load_dataset
    from keepbits.training.density import images_to_unit, load_density
    from keepbits.training.simplebits import mean_bpd

    torch.set_num_threads(args.threads)
    flow = load_density(args.density)
    sets = {
        "black": np.zeros((1, 32, 32, 3), np.uint8),
        "mnist": load_dataset(Path(args.data) / "mnist", "test").x[: args.n],
        "cifar10": load_dataset(Path(args.data) / "cifar10", "test").x[: args.n],
    }
    per_image, summary = {}, {}
    for name, x in sets.items():
        bits = np.array([mean_bpd(flow, images_to_unit(x[i : i + 1])) for i in range(len(x))])
        png = np.array([png_bits_per_dim(img) for img in x])
        per_image[name] = (bits, png)
        summary[name] = {"n": len(x), "bpd_mean": float(bits.mean()), "bpd_std": float(bits.std()), "png_bits_per_dim_mean": float(png.mean())}
        print(f"{name:8s} n={len(x):4d}  bpd {bits.mean():.3f} ± {bits.std():.3f}   PNG {png.mean():.3f} bits/dim", flush=True)
    all_bits = np.concatenate([v[0] for v in per_image.values()])
    all_png = np.concatenate([v[1] for v in per_image.values()])
    rho = {"pooled": spearman(all_bits, all_png), **{f"within_{k}": spearman(*v) for k, v in per_image.items() if len(v[0]) > 2}}
    ordered = summary["black"]["bpd_mean"] < summary["mnist"]["bpd_mean"] < summary["cifar10"]["bpd_mean"]
    print(f"order black < mnist < cifar10: {ordered};  Spearman ρ(bpd, PNG size): {rho}")
    from keepbits.training.checkpoint import load_checkpoint
    from keepbits.training.density import default_density_path

    ckpt = load_checkpoint(args.density or default_density_path(), kind="density")
    write_result("simplebits_bpd", {
        "density": str(args.density or "shipped density_cifar10.pt"), "density_settings": ckpt.settings,
        "density_metrics": ckpt.metrics, "per_dataset": summary, "order_black_mnist_cifar": ordered,
        "spearman_bpd_vs_png": rho,
        "note": "MNIST 28x28 gray is replicated to 3 channels and bilinearly resized to 32x32 for the colour flow; PNG size of the stored image (1 channel for MNIST)",
    })


if __name__ == "__main__":
    main()
