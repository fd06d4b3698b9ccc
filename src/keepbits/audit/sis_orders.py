"""BackSelect orders of many images, sharded over ``torchrun`` processes, cached chunk by chunk.

Each chunk of images is written to ``folder/chunk_<start>.json`` as soon as it is done, with the
time it was written (``written_at``, Unix seconds) and a fingerprint of its images, its settings and
the model (:meth:`ModelAdapter.fingerprint`: weights or graph, normalisation): a killed run resumes where it stopped (chunks whose fingerprint matches
are reused, others recomputed, so another model's orders in the same folder are never reused). Under ``torchrun`` (gloo on the CPU, through
:mod:`keepbits.training.distributed`) the ranks share the chunks still to do round-robin and every
rank returns the merged list in image order; a rank whose ``torchrun`` agent was killed stops before its next
chunk (:func:`keepbits.training.distributed.agent_alive`). Chunks are computed in a seeded random
order (:func:`visit_order`), not image order: a class-balanced draw comes sorted by class, so the
chunks finished at any moment of a long audit are a random sample of its images, not its first
classes, and :func:`read_orders` can report on them while the audit is still running. Used by the SIS and
overinterpretation audits.

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
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from keepbits.audit._base import ModelAdapter
from keepbits.audit._sis_onnx import gradient_module
from keepbits.audit.sis import METHODS, BackSelectResult, backselect_batch, gradient_backselect
from keepbits.errors import InputError
from keepbits.training.distributed import agent_alive, all_gather, barrier, init_distributed, worker_device

log = logging.getLogger(__name__)


#: Seed of the order in which chunks are computed (:func:`visit_order`); the results do not depend on it.
VISIT_SEED = 0


def visit_order(starts: list[int]) -> list[int]:
    """The order in which chunks are computed: a permutation of ``starts`` seeded by :data:`VISIT_SEED`.

    Example:
        >>> from keepbits.audit.sis_orders import visit_order
        >>> sorted(visit_order([0, 1, 2, 3, 4]))
        [0, 1, 2, 3, 4]
    """
    return [starts[i] for i in np.random.default_rng(VISIT_SEED).permutation(len(starts))]


def _chunk_size(method: str, chunk: int | None) -> int:
    """``chunk``, or the default for ``method`` (32 images for gradient, 1 for exact); refuses an unknown method."""
    if method not in ("gradient", "exact") + METHODS:
        raise InputError(f"method must be one of {('gradient', 'exact') + METHODS}, got {method!r}")
    return chunk or (32 if method == "gradient" else 1)


def _fingerprints(model_fingerprint: str, x: np.ndarray, method: str, k: int, chunk: int) -> Any:
    """``fingerprint(start)``: what a chunk file must carry to be reused (its images, the settings, the model)."""
    settings = f"{method}/{k}/{model_fingerprint}".encode()

    def fingerprint(s: int) -> str:
        return hashlib.sha256(np.ascontiguousarray(x[s : s + chunk]).tobytes() + settings).hexdigest()[:20]

    return fingerprint


def _read_chunk(folder: Path, s: int, fingerprint: Any, size: int) -> list[BackSelectResult] | None:
    """The ``size`` results in the chunk file of start ``s`` when it exists and its fingerprint
    matches, else None; an unreadable file (truncated, edited) is logged and counts as not done,
    so it is computed again rather than ending a long audit."""
    path = folder / f"chunk_{s:07d}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fingerprint(s):
            return None
        results = [BackSelectResult.from_dict(d) for d in record["results"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable (%s: %s); it counts as not done", path, type(exc).__name__, exc)
        return None
    return results if len(results) == size else None


def _foreign_chunks(folder: Path, starts: list[int], fingerprint: Any) -> list[Path]:
    """The readable chunk files in ``folder`` that another audit wrote (another model, normalisation,
    image sample, method or k; at this audit's ``starts`` or beyond them): never overwritten, and
    never mixed with this audit's in one folder."""
    mine = set(starts)
    foreign = []
    for path in sorted(folder.glob("chunk_*.json")):
        try:
            record = json.loads(path.read_text())
            s = int(path.stem.removeprefix("chunk_"))
        except (OSError, ValueError):
            continue  # unreadable: counts as not done (:func:`_read_chunk`)
        if isinstance(record, dict) and record.get("fingerprint") is not None and (s not in mine or record["fingerprint"] != fingerprint(s)):
            foreign.append(path)
    return foreign


def read_orders(model: ModelAdapter, x: np.ndarray, folder: str | Path, method: str = "gradient", k: int = 16,
                chunk: int | None = None) -> list[BackSelectResult | None]:
    """The BackSelect results :func:`compute_orders` has already saved in ``folder`` for these
    arguments, computing none: per image its result, or None where its chunk is not finished
    (missing, or made with another model or settings). Safe beside a running audit (chunk files
    are replaced atomically).

    Example:
        >>> import tempfile, numpy as np
        >>> from keepbits.audit import FunctionAdapter
        >>> from keepbits.audit.sis_orders import compute_orders, read_orders
        >>> model = FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :2] * 4, input_shape=(1, 1, 2))
        >>> folder = tempfile.mkdtemp()
        >>> _ = compute_orders(model, np.ones((2, 1, 1, 2), np.float32), folder, "plain", progress=False)
        >>> [r is None for r in read_orders(model, np.ones((3, 1, 1, 2), np.float32), folder, "plain")]
        [False, False, True]
    """
    chunk = _chunk_size(method, chunk)
    fingerprint = _fingerprints(model.fingerprint(), x, method, k, chunk)
    out: list[BackSelectResult | None] = []
    for s in range(0, len(x), chunk):
        size = len(x[s : s + chunk])
        out += _read_chunk(Path(folder), s, fingerprint, size) or [None] * size
    return out


def compute_orders(model: ModelAdapter, x: np.ndarray, folder: str | Path, method: str = "gradient", k: int = 16,
                   chunk: int | None = None, batch_size: int = 64, progress: bool = True, device: str = "cpu",
                   replace_other_audits: bool = False) -> list[BackSelectResult]:
    """BackSelect orders of every image of ``x`` (target: the predicted class; ``method``:
    ``"gradient"`` with ``k`` pixels per step, or exact ``"exact"``/``"incremental"``/``"plain"``), saved per chunk
    of ``chunk`` images (default 32 for gradient, 1 for exact) to ``folder/chunk_<start>.json`` as each finishes, in
    :func:`visit_order`'s seeded order; existing chunk files are reused (resume after a kill), and under ``torchrun`` the
    chunks still to do are dealt round-robin to the ranks.
    Chunk files carry a fingerprint of their images, settings and model; a folder holding another
    audit's (another model, normalisation, image sample, method or k) is refused
    (:class:`InputError`), never overwritten, unless ``replace_other_audits`` (a caller whose folder is
    its own cache, rebuilt with its models); a chunk file that cannot be read is computed again.
    Every rank returns the merged list in image order. ``device``: ``auto``/``cpu``/``cuda`` for
    torch models and ONNX Runtime (with CUDA each ``torchrun`` rank takes ``cuda:<LOCAL_RANK>``)."""
    chunk = _chunk_size(method, chunk)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dist = init_distributed(use_cuda=False)
    where = worker_device(device)
    on = None if where == "cpu" else where
    starts = list(range(0, len(x), chunk))
    from tqdm.auto import tqdm

    if method == "gradient":  # a model it cannot take gradients of is refused before any progress is shown
        gradient_module(model)
    model_fingerprint = model.fingerprint()
    fingerprint = _fingerprints(model_fingerprint, x, method, k, chunk)
    foreign = [] if replace_other_audits else _foreign_chunks(folder, starts, fingerprint)
    if foreign:
        raise InputError(f"{folder}: holds {len(foreign)} BackSelect run(s) of another audit ({foreign[0].name}: another model, "
                         "normalisation, image sample, --method or --k), which are never overwritten; give another --out, or "
                         "remove that folder to start afresh")
    # the chunks still to do, as rank 0 found them, dealt round-robin: the ranks share the rest evenly
    undone = [s for s in visit_order(starts) if _read_chunk(folder, s, fingerprint, len(x[s : s + chunk])) is None]
    todo = all_gather(dist, undone)[0][dist.rank :: dist.world]
    bar = tqdm(total=sum(len(x[s : s + chunk]) for s in todo), desc=f"backselect {folder.name} [rank {dist.rank}]",
               disable=not progress, leave=False)
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
        # written_at (Unix seconds) dates the chunk where its file time cannot: a git checkout resets that
        tmp.write_text(json.dumps({"start": s, "fingerprint": fingerprint(s), "model": model_fingerprint, "method": method, "k": k,
                                   "written_at": time.time(), "results": [r.to_dict() for r in results]}))
        os.replace(tmp, path)
        bar.update(len(part))
    bar.close()
    barrier(dist)
    merged: list[BackSelectResult] = []
    for s in starts:
        results = _read_chunk(folder, s, fingerprint, len(x[s : s + chunk]))
        if results is None:
            raise InputError(f"{folder}: chunk_{s:07d}.json is missing or unreadable after the run (another run writing "
                             "to the same folder?)")
        merged += results
    return merged


__all__ = ["compute_orders", "read_orders", "visit_order"]
