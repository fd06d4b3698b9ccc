"""BackSelect orders of many images, sharded over ``torchrun`` processes, cached chunk by chunk.

Each chunk of images is written to ``folder/chunk_<start>.json`` as soon as it is done, with a
fingerprint of its images, its settings and the model (:meth:`ModelAdapter.fingerprint`: weights
or graph, normalisation): a killed run resumes where it stopped (chunks whose fingerprint matches
are reused, others recomputed, so another model's orders in the same folder are never reused). Under ``torchrun`` (gloo on the CPU, through
:mod:`keepbits.training.distributed`) the ranks take chunks round-robin and every rank returns
the merged list in image order; a rank whose ``torchrun`` agent was killed stops before its next
chunk (:func:`keepbits.training.distributed.agent_alive`). Used by the SIS and overinterpretation audits.

Example:
    >>> import tempfile, numpy as np
    >>> from keepbits.audit import FunctionAdapter
    >>> from keepbits.audit.sis_orders import compute_orders
    >>> model = FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :2] * 4, input_shape=(1, 1, 2))
    >>> orders = compute_orders(model, np.ones((3, 1, 1, 2), np.float32), tempfile.mkdtemp(), "plain", progress=False)
    >>> len(orders), orders[0].shape
    (3, (1, 2))
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from keepbits.audit._base import ModelAdapter
from keepbits.audit._sis_onnx import gradient_module
from keepbits.audit.sis import METHODS, BackSelectResult, backselect_batch, gradient_backselect
from keepbits.errors import InputError
from keepbits.training.distributed import agent_alive, barrier, init_distributed, worker_device


def compute_orders(model: ModelAdapter, x: np.ndarray, folder: str | Path, method: str = "gradient", k: int = 16,
                   chunk: int | None = None, batch_size: int = 64, progress: bool = True, device: str = "cpu") -> list[BackSelectResult]:
    """BackSelect orders of every image of ``x`` (target: the predicted class; ``method``:
    ``"gradient"`` with ``k`` pixels per step, or exact ``"exact"``/``"incremental"``/``"plain"``), saved per chunk
    of ``chunk`` images (default 32 for gradient, 1 for exact) to ``folder/chunk_<start>.json`` as each finishes. Under ``torchrun``
    ranks take chunks round-robin; existing chunk files are reused (resume after a kill).
    Chunk files carry a fingerprint of their images, settings and model; others are recomputed.
    Every rank returns the merged list in image order. ``device``: ``auto``/``cpu``/``cuda`` for
    torch models and ONNX Runtime (with CUDA each ``torchrun`` rank takes ``cuda:<LOCAL_RANK>``)."""
    if method not in ("gradient", "exact") + METHODS:
        raise InputError(f"method must be one of {('gradient', 'exact') + METHODS}, got {method!r}")
    chunk = chunk or (32 if method == "gradient" else 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dist = init_distributed(use_cuda=False)
    where = worker_device(device)
    on = None if where == "cpu" else where
    starts = list(range(0, len(x), chunk))
    mine = [s for i, s in enumerate(starts) if i % dist.world == dist.rank]
    from tqdm.auto import tqdm

    if method == "gradient":  # a model it cannot take gradients of is refused before any progress is shown
        gradient_module(model)
    model_fingerprint = model.fingerprint()

    def fingerprint(s: int) -> str:
        settings = f"{method}/{k}/{model_fingerprint}".encode()
        return hashlib.sha256(np.ascontiguousarray(x[s : s + chunk]).tobytes() + settings).hexdigest()[:20]

    def done(s: int) -> bool:
        path = folder / f"chunk_{s:07d}.json"
        return path.exists() and json.loads(path.read_text()).get("fingerprint") == fingerprint(s)

    todo = [s for s in mine if not done(s)]
    bar = tqdm(total=sum(len(x[s : s + chunk]) for s in mine),
               initial=sum(len(x[s : s + chunk]) for s in mine if s not in todo),
               desc=f"backselect {folder.name} [rank {dist.rank}]", disable=not progress, leave=False)
    for s in todo:
        if not agent_alive(dist):
            raise RuntimeError(f"rank {dist.rank}: the torchrun agent that started it is gone; stopping (finished chunks "
                               f"are kept in {folder} for the next run to resume from)")
        part = x[s : s + chunk]
        if method == "gradient":
            results = gradient_backselect(model, part, None, k, None, batch_size, device=on)
        else:
            results = backselect_batch(model, part, method="auto" if method == "exact" else method, device=on)  # the chunk in lockstep
        path = folder / f"chunk_{s:07d}.json"
        tmp = path.with_suffix(f".tmp{dist.rank}")
        tmp.write_text(json.dumps({"start": s, "fingerprint": fingerprint(s), "model": model_fingerprint, "method": method, "k": k,
                                   "results": [r.to_dict() for r in results]}))
        os.replace(tmp, path)
        bar.update(len(part))
    bar.close()
    barrier(dist)
    merged: list[BackSelectResult] = []
    for s in starts:
        record = json.loads((folder / f"chunk_{s:07d}.json").read_text())
        merged += [BackSelectResult.from_dict(d) for d in record["results"]]
    if len(merged) != len(x):
        raise InputError(f"{folder}: holds {len(merged)} results for {len(x)} images")
    return merged


__all__ = ["compute_orders"]
