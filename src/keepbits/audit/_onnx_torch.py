"""ONNX classifier graphs as torch modules, so BackSelect (SIS §3.1) screens ONNX models with
the incremental evaluator and re-scores them in float64 by torch.

:func:`onnx_module` turns the graph of a plain ``.onnx`` classifier or of a keepbits bundle into
a :class:`OnnxModule` that takes the graph's input as float N×C×H×W (NHWC graphs are fed
through one permute, which cancels against the graph's own transpose), with every op spelled as
torch spells it (``F.conv2d``, ``F.max_pool2d``, ``torch.flatten``, ``operator.add`` …), so
:class:`keepbits.audit._sis_incremental.GraphScreen` recognises the local ops. Shape arithmetic
(``Shape``/``Gather``/``Concat``/``Slice`` chains of exporters) is folded at conversion: the graph
is interpreted for two batch sizes, values that do not depend on the input's pixels become
constants, and a reshape that keeps the batch axis becomes ``reshape(-1, …)``.

Only operators with a faithful torch twin convert; any other raises :class:`NotConvertible`
(callers then run the graph with ONNX Runtime). Callers also check the converted module's
logits against ONNX Runtime before using it (:class:`keepbits.audit.sis` does).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: elements of a folded constant kept at most (bounds the work a hostile graph can ask for)
MAX_CONSTANT_ELEMENTS = 1 << 24

_FLOAT = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
_TYPES = {**_FLOAT, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool}
_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
           "Max": torch.maximum, "Min": torch.minimum, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt}
_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Abs": torch.abs, "Neg": operator.neg,
          "Softplus": F.softplus, "HardSwish": F.hardswish, "Floor": torch.floor, "Ceil": torch.ceil,
          "Sqrt": torch.sqrt, "Exp": torch.exp}


class NotConvertible(Exception):
    """The ONNX graph uses something without a faithful torch twin here."""


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(value: Any) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def _pads2d(attrs: dict[str, Any], in_hw: tuple[int, int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX 2-D pads (top, left, bottom, right), ``auto_pad`` resolved for the known map size."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return _ints(attrs.get("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        total = max(0, (-(-size // s) - 1) * s + d * (k - 1) + 1 - size)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _padded(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """(input, symmetric torch padding): asymmetric ONNX pads are applied by ``F.pad`` first."""
    t, l, b, r = pads
    if t == b and l == r:
        return x, (t, l)
    return F.pad(x, (l, r, t, b), value=value), (0, 0)


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module (see the module docstring); build with :func:`onnx_module`.

    ``forward`` takes the graph's input as float N×C×H×W and returns its classifier output."""

    def __init__(self, steps: list[tuple[Callable, list[str], list[str]]], constants: dict[str, torch.Tensor], source: str,
                 output: str, nhwc: bool):
        super().__init__()
        self.steps, self.source, self.output, self.nhwc = steps, source, output, nhwc
        self.names = {}
        for i, (name, value) in enumerate(constants.items()):
            self.names[name] = f"c{i}"
            self.register_buffer(f"c{i}", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.source: x.permute(0, 2, 3, 1) if self.nhwc else x}
        for name, attr in self.names.items():
            env[name] = getattr(self, attr)
        for fn, inputs, outputs in self.steps:
            result = fn(*[env[i] if i else None for i in inputs])
            for o, v in zip(outputs, result if isinstance(result, tuple) else (result,)):
                env[o] = v
        return env[self.output]


class _Converter:
    """Interprets the graph on example inputs to split constants from pixel-dependent values
    and builds the torch steps of the pixel-dependent ones."""

    def __init__(self, model: Any, input_name: str, output: str, input_shape: tuple[int, int, int], nhwc: bool):
        from onnx import numpy_helper

        graph = model.graph
        self.graph, self.input, self.output, self.nhwc = graph, input_name, output, nhwc
        self.shape = tuple(int(v) for v in input_shape)
        self.initializers: dict[str, torch.Tensor] = {}
        for t in graph.initializer:
            self.initializers[t.name] = self._tensor(numpy_helper.to_array(t))
        opsets = {o.domain: o.version for o in model.opset_import}
        self.opset = opsets.get("", opsets.get("ai.onnx", 13))
        if set(opsets) - {"", "ai.onnx"} and any(n.domain not in ("", "ai.onnx") for n in graph.node):
            raise NotConvertible("custom-domain operators")

    @staticmethod
    def _tensor(array: np.ndarray) -> torch.Tensor:
        if array.size > MAX_CONSTANT_ELEMENTS:
            raise NotConvertible(f"a constant of {array.size} elements")
        return torch.from_numpy(np.array(array))

    def run(self, batch: int) -> tuple[dict[str, Any], set[str]]:
        """Values of every graph value for a random input of ``batch`` images, and the names of the pixel-dependent ones."""
        c, h, w = self.shape
        x = torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(batch)) * 255
        env: dict[str, Any] = {self.input: x.permute(0, 2, 3, 1) if self.nhwc else x, **self.initializers}
        dynamic = {self.input}
        self.steps: list[tuple[Callable, list[str], list[str]]] = []
        self.captured: list[Any] = []  # constant operands the steps hold as Python values (compared across batch sizes)
        self.unmerged: list[tuple[str, tuple[int, ...]]] = []  # batch-merged values made per-image again, and their shape
        merged: dict[str, str] = {}  # values that hold a whole batch in one axis -> the per-image value they were made from
        for node in self.graph.node:
            if any(i in merged for i in node.input if i):
                self._follow_merged(node, env, dynamic, merged)
                continue
            if node.op_type == "Reshape" and node.input[0] in dynamic and self._merges_batch(node, env):
                x = env[node.input[0]]
                env[node.output[0]] = x.reshape(_reshape_target(x, env[node.input[1]], int(_attrs(node).get("allowzero", 0))))
                dynamic.add(node.output[0])
                merged[node.output[0]] = node.input[0]
                continue
            try:
                fn = self._op(node, env, dynamic)
                fn, inputs = fn if isinstance(fn, tuple) else (fn, list(node.input))
                result = fn(*[env[i] if i else None for i in inputs])
            except NotConvertible:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed graph fails in many ways; it then has no twin
                raise NotConvertible(f"{node.op_type} node {node.name!r} does not run ({str(exc).splitlines()[0][:200]})") from None
            outputs = list(node.output)
            values = result if isinstance(result, tuple) else (result,)
            is_dynamic = node.op_type != "Shape" and any(i in dynamic for i in inputs if i)  # a shape is known at conversion
            for o, v in zip(outputs, values):
                if isinstance(v, torch.Tensor) and not is_dynamic and v.numel() > MAX_CONSTANT_ELEMENTS:
                    raise NotConvertible(f"{node.op_type} makes a constant of {v.numel()} elements")
                env[o] = v
                if is_dynamic:
                    dynamic.add(o)
            if is_dynamic:
                self.steps.append((fn, inputs, outputs[: len(values)]))
        return env, dynamic

    def _merges_batch(self, node: Any, env: dict) -> bool:
        """Whether a Reshape of a pixel-dependent value folds the batch axis into another."""
        x = env[node.input[0]]
        try:
            return x.reshape(_reshape_target(x, env[node.input[1]], int(_attrs(node).get("allowzero", 0)))).shape[0] != x.shape[0]
        except Exception:  # noqa: BLE001 - a malformed target: the Reshape's own conversion reports it
            return False

    def _run_aside(self, node: Any, env: dict) -> Any:
        """``node``'s value on the example batch, every operand taken as given (no step is kept,
        its captured operands are discarded)."""
        kept = len(self.captured)
        try:
            fn = self._op(node, env, set())
            fn, inputs = fn if isinstance(fn, tuple) else (fn, list(node.input))
            return fn(*[env[i] if i else None for i in inputs])
        except Exception as exc:  # noqa: BLE001 - see run()
            raise NotConvertible(f"{node.op_type} node {node.name!r} on a batch-merged value does not run "
                                 f"({str(exc).splitlines()[0][:200]})") from None
        finally:
            del self.captured[kept:]

    def _follow_merged(self, node: Any, env: dict, dynamic: set, merged: dict[str, str]) -> None:
        """A node reading a batch-merged value (the dynamo exporter spells a flatten of a
        channels-last tensor as Reshape to 1-D, Gather of computed indices, Reshape back). Its
        value on the example batch is kept only if it is the per-image value's elements in their
        own order: then it stays merged, or, once its first axis is the batch again, becomes one
        reshape of the per-image value. Anything else merges images: not convertible."""
        value = self._run_aside(node, env)
        if node.op_type == "Shape":  # shape arithmetic: a value known at conversion, like any other Shape
            env[node.output[0]] = value
            return
        sources = {merged[i] for i in node.input if i in merged}
        source = env[next(iter(sources))] if len(sources) == 1 else None
        same = (isinstance(value, torch.Tensor) and source is not None and value.numel() == source.numel()
                and torch.equal(value.reshape(-1), source.reshape(-1)))
        if not same:
            raise NotConvertible("Reshape that merges the batch axis")
        out, (origin,) = node.output[0], sources
        env[out] = value
        dynamic.add(out)
        if value.dim() and value.shape[0] == source.shape[0]:
            tail = tuple(int(v) for v in value.shape[1:])
            self.steps.append(((lambda x, tail=tail: x.reshape(-1, *tail)), [origin], [out]))
            self.unmerged.append((out, tail))
        else:
            merged[out] = origin

    # ---------------------------------------------------------------- operators
    def _arg(self, node: Any, env: dict, dynamic: set, index: int, attrs: dict, attr: str, default: Any = None) -> Any:
        """An operand given as input ``index`` (newer opsets) or as attribute ``attr`` (older)."""
        if len(node.input) > index and node.input[index]:
            return self._const(node, env, dynamic, index, capture=True)
        return attrs.get(attr, default)

    def _const(self, node: Any, env: dict, dynamic: set, index: int, capture: bool = False) -> Any:
        """Operand ``index`` of ``node``, which must not depend on the pixels (``capture``: a step keeps it as a Python value)."""
        name = node.input[index] if len(node.input) > index else ""
        if name and name in dynamic:
            raise NotConvertible(f"{node.op_type} with a pixel-dependent operand {index}")
        value = env[name] if name else None
        if capture and isinstance(value, torch.Tensor):
            self.captured.append(value)
        return value

    def _op(self, node: Any, env: dict, dynamic: set) -> Callable | tuple[Callable, list[str]]:
        """The torch twin of ``node`` (or it and the inputs it reads, where they differ from the node's)."""
        op, a = node.op_type, _attrs(node)
        first_dynamic = bool(node.input) and node.input[0] in dynamic
        if op in ("Identity", "Dropout"):
            return lambda x, *_: x
        if op == "Constant":
            if "value" in a:
                from onnx import numpy_helper

                tensor = self._tensor(numpy_helper.to_array(a["value"]))
            elif any(k in a for k in ("value_float", "value_floats", "value_int", "value_ints")):
                key = next(k for k in ("value_float", "value_floats", "value_int", "value_ints") if k in a)
                tensor = torch.tensor(a[key], dtype=torch.float32 if "float" in key else torch.int64)
            else:
                raise NotConvertible(f"Constant given as {sorted(a)}")
            return lambda: tensor
        if op == "Cast":
            to = _TYPES.get(int(a["to"]))
            if to is None:
                raise NotConvertible(f"Cast to ONNX type {a['to']}")
            if first_dynamic:
                if to not in (torch.float32, torch.float64):
                    raise NotConvertible(f"Cast of pixel-dependent values to {to}")
                return lambda x: x  # the module's own float type (float32 screen, float64 re-scoring)
            return lambda x: x.to(to)
        if op in _BINARY:
            operands = [env[i] for i in node.input[:2]]
            if op == "Div" and not any(v.is_floating_point() for v in operands):
                return lambda x, y: torch.div(x, y, rounding_mode="trunc")  # ONNX integer division truncates
            return _BINARY[op]
        if op == "Pow":
            exponent = self._const(node, env, dynamic, 1)
            if exponent.numel() != 1:
                raise NotConvertible("Pow with a tensor exponent")
            self.captured.append(exponent)
            e = float(exponent)
            return lambda x, _: x ** e
        if op in _UNARY:
            return _UNARY[op]
        if op == "LeakyRelu":
            slope = float(a.get("alpha", 0.01))
            return lambda x: F.leaky_relu(x, slope)
        if op == "Elu":
            alpha = float(a.get("alpha", 1.0))
            return lambda x: F.elu(x, alpha)
        if op == "HardSigmoid":
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)
        if op == "Clip":
            low = self._arg(node, env, dynamic, 1, a, "min")
            high = self._arg(node, env, dynamic, 2, a, "max")
            low = None if low is None else float(low)
            high = None if high is None else float(high)
            return lambda x, *_: torch.clamp(x, low, high)
        if op == "Softmax":
            axis = int(a.get("axis", -1 if self.opset >= 13 else 1))
            if self.opset < 13 and first_dynamic and env[node.input[0]].dim() != 2:
                raise NotConvertible("Softmax (opset < 13) of a map")
            return lambda x: F.softmax(x, axis)
        if op == "Conv":
            return self._conv(node, env, dynamic, a)
        if op in ("MaxPool", "AveragePool"):
            return self._pool(node, env, a)
        if op == "GlobalAveragePool":
            return lambda x: F.adaptive_avg_pool2d(x, 1)
        if op == "GlobalMaxPool":
            return lambda x: F.adaptive_max_pool2d(x, 1)
        if op == "BatchNormalization":
            if int(a.get("training_mode", 0)):
                raise NotConvertible("BatchNormalization in training mode")
            for i in range(1, 5):
                self._const(node, env, dynamic, i)
            eps = float(a.get("epsilon", 1e-5))
            return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        if op == "Gemm":
            return self._gemm(node, env, dynamic, a)
        if op == "MatMul":
            if node.input[1] not in dynamic and env[node.input[1]].dim() == 2 and first_dynamic and env[node.input[0]].dim() == 2:
                return lambda x, weight: F.linear(x, weight.t())
            return torch.matmul
        if op == "Flatten":
            axis = int(a.get("axis", 1))
            if first_dynamic and axis != 1:
                raise NotConvertible(f"Flatten at axis {axis} of pixel-dependent values")
            return (lambda x: torch.flatten(x, 1)) if first_dynamic else (lambda x: x.reshape(int(np.prod(x.shape[:axis])), -1))
        if op == "Reshape":
            return self._reshape(node, env, dynamic, a)
        if op == "Transpose":
            perm = _ints(a.get("perm", list(range(env[node.input[0]].dim()))[::-1]))
            if first_dynamic and perm[0] != 0:
                raise NotConvertible("Transpose that moves the batch axis")
            return lambda x: x.permute(*perm)
        if op == "Concat":
            axis = int(a["axis"])
            if any(i in dynamic for i in node.input) and axis == 0:
                raise NotConvertible("Concat along the batch axis")
            return lambda *xs: torch.cat(list(xs), axis)
        if op in ("Squeeze", "Unsqueeze"):
            axes = self._arg(node, env, dynamic, 1, a, "axes")
            axes = None if axes is None else _ints(axes)
            rank = env[node.input[0]].dim() + (len(axes) if op == "Unsqueeze" else 0)
            axes = None if axes is None else sorted(v % rank for v in axes)
            if first_dynamic and (axes is None or 0 in axes):
                raise NotConvertible(f"{op} at the batch axis")
            if op == "Squeeze":
                return lambda x, *_: x.squeeze(tuple(axes)) if axes is not None else x.squeeze()
            return lambda x, *_: _unsqueeze(x, axes)
        if op == "Pad":
            return self._pad(node, env, dynamic, a)
        if op == "Slice":
            starts, ends = self._arg(node, env, dynamic, 1, a, "starts"), self._arg(node, env, dynamic, 2, a, "ends")
            axes, steps = self._arg(node, env, dynamic, 3, a, "axes"), self._arg(node, env, dynamic, 4, a, "steps")
            index = _slice_index(tuple(env[node.input[0]].shape), starts, ends, axes, steps)
            backwards = any(i.step is not None and i.step < 0 for i in index)
            if first_dynamic and (index[0] != slice(None) or backwards):
                raise NotConvertible("Slice of the batch axis or backwards through pixel-dependent values")
            if backwards:  # constants only: torch has no negative-step slicing
                return (lambda x: torch.from_numpy(np.ascontiguousarray(x.numpy()[index]))), [node.input[0]]
            return (lambda x: x[index]), [node.input[0]]
        if op == "ReduceMean":
            axes = self._arg(node, env, dynamic, 1, a, "axes")
            keep = bool(a.get("keepdims", 1))
            if axes is None or (first_dynamic and 0 in [v % env[node.input[0]].dim() for v in _ints(axes)]):
                raise NotConvertible("ReduceMean over all axes or the batch axis")
            dims = tuple(_ints(axes))
            return lambda x, *_: x.mean(dims, keep)
        if op != "Shape" and any(i in dynamic for i in node.input):
            raise NotConvertible(f"operator {op}")
        return self._shape_op(node, env, a)

    def _conv(self, node: Any, env: dict, dynamic: set, a: dict) -> Callable:
        weight = self._const(node, env, dynamic, 1)
        self._const(node, env, dynamic, 2)
        if weight.dim() != 4:
            raise NotConvertible(f"a {weight.dim() - 2}-D convolution")
        kernel = list(weight.shape[2:])
        strides, dilations = _ints(a.get("strides", [1, 1])), _ints(a.get("dilations", [1, 1]))
        pads = _pads2d(a, tuple(env[node.input[0]].shape[2:]), kernel, strides, dilations)
        groups = int(a.get("group", 1))

        def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            x, padding = _padded(x, pads, 0.0)
            return F.conv2d(x, w, b, tuple(strides), padding, tuple(dilations), groups)

        return conv

    def _pool(self, node: Any, env: dict, a: dict) -> Callable:
        if len(node.output) > 1 and node.output[1]:
            raise NotConvertible("MaxPool with indices")
        kernel = _ints(a["kernel_shape"])
        if len(kernel) != 2:
            raise NotConvertible(f"{len(kernel)}-D pooling")
        strides, dilations = _ints(a.get("strides", [1, 1])), _ints(a.get("dilations", [1, 1]))
        pads = _pads2d(a, tuple(env[node.input[0]].shape[2:]), kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        if node.op_type == "MaxPool":
            def max_pool(x: torch.Tensor) -> torch.Tensor:
                x, padding = _padded(x, pads, -float("inf"))
                return F.max_pool2d(x, tuple(kernel), tuple(strides), padding, tuple(dilations), ceil)

            return max_pool
        if dilations != [1, 1]:
            raise NotConvertible("dilated AveragePool")
        include = bool(a.get("count_include_pad", 0))
        if pads[:2] != pads[2:] and any(pads):
            raise NotConvertible("AveragePool with asymmetric pads")

        def avg_pool(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, tuple(kernel), tuple(strides), (pads[0], pads[1]), ceil, include)

        return avg_pool

    def _gemm(self, node: Any, env: dict, dynamic: set, a: dict) -> tuple[Callable, list[str]]:
        if int(a.get("transA", 0)) or node.input[0] not in dynamic:
            raise NotConvertible("Gemm other than pixel-dependent A times a constant B")
        b, c = self._const(node, env, dynamic, 1), self._const(node, env, dynamic, 2)
        alpha, beta, trans_b = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0)), int(a.get("transB", 0))
        weight = (b if trans_b else b.t()) * alpha
        bias = None if c is None else (c * beta).reshape(-1).expand(weight.shape[0]).contiguous()
        names = [node.output[0] + "#weight", node.output[0] + "#bias" if bias is not None else ""]
        env[names[0]] = weight.contiguous()
        if bias is not None:
            env[names[1]] = bias
        return (lambda x, w, bias=None: F.linear(x, w, bias)), [node.input[0], *names]

    def _reshape(self, node: Any, env: dict, dynamic: set, a: dict) -> Callable | tuple[Callable, list[str]]:
        self._const(node, env, dynamic, 1)
        if node.input[0] not in dynamic:
            return lambda x, shape: x.reshape(_reshape_target(x, shape, int(a.get("allowzero", 0))))
        x, shape = env[node.input[0]], env[node.input[1]]
        out = x.reshape(_reshape_target(x, shape, int(a.get("allowzero", 0)))).shape
        if out[0] != x.shape[0]:
            raise NotConvertible("Reshape that merges the batch axis")
        tail = tuple(int(v) for v in out[1:])
        return (lambda x: x.reshape(-1, *tail)), [node.input[0]]  # the target's batch entry is ignored

    def _pad(self, node: Any, env: dict, dynamic: set, a: dict) -> Callable:
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise NotConvertible(f"Pad mode {mode}")
        pads = self._arg(node, env, dynamic, 1, a, "pads")
        value = self._arg(node, env, dynamic, 2, a, "value", 0.0)
        if len(node.input) > 3 and node.input[3]:
            raise NotConvertible("Pad restricted to some axes")
        pads, value = _ints(pads), float(value if not isinstance(value, torch.Tensor) else value.reshape(-1)[0])
        rank = len(pads) // 2
        if pads[0] or pads[rank]:
            raise NotConvertible("Pad of the batch axis")
        torch_pads = [v for axis in reversed(range(rank)) for v in (pads[axis], pads[axis + rank])]
        return lambda x, *_: F.pad(x, torch_pads, value=value)

    def _shape_op(self, node: Any, env: dict, a: dict) -> Callable:
        """Operators of shape arithmetic, evaluated on constants only."""
        op = node.op_type
        if op == "Shape":
            start, end = a.get("start", 0), a.get("end", None)
            return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64)
        if op == "Gather":
            axis = int(a.get("axis", 0))
            return lambda x, i: torch.index_select(x, axis, i.reshape(-1) % x.shape[axis]).reshape(
                (*x.shape[:axis], *i.shape, *x.shape[axis + 1:]))
        if op == "ConstantOfShape":
            from onnx import numpy_helper

            fill = a.get("value")
            fill = self._tensor(numpy_helper.to_array(fill)) if fill is not None else torch.zeros(1)

            def constant_of_shape(shape: torch.Tensor) -> torch.Tensor:
                dims = _ints(shape)
                if int(np.prod(dims)) > MAX_CONSTANT_ELEMENTS:
                    raise NotConvertible(f"ConstantOfShape of {dims}")
                return fill.reshape(-1)[0].expand(*dims).clone()

            return constant_of_shape
        if op == "Range":
            def range_(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
                if delta.item() == 0 or (limit.item() - start.item()) / delta.item() > MAX_CONSTANT_ELEMENTS:
                    raise NotConvertible(f"Range from {start.item()} to {limit.item()} by {delta.item()}")
                return torch.arange(start.item(), limit.item(), delta.item())

            return range_
        if op == "Where":
            return torch.where
        raise NotConvertible(f"operator {op}")


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    for axis in axes:
        x = x.unsqueeze(axis)
    return x


def _reshape_target(x: torch.Tensor, shape: torch.Tensor, allowzero: int) -> list[int]:
    dims = _ints(shape)
    return [x.shape[i] if v == 0 and not allowzero else v for i, v in enumerate(dims)]


def _slice_index(shape: tuple[int, ...], starts: Any, ends: Any, axes: Any, steps: Any) -> tuple[slice, ...]:
    """ONNX Slice (positive steps) on a tensor of ``shape`` as a tuple of Python slices."""
    starts, ends = _ints(starts), _ints(ends)
    axes = [v % len(shape) for v in _ints(axes)] if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * len(shape)
    for s, e, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise NotConvertible("Slice with step 0")
        size = shape[axis]
        s, e = s + size if s < 0 else s, e + size if e < 0 else e
        if step > 0:
            index[axis] = slice(max(0, min(size, s)), max(0, min(size, e)), step)
        else:  # backwards: ends below the first element mean "through the first"
            e = max(-1, min(size - 1, e))
            index[axis] = slice(max(0, min(size - 1, s)), None if e < 0 else e, step)
    return tuple(index)


def _cancel_permutes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove pairs of permutes that compose to the identity (the NHWC feed meeting the graph's own transpose)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_method" and n.target == "permute" and isinstance(n.args[0], torch.fx.Node):
            inner = n.args[0]
            if inner.op == "call_method" and inner.target == "permute":
                outer_perm, inner_perm = list(n.args[1:]), list(inner.args[1:])
                if [inner_perm[i] for i in outer_perm] == list(range(len(outer_perm))):
                    n.replace_all_uses_with(inner.args[0])
                    gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class GraphInput(nn.Module):
    """A graph twin (:func:`onnx_module`) fed normalised float N×C×H×W images, as the gradient
    audits take a classifier: the images are mapped to the graph's input space first (``feed``
    as :class:`keepbits.audit._base.OnnxAdapter`'s). A bundle's uint8 values are rounded and
    clipped straight through: the forward pass sees the integers ONNX Runtime is given, the
    gradient passes as if there were no rounding."""

    def __init__(self, twin: nn.Module, mean: Any, std: Any, feed: str):
        super().__init__()
        self.twin, self.feed = twin, feed
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed == "normalized":
            return self.twin(x)
        pixels = x * self.std + self.mean
        if self.feed == "uint8-nhwc":
            pixels = pixels * 255.0
            pixels = pixels + (torch.round(pixels).clamp(0, 255) - pixels).detach()
        return self.twin(pixels)


def _prune_to(proto: Any, output: str) -> None:
    """Keep only the nodes ``output`` depends on (a bundle's classifier logits beside its mask
    generator's fused custom ops), and the ONNX functions those nodes still call."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    kept: set[int] = set()
    pending = [output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or id(node) in kept:
            continue
        kept.add(id(node))
        pending.extend(i for i in node.input if i)
        pending.extend(i for attr in node.attribute if attr.g.node for sub in attr.g.node for i in sub.input if i)
    nodes = [n for n in proto.graph.node if id(n) in kept]
    called = {(n.domain, n.op_type) for n in nodes}
    functions = [f for f in proto.functions if (f.domain, f.name) in called]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.functions[:]
    proto.functions.extend(functions)


def onnx_module(model_path: Any, input_name: str, output: str, input_shape: tuple[int, int, int], nhwc: bool) -> nn.Module:
    """The ONNX classifier at ``model_path`` as a traced torch module taking its input as float
    N×C×H×W (``nhwc``: the graph itself takes N×H×W×C); raises :class:`NotConvertible`.

    Example:
        >>> import tempfile, os, torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
        >>> torch.onnx.export(net, (torch.zeros(1, 1, 4, 4),), path, input_names=["x"], output_names=["logits"],
        ...                   dynamic_axes={"x": {0: "n"}}, dynamo=False)
        >>> module = onnx_module(path, "x", "logits", (1, 4, 4), nhwc=False)
        >>> x = torch.randn(2, 1, 4, 4)
        >>> bool(torch.allclose(module(x), net(x), atol=1e-6))
        True
    """
    import onnx

    try:
        proto = onnx.load(str(model_path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for unreadable files
        raise NotConvertible(f"unreadable ({str(exc).splitlines()[0]})") from None
    _prune_to(proto, output)
    if proto.functions:
        raise NotConvertible("graph with ONNX functions")
    converter = _Converter(proto, input_name, output, input_shape, nhwc)
    declared = next((i.type.tensor_type.shape.dim for i in proto.graph.input if i.name == input_name), None)
    fixed = declared[0].dim_value if declared and declared[0].HasField("dim_value") and declared[0].dim_value > 0 else None
    first, second = (fixed, fixed) if fixed else (2, 3)  # a fixed-batch graph is interpreted at its batch size only
    env2, dynamic = converter.run(first)
    if output not in dynamic:
        raise NotConvertible("the output does not depend on the input")
    steps2, captured, unmerged = converter.steps, converter.captured, converter.unmerged
    env3, _ = converter.run(second)
    if len(captured) != len(converter.captured) or not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(captured, converter.captured)):
        raise NotConvertible("an operator's constant operand depends on the batch size")
    if unmerged != converter.unmerged or [o for *_, o in steps2] != [o for *_, o in converter.steps]:
        raise NotConvertible("the conversion depends on the batch size")
    used = {i for _, inputs, _ in steps2 for i in inputs if i and i not in dynamic}
    constants = {}
    for name in sorted(used):
        a, b = env2[name], env3[name]
        if not isinstance(a, torch.Tensor):
            raise NotConvertible(f"value {name!r} is not a tensor")
        if a.shape != b.shape or not torch.equal(a, b):
            raise NotConvertible(f"value {name!r} depends on the batch size")
        constants[name] = a
    module = OnnxModule(steps2, constants, input_name, output, nhwc).eval()
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - tracing failures come in many types
        raise NotConvertible(f"does not trace ({str(exc).splitlines()[0]})") from None
    gm = _cancel_permutes(gm).eval()
    _check_per_sample(gm, input_shape)
    return gm


def _check_per_sample(module: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Each image's output must not depend on the batch it is in (graphs with batch-sized constants fail here)."""
    x = torch.rand(3, *input_shape, generator=torch.Generator().manual_seed(0)) * 255
    try:
        with torch.inference_mode():
            together, alone = module(x), torch.cat([module(x[i : i + 1]) for i in range(3)])
    except Exception as exc:  # noqa: BLE001 - a shape error of a batch-specific graph
        raise NotConvertible(f"does not run on other batch sizes ({str(exc).splitlines()[0]})") from None
    if together.shape != alone.shape or not torch.allclose(together, alone, rtol=1e-4, atol=1e-4 * (1 + float(alone.abs().max()))):
        raise NotConvertible("an image's output depends on the rest of its batch")
