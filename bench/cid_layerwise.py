"""CID / RU / concentration per block of a trained classifier (Ma, Zhang et al. ICML 2022, Fig. 5).

Writes the HTML + JSON report to ``bench/results/cid_<task>/`` and the per-layer numbers with
provenance to ``bench/results/cid_<task>.json``. For MNIST the foreground Λ of the
concentration (Eq. 5) is the bounding box of the digit's ink (pixels ≥ 128); CIFAR-10 has no
boxes, so no concentration there.

    python bench/cid_layerwise.py --task mnist-lenet5 --model runs/lenet5/best.pt
    python bench/cid_layerwise.py --task cifar10-resnet20 --model runs/resnet20/best.pt --ru-layers stem layer1.2 layer2.2 layer3.2

Convergence check: the first ``--reference-images`` audited images are fitted again with long
reference settings (``--reference-steps``: at least 1,000 steps, plateaus judged on 100-step
windows); the JSON gives the change of each layer's CID / RU against the differences between
adjacent layers.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from _results import add_data_argument, checkpoint_record, results_dir, write_result

TASKS = {
    "mnist-lenet5": ("mnist", ["features.0", "features.1", "features.2", "features.3", "classifier.2", "classifier.3"]),
    "cifar10-resnet20": ("cifar10", ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                                     "layer3.0", "layer3.1", "layer3.2", "fc"]),
}


def ink_box(image: np.ndarray, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the pixels ≥ ``threshold`` of a gray image."""
    ys, xs = np.nonzero(image[..., 0] >= threshold)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--model", required=True, help="classifier checkpoint (keepbits train classifier)")
    add_data_argument(p, "mnist/ and cifar10/")
    p.add_argument("--layers", nargs="+", default=None, help="default: every block of the task's network")
    p.add_argument("--num-images", type=int, default=20, help="N test images: a seeded class-balanced sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the image samples, the noise and the decoders")
    p.add_argument("--beta", type=float, default=1.5e-4)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ru-layers", nargs="*", default=None, help="layers with RU (default all; empty: none)")
    p.add_argument("--num-decoder-images", type=int, default=8000, help="decoder training images: a seeded class-balanced sample of the train split")
    p.add_argument("--decoder-epochs", type=int, default=8)
    p.add_argument("--decoder-width", type=int, default=32)
    p.add_argument("--reference-images", type=int, default=4,
                   help="rerun the first K audited images with the long reference settings (convergence check; 0: none)")
    p.add_argument("--reference-steps", type=int, nargs=3, default=[1000, 3000, 100], metavar=("MIN", "MAX", "CHECK"),
                   help="min_steps, max_steps and check_every of the reference run")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result name")
    p.add_argument("--write-subset", default=None, metavar="DIR",
                   help="only write the sampled test and decoder images to DIR/<data set>/{test,train}.npz (with their indices in "
                        "the full files) and exit: --data DIR then runs the same protocol where the full files are not at hand")
    args = p.parse_args()

    import dataclasses
    import tempfile

    import torch

    from keepbits.audit.cid import CIDConfig
    from keepbits.audit.cid_report import cid_report, layerwise_cid
    from keepbits.audit.cid_ru import DecoderConfig
    from keepbits.data import load_dataset, sample_indices
    from keepbits.training.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    root = Path(args.data)
    if root is None:
        raise SystemExit("no data: pass --data (a folder holding mnist/ and cifar10/)")
    folder, default = TASKS[args.task]
    layers = args.layers or default
    test = load_dataset(root / folder, split="test")
    picked = sample_indices(test.y, args.num_images, args.seed)
    images = test.x[picked]
    foreground = {i: b for i, img in enumerate(images) if (b := ink_box(img)) is not None} if folder == "mnist" else None
    ru_layers = layers if args.ru_layers is None else args.ru_layers
    train = load_dataset(root / folder, split="train") if ru_layers else None
    decoder_idx = sample_indices(train.y, args.num_decoder_images, args.seed + 1) if ru_layers else None
    ru_images = train.x[decoder_idx] if ru_layers else None
    if args.write_subset:
        out_dir = Path(args.write_subset) / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out_dir / "test.npz", x=images, y=test.y[picked], class_names=np.array(test.class_names), index=picked)
        if ru_layers:
            np.savez_compressed(out_dir / "train.npz", x=ru_images, y=train.y[decoder_idx], class_names=np.array(train.class_names), index=decoder_idx)
        print(out_dir)
        return
    picked = _original_indices(root / folder / "test.npz", picked)  # a subset written by --write-subset knows the full file's indices
    config = CIDConfig(beta=args.beta, max_steps=args.max_steps, min_steps=args.min_steps, seed=args.seed, device=args.device)
    decoder = DecoderConfig(epochs=args.decoder_epochs, width=args.decoder_width, seed=args.seed)
    cache = tempfile.mkdtemp(prefix="cid_decoders_")  # the reference run reuses the decoders
    start = time.perf_counter()
    run = layerwise_cid(args.model, images, layers, config, name=args.task, foreground=foreground, ru_images=ru_images,
                        ru_layers=ru_layers or None, decoder=decoder, cache_dir=cache, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    s = run["summary"]
    ckpt = load_checkpoint(args.model)
    name = f"cid_{args.task}{'_' + args.tag if args.tag else ''}"
    out = results_dir() / name
    cid_report([run], out, meta={"task": args.task, "model": args.model})

    def save(convergence: dict | None) -> Path:
        return write_result(name, {
            "task": args.task, "model": args.model, "model_metrics": checkpoint_record(ckpt),
            "model_settings": {k: ckpt.settings.get(k) for k in ("epochs", "max_train", "optimizer", "arch", "val_fraction", "seed")},
            "model_epochs_completed": ckpt.epoch + 1,
            "protocol": "audited images: a seeded class-balanced sample of the test split; decoder images: a seeded class-balanced "
                        "sample of the train split (a seeded tenth held out for R²); CID and RU fitted until their ratio is on target "
                        "and their entropy on a plateau at the smallest lr (CIDConfig); the first K images rerun with long reference settings",
            "images": len(images), "test_indices": picked.tolist(), "data": str(root / folder), "cid_config": run["config"],
            "decoder": {**asdict(decoder), "train_images": len(ru_images) if ru_layers else 0},
            "ru_layers": ru_layers, "seconds": seconds, "threads": args.threads, "device": args.device or "cpu",
            "per_layer": [{k: (s[k][l] if isinstance(s[k], list) else None) for k in
                           ("layer", "cid_mean", "cid_mean_std", "cid_sum", "ratio_over_beta", "reached", "converged", "steps_mean",
                            "saturated", "ru_mean", "ru_mean_std", "ru_floor_mean", "ru_spread_mean", "concentration", "trace")}
                          | {"decoder": run["decoders"].get(layer)} for l, layer in enumerate(run["layers"])],
            "convergence": convergence if convergence is not None else "pending (reference run not finished)",
            "report": str(out / "report.html"),
        })

    print(save(None))  # the main run survives a reference run cut short
    for row in write_rows(s):
        print(row, flush=True)
    if args.reference_images > 0:
        k = min(args.reference_images, len(images))
        low, high, every = args.reference_steps
        reference = dataclasses.replace(config, min_steps=low, max_steps=high, check_every=every)
        t0 = time.perf_counter()
        ref = layerwise_cid(args.model, images[:k], layers, reference, name="reference", ru_images=ru_images, ru_layers=ru_layers or None,
                            decoder=decoder, cache_dir=cache, batch_size=args.batch_size)
        same = {key: [float(np.mean([p[key][l] for p in run["per_image"][:k]])) if run["per_image"][0].get(key) and run["per_image"][0][key][l] is not None
                      else None for l in range(len(layers))] for key in ("mean", "ru_mean")}

        def diff(a: list, b: list) -> list:
            return [None if x is None or y is None else abs(x - y) for x, y in zip(a, b)]

        def adjacent(v: list) -> list:
            return [None if v[l] is None or v[l + 1] is None else abs(v[l + 1] - v[l]) for l in range(len(v) - 1)]

        cid_ref = [float(np.mean([p["mean"][l] for p in ref["per_image"]])) for l in range(len(layers))]
        convergence = {
            "images": k, "reference_config": dataclasses.asdict(reference), "seconds": time.perf_counter() - t0,
            "cid_mean": same["mean"], "cid_mean_reference": cid_ref, "cid_abs_change": diff(same["mean"], cid_ref),
            "ru_mean": same["ru_mean"], "ru_mean_reference": ref["summary"]["ru_mean"],
            "ru_abs_change": diff(same["ru_mean"], ref["summary"]["ru_mean"] or [None] * len(layers)),
            "reference_steps_mean": ref["summary"]["steps_mean"], "reference_converged": ref["summary"]["converged"],
            "adjacent_layer_cid_differences_full_sample": adjacent(s["cid_mean"]),
            "adjacent_layer_ru_differences_full_sample": adjacent(s["ru_mean"]) if s["ru_mean"] else None,
        }
        print(save(convergence))
        print("reference |Δ CID|:", [None if v is None else round(v, 4) for v in convergence["cid_abs_change"]])
        print("reference |Δ RU| :", [None if v is None else round(v, 4) for v in convergence["ru_abs_change"]])


def _original_indices(path: Path, picked: np.ndarray) -> np.ndarray:
    """``picked`` mapped through the ``index`` array of a subset file, or unchanged."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if "index" in f.files:
                return f["index"][picked]
    return picked


def write_rows(s: dict) -> list[str]:
    fmt = lambda v: "   -  " if v is None else f"{v:7.3f}"  # noqa: E731
    rows = [f"{'layer':14s} {'CID/px':>7s} {'RU/px':>7s} {'RUfloor':>7s} {'RUspread':>8s} {'conc':>7s} {'ratio/β':>7s} reached conv steps"]
    for l, layer in enumerate(s["layer"]):
        ru, floor, spread = (s[k][l] if s[k] else None for k in ("ru_mean", "ru_floor_mean", "ru_spread_mean"))
        rows.append(f"{layer:14s} {fmt(s['cid_mean'][l])} {fmt(ru)} {fmt(floor)} {fmt(spread):>8s} {fmt(s['concentration'][l])} {fmt(s['ratio_over_beta'][l])} "
                    f"{s['reached'][l]:3d}/{s['images']} {s['converged'][l]:3d} {s['steps_mean'][l]:5.0f}")
    return rows


if __name__ == "__main__":
    main()
