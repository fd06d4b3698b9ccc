"""SimpleBits Fig. 2 check: bpd under the density model orders an all-black image <
MNIST < CIFAR-10, and correlates with the PNG size of the same images (Spearman ρ).

    nice -n 5 .venv/bin/python bench/simplebits_bpd.py [--data ../shared/data] [--density CKPT] [--n 300] [--seeds 0 1 2]

Every sample is a seeded class-balanced draw (``keepbits.data.sample_indices``): CIFAR-10's test
file is sorted by class, so its first N images are airplanes. Also evaluates the density model's
CIFAR-10 test bpd on every test image, per class and on class-balanced samples. Writes
``bench/results/simplebits_bpd.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, require_data, write_result  # noqa: E402


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
    add_data_argument(p, "mnist/ and cifar10/")
    p.add_argument("--density", default=None, help="density checkpoint (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--n", type=int, default=300, help="images per data set: a seeded class-balanced sample of the test split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one sample (and one row of results) per seed")
    p.add_argument("--glow-test-images", type=int, default=2000, help="size of the class-balanced CIFAR-10 test samples for the Glow's test bpd")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    require_data(p, args.data, "mnist", "cifar10")

    import torch

    from keepbits.data import load_dataset, sample_indices
    from keepbits.training.checkpoint import load_checkpoint
    from keepbits.training.density import default_density_path, images_to_unit, load_density, per_image_bpd

    torch.set_num_threads(args.threads)
    flow = load_density(args.density)
    mnist, cifar = load_dataset(Path(args.data) / "mnist", "test"), load_dataset(Path(args.data) / "cifar10", "test")
    black = np.zeros((1, 32, 32, 3), np.uint8)
    black_bits, black_png = per_image_bpd(flow, images_to_unit(black)), np.array([png_bits_per_dim(black[0])])
    runs = []
    for seed in args.seeds:
        per_image, summary, picked = {"black": (black_bits, black_png)}, {}, {}
        for name, data in (("mnist", mnist), ("cifar10", cifar)):
            idx = sample_indices(data.y, args.n, seed)
            x = data.x[idx]
            picked[name] = idx.tolist()
            per_image[name] = (per_image_bpd(flow, images_to_unit(x), seed=seed), np.array([png_bits_per_dim(img) for img in x]))
        for name, (bits, png) in per_image.items():
            summary[name] = {"n": len(bits), "bpd_mean": float(bits.mean()), "bpd_std": float(bits.std()), "png_bits_per_dim_mean": float(png.mean())}
            print(f"seed {seed}  {name:8s} n={len(bits):4d}  bpd {bits.mean():.3f} ± {bits.std():.3f}   PNG {png.mean():.3f} bits/dim", flush=True)
        all_bits = np.concatenate([v[0] for v in per_image.values()])
        all_png = np.concatenate([v[1] for v in per_image.values()])
        rho = {"pooled": spearman(all_bits, all_png), **{f"within_{k}": spearman(*v) for k, v in per_image.items() if len(v[0]) > 2}}
        ordered = summary["black"]["bpd_mean"] < summary["mnist"]["bpd_mean"] < summary["cifar10"]["bpd_mean"]
        print(f"seed {seed}  order black < mnist < cifar10: {ordered};  Spearman ρ(bpd, PNG size): {rho}", flush=True)
        runs.append({"seed": seed, "per_dataset": summary, "order_black_mnist_cifar": ordered, "spearman_bpd_vs_png": rho, "test_indices": picked})

    # the Glow's CIFAR-10 test bpd: every test image, per class, and class-balanced samples
    full = per_image_bpd(flow, images_to_unit(cifar.x))
    per_class = {cifar.class_names[c]: float(full[cifar.y == c].mean()) for c in range(cifar.num_classes)}
    samples = {seed: float(full[sample_indices(cifar.y, args.glow_test_images, seed)].mean()) for seed in args.seeds}
    glow = {"full_test_set": {"n": len(full), "bpd_mean": float(full.mean()), "bpd_std": float(full.std())}, "per_class": per_class,
            f"class_balanced_{args.glow_test_images}": samples,
            f"first_{args.glow_test_images}_of_the_class_sorted_file (old protocol, for comparison)": float(full[: args.glow_test_images].mean())}
    print(f"Glow test bpd: all {len(full)} images {full.mean():.3f}; class-balanced {args.glow_test_images}: {samples}; per class {per_class}")

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}

    ckpt = load_checkpoint(args.density or default_density_path(), kind="density")
    write_result("simplebits_bpd", {
        "density": str(args.density or "shipped density_cifar10.pt"), "density_settings": ckpt.settings,
        "density_metrics_at_training": ckpt.metrics, "images_per_set": args.n, "seeds": args.seeds,
        "protocol": "per seed: a class-balanced sample (keepbits.data.sample_indices) of the MNIST and CIFAR-10 test splits; "
                    "bpd with dequantisation noise of a fixed seed; PNG at zlib level 9 of the stored image",
        "summary_over_seeds": {
            "order_black_mnist_cifar_holds": sum(r["order_black_mnist_cifar"] for r in runs),
            **{f"bpd_{k}": spread([r["per_dataset"][k]["bpd_mean"] for r in runs]) for k in ("black", "mnist", "cifar10")},
            **{f"spearman_{k}": spread([r["spearman_bpd_vs_png"][k] for r in runs]) for k in runs[0]["spearman_bpd_vs_png"]},
        },
        "runs": runs, "glow_cifar10_test_bpd": glow,
        "note": "MNIST 28x28 gray is replicated to 3 channels and bilinearly resized to 32x32 for the colour flow; PNG size of the stored image (1 channel for MNIST)",
    })


if __name__ == "__main__":
    main()
