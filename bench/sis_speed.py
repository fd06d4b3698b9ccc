"""Exact SIS speed (issue 6): incremental BackSelect vs the reference algorithm, same model and inputs.

The reference algorithm (as in the public SIS code): at every BackSelect step, one batched
float32 forward pass over all remaining single-pixel maskings, ``argmax`` picks the pixel
(lowest index on exact ties). keepbits' incremental BackSelect evaluates only the boxes a
one-pixel change reaches, reuses unaffected candidates between steps and computes in
float64 (its order equals a plain float64 BackSelect: tests/test_sis.py).

Model: a small MNIST CNN (conv 32@3×3, conv 64@3×3, max-pool 2, fc 128, fc 10; the Keras
MNIST example architecture), trained here for one epoch on real MNIST. Both methods run in
this process on the same images for the first ``--steps`` BackSelect steps (default: all
784). The reference runs twice: in float32 (as the public code; the speed baseline) and in
float64 (the incremental scorer's arithmetic, so the orders must be identical; float32
confidences saturate to exact ties and can then pick another pixel). The JSON records
per-image times, both ratios, and whether the orders and the SIS are identical.

    nice -n 5 python bench/sis_speed.py --images 2 --steps 40
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from keepbits.audit import TorchAdapter, backselect, find_sis
from keepbits.audit._sis_incremental import IncrementalScorer
from keepbits.audit.sis import select
from keepbits.benchmarking import default_data_dir, write_result
from keepbits.data import channel_stats, load_dataset

THRESHOLDS = (0.5, 0.7, 0.9, 0.99)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                         nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def reference_steps(net: nn.Module, x: np.ndarray, target: int, steps: int, dtype: type = np.float32) -> tuple[list[int], float]:
    """The reference algorithm: one batched call over all remaining candidates per step (in
    ``dtype``; ``net`` must hold the same dtype), ``argmax`` of the softmax confidence (lowest
    index on exact ties). Returns (order, seconds)."""
    started = time.perf_counter()
    c, h, w = x.shape
    current = x.astype(dtype).copy()
    remaining, order = np.arange(h * w), []
    for _ in range(min(steps, h * w)):
        batch = np.repeat(current[None], len(remaining), axis=0)
        batch[np.arange(len(remaining)), :, remaining // w, remaining % w] = 0.0
        with torch.inference_mode():
            f = torch.softmax(net(torch.from_numpy(batch)), 1)[:, target].numpy()
        k = int(np.argmax(f))
        pixel = int(remaining[k])
        current[:, pixel // w, pixel % w] = 0.0
        order.append(pixel)
        remaining = np.delete(remaining, k)
    return order, time.perf_counter() - started


def incremental_steps(net: nn.Module, x: np.ndarray, target: int, steps: int) -> tuple[list[int], float]:
    """keepbits' incremental BackSelect loop (as in :func:`keepbits.audit.backselect`), first ``steps`` steps."""
    started = time.perf_counter()
    c, h, w = x.shape
    scorer = IncrementalScorer(net, (c, h, w))
    scorer.reset(x, np.zeros(c), target)
    remaining, order, last = np.arange(h * w), [], None
    for _ in range(min(steps, h * w)):
        k = select(scorer.scores(remaining, last))
        last = int(remaining[k])
        scorer.mask(last)
        order.append(last)
        remaining = np.delete(remaining, k)
    return order, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding mnist/ (default ../shared/data)")
    parser.add_argument("--images", type=int, default=2, help="test images run with both methods")
    parser.add_argument("--steps", type=int, default=784, help="BackSelect steps timed per image (784: the whole order)")
    parser.add_argument("--full", action="store_true", help="also run the whole incremental BackSelect and FindSIS per image")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64-reference", action="store_true", help="also run the reference in float64 (identity check)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and the reference (the incremental scorer uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data is None or not (args.data / "mnist").is_dir():
        parser.error(f"MNIST not found under {args.data} (pass --data)")
    train_set, test_set = load_dataset(args.data / "mnist", "train"), load_dataset(args.data / "mnist", "test")
    mean, std = channel_stats(train_set.x)
    net = small_cnn()
    adapter = TorchAdapter(net, (1, 28, 28), mean=mean, std=std)
    xtr = torch.from_numpy(adapter.normalize(train_set.x[: args.train_images]))
    t0 = time.perf_counter()
    train(net, xtr, torch.from_numpy(train_set.y[: args.train_images]), 1, args.seed)
    train_s = time.perf_counter() - t0
    net64 = copy.deepcopy(net).double()
    xte = adapter.normalize(test_set.x[:1000])
    accuracy = float((adapter.probabilities(xte).argmax(1) == test_set.y[:1000]).mean())
    print(f"model trained in {train_s:.0f}s, test accuracy {accuracy:.4f}", file=sys.stderr)

    rows = []
    for i in range(args.images):
        x = xte[i]
        target = int(adapter.probabilities(x[None]).argmax(1)[0])
        ref_order, ref_s = reference_steps(net, x, target, args.steps)
        inc_order, inc_s = incremental_steps(net, x, target, args.steps)
        same = np.asarray(ref_order) == np.asarray(inc_order)
        row = {"image": i, "label": int(test_set.y[i]), "target": target, "steps": len(ref_order),
               "reference_s": round(ref_s, 3), "incremental_s": round(inc_s, 3), "ratio": round(ref_s / inc_s, 2),
               "order_identical": bool(same.all()), "first_difference_step": None if same.all() else int(np.argmin(same)) + 1}
        if args.float64_reference:
            ref64_order, ref64_s = reference_steps(net64, x, target, args.steps, np.float64)
            same64 = np.asarray(ref64_order) == np.asarray(inc_order)
            row.update(reference_float64_s=round(ref64_s, 3), ratio_vs_float64=round(ref64_s / inc_s, 2),
                       order_identical_float64=bool(same64.all()),
                       first_difference_step_float64=None if same64.all() else int(np.argmin(same64)) + 1)
        if args.full:
            full = backselect(adapter, x, method="incremental")
            row["incremental_full_image_s"] = round(full.seconds, 2)
            row["sis_size"] = {str(t): (None if (s := find_sis(full, t)) is None else len(s)) for t in THRESHOLDS}
        rows.append(row)
        print(row, file=sys.stderr)
    payload = {
        "model": f"small MNIST CNN (conv32-conv64-maxpool-fc128-fc10), 1 epoch on the first {args.train_images} MNIST train images",
        "model_test_accuracy_first_1000": accuracy,
        "pixels": 784,
        "measured": f"the first {args.steps} BackSelect steps of each image (784 down to {784 - args.steps + 1} candidates per step), "
                    "both methods, same process, same model and inputs",
        "torch_threads_reference": torch.get_num_threads(),
        "torch_threads_incremental": 1,
        "images": rows,
        "reference_s_total": round(sum(r["reference_s"] for r in rows), 3),
        "incremental_s_total": round(sum(r["incremental_s"] for r in rows), 3),
        "speedup": round(sum(r["reference_s"] for r in rows) / sum(r["incremental_s"] for r in rows), 2),
        "orders_identical_float32": all(r["order_identical"] for r in rows),
        **({"speedup_vs_float64_reference": round(sum(r["reference_float64_s"] for r in rows) / sum(r["incremental_s"] for r in rows), 2),
            "orders_identical_float64": all(r["order_identical_float64"] for r in rows)} if args.float64_reference else {}),
        "load_average_at_end": [float(v) for v in open("/proc/loadavg").read().split()[:3]],
    }
    print(write_result("sis_speed", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
