"""torch.distributed for keepbits: one helper for every trainer and audit started under ``torchrun``.

``init_distributed()`` joins the process group that ``torchrun`` describes in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL with CUDA, gloo on
CPU. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) it returns the single-process
:class:`Dist` and every collective below is a no-op returning the local value, so callers
never branch on the world size themselves. torch is imported only when a group is used
(``import keepbits.audit`` stays torch-free).

Example:
    >>> from keepbits.training.distributed import all_gather, barrier, init_distributed
    >>> dist = init_distributed(use_cuda=False)
    >>> dist.rank, dist.world, dist.main
    (0, 1, True)
    >>> barrier(dist); all_gather(dist, "digest")
    ['digest']
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world`` processes, its ``device``
    (``"cpu"`` or ``"cuda:<local rank>"``), whether it created the group (``owns_group``:
    then :func:`shutdown` tears it down) and, under ``torchrun``, the agent process that started
    it (``agent_pid``, see :func:`agent_alive`)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False
    agent_pid: int | None = None

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``"cpu"`` or ``"cuda"`` for a trainer's or audit's ``--device``: ``auto`` takes CUDA when
    torch sees a GPU (the CPU without torch, as in the device install); ``cuda`` without one is an
    :class:`keepbits.errors.InputError`.

    Example:
        >>> from keepbits.training.distributed import resolve_device
        >>> resolve_device("cpu")
        'cpu'
    """
    from keepbits.errors import InputError

    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:  # the device install (ONNX audits): nothing here can run on a GPU
        if device == "cuda":
            raise InputError("device 'cuda' asked for, but torch is not installed to find and use a CUDA device") from None
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InputError("device 'cuda' asked for, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return "cpu"


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str) -> str:
    """``"fp32"`` or ``"bf16"`` for a trainer's ``--precision`` on ``device``: ``auto`` takes bf16
    autocast on CUDA and float32 on the CPU; ``bf16`` on the CPU is an :class:`keepbits.errors.InputError`.

    Example:
        >>> from keepbits.training.distributed import resolve_precision
        >>> resolve_precision("auto", "cpu"), resolve_precision("auto", "cuda:0")
        ('fp32', 'bf16')
    """
    from keepbits.errors import InputError

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    on_cpu = str(device).split(":")[0] == "cpu"
    if precision == "bf16" and on_cpu:
        raise InputError("precision bf16 needs CUDA (on the CPU the run is float32)")
    return "bf16" if precision == "bf16" or (precision == "auto" and not on_cpu) else "fp32"


def autocast(precision: str) -> Any:
    """The forward passes' context for a resolved ``precision``: bf16 autocast on CUDA, or nothing."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def worker_device(device: str = "auto") -> str:
    """The torch device this process computes on for a ``--device`` value (:func:`resolve_device`):
    ``"cpu"``, or ``"cuda:<LOCAL_RANK>"`` (one GPU per ``torchrun`` process; ``cuda:0`` alone).
    For work whose process group stays on gloo (the audits) while its tensors live on a GPU.

    Example:
        >>> from keepbits.training.distributed import worker_device
        >>> worker_device("cpu")
        'cpu'
    """
    resolved = resolve_device(device)
    return resolved if resolved == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def model_device(module: Any, device: Any = None) -> Any:
    """``torch.device(device)`` if given, else the device of the module's first parameter (CPU without parameters)."""
    import torch

    if device is not None:
        return torch.device(device)
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def on_device(module: Any, device: Any = None) -> Iterator[Any]:
    """Run ``module`` in eval mode on ``device`` (default: where its parameters are) for the
    duration of the block; yields the device, then restores the module's device and mode."""
    home, target = model_device(module), model_device(module, device)
    was_training = module.training
    module.eval().to(target)
    try:
        yield target
    finally:
        module.to(home).train(was_training)


def init_distributed(use_cuda: bool | None = None) -> Dist:
    """Join (or create) the ``torchrun`` process group; the single-process :class:`Dist` when
    ``WORLD_SIZE`` is unset or 1. ``use_cuda``: NCCL on ``cuda:<LOCAL_RANK>`` (default: when
    CUDA is available), else gloo on the CPU. An already initialised group is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if use_cuda is None:
        import torch

        use_cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device="cuda" if use_cuda else "cpu")
    import torch
    import torch.distributed as tdist

    owns_group = not tdist.is_initialized()
    if owns_group:
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(tdist.get_rank(), tdist.get_world_size(), f"cuda:{local}" if use_cuda else "cpu", owns_group, os.getppid())


def agent_alive(dist: Dist) -> bool:
    """False once the ``torchrun`` agent that started this rank has gone (the rank was handed to
    another parent). torchrun starts every worker in a session of its own, so a SIGKILLed agent
    leaves its workers running; work that only meets the other ranks at the end (the SIS orders)
    checks this between pieces and stops instead of computing on as an orphan."""
    return dist.agent_pid is None or os.getppid() == dist.agent_pid


def barrier(dist: Dist) -> None:
    """Wait until every rank gets here."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def all_gather(dist: Dist, value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if dist.world <= 1:
        return [value]
    import torch.distributed as tdist

    values: list[Any] = [None] * dist.world
    tdist.all_gather_object(values, value)
    return values


def all_reduce_sum(dist: Dist, tensor: Any) -> Any:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(tensor)
    return tensor


def average_gradients(dist: Dist, params: Any) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks (what DistributedDataParallel
    does, for updates computed outside a module's ``forward``)."""
    if dist.world > 1:
        for p in params:
            if p.grad is not None:
                all_reduce_sum(dist, p.grad).div_(dist.world)


def data_parallel(dist: Dist, module: Any, find_unused_parameters: bool = False) -> Any:
    """``module`` as DistributedDataParallel on ``dist``'s device when there are several ranks,
    else itself: the one place every trainer wraps its networks. DDP's note that channels-last
    gradients do not match its bucket views (a copy per step, not an error) is not shown: it
    printed under ``-q`` on every torchrun run."""
    if dist.world <= 1:
        return module
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[torch.device(dist.device).index] if dist.device != "cpu" else None,
        find_unused_parameters=find_unused_parameters)


def rank_mean(dist: Dist, tensor: Any) -> Any:
    """``tensor``'s mean over the ranks as a new tensor autograd goes through (its backward sums
    the ranks' gradients): for a gradient that sits inside a loss, such as an unrolled optimizer
    step's, so every rank takes the step the whole batch would."""
    if dist.world <= 1:
        return tensor
    return _rank_sum().apply(tensor) / dist.world


@functools.lru_cache(maxsize=None)
def _rank_sum() -> Any:
    """An autograd function summing a tensor over the ranks, whose backward sums the gradient
    over the ranks the same way (itself differentiable): what torch's deprecated
    ``torch.distributed.nn.functional.all_reduce`` did for SUM, without its FutureWarning on
    every step."""
    import torch
    import torch.distributed as tdist

    class RankSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, tensor: Any) -> Any:  # noqa: ARG004 - autograd's signature
            out = tensor.clone()
            tdist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # noqa: ARG004
            return RankSum.apply(grad)

    return RankSum


def broadcast_buffers(dist: Dist, module: Any, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. batch-norm statistics, which drift per rank) into every rank's ``module``."""
    if dist.world > 1:
        import torch.distributed as tdist

        for buffer in module.buffers():
            tdist.broadcast(buffer, src)


def shutdown(dist: Dist) -> None:
    """Barrier, then destroy the group if this run created it. Explicit teardown on every rank:
    left to interpreter exit, a rank's gloo threads could outlive rank 0's store and abort."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        if dist.owns_group:
            tdist.destroy_process_group()


__all__ = ["DEVICES", "PRECISIONS", "Dist", "all_gather", "all_reduce_sum", "average_gradients", "barrier", "broadcast_buffers",
           "data_parallel", "init_distributed", "model_device", "on_device", "rank_mean", "resolve_device",
           "resolve_precision", "shutdown", "worker_device", "autocast"]
