"""Exact SIS speed (issue 6): incremental BackSelect vs the reference algorithm, same model and inputs.

The reference algorithm (as in the public SIS code): at every BackSelect step, one batched
forward pass over all remaining single-pixel maskings, ``argmax`` picks the pixel. It runs
twice on every image:

* float32 softmax confidences, as the public code: the **speed baseline**. Once the model is
  confident, float32 confidences round to exactly 1.0 for many candidates and ``argmax``
  takes the lowest index among them, so its order is partly decided by rounding;
* float64 target margins with keepbits' tie rule (``sis.select``): the same algorithm in
  exact-enough arithmetic (``f = σ(margin)``, no saturation), the **identity reference**.

keepbits' incremental BackSelect evaluates only the boxes a one-pixel change reaches and
reuses unaffected candidates between steps (float64 margins). The JSON records per-image
times, the ratios, and whether the orders and the SIS at several τ equal each reference's.

Model: a small MNIST CNN (conv 32@3×3, conv 64@3×3, max-pool 2, fc 128, fc 10; the Keras
MNIST example architecture), trained here for one epoch on real MNIST.

    nice -n 5 python bench/sis_speed.py --images 3
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
from keepbits.audit.sis import BackSelectResult, select
from keepbits.core import target_margin
from keepbits.core import sigmoid
from _results import default_data_dir, write_result
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


def reference_steps(net: nn.Module, x: np.ndarray, target: int, exact: bool) -> tuple[BackSelectResult, float]:
    """The reference algorithm, one batched call over all remaining candidates per step:
    float32 softmax + ``argmax`` (``exact=False``, as the public code; ``net`` float32) or
    float64 target margins + keepbits' tie rule (``exact=True``; ``net`` float64)."""
    started = time.perf_counter()
    dtype = np.float64 if exact else np.float32
    c, h, w = x.shape
    current = x.astype(dtype).copy()

    def confidences(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = net(torch.from_numpy(batch))
        return target_margin(logits.numpy(), target) if exact else torch.softmax(logits, 1)[:, target].numpy()

    remaining, order, scores = np.arange(h * w), [], [confidences(current[None])[0]]
    for _ in range(h * w):
        batch = np.repeat(current[None], len(remaining), axis=0)
        batch[np.arange(len(remaining)), :, remaining // w, remaining % w] = 0.0
        f = confidences(batch)
        k = select(f) if exact else int(np.argmax(f))
        pixel = int(remaining[k])
        current[:, pixel // w, pixel % w] = 0.0
        order.append(pixel)
        scores.append(f[k])
        remaining = np.delete(remaining, k)
    scores = sigmoid(np.asarray(scores, np.float64)) if exact else np.asarray(scores, np.float64)
    return BackSelectResult(np.asarray(order), scores, target, (h, w)), time.perf_counter() - started


def compare(reference: BackSelectResult, ours: BackSelectResult) -> dict:
    """Order identity (first differing step) and SIS identity at every τ in THRESHOLDS."""
    same = reference.order == ours.order
    sis = {}
    for t in THRESHOLDS:
        a, b = find_sis(reference, t), find_sis(ours, t)
        sis[str(t)] = (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
    return {"order_identical": bool(same.all()), "first_difference_step": None if same.all() else int(np.argmin(same)) + 1,
            "sis_identical": sis}


def incremental(adapter: TorchAdapter, x: np.ndarray, target: int) -> tuple[BackSelectResult, float]:
    """keepbits' incremental BackSelect (:func:`keepbits.audit.backselect`, method "incremental")."""
    started = time.perf_counter()
    result = backselect(adapter, x, target, method="incremental")
    return result, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="folder holding mnist/ (default ../shared/data)")
    parser.add_argument("--images", type=int, default=2, help="test images run with all three methods")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and the references (the incremental scorer uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data is None or not (args.data / "mnist").is_dir():
        parser.error(f"MNIST not found under {args.data} (pass --data)")
    train_set, test_set = load_dataset(args.data / "mnist", "train"), load_dataset(args.data / "mnist", "test")
    mean, std = channel_stats(train_set.x)
    net = small_cnn()
    adapter = TorchAdapter(net, (1, 28, 28), mean=mean, std=std)
    train_sample, test_sample = train_set.sample(args.train_images, args.seed), test_set.sample(1000, args.seed)  # seeded, class-balanced
    xtr = torch.from_numpy(adapter.normalize(train_sample.x))
    t0 = time.perf_counter()
    train(net, xtr, torch.from_numpy(train_sample.y), 1, args.seed)
    train_s = time.perf_counter() - t0
    net64 = copy.deepcopy(net).double()
    xte = adapter.normalize(test_sample.x)
    accuracy = float((adapter.probabilities(xte).argmax(1) == test_sample.y).mean())
    print(f"model trained in {train_s:.0f}s, test accuracy {accuracy:.4f}", file=sys.stderr)

    rows = []
    for i in range(args.images):
        x = xte[i]
        target = int(adapter.probabilities(x[None]).argmax(1)[0])
        ours, inc_s = incremental(adapter, x, target)
        ref32, ref32_s = reference_steps(net, x, target, exact=False)
        ref64, ref64_s = reference_steps(net64, x, target, exact=True)
        row = {"image": i, "label": int(test_sample.y[i]), "target": target, "steps": len(ours.order),
               "incremental_s": round(inc_s, 3), "reference_float32_s": round(ref32_s, 3), "ratio": round(ref32_s / inc_s, 2),
               "reference_float64_margin_s": round(ref64_s, 3), "ratio_vs_float64_margin": round(ref64_s / inc_s, 2),
               "vs_float64_margin_reference": compare(ref64, ours), "vs_float32_reference": compare(ref32, ours),
               "sis_size": {str(t): (None if (s := find_sis(ours, t)) is None else len(s)) for t in THRESHOLDS}}
        rows.append(row)
        print(row, file=sys.stderr)
    exact = [r["vs_float64_margin_reference"] for r in rows]
    payload = {
        "model": f"small MNIST CNN (conv32-conv64-maxpool-fc128-fc10), 1 epoch on the first {args.train_images} MNIST train images",
        "model_test_accuracy_first_1000": accuracy,
        "pixels": 784,
        "measured": "whole BackSelect orders (784 steps) of each image, three methods, same process, same model and inputs",
        "torch_threads": torch.get_num_threads(),
        "images": rows,
        "incremental_s_total": round(sum(r["incremental_s"] for r in rows), 3),
        "reference_float32_s_total": round(sum(r["reference_float32_s"] for r in rows), 3),
        "speedup_vs_float32_reference": round(sum(r["reference_float32_s"] for r in rows) / sum(r["incremental_s"] for r in rows), 2),
        "speedup_vs_float64_margin_reference": round(sum(r["reference_float64_margin_s"] for r in rows)
                                                     / sum(r["incremental_s"] for r in rows), 2),
        "orders_identical_to_float64_margin_reference": all(e["order_identical"] for e in exact),
        "sis_identical_to_float64_margin_reference": all(all(e["sis_identical"].values()) for e in exact),
        "orders_identical_to_float32_reference": all(r["vs_float32_reference"]["order_identical"] for r in rows),
        "load_average_at_end": [float(v) for v in open("/proc/loadavg").read().split()[:3]],
    }
    print(write_result("sis_speed", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
