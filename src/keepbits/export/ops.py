"""The NICE custom ops of domain ``keepbits`` (opset version 1) and their ONNX function bodies.

=================== ==================== =========== ===================================
op                  inputs               outputs     attributes
=================== ==================== =========== ===================================
HardConcreteMask    log α (N×1×H×W)      ẑ           beta, gamma, zeta (float)
MixedResCompose     x (N×C×H×W), ẑ       x̃           block_size (int ≥ 1)
MaskCompose         log α, x             ẑ, x̃        beta, gamma, zeta, block_size
=================== ==================== =========== ===================================

ẑ = min(1, max(0, σ(log α / β)(ζ − γ) + γ)) is NICE Eq. 11; x̃ = x ⊙ ẑ + x_b ⊙ (1 − ẑ) is
Eq. 12, where x_b holds the b×b block means (edge blocks average the pixels they hold, as in
:mod:`keepbits.core.compose`). All tensors are float32, NCHW.

During ``torch.onnx.export`` the ops are emitted as single nodes with
``torch.onnx.ops.symbolic`` (the dynamo exporter would inline onnxscript functions); in eager
mode they compute with :mod:`keepbits.training.functional`. :func:`attach_function_bodies`
then adds one model-local ONNX function per op, written with standard ops only, so any ONNX
runtime executes the graph; ONNX Runtime with ``keepbits.native`` registered runs the C++
kernels of ``native/cpu`` instead.

Example:
    >>> from keepbits.export.ops import function_bodies
    >>> sorted(f.name for f in function_bodies())
    ['HardConcreteMask', 'MaskCompose', 'MixedResCompose']
"""
from __future__ import annotations

import onnx
import torch
from onnx import AttributeProto, FunctionProto, TensorProto, helper

from keepbits.bundle import CUSTOM_DOMAIN, MIN_OPSET
from keepbits.core.hard_concrete import BETA, GAMMA, ZETA
from keepbits.training import functional as KF

DOMAIN = CUSTOM_DOMAIN
DOMAIN_VERSION = 1
#: Default-domain opset of the function bodies as built (attached ones import the model's).
BODY_OPSET = MIN_OPSET


def gate_attrs(beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> dict[str, float]:
    """The hard-concrete attributes every mask node carries (names read by the kernels)."""
    return {"beta": float(beta), "gamma": float(gamma), "zeta": float(zeta)}


def mask_and_compose(log_alpha: torch.Tensor, x: torch.Tensor, block_size: int, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ẑ (Eq. 11) and x̃ (Eq. 12) of ``x`` (N×C×H×W) under the gate logits ``log_alpha`` (N×1×H×W).

    Eager: :mod:`keepbits.training.functional`. Under ``torch.onnx.export``: one
    ``MaskCompose`` node (``fused``) or ``HardConcreteMask`` + ``MixedResCompose``.
    """
    if not torch.onnx.is_in_onnx_export():
        mask = KF.deterministic_mask(log_alpha)
        return mask, KF.mixed_resolution(x, mask, block_size)
    if fused:
        mask, mixed = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::MaskCompose", (log_alpha, x), {**gate_attrs(), "block_size": int(block_size)},
            dtypes=(torch.float32, torch.float32), shapes=(log_alpha.shape, x.shape), version=DOMAIN_VERSION,
        )
        return mask, mixed
    mask = hard_concrete_mask(log_alpha)
    mixed = torch.onnx.ops.symbolic(
        f"{DOMAIN}::MixedResCompose", (x, mask), {"block_size": int(block_size)}, dtype=torch.float32, shape=x.shape, version=DOMAIN_VERSION
    )
    return mask, mixed


def hard_concrete_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """ẑ (Eq. 11) of the gate logits ``log_alpha`` (N×1×H×W): eager via
    :mod:`keepbits.training.functional`, one ``HardConcreteMask`` node under ``torch.onnx.export``."""
    if not torch.onnx.is_in_onnx_export():
        return KF.deterministic_mask(log_alpha)
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::HardConcreteMask", (log_alpha,), gate_attrs(), dtype=torch.float32, shape=log_alpha.shape, version=DOMAIN_VERSION
    )


def _ref(name: str, attr_type: int, ref: str) -> AttributeProto:
    """A node attribute ``name`` that takes the value of the function attribute ``ref``."""
    attr = AttributeProto()
    attr.name, attr.type, attr.ref_attr_name = name, attr_type, ref
    return attr


def _node(op: str, inputs: list[str], outputs: list[str], domain: str = "", refs: dict[str, tuple[int, str]] | None = None, **attrs) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, domain=domain, **attrs)
    for name, (attr_type, ref) in (refs or {}).items():
        node.attribute.append(_ref(name, attr_type, ref))
    return node


def _const(name: str, value, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    values = value if isinstance(value, (list, tuple)) else [value]
    dims = [len(values)] if isinstance(value, (list, tuple)) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))


def _function(name: str, inputs: list[str], outputs: list[str], nodes: list[onnx.NodeProto], attrs: dict) -> FunctionProto:
    func = helper.make_function(
        DOMAIN, name, inputs, outputs, nodes,
        opset_imports=[helper.make_opsetid("", BODY_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
    )  # the default-domain version follows the model's in attach_function_bodies
    for attr_name, default in attrs.items():
        func.attribute_proto.append(helper.make_attribute(attr_name, default))
    return func


def _hard_concrete_body() -> FunctionProto:
    """Eq. 11: Clip(Sigmoid(log α / β) · (ζ − γ) + γ, 0, 1)."""
    f = AttributeProto.FLOAT
    nodes = [
        _node("Constant", [], ["beta"], refs={"value_float": (f, "beta")}),
        _node("Constant", [], ["gamma"], refs={"value_float": (f, "gamma")}),
        _node("Constant", [], ["zeta"], refs={"value_float": (f, "zeta")}),
        _const("zero", 0.0, TensorProto.FLOAT),
        _const("one", 1.0, TensorProto.FLOAT),
        _node("Sub", ["zeta", "gamma"], ["span"]),
        _node("Div", ["log_alpha", "beta"], ["t"]),
        _node("Sigmoid", ["t"], ["s"]),
        _node("Mul", ["s", "span"], ["stretched"]),
        _node("Add", ["stretched", "gamma"], ["shifted"]),
        _node("Clip", ["shifted", "zero", "one"], ["mask"]),
    ]
    return _function("HardConcreteMask", ["log_alpha"], ["mask"], nodes, gate_attrs())


def _mixed_res_body() -> FunctionProto:
    """Eq. 12 with dynamic H×W: zero-pad to a multiple of b, block sums / block pixel counts
    (a padded ones-plane, so edge blocks divide by the pixels they hold), expand back, crop."""
    nodes = [
        _node("Constant", [], ["b"], refs={"value_int": (AttributeProto.INT, "block_size")}),
        _const("axis0", [0]),
        _const("zeros4", [0, 0, 0, 0]),
        _const("keep2", [0, 0]),
        _const("ones2", [1, 1]),
        _const("first", [0]),
        _const("second", [1]),
        _const("third", [2]),
        _const("hw_axes", [2, 3]),
        _const("block_axes", [3, 5]),
        _node("Unsqueeze", ["b", "axis0"], ["b1"]),
        _node("Sub", ["b1", "second"], ["b_minus_1"]),
        _node("Shape", ["x"], ["hw"], start=2),
        _node("Add", ["hw", "b_minus_1"], ["hw_up"]),
        _node("Div", ["hw_up", "b1"], ["nblocks"]),  # ceil(H/b), ceil(W/b)
        _node("Mul", ["nblocks", "b1"], ["padded"]),
        _node("Sub", ["padded", "hw"], ["pad_end"]),
        _node("Concat", ["zeros4", "keep2", "pad_end"], ["pads"], axis=0),
        _node("Pad", ["x", "pads"], ["x_pad"]),
        _node("Concat", ["ones2", "hw"], ["plane_shape"], axis=0),
        _node("ConstantOfShape", ["plane_shape"], ["plane"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        _node("Pad", ["plane", "pads"], ["plane_pad"]),
        _node("Slice", ["nblocks", "first", "second"], ["hb"]),
        _node("Slice", ["nblocks", "second", "third"], ["wb"]),
        _node("Concat", ["keep2", "hb", "b1", "wb", "b1"], ["split_shape"], axis=0),
        _node("Reshape", ["x_pad", "split_shape"], ["x_blocks"]),
        _node("ReduceSum", ["x_blocks", "block_axes"], ["sums"], keepdims=1),
        _node("Reshape", ["plane_pad", "split_shape"], ["plane_blocks"]),
        _node("ReduceSum", ["plane_blocks", "block_axes"], ["counts"], keepdims=1),
        _node("Div", ["sums", "counts"], ["means"]),
        _node("Concat", ["ones2", "hb", "b1", "wb", "b1"], ["expand_shape"], axis=0),
        _node("Expand", ["means", "expand_shape"], ["up_blocks"]),
        _node("Concat", ["keep2", "padded"], ["padded_shape"], axis=0),
        _node("Reshape", ["up_blocks", "padded_shape"], ["up"]),
        _node("Slice", ["up", "keep2", "hw", "hw_axes"], ["x_b"]),
        _node("Sub", ["x", "x_b"], ["detail"]),
        _node("Mul", ["mask", "detail"], ["kept"]),
        _node("Add", ["x_b", "kept"], ["mixed"]),  # x_b + ẑ(x − x_b) = x ẑ + x_b (1 − ẑ)
    ]
    return _function("MixedResCompose", ["x", "mask"], ["mixed"], nodes, {"block_size": 1})


def _mask_compose_body() -> FunctionProto:
    """The fused op as the two unfused ones (attributes forwarded by reference)."""
    f, i = AttributeProto.FLOAT, AttributeProto.INT
    nodes = [
        _node("HardConcreteMask", ["log_alpha"], ["mask"], domain=DOMAIN, refs={k: (f, k) for k in ("beta", "gamma", "zeta")}),
        _node("MixedResCompose", ["x", "mask"], ["mixed"], domain=DOMAIN, refs={"block_size": (i, "block_size")}),
    ]
    return _function("MaskCompose", ["log_alpha", "x"], ["mask", "mixed"], nodes, {**gate_attrs(), "block_size": 1})


def function_bodies() -> list[FunctionProto]:
    """One ONNX function per custom op (standard ops only)."""
    return [_hard_concrete_body(), _mixed_res_body(), _mask_compose_body()]


def used_ops(model: onnx.ModelProto) -> list[str]:
    """Custom ops of domain ``keepbits`` that the main graph calls, sorted."""
    return sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain (``ai.onnx``) opset ``model`` imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_function_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function bodies the graph needs (``MaskCompose`` needs the two others) in place,
    importing the model's default-domain opset (ONNX requires the two to agree; the bodies'
    standard ops mean the same in every opset from :data:`BODY_OPSET` on)."""
    needed = set(used_ops(model))
    if "MaskCompose" in needed:
        needed |= {"HardConcreteMask", "MixedResCompose"}
    present = {(f.domain, f.name) for f in model.functions}
    bodies = [f for f in function_bodies() if f.name in needed and (DOMAIN, f.name) not in present]
    for body in bodies:
        next(o for o in body.opset_import if o.domain == "").version = default_opset(model)
    model.functions.extend(bodies)
    _set_opset(model, DOMAIN, DOMAIN_VERSION)
    return model


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == domain:
            opset.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))
