"""Training a Glow density model by maximum likelihood (bits per dimension with uniform
dequantisation), as used for L_sim in SimpleBits (Schirrmeister et al., S2).

Adam with linear warm-up, gradient-norm clipping, data-dependent actnorm init on the first
batch; the checkpoint (kind ``density``, role ``density``) records the command, the steps
run and the test bpd. Every step draws its images and its dequantisation noise from seeds of
its own (``seed``, step, rank), so a run resumed from ``<out>.last.pt`` (written every
``checkpoint_every`` steps with the optimizer state) continues exactly; under ``torchrun``
each rank takes its slice of one seeded draw of ``world × batch_size`` images and gradients are
averaged (DistributedDataParallel through :mod:`keepbits.training.distributed`), rank 0 writes.

Example:
    >>> import tempfile
    >>> from keepbits.data import sample_mnist_path
    >>> from keepbits.training.density import DensityConfig, train_density
    >>> out = tempfile.mkdtemp() + "/d.pt"
    >>> cfg = DensityConfig(data=str(sample_mnist_path()), out=out, levels=2, depth=1, hidden=8, steps=2, batch_size=8, eval_images=16)
    >>> summary = train_density(cfg)
    >>> summary["steps_run"], summary["test_bpd"] > 0
    (2, True)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keepbits.data import ImageDataset, has_split, load_dataset
from keepbits.errors import InputError
from keepbits.training.checkpoint import (
    Checkpoint, ModelEntry, build_model, load_checkpoint, load_resumable, refuse_earlier_run, refuse_finished, resume_path, run_settings, save_checkpoint,
    state_digest,
)
from keepbits.training.distributed import Dist, all_gather, data_parallel, init_distributed, resolve_device, shutdown

log = logging.getLogger("keepbits")

@dataclass
class DensityConfig:
    """Settings of ``keepbits train density``; ``max_train`` and ``eval_images`` are seeded
    class-balanced samples (``seed``), not the first N; ``device``: ``auto`` | ``cpu`` | ``cuda``."""

    data: str
    out: str
    levels: int = 3
    depth: int = 8
    hidden: int = 128
    gray: str = "replicate"
    image_size: int | None = None
    steps: int = 2000
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    max_train: int | None = None
    eval_images: int = 2000
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    log_every: int = 50
    checkpoint_every: int = 200
    resume: bool = False
    overwrite: bool = False
    command: str = ""


#: settings a ``--resume`` may change (run control); any other change is refused (:func:`check_resumable`)
RESUME_MAY_CHANGE = frozenset({"steps", "max_minutes", "device", "threads", "log_every", "checkpoint_every", "eval_images", "command", "out"})


def default_density_path() -> Path:
    """Path of the shipped CIFAR-10 density checkpoint (``keepbits/assets/density_cifar10.pt``)."""
    from keepbits import assets

    return Path(assets.__file__).resolve().parent / "density_cifar10.pt"


def load_density(path: str | Path | None = None) -> torch.nn.Module:
    """The frozen (eval mode, no grad on parameters) density model of a ``density``
    checkpoint; the shipped CIFAR-10 model when ``path`` is None."""
    path = Path(path) if path is not None else default_density_path()
    record = load_checkpoint(path, kind="density")
    flow = build_model(record, "density")
    flow.eval().requires_grad_(False)
    return flow


def images_to_unit(x_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C → float N×C×H×W in [0, 1] (k/255)."""
    x = torch.as_tensor(x_uint8_nhwc)
    return x.permute(0, 3, 1, 2).float() / 255.0


def _flow_shape(ds: ImageDataset, cfg: DensityConfig) -> tuple[int, tuple[int, int]]:
    c, h, w = ds.shape_chw
    if cfg.gray not in ("replicate", "native"):
        raise InputError(f"--gray must be 'replicate' or 'native', got {cfg.gray!r}")
    channels = 3 if (c == 3 or cfg.gray == "replicate") else 1
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else (h, w)
    return channels, size


@torch.no_grad()
def per_image_bpd(flow: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """bpd of each [0, 1] image of N×C×H×W ``images`` (dequantisation noise from a fixed seed,
    so repeated calls agree); float64 vector of length N."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        flow.eval()
        device = next(flow.parameters(), torch.zeros(0)).device
        parts = [flow.bpd(images[i : i + batch_size].to(device)).double().cpu().numpy() for i in range(0, len(images), batch_size)]
    finally:
        torch.random.set_rng_state(state)
    return np.concatenate(parts) if parts else np.zeros(0)


def evaluate_bpd(flow: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, seed: int = 0) -> float:
    """Mean of :func:`per_image_bpd` (0 for no images)."""
    bits = per_image_bpd(flow, images, batch_size, seed)
    return float(bits.mean()) if len(bits) else 0.0


def train_density(cfg: DensityConfig) -> dict[str, Any]:
    """Train a Glow on ``cfg.data`` (train split) and write ``cfg.out``; returns a summary."""
    from keepbits import registry

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
    refuse_earlier_run([cfg.out, resume_path(cfg.out)], cfg.resume, cfg.overwrite, resume_path(cfg.out))
    device = resolve_device(cfg.device)
    dist = init_distributed(use_cuda=device == "cuda")
    device = dist.device if dist.world > 1 else device
    torch.manual_seed(cfg.seed)
    train = load_dataset(cfg.data, "train")
    test = load_dataset(cfg.data, "test") if has_split(cfg.data, "test") else None
    if cfg.max_train:
        train = train.sample(cfg.max_train, cfg.seed)
    channels, size = _flow_shape(train, cfg)
    kwargs = {"in_channels": channels, "image_size": list(size), "levels": cfg.levels, "depth": cfg.depth, "hidden": cfg.hidden}
    flow = registry.build("glow", kind="density", **kwargs).to(device)
    images = torch.from_numpy(np.ascontiguousarray(train.x))  # uint8 NHWC, converted per batch
    settings = run_settings(cfg)

    def batch(step: int, n: int) -> torch.Tensor:
        """Step ``step``'s images for this rank: its slice of one seeded draw of world × n (with replacement)."""
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        index = torch.randint(0, len(images), (dist.world * n,), generator=gen)[dist.rank * n : (dist.rank + 1) * n]
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank + 1)  # this step's dequantisation noise
        return images_to_unit(images[index]).to(device)

    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    step, elapsed = 0, 0.0
    resume_from = resume_path(cfg.out)
    if cfg.resume and resume_from.exists():
        previous = load_resumable(resume_from, "density", {**settings, "world_size": dist.world}, RESUME_MAY_CHANGE,
                                  ("steps_run",))
        flow.load_state_dict(previous.models["density"].state_dict)
        opt.load_state_dict(previous.optimizer)
        step, elapsed = int(previous.metrics["steps_run"]), float(previous.metrics.get("wall_time_s", 0.0))
        refuse_finished(resume_from, step, cfg.steps, "steps")
        log.info("density: resuming %s from step %d", resume_from, step)
    else:
        if cfg.resume:
            log.warning("%s: nothing to resume from; starting a new run", resume_from)
        flow.initialize(flow.to_flow_range(batch(-1, max(cfg.batch_size, 256))))  # every rank alike; DDP keeps rank 0's
    net = data_parallel(dist, flow)

    def record(metrics: dict[str, Any], with_optimizer: bool) -> Checkpoint:
        return Checkpoint(kind="density", models={"density": ModelEntry.of("glow", kwargs, flow)}, input_shape=[channels, *size],
                          settings={**settings, "world_size": dist.world}, command=cfg.command, metrics=metrics,
                          optimizer=opt.state_dict() if with_optimizer else None)

    start, recent = time.time() - elapsed, []
    flow.train()
    while step < cfg.steps:
        if cfg.max_minutes is not None and _agreed(dist, time.time() - start > 60.0 * cfg.max_minutes):
            log.info("density: time budget of %.1f min reached after %d steps", cfg.max_minutes, step)
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        loss = net(batch(step, cfg.batch_size)).mean()
        if not torch.isfinite(loss):
            raise InputError(f"density training diverged at step {step} (bpd {float(loss)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % cfg.log_every == 0 and dist.main:
            log.info("density step %d/%d  train bpd %.3f  (%.0f s)", step, cfg.steps, float(np.mean(recent)), time.time() - start)
            recent = []
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and dist.main:
            save_checkpoint(resume_from, record({"steps_run": step, "wall_time_s": time.time() - start}, with_optimizer=True))
    digests = all_gather(dist, state_digest(flow)[:16])
    summary: dict[str, Any] = {}
    if dist.main:
        eval_set = test if test is not None else train
        eval_x = images_to_unit(eval_set.sample(cfg.eval_images, cfg.seed).x)  # class-balanced, not the first N
        test_bpd = evaluate_bpd(flow, eval_x)
        wall = time.time() - start
        metrics = {"test_bpd" if test is not None else "train_bpd": test_bpd, "eval_images": len(eval_x), "steps_run": step,
                   "wall_time_s": wall, "rank_parameter_digests": digests}
        save_checkpoint(resume_from, record(metrics, with_optimizer=True))
        save_checkpoint(cfg.out, record(metrics, with_optimizer=False))
        log.info("density: %s bpd %.3f on %d images, %d steps, %.0f s -> %s", "test" if test is not None else "train", test_bpd,
                 len(eval_x), step, wall, cfg.out)
        summary = {"test_bpd": test_bpd, "steps_run": step, "wall_time_s": wall, "checkpoint": str(cfg.out), "world_size": dist.world}
    summary = all_gather(dist, summary)[0]
    shutdown(dist)  # rank 0's files are on disk before any rank returns
    return summary


def _agreed(dist: Dist, stop: bool) -> bool:
    """One decision for every rank (rank 0's clock), so no rank waits in a step the others skipped."""
    return bool(all_gather(dist, stop)[0])
