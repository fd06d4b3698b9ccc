"""Train LeNet5 and a NICE mask generator on MNIST, then save the masks as a figure.

    python examples/nice_mnist.py                      # ../shared/data/mnist, else the bundled sample
    python examples/nice_mnist.py --data path/to/mnist --out nice_mnist_masks.png

Steps: LeNet5 (1 epoch, AdamW), then NICE with the paper's MNIST generator (one 3×3 conv),
the classifier fixed, b = 28 (dropped pixels become the image mean), λ1 = 10, λ2 = 0.
A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from keepbits.data import load_dataset, sample_mnist_path
from keepbits.training.classifier import ClassifierConfig, train_classifier
from keepbits.training.data import TensorImages
from keepbits.training.nice import NiceConfig, load_nice, mask_and_mix, train_nice
from keepbits.training.nice_eval import to_uint8

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED) if SHARED.is_dir() else str(sample_mnist_path()))
    p.add_argument("--out", default="nice_mnist_masks.png")
    p.add_argument("--max-train", type=int, default=10000)
    p.add_argument("--lambda-l0", type=float, default=10.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nice_mnist_"))

    clf = train_classifier(ClassifierConfig(data=args.data, arch="lenet5", out=str(work / "lenet5"), epochs=1, optimizer="adamw",
                                            lr=1e-3, weight_decay=0.0, augment="none", val_fraction=0.0, max_train=args.max_train))
    print("LeNet5 test accuracy:", clf["history"][-1].get("test_accuracy"))
    nice = train_nice(NiceConfig(data=args.data, classifier=clf["checkpoints"]["last"], out=str(work / "nice"), generator="nice_mnist",
                                 block_size=28, lambda_l0=args.lambda_l0, lr=1e-2, epochs=1, max_train=args.max_train))
    print("NICE on the test set:", nice["final"])

    generator, _, ckpt = load_nice(nice["checkpoint"])
    norm = ckpt.normalization
    test = load_dataset(args.data, "test")
    x, _ = next(TensorImages(test.subset(np.arange(8)), norm.mean, norm.std).batches(8))
    with torch.no_grad():
        z_hat, mixed = mask_and_mix(generator, x, 28)
    mixed = to_uint8(mixed, norm.mean, norm.std)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 8, figsize=(8, 3.2))
    for i in range(8):
        for row, (image, cmap) in enumerate([(test.x[i, ..., 0], "gray"), (z_hat[i, 0].numpy(), "viridis"), (mixed[i, ..., 0], "gray")]):
            axes[row, i].imshow(image, cmap=cmap, vmin=0, vmax=1 if row == 1 else 255)
            axes[row, i].axis("off")
    for row, name in enumerate(["x", "ẑ", "x̃"]):
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("saved", args.out)


if __name__ == "__main__":
    main()
