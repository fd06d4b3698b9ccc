"""Exact SIS speed (issue 21): keepbits BackSelect (``method="auto"``) against the naive public
algorithm, same process, same thread count, same images, whole orders.

Naive algorithm (a faithful re-implementation of the public SIS code): at every BackSelect
step all remaining single-pixel maskings go through the model in float32 in chunks of 128,
softmax, and ``argmax`` picks the pixel (lowest index among equal confidences). Identity
reference: the same algorithm in float64, ranking target margins with keepbits' tie rule
(``sis.select``); keepbits' orders and SIS at τ ∈ THRESHOLDS must equal it.

Models (28×28 MNIST or 32×32 CIFAR-10 inputs, masked value 0 = the training mean):

* ``cnn-reference``: conv 1→8 3×3, relu, max-pool 2; conv 8→16 3×3, relu, max-pool 2;
  ``x.flatten(1)``; linear 784→10, written with ``F.relu`` / ``F.max_pool2d`` in ``forward``;
* ``cnn-modules``: the same weights as ``nn.Sequential`` of ``nn.ReLU`` / ``nn.MaxPool2d`` / ``nn.Flatten``;
* ``lenet5``: keepbits' LeNet5 (Caffe variant);
* ``resnet20``: a CIFAR-10 ResNet-20 checkpoint (``--resnet20``, from ``keepbits train classifier``);
* ``onnx-bundle``: ``cnn-reference`` exported as a bundle graph (uint8 NHWC in, normalisation
  inside) run by ONNX Runtime; the naive algorithm runs the same session.

The MNIST models are trained here for one epoch on a seeded class-balanced sample of
``--train-images`` training images.
Images: a seeded class-balanced draw from the test split. keepbits runs a model's images in
lockstep (``backselect_batch``) and, separately, the first image alone; its one-off setup per
model (tracing, planning, timing the screens) is timed on its own and reported with and
without it. Times are wall and CPU seconds per image (CPU time is the robust one on a shared
machine); the ratios are naive / keepbits.

A whole naive ResNet-20 order costs minutes of CPU time per image and a float64 one several times
that: ``--resnet-naive-steps N`` runs both for the first N steps only (prefix identity) and
extrapolates the naive whole-order time by candidate count (reported as such in the JSON).

    python bench/sis_speed.py --threads 1 --resnet20 runs/r20_cifar10_e20/best.pt
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _results import add_data_argument, require_data, write_result
from keepbits.audit import TorchAdapter, backselect, backselect_batch, find_sis, load_model
from keepbits.audit.sis import BackSelectResult, select
from keepbits.audit import sis as sis_module
from keepbits.audit.sis import _evaluators as sis_evaluators
from keepbits.core import sigmoid, target_margin
from keepbits.data import channel_stats, load_dataset, sample_indices

THRESHOLDS = (0.5, 0.7, 0.9, 0.99)
MODELS = ("cnn-reference", "cnn-modules", "lenet5", "resnet20", "onnx-bundle")
CHUNK = 128


class ReferenceCNN(nn.Module):
    """The issue's small MNIST CNN, spelled as reference code spells it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc(x)


def module_cnn(ref: ReferenceCNN) -> nn.Module:
    """The same weights as a chain of modules."""
    return nn.Sequential(copy.deepcopy(ref.conv1), nn.ReLU(), nn.MaxPool2d(2), copy.deepcopy(ref.conv2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), copy.deepcopy(ref.fc)).eval()


class Pixels(nn.Module):
    """What a bundle graph does: uint8 N×H×W×C in, normalisation inside, the classifier."""

    def __init__(self, net: nn.Module, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0 - self.mean) / self.std)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """One epoch of Adam (lr 1e-3, batch 64)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.int64))
    net.train()
    perm = torch.randperm(len(xt))
    for i in range(0, len(xt), 64):
        idx = perm[i : i + 64]
        loss = F.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def naive_backselect(score: Callable[[np.ndarray], np.ndarray], image: np.ndarray, mask_pixel: np.ndarray, channels_last: bool,
                     exact: bool, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The naive algorithm on one image in the model's own input layout: per step, all remaining
    candidates through ``score`` in chunks of 128; ``argmax`` of float32 confidences
    (``exact=False``) or keepbits' tie rule on float64 margins (``exact=True``); the first
    ``steps`` steps only when given. Returns the order and the score after every step (``f``)."""
    h, w = image.shape[:2] if channels_last else image.shape[1:]
    current = image.copy()
    remaining, order = np.arange(h * w), []
    scores = [float(score(current[None])[0])]
    for _ in range(h * w if steps is None else min(steps, h * w)):
        parts = []
        for i in range(0, len(remaining), CHUNK):
            part = remaining[i : i + CHUNK]
            batch = np.repeat(current[None], len(part), axis=0)
            if channels_last:
                batch[np.arange(len(part)), part // w, part % w, :] = mask_pixel
            else:
                batch[np.arange(len(part)), :, part // w, part % w] = mask_pixel
            parts.append(score(batch))
        f = np.concatenate(parts)
        k = select(f) if exact else int(np.argmax(f))
        pixel = int(remaining[k])
        if channels_last:
            current[pixel // w, pixel % w, :] = mask_pixel
        else:
            current[:, pixel // w, pixel % w] = mask_pixel
        order.append(pixel)
        scores.append(float(f[k]))
        remaining = np.delete(remaining, k)
    s = np.asarray(scores)
    return np.asarray(order, np.int64), (sigmoid(s) if exact else s)


def compare(reference: BackSelectResult, ours: BackSelectResult) -> dict:
    """Order identity (first differing step), SIS identity at every τ, largest score difference.
    A shorter ``reference`` (the first steps only) is compared with the same prefix of ``ours``."""
    n = len(reference.order)
    if n < len(ours.order):
        same = reference.order == ours.order[:n]
        return {"steps_compared": n, "order_prefix_identical": bool(same.all()),
                "first_difference_step": None if same.all() else int(np.argmin(same)) + 1,
                "max_score_difference": float(np.abs(reference.scores - ours.scores[: n + 1]).max())}
    same = reference.order == ours.order
    sis = {}
    for t in THRESHOLDS:
        a, b = find_sis(reference, t), find_sis(ours, t)
        sis[str(t)] = (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
    return {"order_identical": bool(same.all()), "first_difference_step": None if same.all() else int(np.argmin(same)) + 1,
            "sis_identical": sis, "max_score_difference": float(np.abs(reference.scores - ours.scores).max())}


def whole_order(pixels: int, steps: int) -> float:
    """Candidates of a whole BackSelect order over those of its first ``steps`` steps. The naive
    algorithm's time per candidate is lowest in the first steps (full chunks of 128), so scaling
    the measured time by this factor underestimates its whole-order time (a ratio against it is
    conservative)."""
    return (pixels * (pixels + 1) / 2) / sum(pixels - k for k in range(steps))


def conv_work(model) -> dict | None:
    """Multiply-adds of the convolutions per candidate: every convolution over its whole output
    (what a full forward pass does) against over the box the incremental plan computes (whole
    maps from the node where the plan goes dense); their ratio bounds what evaluating boxes can
    save on the convolutions (the per-candidate cache of models whose changes stay linear saves more)."""
    try:
        screen = sis_evaluators(model, "incremental", None, None)[0]
    except Exception:  # noqa: BLE001 - models the incremental screen cannot plan
        return None
    dense = planned = 0
    for n, p in screen.plan.items():
        module = screen.modules.get(n.target) if n.op == "call_module" else None
        if p.op == "local" and p.local.kind == "conv":
            weight = p.local.weight
        elif p.kind == "dense" and isinstance(module, nn.Conv2d):
            weight = module.weight
        elif p.kind == "dense" and n.op == "call_function" and n.target in (F.conv2d, torch.conv2d):
            weight = screen._example[n.args[1]]
        else:
            continue
        c, h, w = screen._example[n].shape[1:]
        per_output = int(weight[0].numel())
        dense += c * h * w * per_output
        planned += c * (p.bh * p.bw if p.kind == "box" else h * w) * per_output
    return {"full_forward": dense, "incremental_plan": planned, "ratio": round(dense / max(planned, 1), 2)}


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def torch_scores(net: nn.Module, target: int, exact: bool, dtype: torch.dtype) -> Callable[[np.ndarray], np.ndarray]:
    def score(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            z = net(torch.from_numpy(batch) if batch.dtype == np.uint8 else torch.as_tensor(batch, dtype=dtype))
        return target_margin(z.double().numpy(), target) if exact else torch.softmax(z, 1)[:, target].numpy()
    return score


def run_model(name: str, model, net64: nn.Module, naive_score: Callable[[int], Callable], images: np.ndarray, labels: np.ndarray,
              feed: Callable[[np.ndarray], np.ndarray], mask_pixel: np.ndarray, channels_last: bool, log: Callable,
              reference_images: int | None = None, single: bool = True, progress: Callable[[dict], None] = lambda row: None,
              naive_steps: int | None = None, torch_plain_too: bool = False) -> dict:
    """keepbits (batched, then one image alone), the naive algorithm and (on the first
    ``reference_images``, default all) the float64 reference on ``images``; ``progress``
    receives the summary after every image (saved, so a long run can be cut). With
    ``naive_steps`` the naive algorithm and the float64 reference run only that many steps
    per image; the naive time of a whole order is then extrapolated (see :func:`whole_order`).
    ``torch_plain_too``: where ``auto`` took the plain screen as an ONNX Runtime export, keepbits
    is timed once more with the plain screen kept in torch (same images, same process)."""
    x = model.prepare(images)
    targets = model.probabilities(x).argmax(1)
    (screen, _, method), setup_wall, setup_cpu = timed(lambda: sis_evaluators(model, "auto", None, None))  # plan, trace, timing
    ours, wall, cpu = timed(lambda: backselect_batch(model, images, targets, method="auto"))
    torch_plain = None
    if torch_plain_too and type(screen).__name__ == "OnnxScreen" and model.torch_module is not None:
        saved = sis_module.ORT_TRIAL_SECONDS
        sis_module.ORT_TRIAL_SECONDS = float("inf")
        sis_module._EVALUATORS.pop(model.torch_module, None)
        try:
            (_, _, _), tp_setup_wall, tp_setup_cpu = timed(lambda: sis_evaluators(model, "auto", None, None))
            theirs, tp_wall, tp_cpu = timed(lambda: backselect_batch(model, images, targets, method="auto"))
        finally:
            sis_module.ORT_TRIAL_SECONDS = saved
            sis_module._EVALUATORS.pop(model.torch_module, None)
        torch_plain = {"keepbits_torch_plain_batched_s_per_image": {"wall": round(tp_wall / len(images), 3), "cpu": round(tp_cpu / len(images), 3)},
                       "keepbits_torch_plain_setup_s": {"wall": round(tp_setup_wall, 3), "cpu": round(tp_setup_cpu, 3)},
                       "torch_plain_over_onnxruntime_plain_cpu": round(tp_cpu / cpu, 3),
                       "torch_plain_orders_identical": all(np.array_equal(a.order, b.order) for a, b in zip(ours, theirs))}
        log(f"{name}: plain screen in torch {tp_cpu / len(images):.2f} s CPU/image vs ONNX Runtime {cpu / len(images):.2f}")
    if single:  # the first image alone (the evaluators are cached by then: no planning or timing in it)
        one, single_wall, single_cpu = timed(lambda: backselect(model, images[0], int(targets[0]), method="auto"))
    log(f"{name}: keepbits {ours[0].method} {wall / len(images):.2f} s/image wall, {cpu / len(images):.2f} s CPU (batched)")
    work = conv_work(model)
    rows = []
    h, w = x.shape[2:]
    n = len(images)

    def summary() -> dict:
        done = [r for r in rows if "naive_cpu_s" in r]
        naive_wall, naive_cpu = (sum(r["naive_wall_s"] for r in done) / len(done), sum(r["naive_cpu_s"] for r in done) / len(done)) if done else (0.0, 0.0)
        exact = [r["vs_float64_reference"] for r in rows if "vs_float64_reference" in r]
        whole = [e for e in exact if "order_identical" in e]
        out = {"model": name, "method": ours[0].method, "plain_screen": type(screen).__name__ if method == "plain" else None, "images": n, "naive_images_done": len(done), "pixels": int(h * w),
               "naive_s_per_image": {"wall": round(naive_wall, 3), "cpu": round(naive_cpu, 3)},
               "keepbits_setup_s": {"wall": round(setup_wall, 3), "cpu": round(setup_cpu, 3),
                                    "what": "tracing, planning, self-check and timing of the screens, once per model (cached)"},
               "keepbits_batched_s_per_image": {"wall": round(wall / n, 3), "cpu": round(cpu / n, 3)},
               "ratio_batched": {"wall": round(naive_wall / (wall / n), 2), "cpu": round(naive_cpu / (cpu / n), 2)},
               "ratio_batched_with_setup": {"wall": round(naive_wall / ((wall + setup_wall) / n), 2),
                                            "cpu": round(naive_cpu / ((cpu + setup_cpu) / n), 2)},
               "images_checked_against_float64_reference": len(whole),
               "orders_identical_to_float64_reference": all(e["order_identical"] for e in whole) if whole else None,
               "sis_identical_to_float64_reference": all(all(e["sis_identical"].values()) for e in whole) if whole else None,
               "max_score_difference_to_float64_reference": max((e["max_score_difference"] for e in exact), default=None),
               "images_prefix_checked_against_float64_reference": len(exact) - len(whole),
               "order_prefixes_identical_to_float64_reference": (all(e["order_prefix_identical"] for e in exact if e not in whole)
                                                                 if len(exact) > len(whole) else None),
               "conv_multiply_adds_per_candidate": work, **(torch_plain or {}), "per_image": rows}
        if single and done:
            out["keepbits_single_image_s"] = {"wall": round(single_wall, 3), "cpu": round(single_cpu, 3)}
            out["ratio_single_image"] = {"wall": round(rows[0]["naive_wall_s"] / single_wall, 2), "cpu": round(rows[0]["naive_cpu_s"] / single_cpu, 2)}
        return out

    for i in range(n):
        t = int(targets[i])
        (order32, scores32), n_wall, n_cpu = timed(lambda: naive_backselect(naive_score(t), feed(images[i]), mask_pixel, channels_last, False,
                                                                            naive_steps))
        measured = {}
        if naive_steps is not None:
            scale = whole_order(int(h * w), naive_steps)
            measured = {"naive_steps_measured": naive_steps, "naive_measured_wall_s": round(n_wall, 3), "naive_measured_cpu_s": round(n_cpu, 3),
                        "naive_whole_order": f"extrapolated: measured seconds of the first {naive_steps} steps × {scale:.2f} "
                                             "(candidates of the whole order / candidates of the measured steps)"}
            n_wall, n_cpu = n_wall * scale, n_cpu * scale
        row = {"image": i, "label": int(labels[i]), "target": t, "confidence": float(ours[i].scores[0]), "steps": len(ours[i].order),
               "naive_wall_s": round(n_wall, 3), "naive_cpu_s": round(n_cpu, 3), **measured,
               "vs_naive_float32": compare(BackSelectResult(order32, scores32, t, (h, w)), ours[i]),
               "sis_size": {str(tau): (None if (s := find_sis(ours[i], tau)) is None else len(s)) for tau in THRESHOLDS}}
        if i == 0 and single:
            row["single_image_identical_to_batched"] = bool(np.array_equal(one.order, ours[0].order))
        rows.append(row)
        log(f"{name} image {i}: naive {n_cpu:.1f} s CPU")
        progress(summary())
    for i in range(n if reference_images is None else min(reference_images, n)):
        t, image = int(targets[i]), feed(images[i])
        image = image if image.dtype == np.uint8 else image.astype(np.float64)
        (order64, scores64), r_wall, r_cpu = timed(lambda: naive_backselect(torch_scores(net64, t, True, torch.float64), image, mask_pixel,
                                                                             channels_last, True, naive_steps))
        rows[i]["float64_reference_cpu_s"] = round(r_cpu, 3)
        rows[i]["vs_float64_reference"] = compare(BackSelectResult(order64, scores64, t, (h, w)), ours[i])
        log(f"{name} image {i}: float64 reference {r_cpu:.1f} s CPU; {rows[i]['vs_float64_reference']}")
        progress(summary())
    return summary()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "mnist/ and cifar10/")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--images", type=int, default=8, help="test images per MNIST model (run in lockstep by keepbits)")
    parser.add_argument("--reference-images", type=int, default=None, help="MNIST images also run by the float64 reference (default all)")
    parser.add_argument("--resnet-images", type=int, default=3, help="test images for resnet20")
    parser.add_argument("--resnet-reference-images", type=int, default=1,
                        help="resnet20 images also run by the float64 reference (float64 convolutions are slow: ~80 CPU-minutes each)")
    parser.add_argument("--resnet-naive-steps", type=int, default=None,
                        help="run the naive algorithm and the float64 reference only for the first N steps of each resnet20 image "
                             "and extrapolate the naive whole-order time (default: whole orders)")
    parser.add_argument("--torch-plain-too", action="store_true",
                        help="where the plain screen runs as an ONNX Runtime export, time keepbits again with it in torch (same run)")
    parser.add_argument("--resnet20", type=Path, default=Path("runs/r20_cifar10_e20/best.pt"), help="CIFAR-10 ResNet-20 checkpoint")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--name", default="sis_speed", help="results name (bench/results/<name>.json)")
    parser.add_argument("--work-only", action="store_true",
                        help="only count the convolutions' multiply-adds per candidate of each architecture (full forward pass vs the "
                             "incremental plan; weights do not change the counts) and write them; no timing, no data needed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.work_only:
        from keepbits.training.models.classifiers import lenet5, resnet20

        nets = {"cnn-reference": (ReferenceCNN(), (1, 28, 28)), "cnn-modules": (module_cnn(ReferenceCNN()), (1, 28, 28)),
                "lenet5": (lenet5(), (1, 28, 28)), "resnet20": (resnet20(), (3, 32, 32))}
        work = {name: conv_work(TorchAdapter(net.eval(), shape)) for name, (net, shape) in nets.items() if name in args.models}
        print(write_result(args.name, {"measured": conv_work.__doc__.split("\n\n")[0].replace("\n   ", ""), "models": work}))
        return 0
    require_data(parser, args.data, "mnist")
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.0f} s] {msg}", file=sys.stderr, flush=True)

    payload = {"measured": "whole BackSelect orders per image; naive algorithm (float32, chunks of 128, argmax) vs keepbits "
                           "backselect_batch(method='auto') on the same images in the same process; identity vs a float64 run "
                           "of the naive algorithm with keepbits' tie rule",
               "torch_threads": torch.get_num_threads(), "onnxruntime_threads": args.threads, "seed": args.seed, "models": {}}
    results_name = args.name

    def save() -> None:
        payload["load_average_at_end"] = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
        payload["wall_s"] = round(time.time() - started, 1)
        print(write_result(results_name, payload), file=sys.stderr)

    def progress(row: dict) -> None:
        payload["models"][row["model"]] = row
        save()

    mnist_tr, mnist_te = load_dataset(args.data / "mnist", "train"), load_dataset(args.data / "mnist", "test")
    mean, std = channel_stats(mnist_tr.x)
    pick = sample_indices(mnist_te.y, args.images, args.seed)
    images, labels = mnist_te.x[pick], mnist_te.y[pick]
    norm = TorchAdapter(nn.Identity(), (1, 28, 28), mean=mean, std=std)
    train_sample, acc_sample = mnist_tr.sample(args.train_images, args.seed), mnist_te.sample(2000, args.seed)  # seeded, class-balanced
    xtr, ytr = norm.normalize(train_sample.x), train_sample.y
    xte_acc = norm.normalize(acc_sample.x)
    ref = ReferenceCNN()
    if {"cnn-reference", "cnn-modules", "onnx-bundle"} & set(args.models):
        train(ref, xtr, ytr, args.seed)
    for name in args.models:
        if name == "resnet20":
            if not args.resnet20.exists():
                parser.error(f"{args.resnet20}: no ResNet-20 checkpoint (train one with keepbits train classifier)")
            model = load_model(args.resnet20)
            cifar = load_dataset(args.data / "cifar10", "test")
            p = sample_indices(cifar.y, args.resnet_images, args.seed)
            net = model.torch_module
            cifar_acc = cifar.sample(2000, args.seed)
            accuracy = float((model.logits(model.normalize(cifar_acc.x)).argmax(1) == cifar_acc.y).mean())
            row = run_model(name, model, copy.deepcopy(net).double().eval(), lambda t: torch_scores(net, t, False, torch.float32),
                            cifar.x[p], cifar.y[p], lambda im: model.normalize(im)[0], np.zeros(3, np.float32), False, log,
                            args.resnet_reference_images, single=False, progress=progress, naive_steps=args.resnet_naive_steps,
                            torch_plain_too=args.torch_plain_too)
            row["checkpoint"] = str(args.resnet20)
            row["test_accuracy_2000_sampled"] = accuracy
        elif name == "onnx-bundle":
            from keepbits.bundle import Manifest, write_bundle

            folder = Path(tempfile.mkdtemp())
            graph = Pixels(ref, mean, std).eval()
            torch.onnx.export(graph, (torch.zeros(1, 28, 28, 1, dtype=torch.uint8),), str(folder / "model.onnx"), input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "n"}}, dynamo=False)
            manifest = Manifest(input_shape=[1, 28, 28], input_dtype="uint8", input_layout="NHWC", mean=list(map(float, mean)),
                                std=list(map(float, std)), class_names=[str(i) for i in range(10)], block_size=1, mask_threshold=0.5,
                                generator="none", classifier="cnn-reference")
            model = load_model(write_bundle(folder / "bundle", manifest, {"model.onnx": folder / "model.onnx"}), threads=args.threads)
            session = model.session

            def onnx_scores(t: int) -> Callable[[np.ndarray], np.ndarray]:
                def score(batch: np.ndarray) -> np.ndarray:
                    z = session.run(["logits"], {"image": batch})[0]
                    e = np.exp(z - z.max(1, keepdims=True))
                    return (e / e.sum(1, keepdims=True))[:, t]
                return score

            mask_pixel = model.denormalize(np.zeros((1, 1, 1, 1)))[0, 0, 0]
            row = run_model(name, model, copy.deepcopy(graph).double().eval(), onnx_scores, images, labels, lambda im: im.copy(),
                            mask_pixel, True, log, args.reference_images, progress=progress)
            row["float64_reference"] = "the exported torch graph in float64 on the same uint8 candidates"
        else:
            if name == "lenet5":
                from keepbits.training.models.classifiers import lenet5

                net = lenet5()
                train(net, xtr, ytr, args.seed)
            else:
                net = ref if name == "cnn-reference" else module_cnn(ref)
            net.eval()
            model = TorchAdapter(net, (1, 28, 28), mean=mean, std=std)
            accuracy = float((model.logits(xte_acc).argmax(1) == acc_sample.y).mean())
            row = run_model(name, model, copy.deepcopy(net).double().eval(), lambda t: torch_scores(net, t, False, torch.float32),
                            images, labels, lambda im: model.normalize(im)[0], np.zeros(1, np.float32), False, log,
                            args.reference_images, progress=progress)
            row["trained"] = f"1 epoch (Adam 1e-3, batch 64) on {args.train_images} MNIST training images (seeded class-balanced sample)"
            row["test_accuracy_2000_sampled"] = accuracy
        progress(row)
        log(json.dumps({k: row.get(k) for k in ("method", "ratio_batched", "ratio_single_image", "orders_identical_to_float64_reference",
                                                 "sis_identical_to_float64_reference")}))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
