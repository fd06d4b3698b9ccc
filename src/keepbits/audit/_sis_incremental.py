"""Exact BackSelect scores by incremental evaluation (torch, float64).

One BackSelect step (SIS §3.1) scores every remaining pixel masked on its own. For a CNN
made of a chain of convolutions, poolings and element-wise layers up to a flatten (or a
global average pool) and a linear layer, masking pixel ``n`` changes only a box of each
feature map. :class:`IncrementalScorer` keeps, per candidate, the activation values inside
that box (batched over candidates, windows gathered from the base image's activations, as
in incremental occlusion inference), turns the last box into a change of the first linear
layer's output, and evaluates the rest of the head densely.

Between steps only candidates whose receptive field holds the pixel masked last are
recomputed; every other candidate's linear-layer change is reused, because neither its
box values nor the base values under its box have changed.

Scores are float64 target margins (:func:`keepbits.audit.sis.target_margin`); they agree
with a plain float64 forward pass to rounding (~1e-13), which the shared tie rule in
:mod:`keepbits.audit.sis` absorbs. Models outside this structure raise :class:`Unsupported` (callers fall back to
batched full forward passes).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keepbits.core import target_margin

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.BatchNorm2d,
)
_ELEMENTWISE_FUNCTIONS = (F.relu, torch.relu, F.elu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.dropout)


class Unsupported(Exception):
    """The model is not a chain this scorer can evaluate incrementally."""


@dataclass
class _Spatial:
    fn: Callable[[torch.Tensor], torch.Tensor]  # runs the layer on a window, without padding
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    pad_value: float


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _spatial(module: nn.Module) -> _Spatial | None:
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros" or _pair(module.dilation) != (1, 1):
            raise Unsupported(f"conv {module} (string padding, non-zero padding mode or dilation)")
        fn = functools.partial(F.conv2d, weight=module.weight, bias=module.bias, stride=module.stride, groups=module.groups)
        return _Spatial(fn, _pair(module.kernel_size), _pair(module.stride), _pair(module.padding), 0.0)
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode or _pair(module.dilation) != (1, 1) or module.return_indices:
            raise Unsupported(f"max-pool {module} (ceil mode, dilation or indices)")
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        return _Spatial(functools.partial(F.max_pool2d, kernel_size=k, stride=s), k, s, _pair(module.padding), -float("inf"))
    if isinstance(module, nn.AvgPool2d):
        p = _pair(module.padding)
        if module.ceil_mode or module.divisor_override or (p != (0, 0) and not module.count_include_pad):
            raise Unsupported(f"average pool {module}")
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        return _Spatial(functools.partial(F.avg_pool2d, kernel_size=k, stride=s), k, s, p, 0.0)
    return None


def _node_callable(node: Any, modules: dict[str, nn.Module]) -> tuple[str, Any]:
    """(kind, payload) of one traced node: spatial / elementwise / collapse / gap / other."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_module":
        module = modules[node.target]
        spatial = _spatial(module)
        if spatial is not None:
            return "spatial", spatial
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise", module
        if isinstance(module, nn.Flatten):
            return ("collapse" if module.start_dim == 1 and module.end_dim == -1 else "other"), module
        if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
            return "gap", module
        return "other", module
    if node.op == "call_function":
        fn = lambda t, _f=node.target, _a=rest, _k=kwargs: _f(t, *_a, **_k)  # noqa: E731
        if node.target in _ELEMENTWISE_FUNCTIONS and not rest and not kwargs.get("training", False):
            return "elementwise", fn
        if node.target is torch.flatten and (rest[:1] == (1,) or kwargs.get("start_dim") == 1) and len(rest) <= 1:
            return "collapse", fn
        return "other", fn
    if node.op == "call_method":
        fn = lambda t, _n=node.target, _a=rest, _k=kwargs: getattr(t, _n)(*_a, **_k)  # noqa: E731
        if node.target == "flatten" and (rest[:1] == (1,) or kwargs.get("start_dim") == 1):
            return "collapse", fn
        if node.target in ("relu", "sigmoid", "tanh") and not rest:
            return "elementwise", fn
        return "other", fn
    raise Unsupported(f"node {node.op} {node.target}")


def plan_layers(module: nn.Module) -> tuple[list[tuple[str, Any]], bool, nn.Linear, list[Callable]]:
    """Split a traced chain into (feature layers, global average pool?, first linear layer, head callables)."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise Unsupported(f"cannot trace the model ({exc})") from None
    modules = dict(module.named_modules())
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    prev = next(n for n in graph.nodes if n.op == "placeholder")
    for n in nodes:
        deps = [a for a in n.all_input_nodes]
        if deps != [prev] or n.args[0] is not prev:
            raise Unsupported("the model is not a single chain of layers (branches or residual connections)")
        prev = n
    layers = [_node_callable(n, modules) for n in nodes]
    features: list[tuple[str, Any]] = []
    i = 0
    while i < len(layers) and layers[i][0] in ("spatial", "elementwise"):
        features.append(layers[i])
        i += 1
    if not features:
        raise Unsupported("no convolution or pooling layer before the flatten")
    gap = i < len(layers) and layers[i][0] == "gap"
    i += gap
    if i >= len(layers) or layers[i][0] != "collapse":
        raise Unsupported("no flatten after the convolutional layers")
    i += 1
    if i >= len(layers) or not isinstance(layers[i][1], nn.Linear):
        raise Unsupported("the first layer after the flatten is not nn.Linear")
    return features, gap, layers[i][1], [payload for _, payload in layers[i + 1 :]]


def _box_plan(size: int, box: int, k: int, s: int, p: int, out_size: int) -> tuple[int, np.ndarray]:
    """Fixed output box size and, per input box start, the clamped output box start."""
    starts = np.arange(size - box + 1)
    first = np.maximum(0, -((-(starts + p - k + 1)) // s))
    last = np.minimum(out_size - 1, (starts + box - 1 + p) // s)
    b_out = int(min(out_size, max(1, (last - first + 1).max())))
    return b_out, np.minimum(first, out_size - b_out)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (the many small ops here lose to OpenMP barriers on busy CPUs)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class IncrementalScorer:
    """Target margins of "image with one more pixel masked", for all candidates.

    ``threads`` torch threads are used while scoring (default 1: the work is many small ops).

    Example:
        >>> import numpy as np, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        >>> scorer = IncrementalScorer(net, (1, 8, 8))
        >>> x = np.random.default_rng(0).normal(size=(1, 8, 8))
        >>> scorer.reset(x, np.zeros(1), target=0)
        >>> scorer.scores(np.arange(64), None).shape
        (64,)
    """

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int], chunk: int = 512, threads: int | None = 1):
        self.net = copy.deepcopy(module).double().eval()
        self.features, self.gap, self.linear, self.head = plan_layers(self.net)
        self.chunk, self.threads = chunk, threads
        c, h, w = input_shape
        self.shape = (c, h, w)
        # per layer: fixed box sizes and the box start of every input pixel
        rows, cols = np.arange(h), np.arange(w)
        bh, bw = 1, 1
        self.steps: list[tuple[tuple[int, int], np.ndarray, np.ndarray]] = []
        size_h, size_w = h, w
        with torch.no_grad():
            probe = torch.zeros(1, c, h, w, dtype=torch.float64)
            for kind, op in self.features:
                out = (op.fn(F.pad(probe, (op.p[1], op.p[1], op.p[0], op.p[0]), value=op.pad_value))
                       if kind == "spatial" else op(probe))
                if kind == "spatial":
                    oh, ow = out.shape[-2:]
                    bh_new, plan_r = _box_plan(size_h, bh, op.k[0], op.s[0], op.p[0], oh)
                    bw_new, plan_c = _box_plan(size_w, bw, op.k[1], op.s[1], op.p[1], ow)
                    rows, cols, bh, bw, size_h, size_w = plan_r[rows], plan_c[cols], bh_new, bw_new, oh, ow
                self.steps.append(((bh, bw), rows.copy(), cols.copy()))
                probe = out
        self.final_hw = (size_h, size_w)
        if not self.gap:  # the first linear layer's weights under every final box position, as K×out
            (bh, bw) = self.steps[-1][0] if self.steps else (1, 1)
            weight = self.linear.weight.detach().view(-1, probe.shape[1], size_h, size_w)
            self._box_weights = torch.stack([
                weight[:, :, r : r + bh, cc : cc + bw].reshape(weight.shape[0], -1).T.contiguous()
                for r in range(size_h - bh + 1) for cc in range(size_w - bw + 1)
            ])
        self._receptive = self._receptive_fields()
        self._cache: np.ndarray | None = None

    def _receptive_fields(self) -> np.ndarray:
        """Per input pixel: [row0, row1, col0, col1] (inclusive) of the input region that any of
        its boxes reads (the union over layers of each box's window, mapped back to the input)."""
        c, h, w = self.shape
        pix_r, pix_c = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
        lo_r, hi_r, lo_c, hi_c = pix_r.copy(), pix_r.copy(), pix_c.copy(), pix_c.copy()
        for idx, ((bh, bw), plan_r, plan_c) in enumerate(self.steps):
            r0, r1 = plan_r[pix_r], plan_r[pix_r] + bh - 1
            c0, c1 = plan_c[pix_c], plan_c[pix_c] + bw - 1
            for kind, op in reversed(self.features[: idx + 1]):
                if kind == "spatial":
                    r0, r1 = r0 * op.s[0] - op.p[0], r1 * op.s[0] - op.p[0] + op.k[0] - 1
                    c0, c1 = c0 * op.s[1] - op.p[1], c1 * op.s[1] - op.p[1] + op.k[1] - 1
            lo_r, hi_r = np.minimum(lo_r, r0), np.maximum(hi_r, r1)
            lo_c, hi_c = np.minimum(lo_c, c0), np.maximum(hi_c, c1)
        return np.stack([lo_r, hi_r, lo_c, hi_c], 1)

    def reset(self, x: np.ndarray, mask_value: np.ndarray, target: int) -> None:
        """Start a BackSelect run on the normalised C×H×W image ``x``."""
        self.mask_value = torch.as_tensor(np.asarray(mask_value, dtype=np.float64)).view(-1, 1, 1)
        self.target = int(target)
        self.base = torch.as_tensor(np.asarray(x, dtype=np.float64)).clone()
        self._cache = None
        with _threads(self.threads), torch.inference_mode():
            self._acts = [self.base[None]]
            for kind, op in self.features:
                t = self._acts[-1]
                self._acts.append(op.fn(F.pad(t, (op.p[1], op.p[1], op.p[0], op.p[0]), value=op.pad_value)) if kind == "spatial" else op(t))
            last = self._acts[-1]
            self._base_lin = self.linear(last.mean(dim=(2, 3)) if self.gap else last.flatten(1))

    @torch.inference_mode()
    def base_margin(self) -> float:
        return float(target_margin(self.net(self.base[None]).numpy(), self.target)[0])

    def mask(self, pixel: int) -> None:
        """Mask ``pixel`` in the base image (the step's choice) and update the base activations
        and linear-layer output in place: only the pixel's boxes change (previous step reused)."""
        w = self.shape[2]
        with _threads(self.threads), torch.inference_mode():
            boxes = self._propagate(np.array([pixel]))
            self._base_lin += self._linear_delta(*boxes[-1])
            for act, (rows, cols, bh, bw, patch) in zip(self._acts[1:], boxes):
                r, c = int(rows[0]), int(cols[0])
                act[0, :, r : r + bh, c : c + bw] = patch[0]
        self.base[:, pixel // w, pixel % w] = self.mask_value[:, 0, 0]
        self._acts[0] = self.base[None]

    def _propagate(self, pixels: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]]:
        """Per feature layer, the box (row/col starts, size) and new values when each pixel is masked alone."""
        c, h, w = self.shape
        n = len(pixels)
        pix_r, pix_c = pixels // w, pixels % w
        rows, cols = torch.as_tensor(pix_r), torch.as_tensor(pix_c)
        patch = self.mask_value.expand(c, 1, 1).unsqueeze(0).expand(n, c, 1, 1)
        bh, bw = 1, 1
        ar = torch.arange(n)
        boxes = []
        for (kind, op), ((nbh, nbw), plan_r, plan_c), prev in zip(self.features, self.steps, self._acts[:-1]):
            if kind == "elementwise":
                patch = op(patch)
                boxes.append((rows, cols, bh, bw, patch))
                continue
            out_r, out_c = torch.as_tensor(plan_r[pix_r]), torch.as_tensor(plan_c[pix_c])
            wh, ww = (nbh - 1) * op.s[0] + op.k[0], (nbw - 1) * op.s[1] + op.k[1]
            win_r = out_r[:, None] * op.s[0] + torch.arange(wh)  # padded coordinates
            win_c = out_c[:, None] * op.s[1] + torch.arange(ww)
            padded = F.pad(prev[0], (op.p[1], op.p[1], op.p[0], op.p[0]), value=op.pad_value)
            window = padded[:, win_r[:, :, None], win_c[:, None, :]].permute(1, 0, 2, 3)
            pr = win_r - op.p[0] - rows[:, None]  # row inside the candidate's current box
            pc = win_c - op.p[1] - cols[:, None]
            inside = ((pr >= 0) & (pr < bh))[:, :, None] & ((pc >= 0) & (pc < bw))[:, None, :]
            vals = patch[ar[:, None, None], :, pr.clamp(0, bh - 1)[:, :, None], pc.clamp(0, bw - 1)[:, None, :]]
            window = torch.where(inside[:, None], vals.permute(0, 3, 1, 2), window)
            patch, rows, cols, bh, bw = op.fn(window), out_r, out_c, nbh, nbw
            boxes.append((rows, cols, bh, bw, patch))
        return boxes

    def _linear_delta(self, rows: torch.Tensor, cols: torch.Tensor, bh: int, bw: int, patch: torch.Tensor) -> torch.Tensor:
        """Change of the first linear layer's output from last-layer boxes with new values ``patch``."""
        last = self._acts[-1][0]
        n, (fh, fw) = len(patch), last.shape[-2:]
        base_box = last[:, rows[:, None, None] + torch.arange(bh)[:, None], cols[:, None, None] + torch.arange(bw)].permute(1, 0, 2, 3)
        delta = patch - base_box
        if self.gap:
            return delta.sum(dim=(2, 3)) @ self.linear.weight.T / (fh * fw)
        keys = rows * (fw - bw + 1) + cols
        order = torch.argsort(keys, stable=True)
        uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
        flat = delta.reshape(n, -1)[order]
        out = torch.empty(n, self.linear.out_features, dtype=torch.float64)
        pieces = [torch.mm(part, self._box_weights[key]) for part, key in zip(torch.split(flat, counts.tolist()), uniq.tolist())]
        out[order] = torch.cat(pieces)
        return out

    def scores(self, candidates: np.ndarray, last_masked: int | None) -> np.ndarray:
        """Target margin with each candidate pixel masked (on top of the base);
        only candidates whose receptive field holds ``last_masked`` are recomputed."""
        with _threads(self.threads), torch.inference_mode():
            return self._scores(np.asarray(candidates), last_masked)

    def _scores(self, candidates: np.ndarray, last_masked: int | None) -> np.ndarray:
        c, h, w = self.shape
        if self._cache is None:
            self._cache = np.zeros((h * w, self.linear.out_features))
            todo = np.asarray(candidates)
        else:
            rf = self._receptive[candidates]
            lr, lc = divmod(last_masked, w)
            hit = (rf[:, 0] <= lr) & (lr <= rf[:, 1]) & (rf[:, 2] <= lc) & (lc <= rf[:, 3])
            todo = np.asarray(candidates)[hit]
        for i in range(0, len(todo), self.chunk):
            part = todo[i : i + self.chunk]
            self._cache[part] = self._linear_delta(*self._propagate(part)[-1]).numpy()
        hidden = self._base_lin + torch.as_tensor(self._cache[candidates])
        for fn in self.head:
            hidden = fn(hidden)
        return target_margin(hidden.numpy(), self.target)
