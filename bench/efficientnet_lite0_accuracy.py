"""Top-1 of keepbits' EfficientNet-Lite0 port (and of the weights package's own model, when
installed) on the ImageNet sample images.

    OMP_NUM_THREADS=1 python bench/efficientnet_lite0_accuracy.py --data ../shared/data

Data: ``imagenet_samples/<wnid>/<file>.jpg`` (one image per class; the label is the wnid's
index in keepbits' shipped class list), read with :class:`keepbits.data.Footage`.
Preprocessing: the model's own :data:`keepbits.training.models.efficientnet_lite.PREPROCESSING`
(short side to 256, centre 224×224 crop, ImageNet mean/std), the same input for both models.
Reported on seeded class-balanced samples of ``--sample`` images (one image per class, so a
seeded draw of classes; one per ``--seeds``), on all images, and on the evaluation split (classes whose index is a
multiple of 5: measured, never tuned on) and the rest. Also: top-1 agreement and the largest
logit difference between the two models, and (``--symmetric-padding``) the port with
symmetric instead of TensorFlow-``SAME`` padding, to check which one the weights expect.
Writes ``bench/results/efficientnet_lite0_accuracy.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, write_result  # noqa: E402

from keepbits import registry  # noqa: E402
from keepbits.data import Footage, imagenet_wnids  # noqa: E402
from keepbits.training.checkpoint import read_state_dict  # noqa: E402
from keepbits.training.models import efficientnet_lite as lite  # noqa: E402


def load_images(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Model-size uint8 images (N×224×224×3) and labels of every image under ``root``."""
    footage = Footage([root], class_folders=imagenet_wnids())
    images, labels = [], []
    for sample in footage.read():
        images.append(lite.PREPROCESSING.fit(sample.image)[0])
        labels.append(sample.label)
    counts = footage.counts.as_dict()
    if counts["skipped"]:
        raise SystemExit(f"{counts['skipped']} unreadable images under {root}")
    return np.stack(images), np.array(labels)


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(lite.PREPROCESSING.normalize(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def symmetric_padding(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights with every convolution padded k // 2 on all sides (no TF-SAME extra pixel)."""
    for module in model.modules():
        if isinstance(module, lite.ConvBNAct) and isinstance(module.pad, torch.nn.ZeroPad2d):
            k = module.conv.kernel_size[0]
            module.pad, module.conv.padding = torch.nn.Identity(), (k // 2, k // 2)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser, "imagenet_samples/")
    parser.add_argument("--sample", type=int, default=500, help="size of the seeded class-balanced sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the class-balanced samples")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--symmetric-padding", action="store_true", help="also measure the port with symmetric padding")
    args = parser.parse_args()
    if args.data is None:
        raise SystemExit("--data is required (no ../shared/data here)")
    torch.set_num_threads(args.threads)
    root = args.data / "imagenet_samples"
    started = time.time()
    images, labels = load_images(root)
    # one image per class: a class-balanced sample is a seeded draw of classes
    per_class = np.bincount(labels, minlength=1000)
    samples = {f"sample_seed{seed}": np.flatnonzero(np.isin(labels, np.random.default_rng(seed).permutation(1000)[:args.sample]))
               for seed in args.seeds}
    evaluation = labels % 5 == 0
    subsets = {**samples, "all": np.arange(len(labels)), "evaluation_split": np.flatnonzero(evaluation), "rest": np.flatnonzero(~evaluation)}

    models = {"keepbits_port": registry.build("efficientnet_lite0", pretrained=True)}
    try:
        from efficientnet_lite_pytorch import EfficientNet

        reference = EfficientNet.from_name("efficientnet-lite0")
        reference.load_state_dict(read_state_dict(lite.package_weights_path()))
        models["package_model"] = reference
    except ImportError:
        print("efficientnet-lite-pytorch not installed: measuring the port only")
    if args.symmetric_padding:
        models["port_symmetric_padding"] = symmetric_padding(registry.build("efficientnet_lite0", pretrained=True))

    logits = {name: logits_of(model, images, args.batch_size) for name, model in models.items()}
    accuracy = {name: {subset: round(float((out[index].argmax(1) == labels[index]).mean() * 100), 2) for subset, index in subsets.items()}
                for name, out in logits.items()}
    payload = {
        "images": int(len(labels)), "classes_with_images": int((per_class > 0).sum()), "sample_size": args.sample,
        "subset_sizes": {k: int(len(v)) for k, v in subsets.items()},
        "preprocessing": lite.PREPROCESSING.to_dict() | {"class_names": f"{len(lite.PREPROCESSING.class_names)} ImageNet classes"},
        "top1_percent": accuracy, "threads": args.threads, "wall_s": round(time.time() - started, 1),
    }
    if "package_model" in logits:
        a, b = logits["keepbits_port"], logits["package_model"]
        payload["port_vs_package"] = {"top1_agreement_percent": round(float((a.argmax(1) == b.argmax(1)).mean() * 100), 2),
                                      "max_abs_logit_difference": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max())}
    if "port_symmetric_padding" in logits:
        payload["symmetric_vs_same_padding_top1_agreement_percent"] = round(
            float((logits["port_symmetric_padding"].argmax(1) == logits["keepbits_port"].argmax(1)).mean() * 100), 2)
    path = write_result("efficientnet_lite0_accuracy", payload)
    print(path)
    for name, row in accuracy.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.1f}%" for k, v in row.items()))
    if "port_vs_package" in payload:
        print("port vs package:", payload["port_vs_package"])


if __name__ == "__main__":
    main()
