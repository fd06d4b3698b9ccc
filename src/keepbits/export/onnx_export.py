"""NICE or SimpleBits checkpoint -> model bundle (``model.onnx`` + ``manifest.json``, see ``docs/bundle.md``).

For a ``nice`` checkpoint the graph maps an image batch (uint8 N×H×W×C or float N×C×H×W on 0..1) to ``logits``,
``mask`` ẑ (NICE Eq. 11) and ``mixed`` x̃ (Eq. 12, pixel space, the input's layout). The
normalisation runs inside the graph; the mask generator sees the normalised image; the
composition runs on the pixel-space image, which equals composing the normalised image and
un-normalising it, since Eq. 12 commutes with a per-channel affine map.

For a ``simplebits`` checkpoint (manifest ``explain: "simplify"``) the graph maps the same
input to ``logits`` of the simplified image and ``simplified`` (the simplifier's output in
pixel space, the input's layout; :class:`keepbits.export.graphs.SimplifierGraph`).

Example:
    >>> from keepbits.export import export_onnx
    >>> # bundle = export_onnx("runs/nice/nice.pt", "runs/nice.bundle")
    >>> # bundle.manifest.class_names, bundle.model_path
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from keepbits._json import jsonable
from keepbits._version import __version__
from keepbits.bundle import (
    EXPLAIN_CLASSIFY_ON, EXPLAIN_OUTPUTS, INPUT_DTYPES, MAX_OPSET, MIN_OPSET, TARGETS, Bundle, Manifest, explain_outputs, load_bundle, refuse_existing,
    sha256_file, write_bundle,
)
from keepbits.errors import BundleError, InputError
from keepbits.export import ops
from keepbits.export.graphs import NiceGraph, SimplifierGraph
from keepbits.runtime.parity import compare_outputs
from keepbits.training.checkpoint import Checkpoint, build_model, load_checkpoint
from keepbits.training.models.fast_generators import attach_classifier

_log = logging.getLogger("keepbits.export")
def check_opset(opset: Any) -> int:
    """``opset`` when it is an int in [:data:`MIN_OPSET`, :data:`MAX_OPSET`], else :class:`InputError`."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    return opset


def _example_input(shape: list[int], input_dtype: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    if input_dtype == "uint8":
        return torch.randint(0, 256, (batch, h, w, c), dtype=torch.uint8, generator=g)
    return torch.rand((batch, c, h, w), generator=g)


def _dynamic_shapes(input_dtype: str) -> dict[str, dict[int, Any]]:
    auto = torch.export.Dim.AUTO  # dynamic where the networks allow it, specialised otherwise
    axes = (1, 2) if input_dtype == "uint8" else (2, 3)
    return {"image": {0: auto, axes[0]: auto, axes[1]: auto}}


def _accepts_other_sizes(model: onnx.ModelProto, shape: list[int], input_dtype: str) -> bool:
    """Whether the graph runs on an odd size other than the training size. The ONNX input
    dims are symbolic either way; a fixed-size head (e.g. LeNet-5's linear layer) only fails
    at run time, so try it (ONNX Runtime, function bodies attached to a copy if absent)."""
    import onnxruntime as ort

    from keepbits.native import session_options

    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    ops.attach_function_bodies(probe_model)
    c, h, w = shape
    probe = _example_input([c, h + 7, w + 5], input_dtype, batch=1)
    options = session_options(native=False)
    options.log_severity_level = 4  # the expected failure would print an ONNX Runtime error line
    try:
        session = ort.InferenceSession(probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"image": probe.numpy()})
    except Exception:  # noqa: BLE001 - onnxruntime raises its own error types on shape mismatches
        return False
    return True


def trace_to_onnx(
    graph: nn.Module,
    example: torch.Tensor,
    opset: int = MIN_OPSET,
    function_bodies: bool = True,
    output_names: tuple[str, ...] | list[str] = tuple(EXPLAIN_OUTPUTS["mask"]),
    dynamo: bool = True,
) -> onnx.ModelProto:
    """Export ``graph`` (input ``image``) to ONNX; attach the custom ops' function bodies.

    ``dynamo=True``: the dynamo exporter, batch/height/width dynamic where the networks allow
    it. ``dynamo=False``: the TorchScript exporter with only the batch dynamic (the dynamo
    exporter takes minutes on the SimpleBits U-Net on a loaded CPU).
    """
    check_opset(opset)
    input_dtype = "uint8" if example.dtype == torch.uint8 else "float32"
    chatty = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx._internal.exporter._registration": logging.ERROR}
    loggers = [logging.getLogger(name) for name in chatty]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, chatty.values()):  # one INFO line per optimisation pass; "torchvision is not installed"
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices about its internals, nothing the user can act on
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            model = _export(graph, example, opset, output_names, input_dtype, dynamo)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; report the first line
        raise InputError(f"ONNX export failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    if ops.default_opset(model) != opset:  # the exporter falls back where it cannot convert: the bundle would misstate it
        raise InputError(f"ONNX export: asked for opset {opset}, the exporter wrote opset {ops.default_opset(model)}; "
                         f"choose {ops.default_opset(model)} (--opset)")
    if function_bodies:
        ops.attach_function_bodies(model)
    else:
        ops._set_opset(model, ops.DOMAIN, ops.DOMAIN_VERSION)
    model.producer_name, model.producer_version = "keepbits", __version__
    return model


def _export(graph: nn.Module, example: torch.Tensor, opset: int, output_names: tuple[str, ...] | list[str], input_dtype: str,
            dynamo: bool) -> onnx.ModelProto:
    """The traced ONNX model (see :func:`trace_to_onnx`), before keepbits' own additions."""
    if dynamo:
        return torch.onnx.export(
            graph, (example,), dynamo=True, input_names=["image"], output_names=list(output_names),
            opset_version=opset, dynamic_shapes=_dynamic_shapes(input_dtype), external_data=False, verbose=False,
        ).model_proto
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # shape-dependent Python values become constants: H×W is fixed on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (example,), buffer, dynamo=False, input_names=["image"], output_names=list(output_names),
                          dynamic_axes={name: {0: "batch"} for name in ["image", *output_names]}, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full (strict) shape inference; :class:`BundleError` on failure."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BundleError(f"exported graph is not valid ONNX: {exc}") from None


#: Checkpoint kind -> the bundle's explain stage.
EXPLAIN_OF_KIND = {"nice": "mask", "simplebits": "simplify"}


def checkpoint_manifest(ckpt: Checkpoint, checkpoint: str | Path, *, input_dtype: str = "uint8",
                        classify_on: str | None = None, mixed_output: bool = True, target: str = "onnxruntime",
                        opset: int = MIN_OPSET, command: str = "") -> Manifest:
    """The bundle manifest of a ``nice`` or ``simplebits`` :class:`Checkpoint` read from ``checkpoint``:
    the one mapping from checkpoint fields to manifest fields (export and the torch backend share
    it), the classifier's preprocessing (resize policy, crop fraction) included. Graph facts
    (``custom_ops``, ``dynamic_size``) keep their defaults until the graph is traced."""
    checkpoint = Path(checkpoint)
    explain = EXPLAIN_OF_KIND.get(ckpt.kind)
    if explain is None:
        raise InputError(f"{checkpoint}: holds a {ckpt.kind} checkpoint; export takes {' or '.join(EXPLAIN_OF_KIND)} checkpoints")
    if input_dtype not in INPUT_DTYPES:
        raise InputError(f"input dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    classify_on = classify_on or EXPLAIN_CLASSIFY_ON[explain][0]
    if classify_on not in EXPLAIN_CLASSIFY_ON[explain]:
        raise InputError(f"classify_on must be one of {EXPLAIN_CLASSIFY_ON[explain]} for a {ckpt.kind} checkpoint, got {classify_on!r}")
    if explain == "simplify" and not mixed_output:
        raise InputError(f"{checkpoint}: mixed_output=False applies to NICE checkpoints (a SimpleBits bundle has no x̃ output)")
    settings = ckpt.settings
    if explain == "mask":
        if "block_size" not in settings:
            raise InputError(f"{checkpoint}: settings lack block_size (b)")
        fields = {"block_size": int(settings["block_size"]), "mask_threshold": float(settings.get("mask_threshold", 0.5)),
                  "generator": ckpt.models["generator"].arch}
    else:
        fields = {"block_size": 1, "mask_threshold": 0.5, "generator": ckpt.models["simplifier"].arch}
    preprocessing = ckpt.preprocessing_record()
    return Manifest(
        input_shape=list(ckpt.input_shape), input_dtype=input_dtype,
        resize_policy=preprocessing.resize_policy, crop_fraction=preprocessing.crop_fraction,
        input_layout="NHWC" if input_dtype == "uint8" else "NCHW",
        mean=list(ckpt.normalization.mean), std=list(ckpt.normalization.std),
        class_names=list(ckpt.class_names), classifier=ckpt.models["classifier"].arch,
        classify_on=classify_on, explain=explain, output_names=explain_outputs(explain, optional=mixed_output),
        target=target, opset=opset, function_bodies=target == "onnxruntime",
        provenance=jsonable({
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": sha256_file(checkpoint),
            "training_command": ckpt.command,
            "settings": settings,
            "metrics": ckpt.metrics,
            "epoch": ckpt.epoch,
            "export_command": command,
            "keepbits_version": __version__,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "exported_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }),
        **fields,
    )


def _graph(ckpt: Checkpoint, checkpoint: Path, manifest: Manifest, fused: bool) -> nn.Module:
    """The torch twin of the bundle's graph for ``manifest``."""
    if manifest.explain == "mask":
        classifier = build_model(ckpt, "classifier")
        return NiceGraph(attach_classifier(build_model(ckpt, "generator"), classifier), classifier, manifest.mean, manifest.std,
                         manifest.block_size, manifest.input_dtype, manifest.classify_on, fused,
                         mixed_output="mixed" in manifest.output_names)
    from keepbits.training.simplebits import load_simplebits

    simplifier, classifier, _ = load_simplebits(checkpoint)
    return SimplifierGraph(simplifier, classifier, manifest.input_dtype).eval()


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    input_dtype: str = "uint8",
    classify_on: str | None = None,
    fused: bool = True,
    mixed_output: bool = True,
    target: str = "onnxruntime",
    opset: int = MIN_OPSET,
    archive: bool | None = None,
    overwrite: bool = False,
    verify: bool = True,
    command: str = "",
) -> Bundle:
    """Export a ``nice`` or ``simplebits`` checkpoint to a bundle at ``out`` (a folder, or a ``.zip``); returns it loaded.

    ``classify_on`` (NICE only): ``"original"`` (default) or ``"mixed"``; a SimpleBits
    classifier sees the simplified image (``"simplified"``). ``mixed_output=False`` (NICE only)
    leaves x̃ out of the outputs: the runtime reads the logits and ẑ alone (its codec rebuilds x̃
    from the hard mask), and ONNX Runtime runs every node of a graph whether its outputs are
    asked for or not, so a deployment bundle skips the compose (a classifier of the original
    image then needs only ``HardConcreteMask``). ``target='tensorrt'`` leaves the
    custom nodes without function bodies (TensorRT's parser expands local functions before it
    looks for plugins). ``verify`` runs the bundle in ONNX Runtime (function bodies) on a random
    batch against the torch graph and fails on a mismatch (ẑ, x̃/scale or the simplified
    image/scale beyond 1e-4, or a different argmax). SimpleBits graphs are exported with the
    TorchScript exporter, batch dynamic and H×W fixed to the training size
    (``dynamic_size: false``).

    Example:
        >>> from keepbits.export import export_onnx
        >>> # export_onnx("nice.pt", "nice.bundle", input_dtype="uint8", classify_on="mixed")
        >>> # export_onnx("simplebits.pt", "simplify.bundle").manifest.explain  -> 'simplify'
    """
    check_opset(opset)
    refuse_existing(out, overwrite)
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    manifest = checkpoint_manifest(ckpt, checkpoint, input_dtype=input_dtype, classify_on=classify_on,
                                   mixed_output=mixed_output, target=target, opset=opset, command=command)
    graph = _graph(ckpt, checkpoint, manifest, fused)
    dynamo = manifest.explain == "mask"
    output_names = manifest.output_names
    shape = manifest.input_shape
    example = _example_input(shape, input_dtype)
    model = trace_to_onnx(graph, example, opset, function_bodies=target == "onnxruntime", output_names=output_names, dynamo=dynamo)
    if target == "onnxruntime":
        check_model(model)
    model_bytes = model.SerializeToString()
    dynamic_size = dynamo and _accepts_other_sizes(model, shape, input_dtype)
    if dynamo and not dynamic_size:
        _log.warning("the networks fix the image size: the bundle accepts %d×%d images only", shape[1], shape[2])
    manifest = dataclasses.replace(manifest, dynamic_size=dynamic_size, custom_ops=ops.used_ops(model))
    if verify and target == "onnxruntime":
        verify_model(model_bytes, graph, example, manifest.pixel_scale, names=output_names)
    elif verify:
        _log.info("not verified here: a %s bundle's custom nodes have no function bodies (keepbits export tensorrt checks "
                  "its engine against ONNX Runtime with the native kernels)", target)
    path = write_bundle(out, manifest, {manifest.model_file: model_bytes}, archive=archive, overwrite=overwrite)
    bundle = load_bundle(path)
    _log.info("wrote %s (%s, opset %d, digest %s…)", path, ", ".join(manifest.custom_ops) or "no custom ops", opset,
              bundle.digest[:12])
    return bundle


def verify_model(
    model_bytes: bytes,
    graph: nn.Module,
    example: torch.Tensor,
    pixel_scale: float,
    tol: float = 1e-4,
    names: tuple[str, ...] | list[str] = tuple(EXPLAIN_OUTPUTS["mask"]),
) -> dict[str, float]:
    """Run ``model_bytes`` in ONNX Runtime with the function bodies on ``example``; compare to
    ``graph`` (outputs ``names``): every output but the logits within ``tol``, same argmax."""
    from keepbits.native import make_session

    with torch.no_grad():
        reference = tuple(t.numpy() for t in graph(example))
    session = make_session(model_bytes, native=False)
    got = tuple(session.run(None, {"image": example.numpy()}))
    report = compare_outputs(reference, got, pixel_scale, names)
    if (any(report[f"{name}_max_abs"] > tol for name in names if name != "logits") or report["argmax_agree"] < 1.0
            or any(report[f"{name}_non_finite"] for name in names)):
        raise BundleError(f"exported graph disagrees with torch: {report}")
    return report


def export_simplifier_onnx(checkpoint: str | Path, out: str | Path, tol: float = 1e-4) -> dict[str, Any]:
    """Export a ``simplebits`` checkpoint to a bare ONNX graph (input ``image`` float N×C×H×W
    in [0, 1], dynamic batch; outputs ``logits``, ``simplified``) and check it against torch
    with ONNX Runtime; returns the max abs differences. Raises :class:`InputError` beyond ``tol``.
    For the runtime, export a model bundle instead: :func:`export_onnx`."""
    from keepbits.native import make_session
    from keepbits.training.simplebits import load_simplebits

    simplifier, classifier, ckpt = load_simplebits(checkpoint)
    graph = SimplifierGraph(simplifier, classifier).eval()
    c, h, w = ckpt.input_shape
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    model = trace_to_onnx(graph, example, output_names=["logits", "simplified"], dynamo=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    test = torch.rand(3, c, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [t.numpy() for t in graph(test)]
    got = make_session(str(out), native=False).run(None, {"image": test.numpy()})
    report = compare_outputs(ref, got, names=("logits", "simplified"))
    diffs = {name: report[f"{name}_max_abs"] for name in ("logits", "simplified")}
    if max(diffs.values()) > tol or report["logits_non_finite"] or report["simplified_non_finite"]:
        raise InputError(f"{out}: ONNX output differs from torch by {diffs} (tolerance {tol}; values NaN or infinite in either: "
                         f"{report['logits_non_finite']} logits, {report['simplified_non_finite']} pixels)")
    return {"onnx": str(out), "max_abs_diff": diffs}
