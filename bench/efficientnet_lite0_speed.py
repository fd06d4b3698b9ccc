"""How fast EfficientNet-Lite0 runs on this CPU at 224×224, and how fast a NICE training step
with it is: the numbers that size NICE training on natural images and video frames.

    OMP_WAIT_POLICY=PASSIVE python bench/efficientnet_lite0_speed.py --threads 1 2

Measured, for each thread count (torch intra-op threads, ONNX Runtime intra-op threads with
spinning off):

* classifier forward images/s, torch eager (``torch.no_grad``) and ONNX Runtime float32 (the
  port exported with the dynamo exporter, dynamic batch), batch 1 and ``--batch-size``;
* a NICE training step images/s, batch ``--batch-size``: generator ``nice_fast`` (registry)
  → hard-concrete sample (Eq. 7) → mixed-resolution image (Eq. 12, b = ``--block``) →
  EfficientNet-Lite0 frozen (eval mode, no parameter gradients; the backward pass runs
  through it to the mask) → Eq. 10 loss → backward → Adam step on the generator.

Untrained weights (the compute is the same as pretrained). Each measurement is the median of
``--repeats`` timed runs after one warm-up; thread counts alternate in rounds, so load
changes hit both. Process CPU time per image is recorded next to wall time (steadier on a
shared machine), and the load average before and after. Writes
``bench/results/efficientnet_lite0_speed.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from keepbits import registry  # noqa: E402
from keepbits.training.functional import hard_concrete_sample, mixed_resolution  # noqa: E402
from keepbits.training.nice import nice_loss  # noqa: E402


def timed(run: Callable[[], None], images: int, repeats: int) -> dict[str, float]:
    """Median images/s (wall) and process CPU ms per image over ``repeats`` runs after a warm-up."""
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    wall = statistics.median(walls)
    return {"images_per_s": round(images / wall, 2), "cpu_ms_per_image": round(statistics.median(cpus) * 1e3 / images, 2),
            "wall_s_runs": [round(w, 4) for w in walls]}


def onnx_session(model: torch.nn.Module, threads: int):
    import onnxruntime as ort

    from keepbits.native import session_options

    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(model, (torch.zeros(2, 3, 224, 224),), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False)
    return ort.InferenceSession(program.model_proto.SerializeToString(), session_options(threads, native=False), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block", type=int, default=8, help="NICE block size b of the mixed-resolution image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the thread counts (median of rounds reported)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    classifier = registry.build("efficientnet_lite0").eval()
    generator = registry.build("nice_fast", in_channels=3)
    sessions = {t: onnx_session(classifier, t) for t in args.threads}
    n = args.batch_size
    x = torch.randn(n, 3, 224, 224)
    one = x[:1]
    y = torch.randint(0, 1000, (n,))
    for p in classifier.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)

    def nice_step() -> None:
        log_alpha = generator(x)
        logits = classifier(mixed_resolution(x, hard_concrete_sample(log_alpha), args.block))
        loss, _ = nice_loss(log_alpha, logits, y, 1.0, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ort_forward(threads: int, batch: torch.Tensor) -> Callable[[], None]:
        feed = {"image": batch.numpy()}
        return lambda: sessions[threads].run(None, feed)

    def no_grad(run: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            with torch.no_grad():
                run()
        return wrapped

    rounds: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            cases = {
                "torch_forward_batch1": (no_grad(lambda: classifier(one)), 1),
                f"torch_forward_batch{n}": (no_grad(lambda: classifier(x)), n),
                "onnxruntime_forward_batch1": (ort_forward(threads, one), 1),
                f"onnxruntime_forward_batch{n}": (ort_forward(threads, x), n),
                f"nice_step_batch{n}": (nice_step, n),
            }
            for case, (run, images) in cases.items():
                rounds.setdefault(f"{threads}_threads/{case}", []).append(timed(run, images, args.repeats))
                print(f"round {r + 1} threads {threads} {case}: {rounds[f'{threads}_threads/{case}'][-1]['images_per_s']} images/s", flush=True)
    results: dict[str, dict[str, object]] = {}
    for key, runs in rounds.items():
        threads, case = key.split("/")
        results.setdefault(threads, {})[case] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
            "rounds_images_per_s": [r["images_per_s"] for r in runs],
        }
    payload = {
        "model": "efficientnet_lite0 (untrained weights, eval mode)", "generator": "nice_fast", "input": [3, 224, 224],
        "batch_size": n, "block": args.block, "repeats": args.repeats, "rounds": args.rounds,
        "results": results, "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "onnxruntime_spinning": False,
    }
    print(write_result("efficientnet_lite0_speed", payload))


if __name__ == "__main__":
    main()
