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
pixel index among the tied wins (:func:`select`).

Fast and exact: every step first *screens* all remaining candidates in float32 (margins
computed in float64 from float32 logits), then re-scores in float64 only the candidates a
float32 error ``ε`` could put on top, the winner set ``{i : m32_i ≥ max m32 − 2ε − TIE_TOLERANCE}``;
the float64 margins of that set decide the step with :func:`select`. When
``|m32 − m64| ≤ ε`` for every candidate, this is the decision of a float64 run. ``ε`` is
:data:`SCREEN_SAFETY` times the largest ``|m32 − m64|`` observed in the run (on
:data:`CALIBRATION` candidates per image at the first step and on every winner set
after), at least :data:`SCREEN_FLOOR` · (1 + |best margin|); a step whose winner set shows a
larger difference widens ``ε`` and is decided again; for torch models the scores of the
chosen path are computed in float64 in one pass at the end and every winner's float32 margin
is checked against its step's ``ε`` (a miss reruns the images with a wider ``ε``). Screens: ``"incremental"`` (torch
models: only the boxes of each feature map a one-pixel change reaches, from the traced
graph, see :mod:`keepbits.audit._sis_incremental`) and ``"plain"`` (every candidate image
through the model: in torch, or on the CPU an ONNX Runtime export of the model where that
spends less CPU time, :func:`_plain_screen`). Float64 re-scoring: a float64 copy of the torch model.
ONNX models (plain ``.onnx`` files and bundles) are converted to a torch twin of their graph
where every operator has one (:mod:`keepbits.audit._onnx_torch`, checked against ONNX Runtime)
and then take the torch screens and re-scoring on the graph's own input space; ``"plain"``
screens them with ONNX Runtime (re-scored by the twin). A graph without a twin (or no torch)
is screened by ONNX Runtime and re-scored by the graph in float64 on the ONNX reference
evaluator, only when more than one candidate is within reach (recorded scores then come from
float32 logits when the step was unambiguous), or, where the graph does not convert to
float64 either, not at all (ONNX Runtime's float32 margins are ranked directly). Several
images run in lockstep (:func:`backselect_batch`), their candidates sharing forward passes.

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
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from keepbits.audit._base import Explainer, ModelAdapter, load_model, model_targets
from keepbits.audit._sis_eval import AdapterEvaluator, Evaluator
from keepbits.core import sigmoid, target_margin
from keepbits.errors import InputError

log = logging.getLogger("keepbits")

#: A torch model whose plain screen spends more CPU seconds than this on 256 candidates is also
#: tried as an ONNX Runtime export (:func:`_plain_screen`).
ORT_TRIAL_SECONDS = 0.05
#: Scores (float64 target margins, nats) closer than this to a step's best count as tied.
TIE_TOLERANCE = 1e-9
#: The float32 screening bound ε is this factor times the largest float32-vs-float64 margin difference seen in the run,
SCREEN_SAFETY = 8.0
#: and at least this fraction of 1 + |best float32 margin| of the step.
SCREEN_FLOOR = 2.0**-20
#: Candidates per image re-scored in float64 at the first step to calibrate ε.
CALIBRATION = 16
#: Images run in lockstep by :class:`SISExplainer` (their candidates share forward passes).
IMAGES_PER_PASS = 16
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


_EVALUATORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _state(module: Any) -> tuple:
    """Identity and in-place version of every parameter and buffer (a cached copy is stale when it changes)."""
    return tuple((id(t), t._version) for t in (*module.parameters(), *module.buffers()))


def _evaluators(model: ModelAdapter, method: str, batch_size: int | None, device: Any) -> tuple[Any, Any, str]:
    """(float32 screen, float64 evaluator or None, method used) for ``model``; torch ones are cached per module."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if model.torch_module is not None:
        module = model.torch_module
        key = (method, batch_size, str(device), model.input_shape)
        entry = _EVALUATORS.setdefault(module, {}).get(key)
        if entry is None or entry[0] != _state(module):
            entry = (_state(module), *_torch_evaluators(module, model.input_shape, method, batch_size, device))
            _EVALUATORS[module][key] = entry
        return entry[1:]
    from keepbits.audit._base import OnnxAdapter

    if isinstance(model, OnnxAdapter):
        key = (method, batch_size, str(device))
        entry = _EVALUATORS.setdefault(model, {}).get(key)
        if entry is None:
            entry = _onnx_evaluators(model, method, batch_size, device)
            _EVALUATORS[model][key] = entry
        return entry
    if method == "incremental":
        raise InputError(f"{model.source}: incremental BackSelect needs a torch model or an ONNX graph (method='plain' or 'auto')")
    if device not in (None, "cpu"):
        raise InputError(f"device {device!r}: models given as functions run where they are")
    return AdapterEvaluator(model, batch_size), None, "plain"


def _onnx_evaluators(model: Any, method: str, batch_size: int | None, device: Any) -> tuple[Any, Any, str]:
    """Evaluators of an ONNX model: those of its torch twin (``auto``, ``incremental``), else
    ONNX Runtime's float32 screen (``plain``) with float64 re-scoring by the twin or, without
    one, the ONNX reference evaluator."""
    from keepbits.audit._sis_onnx import GraphInputSpace, OnnxFloat64, OnnxScreen, torch_twin

    twin, why = torch_twin(model)
    if twin is None:
        if method == "incremental":
            raise InputError(f"{model.source}: incremental BackSelect needs a torch twin of the graph; {why}")
        log.info("%s: %s; screening with ONNX Runtime", model.source, why)
    if twin is not None and method != "plain":
        screen, exact, used = _torch_evaluators(twin, model.input_shape, method, batch_size, device)
        return GraphInputSpace(screen, model), GraphInputSpace(exact, model), used
    if twin is not None:
        import torch

        from keepbits.audit._sis_torch import DenseTorch

        exact = GraphInputSpace(DenseTorch(twin, model.input_shape, torch.float64, device, batch_size), model)
    else:
        exact = OnnxFloat64.create(model, np.random.default_rng(0).normal(size=(1, *model.input_shape)))
    return OnnxScreen(model, device, batch_size), exact, "plain"


def _torch_evaluators(module: Any, shape: tuple[int, int, int], method: str, batch_size: int | None, device: Any) -> tuple[Any, Any, str]:
    """Screen and float64 evaluator of a torch model. ``auto`` takes the incremental screen
    when its per-candidate cache applies (only candidates near the masked pixel are
    recomputed), else on the CPU whichever screen spends less CPU time on one batch of
    candidates, on a GPU the plain one (large dense batches)."""
    import torch

    from keepbits.audit._sis_incremental import GraphScreen, Unsupported
    from keepbits.audit._sis_torch import DenseTorch

    exact = DenseTorch(module, shape, torch.float64, device, batch_size)
    if method == "plain":
        return _plain_screen(module, shape, device, batch_size)[0], exact, "plain"
    try:
        screen = GraphScreen(module, shape, device, batch_size)
    except Unsupported as exc:
        if method == "incremental":
            raise InputError(f"incremental BackSelect does not support this model: {exc}") from None
        log.info("incremental BackSelect unavailable (%s); using full forward passes", exc)
        return _plain_screen(module, shape, device, batch_size)[0], exact, "plain"
    if method == "incremental" or (screen.local_nodes and screen.cacheable):
        return screen, exact, "incremental"
    plain, plain_seconds = _plain_screen(module, shape, device, batch_size)
    if screen.local_nodes and plain_seconds is not None and _cpu_seconds(screen, shape) < plain_seconds:
        return screen, exact, "incremental"
    return plain, exact, "plain"


def _plain_screen(module: Any, shape: tuple[int, int, int], device: Any, batch_size: int | None) -> tuple[Any, float | None]:
    """(the float32 screen of every candidate through the whole model, its :func:`_cpu_seconds`;
    None off the CPU): torch, or on the CPU an ONNX Runtime export of the model
    (:func:`keepbits.audit._sis_onnx.module_screen`) where it spends less CPU time on a batch of
    candidates. Models that spend at most :data:`ORT_TRIAL_SECONDS` CPU seconds on that batch stay
    in torch (small models: the export would cost more than it saves)."""
    import torch

    from keepbits.audit._sis_torch import DenseTorch

    dense = DenseTorch(module, shape, torch.float32, device, batch_size)
    if dense.device.type != "cpu":
        return dense, None
    torch_seconds = _cpu_seconds(dense, shape)
    if torch_seconds <= ORT_TRIAL_SECONDS:
        return dense, torch_seconds
    from keepbits.audit._sis_onnx import module_screen

    ort_screen, why = module_screen(module, shape, batch_size)
    if ort_screen is None:
        log.info("plain screen in torch: %s", why)
        return dense, torch_seconds
    ort_seconds = _cpu_seconds(ort_screen, shape)
    log.info("screen of the plain path (where it runs; the report's method says which path did): %s "
             "(CPU s per 256 candidates: torch %.3f, ONNX Runtime %.3f)",
             "ONNX Runtime" if ort_seconds < torch_seconds else "torch", torch_seconds, ort_seconds)
    return (ort_screen, ort_seconds) if ort_seconds < torch_seconds else (dense, torch_seconds)


def _cpu_seconds(screen: Any, shape: tuple[int, int, int], candidates: int = 256) -> float:
    """CPU seconds ``screen`` takes for ``candidates`` candidates of a random image (best of two)."""
    c, h, w = shape
    screen.reset(np.random.default_rng(0).normal(size=(1, c, h, w)), np.zeros(c))
    img, pix = np.zeros(min(candidates, h * w), np.int64), np.linspace(0, h * w - 1, min(candidates, h * w)).astype(np.int64)
    screen.logits(img, pix)
    best = float("inf")
    for _ in range(2):
        started = time.process_time()
        screen.logits(img, pix)
        best = min(best, time.process_time() - started)
    return best


@dataclass
class _Steps:
    """Steps of a lockstep run, one entry per (step, running image): the image, the pixel it
    masked, the margin (float64 where re-scored, else the float32 screen's), the bound ε the
    step used, and whether the winner was re-scored."""

    images: np.ndarray
    pixels: np.ndarray
    margins: np.ndarray
    bounds: np.ndarray
    rescored: np.ndarray

    def of(self, image: int) -> "_Steps":
        keep = self.images == image
        return _Steps(*(a[keep] for a in (self.images, self.pixels, self.margins, self.bounds, self.rescored)))


def _winners(grid: np.ndarray, active: np.ndarray, targets: np.ndarray, exact: Any, error: float, calibrate: bool) -> tuple[_Steps, float]:
    """Every running image's winner of one step. ``grid``: float32-screened margins, image ×
    pixel (−inf: not a candidate). Without a float64 evaluator, :func:`select` on the screened
    margins. Else the winner set of each image (see the module docstring) is re-scored in
    float64 when it holds more than one candidate (at the first step also :data:`CALIBRATION`
    candidates) and decided by :func:`select`; ``error`` (largest |float32 − float64| seen)
    grows with every re-scored candidate, and the step is decided again when ε grows."""
    g = grid[active]
    known: dict[tuple[int, int], float] = {}
    while True:
        best = g.max(1)
        bounds = np.maximum(SCREEN_SAFETY * error, SCREEN_FLOOR * (1.0 + np.abs(best))) if exact is not None else np.zeros(len(g))
        member = g >= (best - 2 * bounds - TIE_TOLERANCE)[:, None]
        if exact is None:
            break
        want = member & (member.sum(1) > 1)[:, None]
        if calibrate:
            for j in range(len(g)):
                candidates = np.flatnonzero(np.isfinite(g[j]))
                want[j, candidates[np.linspace(0, len(candidates) - 1, min(CALIBRATION, len(candidates))).astype(np.int64)]] = True
            calibrate = False
        need = [(j, p) for j, p in zip(*np.nonzero(want)) if (j, p) not in known]
        if not need:
            break
        rows, pixels = np.array([j for j, _ in need]), np.array([p for _, p in need])
        exact_m = target_margin(exact.logits(active[rows], pixels), targets[active[rows]])
        known.update(zip(need, exact_m.tolist()))
        error = max(error, float(np.abs(exact_m - g[rows, pixels]).max()))
        if (np.maximum(SCREEN_SAFETY * error, SCREEN_FLOOR * (1.0 + np.abs(best))) <= bounds).all():
            break
    pixels = member.argmax(1)  # the only member, or the lowest (exact None: the tie rule itself)
    for j in np.flatnonzero(member.sum(1) > 1) if exact is not None else ():
        members = np.flatnonzero(member[j])
        pixels[j] = members[select(np.array([known[(j, p)] for p in members]))]
    margins = np.array([known.get((j, p), g[j, p]) for j, p in enumerate(pixels)])
    rescored = np.array([(j, p) in known for j, p in enumerate(pixels)], bool)
    return _Steps(active, pixels, margins, bounds, rescored), error


def _path_images(x: np.ndarray, order: np.ndarray, mask_value: np.ndarray) -> np.ndarray:
    """``x`` with the first ``i`` pixels of ``order`` masked, for i = 0 … len(order)."""
    c, h, w = x.shape
    rank = np.full(h * w, len(order) + 1)
    rank[order] = np.arange(len(order))
    masked = np.arange(len(order) + 1)[:, None] > rank[None, :]
    return np.where(masked.reshape(-1, 1, h, w), mask_value[None, :, None, None], x[None])


def _lockstep(screen: Evaluator, exact: Any, x: np.ndarray, targets: np.ndarray, mask_value: np.ndarray, remaining: np.ndarray,
              error: float) -> tuple[np.ndarray, _Steps, float]:
    """BackSelect of B images in lockstep, one batch of candidates per step for all of them;
    ``remaining``: image × pixel, True for candidates. Returns the margins of the unmasked
    bases, every step, and the largest float32 error seen."""
    screen.reset(x, mask_value)
    if exact is not None:
        exact.reset(x, mask_value)
    base = target_margin((exact or screen).base_logits(), targets)
    remaining = remaining.copy()
    steps: list[_Steps] = []
    calibrate = True
    while True:
        img, pix = np.nonzero(remaining)
        if not len(img):
            break
        grid = np.full(remaining.shape, -np.inf)
        grid[img, pix] = margins = target_margin(screen.logits(img, pix), targets[img])
        if not np.isfinite(margins).all():  # no winner is defined (and NaN would pick a pixel already masked, forever)
            raise InputError(f"the model's score is NaN or infinite on {int((~np.isfinite(margins)).sum())} masked candidate(s) "
                             f"of image(s) {np.unique(img[~np.isfinite(margins)])[:8].tolist()} after {len(steps)} step(s); "
                             "BackSelect needs finite scores")
        step, error = _winners(grid, np.unique(img), targets, exact, error, calibrate)
        calibrate = False
        steps.append(step)
        remaining[step.images, step.pixels] = False
        screen.mask(step.images, step.pixels)
        if exact is not None:
            exact.mask(step.images, step.pixels)
    merged = _Steps(*(np.concatenate([getattr(t, k) for t in steps]) if steps else np.zeros(0)
                      for k in ("images", "pixels", "margins", "bounds", "rescored")))
    return base, merged, error


def _run_backselect(screen: Evaluator, exact: Any, method: str, x: np.ndarray, targets: np.ndarray, mask_value: np.ndarray,
                    initially_masked: Sequence[np.ndarray]) -> list[BackSelectResult]:
    """BackSelect of B images in lockstep. With a float64 evaluator that scores whole paths
    (torch), the scores of the chosen path are computed in float64 at the end, and every
    winner's float32 margin is checked against them: a step whose winner differs by more
    than its ε reruns the images with ε grown to cover it."""
    started = time.perf_counter()
    n, c, h, w = x.shape
    x = np.array(x, dtype=np.float64)
    initial = [np.unique(np.asarray(m, dtype=np.int64)) for m in initially_masked]
    remaining = np.ones((n, h * w), bool)
    for b, m in enumerate(initial):
        x[b][:, m // w, m % w] = mask_value[:, None]
        remaining[b, m] = False
    error = 0.0
    while True:
        base, steps, error = _lockstep(screen, exact, x, targets, mask_value, remaining, error)
        runs = [steps.of(b) for b in range(n)]
        if exact is None or not exact.path_scores:
            margins = [np.concatenate([[base[b]], r.margins]) for b, r in enumerate(runs)]
            break
        margins = [target_margin(exact.image_logits(_path_images(x[b], r.pixels.astype(np.int64), mask_value)), targets[b])
                   for b, r in enumerate(runs)]
        missed = [np.abs(r.margins - m[1:]) - np.where(r.rescored, np.inf, r.bounds) for r, m in zip(runs, margins)]
        if max((float(v.max()) for v in missed if len(v)), default=0.0) <= 0:
            break
        error = max(error, max(float(np.abs(r.margins - m[1:]).max()) for r, m in zip(runs, margins) if len(r.margins)))
        log.warning("BackSelect: a float32 margin missed its error bound; rerunning with ε = %.3g", SCREEN_SAFETY * error)
    seconds = (time.perf_counter() - started) / max(n, 1)
    return [BackSelectResult(r.pixels.astype(np.int64), sigmoid(m), int(targets[b]), (h, w), initial[b], seconds, method)
            for b, (r, m) in enumerate(zip(runs, margins))]


def backselect_batch(model: Any, x: Any, target: Any = None, mask_value: Any = None, method: str = "auto",
                     batch_size: int | None = None, initially_masked: Sequence[Sequence[int]] | None = None,
                     device: Any = None) -> list[BackSelectResult]:
    """Exact BackSelect (SIS §3.1) of N images (normalised N×C×H×W floats or uint8 N×H×W×C),
    run in lockstep: each step's candidates of all images go through the model together.

    ``target``: None (the predicted class), an int or N ints; ``mask_value``: one value or
    one per channel (normalised space; default 0 = the training mean); ``method``:
    ``"auto"`` (incremental for torch models and ONNX graphs with a torch twin whose graph has local ops, else plain),
    ``"incremental"`` or ``"plain"``; ``batch_size``: candidates per forward pass (None:
    timed per model); ``initially_masked``: per image, pixels masked before the run;
    ``device``: where torch models (``"cuda"``, ...) or ONNX Runtime (``"cuda"``) run
    (default: the model's device / CPU).

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import FunctionAdapter, backselect_batch
        >>> model = FunctionAdapter(lambda x: np.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
        >>> [r.order.tolist() for r in backselect_batch(model, np.array([[[[-1.0, 2.0, 1.0]]], [[[3.0, 2.0, 1.0]]]], np.float32))]
        [[0, 2, 1], [2, 1, 0]]
    """
    model = load_model(model)
    xs = model.prepare(x)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    masked = [np.zeros(0, np.int64)] * len(xs) if initially_masked is None else [np.asarray(m, np.int64) for m in initially_masked]
    if len(masked) != len(xs):
        raise InputError(f"initially_masked holds {len(masked)} lists for {len(xs)} images")
    targets = model_targets(model, xs, target)
    screen, exact, used = _evaluators(model, method, batch_size, device)
    return _run_backselect(screen, exact, used, xs, targets, _mask_value(model, mask_value), masked)


def backselect(model: Any, x: np.ndarray, target: int | None = None, mask_value: Any = None, method: str = "auto",
               batch_size: int | None = None, initially_masked: Sequence[int] = (), device: Any = None) -> BackSelectResult:
    """Exact BackSelect (SIS §3.1) of one normalised C×H×W image (or a uint8 H×W×C image);
    arguments as :func:`backselect_batch`.

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
        raise InputError(f"backselect takes one image, got {len(xs)}; use backselect_batch")
    return backselect_batch(model, xs, target, mask_value, method, batch_size, [initially_masked], device)[0]


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


def _collect(first: Sequence[BackSelectResult], threshold: float, rerun: Callable[[list[int], list[np.ndarray]], list[BackSelectResult]],
             max_sis: int | None) -> list[list[np.ndarray]]:
    """SIScollection loop for several images: cut an SIS from each run, keep it masked and
    ``rerun(images, masked)`` BackSelect on the rest of those images together."""
    found: list[list[np.ndarray]] = [[] for _ in first]
    runs = list(first)
    active = list(range(len(first)))
    while active:
        again = []
        for i in active:
            sis = find_sis(runs[i], threshold)
            if sis is None or len(sis) == 0:
                continue
            found[i].append(sis)
            if max_sis is None or len(found[i]) < max_sis:
                again.append(i)
        if again:
            for i, run in zip(again, rerun(again, [np.concatenate(found[i]) for i in again])):
                runs[i] = run
        active = again
    return found


def sis_collection(model: Any, x: np.ndarray, threshold: float, target: int | None = None, mask_value: Any = None,
                   method: str = "auto", batch_size: int | None = None, max_sis: int | None = None,
                   device: Any = None) -> list[np.ndarray]:
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

    def rerun(_: list[int], masked: list[np.ndarray]) -> list[BackSelectResult]:
        return backselect_batch(model, xs, target, mask_value, method, batch_size, masked, device)

    return _collect(rerun([0], [np.zeros(0, np.int64)]), threshold, rerun, max_sis)[0]


def gradient_backselect(model: Any, x: np.ndarray, target: Any = None, k: int = 1, mask_value: Any = None,
                        batch_size: int = 64, initially_masked: Sequence[Sequence[int]] | None = None,
                        device: Any = None, **model_kwargs: Any) -> list[BackSelectResult]:
    """Batched Gradient BackSelect (Overinterpretation §3.2, S5) for a batch of images.

    Each iteration takes one gradient of ``f(x ⊙ (1−M) + m ⊙ M)`` with respect to the pixel
    mask ``M`` (shared by a pixel's channels) and masks the ``k`` remaining pixels with the
    largest gradient (masking them is predicted to keep ``f`` highest; ties to the lowest
    index): ⌈p/k⌉ gradient evaluations per image, batched over images. ``scores`` holds the
    forward-pass ``f`` at every iteration boundary (NaN in between), so :func:`find_sis`
    returns subsets made of whole iterations whose ``f(x_S) ≥ τ`` was evaluated. ONNX models
    (plain ``.onnx`` files, bundles) take their gradients through the graph's torch twin
    (:func:`keepbits.audit._sis_onnx.gradient_module`); their ``f`` is ONNX Runtime's. ``device``:
    where the gradients are taken (``"cuda"``, ...; default: where the model's parameters are;
    the module is moved there for the run and back after it).

    Example:
        >>> import numpy as np, torch
        >>> from keepbits.audit import gradient_backselect
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> res = gradient_backselect(net, np.ones((3, 1, 2, 2), np.float32), k=2, input_shape=(1, 2, 2))
        >>> len(res), sorted(res[0].order.tolist()), int(np.isfinite(res[0].scores).sum())
        (3, [0, 1, 2, 3], 3)
    """
    from keepbits.training.distributed import on_device

    from keepbits.audit._sis_onnx import gradient_module

    model = load_model(model, **model_kwargs)
    if k < 1:
        raise InputError(f"k (pixels per iteration) must be >= 1, got {k}")
    net = gradient_module(model)
    xs = model.prepare(x)
    targets = model_targets(model, xs, target, batch_size)
    with on_device(net, device) as where:
        return _gradient_backselect(model, net, xs, targets, k, mask_value, batch_size, initially_masked, where)


def _gradient_backselect(model: ModelAdapter, net: Any, xs: np.ndarray, targets: np.ndarray, k: int, mask_value: Any, batch_size: int,
                         initially_masked: Sequence[Sequence[int]] | None, where: Any) -> list[BackSelectResult]:
    """``net``: the differentiable module; when it is not ``model``'s own (an ONNX graph's twin),
    ``f`` at each iteration is read from ``model`` itself (ONNX Runtime), not from the twin."""
    import torch

    n, (c, h, w) = len(xs), model.input_shape
    d = h * w
    twin = net is not model.torch_module
    m = torch.as_tensor(_mask_value(model, mask_value), dtype=torch.float32, device=where).view(1, c, 1, 1)
    results = []
    for start in range(0, n, batch_size):
        started = time.perf_counter()
        xb = torch.as_tensor(xs[start : start + batch_size], device=where)
        tb = torch.as_tensor(targets[start : start + batch_size], device=where)
        b = len(xb)
        masked = np.zeros((b, d), bool)
        for i in range(b):
            if initially_masked is not None:
                masked[i, np.asarray(initially_masked[start + i], np.int64)] = True
        initial = [np.flatnonzero(row) for row in masked]
        orders: list[list[int]] = [[] for _ in range(b)]
        scores = [np.full(d - len(init) + 1, np.nan) for init in initial]
        while True:
            mask = torch.tensor(masked.reshape(b, 1, h, w), dtype=torch.float32, device=where, requires_grad=True)
            masked_x = xb * (1 - mask) + m * mask
            probs = torch.softmax(net(masked_x), 1)
            f = probs[torch.arange(b, device=where), tb]
            (grad,) = torch.autograd.grad(f.sum(), mask)
            f_np, g = f.detach().double().cpu().numpy(), grad.double().cpu().numpy().reshape(b, d)
            if twin:
                f_np = model.probabilities(masked_x.detach().cpu().numpy(), batch_size)[np.arange(b), targets[start : start + b]]
            if not (np.isfinite(f_np).all() and np.isfinite(g).all()):  # a NaN ranks no pixel and fails every τ test
                bad = np.flatnonzero(~(np.isfinite(f_np) & np.isfinite(g).all(1))) + start
                raise InputError(f"the model's score or its gradient is NaN or infinite on image(s) {bad[:8].tolist()} after "
                                 f"{min(len(o) for o in orders)} masked pixel(s); BackSelect needs finite scores")
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
    ``method="gradient"`` uses Batched Gradient BackSelect with ``k`` pixels per iteration;
    exact methods run :data:`IMAGES_PER_PASS` images in lockstep on ``device``.

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import FunctionAdapter, SISExplainer
        >>> model = FunctionAdapter(lambda x: np.stack([4 * x.sum((1, 2, 3)), 0 * x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
        >>> [r.sis[0].tolist() for r in SISExplainer(model, threshold=0.95).explain(np.ones((2, 1, 1, 3), np.float32))]
        [[2], [2]]
    """

    def __init__(self, model: Any, threshold: float = 0.9, mask_value: Any = None, method: str = "auto",
                 collection: bool = False, k: int = 1, device: Any = None, **model_kwargs: Any):
        super().__init__(model, **model_kwargs)
        if not 0.0 < threshold <= 1.0:
            raise InputError(f"threshold must be in (0, 1], got {threshold}")
        if method not in METHODS + ("gradient",):
            raise InputError(f"method must be one of {METHODS + ('gradient',)}, got {method!r}")
        self.threshold, self.mask_value, self.method, self.collection, self.k = threshold, mask_value, method, collection, k
        self.device = device

    def _runs(self, x: np.ndarray, targets: np.ndarray, batch_size: int, masked: list[np.ndarray] | None) -> list[BackSelectResult]:
        if self.method == "gradient":
            return gradient_backselect(self.model, x, targets, self.k, self.mask_value, batch_size, masked, self.device)
        runs: list[BackSelectResult] = []
        for i in range(0, len(x), IMAGES_PER_PASS):
            part = slice(i, i + IMAGES_PER_PASS)
            runs += backselect_batch(self.model, x[part], targets[part], self.mask_value, self.method, batch_size,
                                     None if masked is None else masked[part], self.device)
        return runs

    def _explain(self, x: np.ndarray, targets: np.ndarray, batch_size: int) -> list[SISResult]:
        runs = self._runs(x, targets, batch_size, None)

        def rerun(images: list[int], masked: list[np.ndarray]) -> list[BackSelectResult]:
            return self._runs(x[images], targets[images], batch_size, masked)

        found = _collect(runs, self.threshold, rerun, None if self.collection else 1)
        return [SISResult(int(t), float(run.scores[0]), self.threshold, sis, run) for t, run, sis in zip(targets, runs, found)]
