"""Sufficient input subsets (Carter et al. 2019, "What made you do this?"; Carter et al. 2021,
"Overinterpretation reveals image classification model pathologies").

* :func:`backselect` (SIS §3.1, Alg. 1 "BackSelect"): from the full image, repeatedly mask the
  remaining pixel (all channels together) whose masking keeps the confidence ``f`` highest;
  ties go to the lowest pixel index. The full order and the score after every step are kept
  in a :class:`BackSelectResult`, so :func:`find_sis` cuts the SIS for any threshold τ without
  new model evaluations.
* :func:`find_sis` (Alg. 1 "FindSIS"): walk the order backwards, re-adding pixels until
  ``f ≥ τ``; ``None`` when ``f(x) < τ``, an empty set when the fully masked image scores ≥ τ.
* :func:`sis_collection` (Alg. 1 "SIScollection"): mask each SIS found and repeat until the
  rest scores below τ (disjoint SIS).
* :func:`gradient_backselect` (Overinterpretation §3.2, S5 "Batched Gradient SIS"): order by
  ∇_M f(x ⊙ (1−M) + m ⊙ M), masking ``k`` pixels per iteration, batched over images; its SIS are
  checked by forward passes, so ``f(x_S) ≥ τ`` always holds for the returned subsets.

``f`` is the softmax probability of the class predicted on the full image (or a given
target). Masked pixels take ``mask_value`` in normalised space; the default 0 is the
per-channel training mean, as in the paper.

Exact BackSelect ranks candidates by the float64 target margin
``m = z_t − log Σ_{j≠t} exp z_j`` (:func:`target_margin`), for which ``f = σ(m)`` exactly:
the same order as ``f`` itself, but without the saturation of ``f`` (or of ``log f``) to
exactly 1 (0) once the model is confident, where every candidate would tie. Two candidates
tie when their margins are within :data:`TIE_TOLERANCE` of the step's best; the lowest
pixel index among the tied wins. Both evaluation methods (``"plain"``: every candidate image through the
model; ``"incremental"``: only the boxes of each layer a one-pixel change reaches, see
:mod:`keepbits.audit._sis_incremental`) apply that rule, so they return the same order.

Example:
    >>> import numpy as np
    >>> from keepbits.audit import FunctionAdapter, backselect, find_sis
    >>> w = np.zeros((2, 1, 2, 2)); w[0, 0, 0, 1] = 5.0     # class 0 is decided by pixel 1
    >>> model = FunctionAdapter(lambda x: np.einsum("kchw,nchw->nk", w, x), input_shape=(1, 2, 2))
    >>> bs = backselect(model, np.ones((1, 2, 2), np.float32))
    >>> bs.order.tolist(), find_sis(bs, 0.99).tolist()
    ([0, 2, 3, 1], [1])
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from keepbits.audit._base import Explainer, ModelAdapter, load_model
from keepbits.core import sigmoid, target_margin
from keepbits.errors import InputError

log = logging.getLogger("keepbits")

#: Scores (float64 target margins, nats) closer than this to a step's best count as tied.
TIE_TOLERANCE = 1e-9
METHODS = ("auto", "incremental", "plain")


@dataclass
class BackSelectResult:
    """One image's BackSelect: ``order[i]`` is the pixel (index ``row * W + col``) masked at
    step ``i + 1`` and ``scores[i]`` is ``f`` with ``order[:i]`` masked (``scores[0]`` is the
    full image, ``scores[-1]`` the fully masked one). Pixels in ``initially_masked`` were
    masked before the run and are not part of the order."""

    order: np.ndarray
    scores: np.ndarray
    target: int
    shape: tuple[int, int]
    initially_masked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"order": self.order.tolist(), "scores": self.scores.tolist(), "target": self.target,
                "shape": list(self.shape), "initially_masked": self.initially_masked.tolist(),
                "seconds": self.seconds, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackSelectResult":
        return cls(np.asarray(d["order"], np.int64), np.asarray(d["scores"], np.float64), int(d["target"]),
                   tuple(d["shape"]), np.asarray(d.get("initially_masked", []), np.int64), d.get("seconds", 0.0), d.get("method", ""))


def select(scores: np.ndarray) -> int:
    """Position of the winner of one BackSelect step: the lowest index whose score is within
    :data:`TIE_TOLERANCE` of the best (candidates are listed by increasing pixel index)."""
    scores = np.asarray(scores, dtype=np.float64)
    return int(np.flatnonzero(scores >= scores.max() - TIE_TOLERANCE)[0])


def _mask_value(model: ModelAdapter, mask_value: Any) -> np.ndarray:
    c = model.input_shape[0]
    value = np.zeros(c) if mask_value is None else np.broadcast_to(np.asarray(mask_value, dtype=np.float64), (c,)).copy()
    return value


class _PlainScorer:
    """Every candidate image through the whole model (float64 for torch models)."""

    def __init__(self, model: ModelAdapter, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self._net = None
        if model.torch_module is not None:
            import copy

            self._net = copy.deepcopy(model.torch_module).double().eval()

    def reset(self, x: np.ndarray, mask_value: np.ndarray, target: int) -> None:
        self.base, self.mask_value, self.target = np.array(x, dtype=np.float64), mask_value, target

    def mask(self, pixel: int) -> None:
        w = self.base.shape[2]
        self.base[:, pixel // w, pixel % w] = self.mask_value

    def margins(self, x: np.ndarray) -> np.ndarray:
        if self._net is None:
            return target_margin(self.model.logits(x.astype(np.float32), self.batch_size), self.target)
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                out.append(self._net(torch.as_tensor(x[i : i + self.batch_size], dtype=torch.float64)).numpy())
        return target_margin(np.concatenate(out), self.target)

    def base_margin(self) -> float:
        return float(self.margins(self.base[None])[0])

    def scores(self, candidates: np.ndarray, last_masked: int | None) -> np.ndarray:
        c, h, w = self.base.shape
        out = []
        for i in range(0, len(candidates), self.batch_size):
            part = candidates[i : i + self.batch_size]
            batch = np.repeat(self.base[None], len(part), axis=0)
            batch[np.arange(len(part)), :, part // w, part % w] = self.mask_value
            out.append(self.margins(batch))
        return np.concatenate(out)


def _scorer(model: ModelAdapter, method: str, batch_size: int):
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if method != "plain" and model.torch_module is not None:
        from keepbits.audit._sis_incremental import IncrementalScorer, Unsupported

        try:
            return IncrementalScorer(model.torch_module, model.input_shape, chunk=batch_size), "incremental"
        except Unsupported as exc:
            if method == "incremental":
                raise InputError(f"incremental BackSelect does not support this model: {exc}") from None
            log.info("incremental BackSelect unavailable (%s); using full forward passes", exc)
    elif method == "incremental":
        raise InputError("incremental BackSelect needs a torch model")
    return _PlainScorer(model, batch_size), "plain"


def _run_backselect(scorer: Any, method: str, x: np.ndarray, target: int, mask_value: np.ndarray,
                    initially_masked: np.ndarray) -> BackSelectResult:
    started = time.perf_counter()
    c, h, w = x.shape
    x = np.array(x, dtype=np.float64)
    initially_masked = np.unique(np.asarray(initially_masked, dtype=np.int64))
    x[:, initially_masked // w, initially_masked % w] = mask_value[:, None]
    scorer.reset(x, mask_value, target)
    remaining = np.setdiff1d(np.arange(h * w), initially_masked)
    order, margins = [], [scorer.base_margin()]
    last = None
    while len(remaining):
        s = scorer.scores(remaining, last)
        k = select(s)
        last = int(remaining[k])
        order.append(last)
        margins.append(float(s[k]))
        scorer.mask(last)
        remaining = np.delete(remaining, k)
    return BackSelectResult(np.asarray(order, np.int64), sigmoid(np.asarray(margins)), int(target), (h, w), initially_masked,
                            time.perf_counter() - started, method)


def backselect(model: Any, x: np.ndarray, target: int | None = None, mask_value: Any = None, method: str = "auto",
               batch_size: int = 512, initially_masked: Sequence[int] = ()) -> BackSelectResult:
    """Exact BackSelect (SIS §3.1) of one normalised C×H×W image (or a uint8 H×W×C image).

    ``target`` defaults to the class predicted on the full image; ``mask_value`` (one value
    or one per channel, normalised space) defaults to 0 = the training mean; ``method``:
    ``"incremental"`` (torch CNN chains), ``"plain"`` (any model, incl. ONNX) or ``"auto"``.

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import FunctionAdapter, backselect
        >>> model = FunctionAdapter(lambda x: np.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
        >>> backselect(model, np.array([[[-1.0, 2.0, 1.0]]], np.float32)).order.tolist()
        [0, 2, 1]
    """
    model = load_model(model)
    xs = model.prepare(x)
    if len(xs) != 1:
        raise InputError(f"backselect takes one image, got {len(xs)}; use SISExplainer.explain for batches")
    scorer, used = _scorer(model, method, batch_size)
    if target is None:
        target = int(model.probabilities(xs).argmax(1)[0])
    return _run_backselect(scorer, used, xs[0], int(target), _mask_value(model, mask_value), np.asarray(initially_masked))


def find_sis(result: BackSelectResult, threshold: float) -> np.ndarray | None:
    """FindSIS (SIS Alg. 1) from a cached BackSelect order: the pixels (sorted by decreasing
    importance, last masked first) that alone keep ``f ≥ threshold``; ``None`` if the
    unmasked image scores below ``threshold``; empty if the fully masked image reaches it.
    Positions whose score was not evaluated (NaN, gradient BackSelect) are skipped.

    Example:
        >>> import numpy as np
        >>> from keepbits.audit.sis import BackSelectResult, find_sis
        >>> r = BackSelectResult(np.array([2, 0, 1]), np.array([0.9, 0.95, 0.7, 0.2]), 0, (1, 3))
        >>> find_sis(r, 0.8).tolist(), find_sis(r, 0.6).tolist(), find_sis(r, 0.99)
        ([1, 0], [1], None)
    """
    d = len(result.order)
    if not result.scores[0] >= threshold:
        return None
    # scores[d - k] is f with only the last k pixels of the order left (NaN: not evaluated)
    for k in range(d + 1):
        if result.scores[d - k] >= threshold:
            return result.order[d - k :][::-1].copy()
    raise AssertionError("unreachable: scores[0] >= threshold")


def _collect(first: BackSelectResult, threshold: float, rerun: Any, max_sis: int | None) -> list[np.ndarray]:
    """SIScollection loop: cut an SIS, keep it masked, ``rerun(masked)`` BackSelect on the rest."""
    found: list[np.ndarray] = []
    run = first
    while max_sis is None or len(found) < max_sis:
        sis = find_sis(run, threshold)
        if sis is None or len(sis) == 0:
            break
        found.append(sis)
        if max_sis is not None and len(found) >= max_sis:
            break
        run = rerun(np.concatenate(found))
    return found


def sis_collection(model: Any, x: np.ndarray, threshold: float, target: int | None = None, mask_value: Any = None,
                   method: str = "auto", batch_size: int = 512, max_sis: int | None = None) -> list[np.ndarray]:
    """SIScollection (SIS Alg. 1): disjoint SIS of one image. After each SIS is found its
    pixels stay masked and BackSelect runs again on the rest, until the rest scores < τ.

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import FunctionAdapter, sis_collection
        >>> model = FunctionAdapter(lambda x: np.stack([4 * x.sum((1, 2, 3)), 0 * x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
        >>> [s.tolist() for s in sis_collection(model, np.ones((1, 1, 3), np.float32), 0.95)]
        [[2], [1], [0]]
    """
    model = load_model(model)
    xs = model.prepare(x)
    if target is None:
        target = int(model.probabilities(xs).argmax(1)[0])

    def rerun(masked: np.ndarray) -> BackSelectResult:
        return backselect(model, xs[0], target, mask_value, method, batch_size, masked)

    return _collect(rerun(np.zeros(0, np.int64)), threshold, rerun, max_sis)


def gradient_backselect(model: Any, x: np.ndarray, target: Any = None, k: int = 1, mask_value: Any = None,
                        batch_size: int = 64, initially_masked: Sequence[Sequence[int]] | None = None,
                        **model_kwargs: Any) -> list[BackSelectResult]:
    """Batched Gradient BackSelect (Overinterpretation §3.2, S5) for a batch of images.

    Each iteration takes one gradient of ``f(x ⊙ (1−M) + m ⊙ M)`` with respect to the pixel
    mask ``M`` (shared by a pixel's channels) and masks the ``k`` remaining pixels with the
    largest gradient (masking them is predicted to keep ``f`` highest; ties to the lowest
    index): ⌈p/k⌉ gradient evaluations per image, batched over images. ``scores`` holds the
    forward-pass ``f`` at every iteration boundary (NaN in between), so :func:`find_sis`
    returns subsets made of whole iterations whose ``f(x_S) ≥ τ`` was evaluated.

    Example:
        >>> import numpy as np, torch
        >>> from keepbits.audit import gradient_backselect
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> res = gradient_backselect(net, np.ones((3, 1, 2, 2), np.float32), k=2, input_shape=(1, 2, 2))
        >>> len(res), sorted(res[0].order.tolist()), int(np.isfinite(res[0].scores).sum())
        (3, [0, 1, 2, 3], 3)
    """
    import torch

    model = load_model(model, **model_kwargs)
    if model.torch_module is None:
        raise InputError(f"{model.source}: gradient BackSelect needs a torch model (ONNX bundles: use method='plain')")
    if k < 1:
        raise InputError(f"k (pixels per iteration) must be >= 1, got {k}")
    xs = model.prepare(x)
    n, (c, h, w) = len(xs), model.input_shape
    d = h * w
    if target is None:
        target = model.probabilities(xs, batch_size).argmax(1)
    targets = np.array(np.broadcast_to(np.asarray(target, np.int64), (n,)))
    m = torch.as_tensor(_mask_value(model, mask_value), dtype=torch.float32).view(1, c, 1, 1)
    net = model.torch_module
    results = []
    for start in range(0, n, batch_size):
        started = time.perf_counter()
        xb = torch.as_tensor(xs[start : start + batch_size])
        tb = torch.as_tensor(targets[start : start + batch_size])
        b = len(xb)
        masked = np.zeros((b, d), bool)
        for i in range(b):
            if initially_masked is not None:
                masked[i, np.asarray(initially_masked[start + i], np.int64)] = True
        initial = [np.flatnonzero(row) for row in masked]
        orders: list[list[int]] = [[] for _ in range(b)]
        scores = [np.full(d - len(init) + 1, np.nan) for init in initial]
        while True:
            mask = torch.tensor(masked.reshape(b, 1, h, w), dtype=torch.float32, requires_grad=True)
            probs = torch.softmax(net(xb * (1 - mask) + m * mask), 1)
            f = probs[torch.arange(b), tb]
            (grad,) = torch.autograd.grad(f.sum(), mask)
            f_np, g = f.detach().double().numpy(), grad.double().numpy().reshape(b, d)
            busy = False
            for i in range(b):
                scores[i][len(orders[i])] = f_np[i]
                rest = np.flatnonzero(~masked[i])
                if not len(rest):
                    continue
                busy = True
                pick = rest[np.argsort(-g[i, rest], kind="stable")[:k]]
                orders[i].extend(int(p) for p in pick)
                masked[i, pick] = True
            if not busy:
                break
        seconds = (time.perf_counter() - started) / b
        results += [BackSelectResult(np.asarray(o, np.int64), sc, int(t), (h, w), init, seconds, f"gradient(k={k})")
                    for o, sc, t, init in zip(orders, scores, tb.tolist(), initial)]
    return results


@dataclass
class SISResult:
    """SIS of one image: ``sis`` (a list of disjoint pixel-index arrays, empty when the image
    scores below τ), the BackSelect order of the first run, and the full-image confidence."""

    target: int
    confidence: float
    threshold: float
    sis: list[np.ndarray]
    backselect: BackSelectResult

    @property
    def confident(self) -> bool:
        return self.confidence >= self.threshold


class SISExplainer(Explainer):
    """SIS audit with the shared explainer call shape: ``explain(inputs, target=None, batch_size=...)``.

    ``collection=True`` returns every disjoint SIS (SIScollection), else the first only;
    ``method="gradient"`` uses Batched Gradient BackSelect with ``k`` pixels per iteration.

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import FunctionAdapter, SISExplainer
        >>> model = FunctionAdapter(lambda x: np.stack([4 * x.sum((1, 2, 3)), 0 * x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
        >>> [r.sis[0].tolist() for r in SISExplainer(model, threshold=0.95).explain(np.ones((2, 1, 1, 3), np.float32))]
        [[2], [2]]
    """

    def __init__(self, model: Any, threshold: float = 0.9, mask_value: Any = None, method: str = "auto",
                 collection: bool = False, k: int = 1, **model_kwargs: Any):
        super().__init__(model, **model_kwargs)
        if not 0.0 < threshold <= 1.0:
            raise InputError(f"threshold must be in (0, 1], got {threshold}")
        if method not in METHODS + ("gradient",):
            raise InputError(f"method must be one of {METHODS + ('gradient',)}, got {method!r}")
        self.threshold, self.mask_value, self.method, self.collection, self.k = threshold, mask_value, method, collection, k

    def _explain(self, x: np.ndarray, targets: np.ndarray, batch_size: int) -> list[SISResult]:
        if self.method == "gradient":
            runs = gradient_backselect(self.model, x, targets, self.k, self.mask_value, batch_size)
        else:
            runs = [backselect(self.model, xi, int(t), self.mask_value, self.method, batch_size) for xi, t in zip(x, targets)]
        results = []
        for xi, t, run in zip(x, targets, runs):
            def rerun(masked: np.ndarray, xi=xi, t=int(t)) -> BackSelectResult:
                if self.method == "gradient":
                    return gradient_backselect(self.model, xi[None], [t], self.k, self.mask_value, batch_size, [masked])[0]
                return backselect(self.model, xi, t, self.mask_value, self.method, batch_size, masked)

            sis = _collect(run, self.threshold, rerun, None if self.collection else 1)
            results.append(SISResult(int(t), float(run.scores[0]), self.threshold, sis, run))
        return results
