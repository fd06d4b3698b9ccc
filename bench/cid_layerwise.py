"""CID / RU / concentration per block of a trained classifier (Ma, Zhang et al. ICML 2022, Fig. 5).

Writes the HTML + JSON report to ``bench/results/cid_<task>/`` and the per-layer numbers with
provenance to ``bench/results/cid_<task>.json``. For MNIST the foreground Λ of the
concentration (Eq. 5) is the bounding box of the digit's ink (pixels ≥ 128); CIFAR-10 has no
boxes, so no concentration there.

    python bench/cid_layerwise.py --task mnist-lenet5 --model runs/lenet5/best.pt
    python bench/cid_layerwise.py --task cifar10-resnet20 --model runs/resnet20/best.pt --ru-layers stem layer1.2 layer2.2 layer3.2
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from _results import default_data_dir, results_dir, write_result

TASKS = {
    "mnist-lenet5": ("mnist", ["features.0", "features.1", "features.2", "features.3", "classifier.2", "classifier.3"]),
    "cifar10-resnet20": ("cifar10", ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                                     "layer3.0", "layer3.1", "layer3.2", "fc"]),
}


def ink_box(image: np.ndarray, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the pixels ≥ ``threshold`` of a gray image."""
    ys, xs = np.nonzero(image[..., 0] >= threshold)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


def spread_over_classes(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of ``count`` images taken round-robin over the classes in a seeded random order
    (CIFAR-10's npz files are sorted by class, so their first N images are one class); the
    interleaved order also gives the decoder's held-out last tenth every class."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < count and any(per_class):
        picked += [pool.pop() for pool in per_class if pool][: count - len(picked)]
    return np.array(picked, dtype=np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--model", required=True, help="classifier checkpoint (keepbits train classifier)")
    p.add_argument("--data", default=None, help="data root holding mnist/ and cifar10/ (default ../shared/data)")
    p.add_argument("--layers", nargs="+", default=None, help="default: every block of the task's network")
    p.add_argument("--num-images", type=int, default=8, help="N test images, spread evenly over the classes (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test-image sample")
    p.add_argument("--beta", type=float, default=1.5e-4)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ru-layers", nargs="*", default=None, help="layers with RU (default all; empty: none)")
    p.add_argument("--ru-train-images", type=int, default=1500)
    p.add_argument("--decoder-epochs", type=int, default=2)
    p.add_argument("--decoder-width", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from keepbits.audit.cid import CIDConfig
    from keepbits.audit.cid_report import cid_report, layerwise_cid
    from keepbits.audit.cid_ru import DecoderConfig
    from keepbits.data import load_dataset
    from keepbits.training.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    root = Path(args.data) if args.data else default_data_dir()
    if root is None:
        raise SystemExit("no data: pass --data (a folder holding mnist/ and cifar10/)")
    folder, default = TASKS[args.task]
    layers = args.layers or default
    test = load_dataset(root / folder, split="test")
    picked = spread_over_classes(test.y, args.num_images, args.seed)
    images = test.x[picked]
    foreground = {i: b for i, img in enumerate(images) if (b := ink_box(img)) is not None} if folder == "mnist" else None
    ru_layers = layers if args.ru_layers is None else args.ru_layers
    if ru_layers:
        train = load_dataset(root / folder, split="train")
        ru_images = train.x[spread_over_classes(train.y, args.ru_train_images, args.seed + 1)]
    else:
        ru_images = None
    config = CIDConfig(beta=args.beta, max_steps=args.max_steps)
    decoder = DecoderConfig(epochs=args.decoder_epochs, width=args.decoder_width)
    start = time.perf_counter()
    run = layerwise_cid(args.model, images, layers, config, name=args.task, foreground=foreground, ru_images=ru_images,
                        ru_layers=ru_layers or None, decoder=decoder, cache_dir=None, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    ckpt = load_checkpoint(args.model)
    out = results_dir() / f"cid_{args.task}"
    cid_report([run], out, meta={"task": args.task, "model": args.model})
    s = run["summary"]
    path = write_result(f"cid_{args.task}", {
        "task": args.task, "model": args.model, "model_metrics": ckpt.metrics.get("best"),
        "model_settings": {k: ckpt.settings.get(k) for k in ("epochs", "max_train", "optimizer", "arch")},
        "model_epochs_completed": ckpt.epoch + 1,
        "images": len(images), "test_indices": picked.tolist(), "data": str(root / folder), "cid_config": run["config"], "decoder": {**asdict(decoder), "train_images": len(ru_images) if ru_layers else 0},
        "ru_layers": ru_layers, "seconds": seconds, "threads": args.threads,
        "per_layer": [{k: (s[k][l] if isinstance(s[k], list) else None) for k in
                       ("layer", "cid_mean", "cid_mean_std", "cid_sum", "ratio_over_beta", "reached", "steps_mean", "saturated",
                        "ru_mean", "concentration")} | {"decoder": run["decoders"].get(layer)} for l, layer in enumerate(run["layers"])],
        "report": str(out / "report.html"),
    })
    print(path)
    for row in write_rows(s):
        print(row)


def write_rows(s: dict) -> list[str]:
    fmt = lambda v: "   -  " if v is None else f"{v:7.3f}"  # noqa: E731
    rows = [f"{'layer':14s} {'CID/px':>7s} {'RU/px':>7s} {'conc':>7s} {'ratio/β':>7s} reached steps"]
    for l, layer in enumerate(s["layer"]):
        ru = s["ru_mean"][l] if s["ru_mean"] else None
        rows.append(f"{layer:14s} {fmt(s['cid_mean'][l])} {fmt(ru)} {fmt(s['concentration'][l])} {fmt(s['ratio_over_beta'][l])} "
                    f"{s['reached'][l]:3d}/{s['images']} {s['steps_mean'][l]:5.0f}")
    return rows


if __name__ == "__main__":
    main()
