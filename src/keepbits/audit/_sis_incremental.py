"""Incremental BackSelect screening from the traced graph (torch.fx, float32).

One BackSelect step (SIS §3.1) scores every remaining pixel masked on its own. Masking one
pixel changes only a box of every feature map a local op (convolution, pooling) produces,
so each candidate is carried through the graph as *its box*: the rows/columns it can
change and their new values, while everything outside the box is the base image's
activation (one dense forward pass of the base per step). Per node of the traced graph:

* convolutions (any stride, padding, dilation, groups) and max/average pooling: the output
  box covers every output whose window touches the input box; its values are the op run
  without padding on a window gathered from the padded base activation with the candidate's
  input box written in;
* element-wise ops (activations in module, functional or method form, eval BatchNorm,
  dropout, arithmetic with constants): the same box;
* additions, products and channel concatenations of boxed maps (residual connections):
  the box is the union of the operands' boxes;
* flatten / view / reshape to ``(N, C·H·W)``: the box keeps its layout; a linear layer
  after it turns it into a *change* of its output (weights under the box only); a global
  average pool turns it into the change of the pooled vector;
* anything else (and any op whose box would cover its whole output): the boxed operands are
  written into full maps and the op runs densely, for that node and everything after it.

When every change reaches the output through such linear changes (no dense write-out), each
candidate's box values are cached per node and recomputed only where a masked pixel's box
meets what the node reads for that candidate, or its inputs changed.

Candidates of several images run in one batch (``img`` indexes the image of each). The
results are float32 logits, used as a *screen*: :mod:`keepbits.audit.sis` re-scores in
float64 every candidate that float32 rounding could put on top (its ``_winners``), so
the order equals a float64 run. :class:`Unsupported` is raised for models that do not trace
or whose output is not an ``N×K`` tensor (callers use plain forward passes).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from keepbits.audit._sis_torch import float32_copy, max_pool2d

# node kinds: how a batch of candidates is represented at a node
STATIC, META, BOX, FLAT, DELTA, DENSE = "static", "meta", "box", "flat", "delta", "dense"

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                  nn.Hardsigmoid, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.AlphaDropout, nn.Identity)
_CHANNEL_MODULES = (nn.BatchNorm2d, nn.PReLU, nn.Dropout2d)  # per-channel: boxes of 4-D maps only
_UNARY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                    F.hardsigmoid, F.hardtanh, F.softplus, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.dropout,
                    torch.clamp, torch.clip, torch.abs, torch.neg, operator.neg}
_CHANNEL_FUNCTIONS = {F.batch_norm, F.prelu, F.dropout2d}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "abs", "neg", "contiguous", "float"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
                     torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div", "maximum", "minimum"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_MAX_POOLS = (F.max_pool2d, torch.max_pool2d, max_pool2d)
_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul, operator.itruediv: operator.truediv}
#: argument names after the input, in order, of the functional ops read by name
_SIGNATURES = (
    ((F.conv2d, torch.conv2d), ("weight", "bias", "stride", "padding", "dilation", "groups")),
    (_MAX_POOLS, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    ((F.avg_pool2d,), ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")),
    ((F.adaptive_avg_pool2d, F.adaptive_max_pool2d), ("output_size",)),
    ((F.linear, torch._C._nn.linear), ("weight", "bias")),
)
#: cached boxed values of all candidates of all images kept at most (elements), else no cache
CACHE_ELEMENTS = 1 << 26
#: elements of the largest per-chunk tensor (sets the default candidate chunk)
CHUNK_ELEMENTS = 1 << 22


class Unsupported(Exception):
    """The model cannot be screened incrementally (it does not trace, or its output is not N×K)."""


@dataclass
class _Local:
    """A local op run on windows without padding; ``pads`` = (top, bottom, left, right) of the base map."""

    kind: str  # conv | max | avg
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    divisor: int | None = None

    @property
    def pad_value(self) -> float:
        return -float("inf") if self.kind == "max" else 0.0

    def run(self, window: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return F.conv2d(window, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if self.kind == "max":
            return max_pool2d(window, self.kernel, self.stride, 0, self.dilation)
        return F.avg_pool2d(window, self.kernel, self.stride, 0, False, True, self.divisor)


@dataclass
class _Node:
    """Plan of one graph node: its kind and, for boxed nodes, the box of every input pixel."""

    node: Node
    kind: str
    op: str = "generic"  # input | unary | binary | cat | local | collapse | gap | linear | generic
    shape: tuple[int, ...] = ()  # per-sample shape (C, H, W for boxed nodes)
    rows: np.ndarray | None = None  # box start row at this node, per input pixel row
    cols: np.ndarray | None = None
    bh: int = 1
    bw: int = 1
    source: "_Node | None" = None  # the boxed map a flat / delta node reads
    local: _Local | None = None
    scale: float = 1.0  # global pool: 1/(H·W) (mean) or 1 (sum)
    weight: torch.Tensor | None = None  # linear after a flatten: out × C × H × W
    reads: list[tuple[Node, np.ndarray, int, np.ndarray, int]] = field(default_factory=list)  # base regions read: (node, rows, bh, cols, bw)
    gathers: dict[Node, "_Gather"] = field(default_factory=dict)  # base windows / boxes read, per operand
    writes: dict[Node, "_Write"] = field(default_factory=dict)  # where an operand's box goes in that window
    t: dict[str, torch.Tensor] = field(default_factory=dict)  # device index tables (rows, cols)


@dataclass
class _Map:
    """A node's base map, padded, as rows of C values (NHWC order, B·Hp·Wp rows), rebuilt every step."""

    node: Node
    shape: tuple[int, int, int]  # C, H, W (flat nodes: of their box layout)
    pads: tuple[int, int, int, int]
    value: float

    @property
    def size(self) -> tuple[int, int]:
        c, h, w = self.shape
        t, b, l, r = self.pads
        return h + t + b, w + l + r


@dataclass
class _Gather:
    """Which ``kh×kw`` window of a map each candidate reads: its row offsets (in map rows of
    width Wp) and columns, by input pixel row / column."""

    key: tuple
    rows: torch.Tensor  # input pixel row -> kh window rows × Wp
    cols: torch.Tensor  # input pixel column -> kw window columns


@dataclass
class _Write:
    """Where a candidate's box (``bh×bw``) goes inside a ``lh×lw`` window: window row / column per box row / column."""

    rows: torch.Tensor  # input pixel row -> bh window rows
    cols: torch.Tensor  # input pixel column -> bw window columns
    lh: int
    lw: int
    inside: bool  # every box cell lands inside the window


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return int(v), int(v)


def _local_box(start: np.ndarray, size: int, local: _Local, dim: int, out: int) -> tuple[np.ndarray, int]:
    """Output box (start per input pixel, fixed size) of every output whose window meets the input box."""
    k, s, d, lo = local.kernel[dim], local.stride[dim], local.dilation[dim], local.pads[2 * dim]
    first = np.maximum(0, -((-(start + lo - d * (k - 1))) // s))
    last = np.minimum(out - 1, (start + size - 1 + lo) // s)
    b = int(min(out, max(1, int((last - first + 1).max()))))
    return np.clip(np.minimum(first, out - b), 0, None), b


def _union_box(parts: list[tuple[np.ndarray, int]], out: int) -> tuple[np.ndarray, int]:
    first = np.min([s for s, _ in parts], axis=0)
    last = np.max([s + b - 1 for s, b in parts], axis=0)
    b = int(min(out, int((last - first + 1).max())))
    return np.clip(np.minimum(first, out - b), 0, None), b


def _fix_inplace(gm: GraphModule) -> None:
    """Make every op out-of-place (the base activations of every node are kept)."""
    for m in gm.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    for n in gm.graph.nodes:
        if n.op == "call_function":
            if n.target in _INPLACE:
                n.target = _INPLACE[n.target]
            name = getattr(n.target, "__name__", "")
            if name.endswith("_") and not name.startswith("_"):
                for owner in (torch, F):
                    if getattr(owner, name, None) is n.target and hasattr(owner, name[:-1]):
                        n.target = getattr(owner, name[:-1])
            if n.kwargs.get("inplace"):
                n.kwargs = {**n.kwargs, "inplace": False}
        elif n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_"):
            if callable(getattr(torch.Tensor, n.target[:-1], None)):
                n.target = n.target[:-1]
    gm.recompile()


def _trace(module: nn.Module) -> GraphModule:
    """Traced float32 eval copy (batch norm folded where possible), every op out of place."""
    gm = float32_copy(module)
    if not isinstance(gm, GraphModule):
        try:
            gm = torch.fx.symbolic_trace(gm)
        except Exception as exc:  # data-dependent control flow and the like
            raise Unsupported(f"cannot trace the model ({str(exc).splitlines()[0]})") from None
    _fix_inplace(gm)
    return gm.eval()


class GraphScreen:
    """Float32 logits of "base image with one more pixel masked", for batches of candidates of
    several images, evaluated incrementally on the traced graph (see the module docstring).

    ``reset(x, mask_value)`` takes the B normalised base images; ``logits(img, pix)`` the
    candidates (image index, pixel index ``row * W + col``); ``mask(img, pix)`` masks one
    pixel in each listed image (the step's choice).

    Example:
        >>> import numpy as np, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        >>> screen = GraphScreen(net, (1, 8, 8))
        >>> x = np.random.default_rng(0).normal(size=(1, 1, 8, 8))
        >>> screen.reset(x, np.zeros(1))
        >>> masked = x.copy(); masked[0, 0, 2, 5] = 0.0
        >>> dense = net(torch.as_tensor(masked, dtype=torch.float32)).detach().numpy()
        >>> bool(np.allclose(screen.logits(np.array([0]), np.array([21])), dense, atol=1e-5))
        True
    """

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int], device: Any = None, chunk: int | None = None):
        self.device = torch.device(device or "cpu")
        self.gm = _trace(module).to(self.device)
        self.modules = dict(self.gm.named_modules())
        self.shape = tuple(int(v) for v in input_shape)
        self._plan()
        self.chunk = chunk or self._default_chunk()
        self._check()

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        c, h, w = self.shape
        nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.input = placeholders[0]
        example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)
        with torch.inference_mode():
            values = self._forward(example)
        self._example = values
        self.plan: dict[Node, _Node] = {}
        for n in nodes:
            if n.op == "output":
                continue
            self.plan[n] = self._classify(n, values)
        out = nodes[-1].args[0]
        if not isinstance(out, Node) or self.plan[out].kind not in (DENSE, DELTA) or values[out].dim() != 2:
            raise Unsupported("the model output is not one N×K tensor depending on the input")
        self.output = out
        self.static = {n: values[n] for n, p in self.plan.items() if p.kind == STATIC}
        self.deltas = [p for p in self.plan.values() if p.kind == DELTA]
        # caching needs every change to reach the output through a linear change (no dense write-out of a box)
        self.cacheable = bool(self.deltas) and not any(
            p.kind == DENSE and any(self.plan[a].kind in (BOX, FLAT) for a in p.node.all_input_nodes) for p in self.plan.values())
        self.local_nodes = sum(p.op == "local" for p in self.plan.values())
        self._overlap_tables()
        self._index_tables(values)

    def _classify(self, n: Node, values: dict[Node, Any]) -> _Node:
        c, h, w = self.shape
        value = values[n]
        deps = [self.plan[a] for a in n.all_input_nodes]
        if n.op == "placeholder":
            if n is self.input:
                return _Node(n, BOX, "input", (c, h, w), np.arange(h), np.arange(w), 1, 1)
            return _Node(n, STATIC)
        if not any(d.kind != STATIC for d in deps):
            return _Node(n, STATIC)
        if not isinstance(value, torch.Tensor):
            has_tensor = isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
            return _Node(n, DENSE if has_tensor else META)
        shape = tuple(value.shape[1:])
        dense = _Node(n, DENSE, shape=shape)
        if any(d.kind in (DENSE, DELTA) for d in deps):
            return dense
        boxed = [d for d in deps if d.kind in (BOX, FLAT)]
        target, module = n.target, self.modules.get(n.target) if n.op == "call_module" else None
        first = n.args[0] if n.args and isinstance(n.args[0], Node) else None
        src = self.plan.get(first) if first is not None else None
        # element-wise ops of one boxed operand
        if src is not None and len(boxed) == 1 and boxed[0] is src and tuple(values[first].shape[1:]) == shape:
            per_channel = (isinstance(module, _CHANNEL_MODULES) or (n.op == "call_function" and target in _CHANNEL_FUNCTIONS))
            unary = (isinstance(module, _UNARY_MODULES) or (n.op == "call_function" and target in _UNARY_FUNCTIONS)
                     or (n.op == "call_method" and target in _UNARY_METHODS))
            if (unary or (per_channel and src.kind == BOX)) and self._static_args(n, first):
                return self._same_box(n, src, "unary", shape)
        if n.op in ("call_function", "call_method") and (target in _BINARY_FUNCTIONS or target in _BINARY_METHODS):
            return self._binary(n, values, shape) or dense
        if n.op == "call_function" and target in _CAT_FUNCTIONS:
            return self._cat(n, values, shape) or dense
        if src is None or src.kind not in (BOX, FLAT) or len(boxed) != 1:
            return dense
        if src.kind == BOX:
            local = self._local(n, module, values[first], value)
            if local is not None:
                return self._local_node(n, src, local, shape) or dense
            scale = self._global_pool(n, module, values[first], value)
            if scale is not None:
                node = _Node(n, DELTA, "gap", shape, source=src, scale=scale)
                node.reads.append((src.node, src.rows, src.bh, src.cols, src.bw))
                return node
            if value.dim() == 2 and shape[0] == int(np.prod(src.shape)) and self._is_reshape(n, module):
                return self._same_box(n, src, "collapse", shape, FLAT)
        elif self._linear_weight(n, module) is not None:
            weight = self._linear_weight(n, module)
            box = src.source
            node = _Node(n, DELTA, "linear", shape, source=box, weight=weight.view(weight.shape[0], *box.shape))
            node.reads.append((first, box.rows, box.bh, box.cols, box.bw))
            return node
        return dense

    def _static_args(self, n: Node, first: Node) -> bool:
        others = [a for a in n.all_input_nodes if a is not first]
        return all(self.plan[a].kind == STATIC for a in others)

    def _same_box(self, n: Node, src: _Node, op: str, shape: tuple[int, ...], kind: str | None = None) -> _Node:
        root = src.source if src.kind == FLAT else src
        return _Node(n, kind or src.kind, op, shape, src.rows, src.cols, src.bh, src.bw, source=root if (kind or src.kind) == FLAT else None)

    def _binary(self, n: Node, values: dict[Node, Any], shape: tuple[int, ...]) -> _Node | None:
        operands = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, Node)]
        boxes = [self.plan[a] for a in operands if self.plan[a].kind == BOX]
        if len(boxes) != len([a for a in operands if self.plan[a].kind != STATIC]) or not boxes:
            return None
        if any(b.shape != shape for b in boxes) or len(shape) != 3:
            return None
        for a in operands:
            if self.plan[a].kind == STATIC and not self._broadcastable(values[a], shape):
                return None
        return self._union(n, boxes, shape, "binary")

    def _cat(self, n: Node, values: dict[Node, Any], shape: tuple[int, ...]) -> _Node | None:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or dim not in (1, -3) or len(shape) != 3:
            return None
        parts = [self.plan[a] for a in tensors if isinstance(a, Node)]
        if len(parts) != len(tensors) or any(p.kind not in (BOX, STATIC) for p in parts):
            return None
        if any(p.kind == STATIC and tuple(values[p.node].shape[2:]) != shape[1:] for p in parts):
            return None
        return self._union(n, [p for p in parts if p.kind == BOX], shape, "cat")

    def _union(self, n: Node, boxes: list[_Node], shape: tuple[int, ...], op: str) -> _Node:
        rows, bh = _union_box([(b.rows, b.bh) for b in boxes], shape[1])
        cols, bw = _union_box([(b.cols, b.bw) for b in boxes], shape[2])
        if bh == shape[1] and bw == shape[2]:
            return _Node(n, DENSE, shape=shape)
        node = _Node(n, BOX, op, shape, rows, cols, bh, bw)
        node.reads = [(b.node, rows, bh, cols, bw) for b in boxes if not self._same_geometry(b, node)]
        return node

    @staticmethod
    def _broadcastable(value: Any, shape: tuple[int, ...]) -> bool:
        if not isinstance(value, torch.Tensor):
            return True
        s = tuple(value.shape)
        if value.dim() <= 4 and (len(s) < 2 or s[-2:] == (1, 1)):
            return value.dim() < 4 or s[0] == 1
        return value.dim() == 4 and s[0] == 1 and s[2:] == shape[1:]

    def _local(self, n: Node, module: Any, x: torch.Tensor, y: torch.Tensor) -> _Local | None:
        """The node as a local op of its (4-D) first argument, or None."""
        if x.dim() != 4 or y.dim() != 4:
            return None
        kw = self._kwargs(n)
        if kw is None:
            return None
        target = module if module is not None else n.target
        hw = tuple(x.shape[2:])
        if isinstance(target, nn.Conv2d) or target in (F.conv2d, torch.conv2d):
            if isinstance(target, nn.Conv2d):
                if target.padding_mode != "zeros":
                    return None
                weight, bias = target.weight, target.bias
                stride, padding, dilation, groups = target.stride, target.padding, target.dilation, target.groups
            else:
                weight, bias = kw.get("weight"), kw.get("bias")
                if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
                    return None
                stride, padding, dilation, groups = kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1)
            k, d = tuple(weight.shape[2:]), _pair(dilation)
            if isinstance(padding, str):
                pads = [0, 0, 0, 0]
                if padding == "same":
                    for i in range(2):
                        total = d[i] * (k[i] - 1)
                        pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
                pads = tuple(pads)
            else:
                p = _pair(padding)
                pads = (p[0], p[0], p[1], p[1])
            local = _Local("conv", k, _pair(stride), d, pads, weight.detach(), None if bias is None else bias.detach(), int(groups))
        elif isinstance(target, (nn.MaxPool2d, nn.AvgPool2d)) or target in (*_MAX_POOLS, F.avg_pool2d):
            is_max = isinstance(target, nn.MaxPool2d) or target in _MAX_POOLS
            get = (lambda key, default: getattr(target, key, default)) if isinstance(target, nn.Module) else kw.get
            if get("return_indices", False):
                return None
            k = _pair(get("kernel_size", None))
            stride = get("stride", None)
            s = _pair(stride) if stride not in (None, [], ()) else k
            p = _pair(get("padding", 0))
            d = _pair(get("dilation", 1)) if is_max else (1, 1)
            local = _Local("max" if is_max else "avg", k, s, d, (p[0], p[0], p[1], p[1]))
            if not is_max:
                if get("ceil_mode", False) or (p != (0, 0) and not get("count_include_pad", True)):
                    local = None  # edge windows divide by fewer than k·k
                else:
                    local.divisor = get("divisor_override", None)
            if local is None or y.shape[2:] == (1, 1) and not is_max:
                return None
        elif isinstance(target, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            out = tuple(y.shape[2:])
            if out == (1, 1) and (isinstance(target, nn.AdaptiveAvgPool2d) or target is F.adaptive_avg_pool2d):
                return None  # a global average pool (see _global_pool)
            if hw[0] % out[0] or hw[1] % out[1]:
                return None
            k = (hw[0] // out[0], hw[1] // out[1])
            is_max = isinstance(target, nn.AdaptiveMaxPool2d) or target is F.adaptive_max_pool2d
            local = _Local("max" if is_max else "avg", k, k, (1, 1), (0, 0, 0, 0))
        else:
            return None
        # bottom/right pads up to the windows of the last outputs (ceil mode)
        oh, ow = y.shape[2:]
        t, b, l, r = local.pads
        need_h = (oh - 1) * local.stride[0] + local.dilation[0] * (local.kernel[0] - 1) + 1 - (hw[0] + t + b)
        need_w = (ow - 1) * local.stride[1] + local.dilation[1] * (local.kernel[1] - 1) + 1 - (hw[1] + l + r)
        local.pads = (t, b + max(0, need_h), l, r + max(0, need_w))
        if local.kind != "max" and (need_h > 0 or need_w > 0):
            return None
        return local

    def _kwargs(self, n: Node) -> dict[str, Any] | None:
        """Arguments after the input of a functional local op / linear layer, by name (static values), or None."""
        if n.op == "call_module":
            return {}
        names = next((v for k, v in _SIGNATURES if n.op == "call_function" and n.target in k), None)
        if names is None or len(n.args) - 1 > len(names):
            return None
        bound = dict(zip(names, n.args[1:]), **{k: v for k, v in n.kwargs.items() if k != "input"})
        return {k: (self._static_value(v) if isinstance(v, Node) else v) for k, v in bound.items()}

    def _static_value(self, n: Node) -> Any:
        """Value of a node that does not depend on the input (parameters, constants)."""
        p = self.plan.get(n)
        if p is None or p.kind != STATIC:
            return None
        return self._example[n]

    def _local_node(self, n: Node, src: _Node, local: _Local, shape: tuple[int, ...]) -> _Node | None:
        rows, bh = _local_box(src.rows, src.bh, local, 0, shape[1])
        cols, bw = _local_box(src.cols, src.bw, local, 1, shape[2])
        if bh == shape[1] and bw == shape[2]:
            return None  # the change covers the whole map: dense from here
        lh, lw = self._window(local, bh, bw)
        t, _, l, _ = local.pads
        node = _Node(n, BOX, "local", shape, rows, cols, bh, bw, source=src, local=local)
        node.reads.append((src.node, rows * local.stride[0] - t, lh, cols * local.stride[1] - l, lw))  # the window
        return node

    @staticmethod
    def _window(local: _Local, bh: int, bw: int) -> tuple[int, int]:
        return ((bh - 1) * local.stride[0] + local.dilation[0] * (local.kernel[0] - 1) + 1,
                (bw - 1) * local.stride[1] + local.dilation[1] * (local.kernel[1] - 1) + 1)

    def _global_pool(self, n: Node, module: Any, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """1/(H·W) for a global average pool (any spelling), 1 for a spatial sum, else None."""
        if x.dim() != 4 or y.numel() != x.shape[0] * x.shape[1]:
            return None
        h, w = x.shape[2:]
        target = module if module is not None else n.target
        if isinstance(target, nn.AdaptiveAvgPool2d) or target is F.adaptive_avg_pool2d:
            return 1.0 / (h * w)
        if isinstance(target, nn.AvgPool2d) or target in (F.avg_pool2d,):
            kw = vars(target) if isinstance(target, nn.Module) else (self._kwargs(n) or {"padding": 1})
            whole = _pair(kw.get("kernel_size", 0)) == (h, w) and _pair(kw.get("padding", 0)) == (0, 0)
            return 1.0 / (h * w) if whole and not kw.get("divisor_override") else None
        if (n.op == "call_method" and target in ("mean", "sum")) or (n.op == "call_function" and target in (torch.mean, torch.sum)):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            if {int(d) % 4 for d in dims if isinstance(d, int)} == {2, 3} and len(dims) == 2:
                return 1.0 / (h * w) if target in ("mean", torch.mean) else 1.0
        return None

    def _is_reshape(self, n: Node, module: Any) -> bool:
        if isinstance(module, nn.Flatten):
            return True
        if n.op == "call_function":
            return n.target in (torch.flatten, torch.reshape)
        return n.op == "call_method" and n.target in ("flatten", "view", "reshape")

    def _linear_weight(self, n: Node, module: Any) -> torch.Tensor | None:
        if isinstance(module, nn.Linear):
            return module.weight.detach()
        if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear) and len(n.all_input_nodes) >= 2:
            kw = self._kwargs(n) or {}
            weight = kw.get("weight")
            return weight.detach() if isinstance(weight, torch.Tensor) else None
        return None

    def _index_tables(self, values: dict[Node, Any]) -> None:
        """Device tables: box starts, the base windows each op gathers and where boxes go in them."""
        dev = self.device
        self.maps: dict[tuple, _Map] = {}

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64, device=dev)

        def gather(node: Node, shape: tuple[int, int, int], kh: int, kw: int, sh: int, sw: int, pads: tuple[int, int, int, int],
                   value: float, pos_r: np.ndarray, pos_c: np.ndarray) -> _Gather:
            key = (node, pads, value)
            self.maps.setdefault(key, _Map(node, shape, pads, value))
            wp = self.maps[key].size[1]
            return _Gather(key, tensor((pos_r[:, None] * sh + np.arange(kh)) * wp), tensor(pos_c[:, None] * sw + np.arange(kw)))

        def write(box: _Node, rel_r: np.ndarray, rel_c: np.ndarray, lh: int, lw: int) -> _Write:
            rows, cols = rel_r[:, None] + np.arange(box.bh), rel_c[:, None] + np.arange(box.bw)
            inside = bool((rows >= 0).all() and (rows < lh).all() and (cols >= 0).all() and (cols < lw).all())
            return _Write(tensor(rows), tensor(cols), lh, lw, inside)

        for p in self.plan.values():
            if p.rows is not None:
                p.t["rows"], p.t["cols"] = tensor(p.rows), tensor(p.cols)
            if p.op == "local":
                src, local = p.source, p.local
                lh, lw = self._window(local, p.bh, p.bw)
                t, _, l, _ = local.pads
                p.gathers[src.node] = gather(src.node, src.shape, lh, lw, *local.stride, local.pads, local.pad_value, p.rows, p.cols)
                p.writes[src.node] = write(src, src.rows + t - p.rows * local.stride[0], src.cols + l - p.cols * local.stride[1], lh, lw)
            elif p.op in ("binary", "cat"):
                args = p.node.args[0] if p.op == "cat" else (*p.node.args, *p.node.kwargs.values())
                for a in args:
                    q = self.plan.get(a) if isinstance(a, Node) else None
                    if q is not None and q.kind == BOX and not self._same_geometry(q, p):
                        p.gathers[a] = gather(a, q.shape, p.bh, p.bw, 1, 1, (0, 0, 0, 0), 0.0, p.rows, p.cols)
                        p.writes[a] = write(q, q.rows - p.rows, q.cols - p.cols, p.bh, p.bw)
            elif p.op in ("gap", "linear"):
                src = p.source
                arg = p.node.args[0] if p.node.args else p.node.kwargs["input"]
                p.gathers[arg] = gather(arg, src.shape, src.bh, src.bw, 1, 1, (0, 0, 0, 0), 0.0, src.rows, src.cols)
                if p.op == "linear":
                    self._linear_blocks(p)

    @staticmethod
    def _same_geometry(q: _Node, p: _Node) -> bool:
        return q.bh == p.bh and q.bw == p.bw and np.array_equal(q.rows, p.rows) and np.array_equal(q.cols, p.cols)

    def _linear_blocks(self, p: _Node) -> None:
        """Weights of a linear layer after a flatten under every box position, (positions, bh·bw·C, out), NHWC order."""
        src, weight = p.source, p.weight
        c, h, w = src.shape
        nr, nc = h - src.bh + 1, w - src.bw + 1
        blocks = weight.unfold(2, src.bh, 1).unfold(3, src.bw, 1)  # out, C, nr, nc, bh, bw
        p.t["blocks"] = blocks.permute(2, 3, 4, 5, 1, 0).reshape(nr * nc, src.bh * src.bw * c, weight.shape[0]).contiguous()
        p.t["key_r"] = torch.as_tensor(src.rows * nc, device=self.device)
        p.t["key_c"] = torch.as_tensor(src.cols, device=self.device)

    def _overlap_tables(self) -> None:
        """Cached nodes and their segments (a node whose only user is element-wise is computed
        with that user, not cached), the boxed inputs of each segment (flatten resolved), and
        per segment: does masking a pixel in row r (column c) change base values the segment
        reads for a candidate in row r' (column c')? Masking changes each node's base within
        that pixel's box."""
        c, h, w = self.shape
        boxed = [p for p in self.plan.values() if p.kind in (BOX, FLAT, DELTA) and p.op not in ("input", "collapse")]
        inline = {p.node for p in boxed if len(p.node.users) == 1 and p.kind != DELTA
                  and self.plan[next(iter(p.node.users))].op == "unary" and p.node is not self.output}
        self.cached = [p for p in boxed if p.node not in inline]
        self.segments: dict[Node, list[_Node]] = {}
        self.inputs: dict[Node, list[Node]] = {}
        self._ov: dict[Node, tuple[np.ndarray, np.ndarray]] = {}
        for p in self.cached:
            members = [p]
            while members[0].op == "unary" and self._resolve(members[0].node.args[0]) in inline:
                members.insert(0, self.plan[self._resolve(members[0].node.args[0])])
            self.segments[p.node] = members
            inside = {m.node for m in members}
            self.inputs[p.node] = list(dict.fromkeys(self._resolve(a) for m in members for a in m.node.all_input_nodes
                                                     if self.plan[a].kind in (BOX, FLAT) and self._resolve(a) not in inside))
            ov_r, ov_c = [np.zeros((h, h), bool)], [np.zeros((w, w), bool)]
            for a, r0, bh, c0, bw in (r for m in members for r in m.reads):
                q = self.plan[self._resolve(a)]
                ov_r.append((q.rows[:, None] <= r0[None] + bh - 1) & (r0[None] <= q.rows[:, None] + q.bh - 1))
                ov_c.append((q.cols[:, None] <= c0[None] + bw - 1) & (c0[None] <= q.cols[:, None] + q.bw - 1))
            self._ov[p.node] = (np.stack(ov_r), np.stack(ov_c))

    @staticmethod
    def _channels(p: _Node) -> int:
        """Channels of a boxed node's values (a flat node: of the map it came from)."""
        return p.source.shape[0] if p.kind == FLAT else p.shape[0]

    def _resolve(self, a: Node) -> Node:
        """The node whose values a flatten passes on (itself for others)."""
        while self.plan[a].op == "collapse":
            a = a.args[0]
        return a

    def affected(self, rows: np.ndarray, cols: np.ndarray) -> dict[Node, np.ndarray]:
        """Per cached node, which candidates (B × H·W, one row per masked pixel at ``rows``,
        ``cols``) hold values that may change: those it reads for them, or its inputs' changes."""
        out: dict[Node, np.ndarray] = {}
        for p in self.cached:
            ov_r, ov_c = self._ov[p.node]
            hit = (ov_r[:, rows, :][:, :, :, None] & ov_c[:, cols, :][:, :, None, :]).any(0).reshape(len(rows), -1)
            for a in self.inputs[p.node]:
                if a in out:
                    hit |= out[a]
            out[p.node] = hit
        return out

    def _default_chunk(self) -> int:
        per = [int(np.prod(p.shape)) if p.kind in (DENSE, DELTA) else self._channels(p) * p.bh * p.bw
               for p in self.plan.values() if p.kind in (BOX, FLAT, DENSE, DELTA) and p.shape]
        per += [int(g.rows.shape[1] * g.cols.shape[1]) * self.maps[g.key].shape[0] for p in self.plan.values() for g in p.gathers.values()]
        return int(np.clip(CHUNK_ELEMENTS // max(per + [1]), 16, 4096))

    def _check(self) -> None:
        """Compare the incremental logits with dense forward passes on a random image."""
        c, h, w = self.shape
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, c, h, w, generator=gen, dtype=torch.float64).numpy()
        self.reset(x, np.zeros(c))
        pix = np.unique(np.linspace(0, h * w - 1, min(h * w, 9)).astype(np.int64))
        got = self.logits(np.zeros(len(pix), np.int64), pix)
        trials = np.repeat(x, len(pix), 0)
        trials[np.arange(len(pix)), :, pix // w, pix % w] = 0.0
        with torch.inference_mode():
            want = self.gm(torch.as_tensor(trials, dtype=torch.float32, device=self.device)).double().cpu().numpy()
        scale = 1.0 + np.abs(want).max()
        if not np.allclose(got, want, rtol=0, atol=1e-3 * scale):
            raise Unsupported(f"incremental evaluation disagrees with the dense graph by {np.abs(got - want).max():.3g}")

    # ------------------------------------------------------------------ dense evaluation
    def _call(self, n: Node, args: tuple, kwargs: dict) -> Any:
        if n.op == "call_module":
            return self.modules[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            value = self.gm
            for part in n.target.split("."):
                value = getattr(value, part)
            return value
        if n.op == "placeholder":
            return n.args[0] if n.args else None
        raise Unsupported(f"node {n.op} {n.target}")

    def _forward(self, x: torch.Tensor) -> dict[Node, Any]:
        env: dict[Node, Any] = {}
        for n in self.gm.graph.nodes:
            if n.op == "output":
                break
            if n is self.input:
                env[n] = x
                continue
            env[n] = self._call(n, map_arg(n.args, env.__getitem__), map_arg(n.kwargs, env.__getitem__))
        return env

    # ------------------------------------------------------------------ state
    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        """Start BackSelect runs on the B normalised images ``x`` (B×C×H×W)."""
        self.base = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device).clone()
        self.mask_value = torch.as_tensor(np.asarray(mask_value, np.float64), dtype=torch.float32, device=self.device)
        b, (c, h, w) = len(self.base), self.shape
        shapes = {p.node: (p.shape if p.kind == DELTA else (p.bh, p.bw, self._channels(p))) for p in self.cached}  # boxes NHWC
        self.caching = self.cacheable and b * h * w * sum(int(np.prod(v)) for v in shapes.values()) <= CACHE_ELEMENTS
        self.cache = {n: torch.zeros(b * h * w, *shape, device=self.device) for n, shape in shapes.items()} if self.caching else {}
        self.valid = {n: np.zeros((b, h * w), bool) for n in self.cache}
        self._refresh()

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        """Mask pixel ``pix[i]`` of image ``img[i]`` in the bases."""
        w = self.shape[2]
        img, pix = np.asarray(img, np.int64), np.asarray(pix, np.int64)
        self.base[torch.as_tensor(img), :, torch.as_tensor(pix // w), torch.as_tensor(pix % w)] = self.mask_value
        if not self.caching:
            self._refresh()
            return
        known = all(self.valid[p.node][img, pix].all() for p in self.cached)
        if known:  # the chosen pixels' boxes are the new base values there
            with torch.inference_mode():
                self._write_chosen(img, pix)
        for n, hit in self.affected(pix // w, pix % w).items():
            self.valid[n][img] &= ~hit
        if not known:
            self._refresh()

    def _write_chosen(self, img: np.ndarray, pix: np.ndarray) -> None:
        """Update the base activations and padded maps in place from the cached boxes of the
        masked pixels (as candidates they were evaluated on the current bases), then rerun the
        nodes after the boxes (linear changes, head) densely."""
        self._context(img, pix)
        ii, pr, pc = self._ctx
        b, hw = len(self.base), self.shape[1] * self.shape[2]
        rows = torch.as_tensor(img * hw + pix, device=self.device)
        patches = {p.node: self.cache[p.node].index_select(0, rows) for p in self.cached if p.kind != DELTA}
        patches[self.input] = self.mask_value.view(1, 1, 1, -1).expand(len(img), 1, 1, -1)
        for n, patch in patches.items():
            box = self.plan[n].source if self.plan[n].kind == FLAT else self.plan[n]
            r, c = self._box_index(box)
            if n is not self.input:
                base = self.values[n].view(b, *box.shape).permute(0, 2, 3, 1)
                base[ii[:, None, None], r[:, :, None], c[:, None, :]] = patch
        for key, m in self.maps.items():
            box = self.plan[m.node].source if self.plan[m.node].kind == FLAT else self.plan[m.node]
            r, c = self._box_index(box)
            hp, wp = m.size
            index = (ii * (hp * wp))[:, None, None] + ((r + m.pads[0]) * wp)[:, :, None] + (c + m.pads[2])[:, None, :]
            patch = patches[self._resolve(m.node)].expand(len(img), box.bh, box.bw, -1)
            self.rows[key].index_copy_(0, index.view(-1), patch.reshape(-1, m.shape[0]))
        for n in self.gm.graph.nodes:
            if n.op != "output" and (self.plan[n].kind in (DELTA, DENSE, META) or self.plan[n].op == "collapse"):
                self.values[n] = self._call(n, map_arg(n.args, self.values.__getitem__), map_arg(n.kwargs, self.values.__getitem__))

    def _box_index(self, box: _Node) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns of each context candidate's box at a node: N × bh, N × bw."""
        _, pr, pc = self._ctx
        return (box.t["rows"][pr][:, None] + torch.arange(box.bh, device=self.device),
                box.t["cols"][pc][:, None] + torch.arange(box.bw, device=self.device))

    def _refresh(self) -> None:
        """Base activations of every node (one dense pass) and the padded maps the candidates read."""
        with torch.inference_mode():
            self.values = self._forward(self.base)
            self.rows: dict[tuple, torch.Tensor] = {}
            b = len(self.base)
            for key, m in self.maps.items():
                x = self.values[m.node].reshape(b, *m.shape)
                t, bottom, l, r = m.pads
                if t or bottom or l or r:
                    x = F.pad(x, (l, r, t, bottom), value=m.value)
                self.rows[key] = x.permute(0, 2, 3, 1).reshape(-1, m.shape[0])

    def base_logits(self) -> np.ndarray:
        return self.values[self.output].double().cpu().numpy()

    # ------------------------------------------------------------------ candidates
    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        """Float32 logits (as float64 numpy) of image ``img[i]`` with pixel ``pix[i]`` masked on top of its base."""
        img, pix = np.asarray(img, np.int64), np.asarray(pix, np.int64)
        out = []
        with torch.inference_mode():
            if self.caching:
                self._update_cache(img, pix)
            step = max(self.chunk, 4096) if self.caching else self.chunk
            for i in range(0, len(img), step):
                out.append(self._candidates(img[i : i + step], pix[i : i + step]).double().cpu().numpy())
        k = int(self.values[self.output].shape[1])
        return np.concatenate(out) if out else np.zeros((0, k))

    def _update_cache(self, img: np.ndarray, pix: np.ndarray) -> None:
        """Recompute, node by node, the cached values that masked pixels made stale."""
        hw = self.shape[1] * self.shape[2]
        for p in self.cached:
            stale = np.flatnonzero(~self.valid[p.node][img, pix])
            for i in range(0, len(stale), self.chunk):
                part = stale[i : i + self.chunk]
                self._context(img[part], pix[part])
                rows = torch.as_tensor(img[part] * hw + pix[part], device=self.device)
                env = {a: self._cached(a, rows) for a in self.inputs[p.node]}
                for member in self.segments[p.node]:
                    env[member.node] = self._compute(member, env)
                values = env[p.node]
                self.cache[p.node].index_copy_(0, rows, values if p.kind == DELTA else values.permute(0, 2, 3, 1))
            self.valid[p.node][img[stale], pix[stale]] = True

    def _cached(self, a: Node, rows: torch.Tensor) -> torch.Tensor:
        if self.plan[a].op == "input":
            return self.mask_value.view(1, -1, 1, 1).expand(len(rows), -1, 1, 1)
        return self.cache[a].index_select(0, rows).permute(0, 3, 1, 2)

    def _candidates(self, img: np.ndarray, pix: np.ndarray) -> torch.Tensor:
        if self.caching:
            rows = torch.as_tensor(img * (self.shape[1] * self.shape[2]) + pix, device=self.device)
            env = self._dense(img, {p.node: self.cache[p.node].index_select(0, rows) for p in self.deltas})
        else:
            env = self._dense(img, self._boxes(img, pix))
        if self.plan[self.output].kind == DENSE:
            return env[self.output]
        return self.values[self.output][torch.as_tensor(img, device=self.device)] + env[self.output]

    def _context(self, img: np.ndarray, pix: np.ndarray) -> None:
        w, dev = self.shape[2], self.device
        self._ctx = (torch.as_tensor(img, device=dev), torch.as_tensor(pix // w, device=dev), torch.as_tensor(pix % w, device=dev))

    def _boxes(self, img: np.ndarray, pix: np.ndarray) -> dict[Node, Any]:
        """Boxed values (N×C×bh×bw) and linear changes of the candidates, every node."""
        self._context(img, pix)
        env: dict[Node, Any] = {}
        for p in self.plan.values():
            if p.op == "input":
                env[p.node] = self.mask_value.view(1, -1, 1, 1).expand(len(img), -1, 1, 1)
            elif p.op == "collapse":
                env[p.node] = env[p.node.args[0]]
            elif p.kind in (BOX, FLAT, DELTA):
                env[p.node] = self._compute(p, env)
        return env

    def _compute(self, p: _Node, env: dict[Node, Any]) -> torch.Tensor:
        """Values of node ``p`` for the candidates in the context, from its inputs' values in ``env``."""
        n = p.node
        n_cand = len(self._ctx[0])
        if p.op == "unary":
            arg = self._resolve(n.args[0])
            return self._call(n, (env[arg], *map_arg(n.args[1:], self.static.__getitem__)), map_arg(n.kwargs, self.static.__getitem__))
        if p.op == "local":
            window = self._window_with(p, p.source.node, env)
            return p.local.run(window.permute(0, 3, 1, 2))
        if p.op in ("binary", "cat"):
            return self._run_union(p, env)
        arg = n.args[0] if n.args else n.kwargs["input"]
        box = p.source
        delta = (env[self._resolve(arg)].reshape(n_cand, box.shape[0], box.bh, box.bw).permute(0, 2, 3, 1)
                 - self._gather(p.gathers[arg]))  # N × bh × bw × C
        if p.op == "gap":
            return (delta.sum((1, 2)) * p.scale).view(n_cand, *p.shape)
        return self._linear(p, delta.reshape(n_cand, -1))

    def _gather(self, g: _Gather) -> torch.Tensor:
        """Base windows of the candidates, N × kh × kw × C."""
        ii, pr, pc = self._ctx
        m = self.maps[g.key]
        hp, wp = m.size
        rows, cols = g.rows[pr], g.cols[pc]
        index = (ii * (hp * wp))[:, None, None] + rows[:, :, None] + cols[:, None, :]
        return self.rows[g.key].index_select(0, index.view(-1)).view(len(ii), rows.shape[1], cols.shape[1], m.shape[0])

    def _window_with(self, p: _Node, a: Node, env: dict) -> torch.Tensor:
        """The base window operand ``a`` of node ``p`` reads, with the candidates' boxes of ``a`` written in (N × lh × lw × C)."""
        _, pr, pc = self._ctx
        window = self._gather(p.gathers[a])
        wr = p.writes[a]
        n, c = len(window), window.shape[3]
        rows, cols = wr.rows[pr], wr.cols[pc]
        bh, bw = rows.shape[1], cols.shape[1]
        values = env[a].permute(0, 2, 3, 1).expand(n, bh, bw, c).reshape(n * bh * bw, c)
        index = (torch.arange(n, device=self.device)[:, None, None] * (wr.lh * wr.lw) + rows[:, :, None] * wr.lw + cols[:, None, :])
        index = index.view(-1)
        if not wr.inside:
            ok = (((rows >= 0) & (rows < wr.lh))[:, :, None] & ((cols >= 0) & (cols < wr.lw))[:, None, :]).view(-1)
            index, values = index[ok], values[ok]
        window.view(n * wr.lh * wr.lw, c).index_copy_(0, index, values)
        return window

    def _run_union(self, p: _Node, env: dict) -> torch.Tensor:
        n = p.node

        def operand(a: Any) -> Any:
            if not isinstance(a, Node):
                return a
            q = self.plan[a]
            if q.kind == STATIC:
                value = self.static[a]
                if isinstance(value, torch.Tensor) and value.dim() == 4 and tuple(value.shape[2:]) == p.shape[1:] and p.shape[1:] != (1, 1):
                    _, pr, pc = self._ctx
                    rows = p.t["rows"][pr][:, None] + torch.arange(p.bh, device=self.device)
                    cols = p.t["cols"][pc][:, None] + torch.arange(p.bw, device=self.device)
                    return value[0][:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
                return value
            if a not in p.gathers:
                return env[a]
            return self._window_with(p, a, env).permute(0, 3, 1, 2)

        if p.op == "cat":
            return torch.cat([operand(a) for a in n.args[0]], 1)
        return self._call(n, tuple(operand(a) for a in n.args), {k: operand(v) for k, v in n.kwargs.items()})

    def _linear(self, p: _Node, delta: torch.Tensor) -> torch.Tensor:
        """Change of a linear layer's output from box changes ``delta`` (N × bh·bw·C, NHWC
        order): one matrix product per box position (measured faster than gathering weights per candidate)."""
        _, pr, pc = self._ctx
        key = p.t["key_r"][pr] + p.t["key_c"][pc]
        blocks = p.t["blocks"]
        order = torch.argsort(key, stable=True)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        out = torch.empty(len(delta), blocks.shape[2], device=self.device, dtype=delta.dtype)
        out[order] = torch.cat([part @ blocks[k] for part, k in zip(torch.split(delta[order], counts.tolist()), keys.tolist())])
        return out

    def _dense(self, img: np.ndarray, env: dict) -> dict:
        """Evaluate the dense part of the graph (after the boxes) for the candidates in ``env``."""
        ii = torch.as_tensor(img, device=self.device)
        n_cand = len(img)
        meta: dict[Node, Any] = {}

        def value(a: Node) -> Any:
            q = self.plan[a]
            if q.kind == STATIC:
                return self.static[a]
            if q.kind == DENSE:
                return env[a]
            if q.kind == DELTA:
                return self.values[a][ii] + env[a]
            if q.kind == META:
                if a not in meta:
                    meta[a] = self._call(a, map_arg(a.args, meta_value), map_arg(a.kwargs, meta_value))
                return meta[a]
            return self._materialize(q, env[a])

        def meta_value(a: Node) -> Any:
            q = self.plan[a]
            if q.kind in (STATIC, META):
                return value(a)
            base = self.values[a]
            return torch.empty((n_cand, *base.shape[1:]), device="meta", dtype=base.dtype)

        for p in self.plan.values():
            if p.kind == DENSE:
                n = p.node
                env[n] = self._call(n, map_arg(n.args, value), map_arg(n.kwargs, value))
        return env

    def _materialize(self, q: _Node, patch: torch.Tensor) -> torch.Tensor:
        """Full maps of a boxed node for the candidates (base with each box written in)."""
        ii, pr, pc = self._ctx
        box = q.source if q.kind == FLAT else q
        c, h, w = box.shape
        n = len(ii)
        full = self.values[q.node][ii].reshape(n, c, h, w).clone()
        rows = box.t["rows"][pr][:, None] + torch.arange(box.bh, device=self.device)
        cols = box.t["cols"][pc][:, None] + torch.arange(box.bw, device=self.device)
        full.permute(0, 2, 3, 1)[torch.arange(n, device=self.device)[:, None, None], rows[:, :, None], cols[:, None, :]] = \
            patch.reshape(n, c, box.bh, box.bw).permute(0, 2, 3, 1)
        return full.reshape(n, *q.shape)
