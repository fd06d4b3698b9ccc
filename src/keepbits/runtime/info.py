"""What is inside a model bundle, and how this machine would run it (``keepbits info``).

:func:`bundle_info` loads the bundle (every file's sha256 is checked against the manifest, the
manifest against ``expected_digest`` when given), opens it in ONNX Runtime as the runtime does
and reports: the manifest (input size, layout, normalisation, classes, explain stage, block size,
threshold), the provenance record, the graph's inputs and outputs as ONNX Runtime sees them, the
custom ops and whether they run on the native kernels or on the graph's ONNX function bodies
here, and the files with their sizes. Torch-free, onnx-free.

Example:
    >>> import tempfile
    >>> from keepbits.runtime.info import bundle_info
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> info = bundle_info(toy_bundle(tempfile.mkdtemp() + "/b", size=16))
    >>> info["verified"], info["input"]["shape"], info["outputs"]["names"]
    (True, [3, 16, 16], ['logits', 'mask', 'mixed'])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from keepbits import native
from keepbits.bundle import MANIFEST_NAME, load_bundle
from keepbits.errors import InputError
from keepbits.runtime.pipeline import check_session

#: How each resize policy of a bundle fits a frame of any size to the model input (keepbits.data.fit_into).
RESIZE_DESCRIPTIONS = {
    "letterbox": "aspect kept, scaled to fit, centred, zero padding",
    "center-crop": "aspect kept, scaled to cover (then by 1 / crop_fraction), centre kept",
    "resize": "stretched to the model size",
}


def resize_description(policy: str, crop_fraction: float) -> str:
    """What the runtime does to a frame under a bundle's resize policy.

    Example:
        >>> from keepbits.runtime.info import resize_description
        >>> resize_description("center-crop", 0.875)
        'center-crop (crop fraction 0.875): aspect kept, scaled to cover (then by 1 / crop_fraction), centre kept (keepbits.data.fit_into)'
    """
    crop = f" (crop fraction {crop_fraction:g})" if policy == "center-crop" else ""
    return f"{policy}{crop}: {RESIZE_DESCRIPTIONS[policy]} (keepbits.data.fit_into)"


def custom_op_status(custom_ops: list[str], function_bodies: bool) -> dict[str, Any]:
    """How this machine runs a bundle's custom ops: ``runs_with`` is ``"native kernels"``,
    ``"ONNX function bodies"``, ``"not needed"`` (a plain graph) or ``"cannot run"``, with the
    native library's status (:func:`keepbits.native.status`).

    Example:
        >>> from keepbits.runtime.info import custom_op_status
        >>> custom_op_status([], True)["runs_with"]
        'not needed'
    """
    status = native.status()
    if not custom_ops:
        runs_with = "not needed"
    elif status["loaded"]:
        runs_with = "native kernels"
    elif function_bodies:
        runs_with = "ONNX function bodies"
    else:
        runs_with = "cannot run"
    return {"ops": list(custom_ops), "function_bodies": function_bodies, "runs_with": runs_with, "native": status}


def bundle_info(path: str | Path, expected_digest: str | None = None) -> dict[str, Any]:
    """The report of ``keepbits info`` for the bundle folder or ``.zip`` at ``path``.

    :class:`keepbits.errors.BundleError` when the bundle is missing, malformed, modified (a file's
    sha256 differs from the manifest) or not the pinned ``expected_digest``; :class:`InputError`
    when ONNX Runtime cannot load its model here.
    """
    import onnxruntime as ort

    bundle = load_bundle(path, expected_digest)
    m = bundle.manifest
    ops = custom_op_status(m.custom_ops, m.function_bodies)
    session = None  # a bundle whose custom ops cannot run here (a TensorRT one without the native kernels) is still described
    if ops["runs_with"] != "cannot run":
        try:
            session = native.make_session(bundle.model_path, native=ops["runs_with"] == "native kernels")
        except Exception as exc:  # noqa: BLE001 - ORT raises its own error types
            raise InputError(f"{path}: ONNX Runtime {ort.__version__} cannot load {m.model_file} here "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); custom ops: {ops['runs_with']}") from None
        check_session(session, m, str(path))  # a manifest `run` refuses is an error here too
    files = {name: {"bytes": (bundle.root / name).stat().st_size, "sha256": digest} for name, digest in m.files.items()}
    source = Path(path)
    return {
        "bundle": str(source),
        "archive_bytes": source.stat().st_size if source.is_file() else None,
        "digest": bundle.digest,
        "verified": True,
        "digest_check": (f"every file's sha256 matches {MANIFEST_NAME}"
                         + (f"; {MANIFEST_NAME} matches the expected digest" if expected_digest else "; no expected digest given")),
        "format_version": m.format_version,
        "explain": m.explain,
        "generator": m.generator,
        "classifier": m.classifier,
        "classes": {"count": len(m.class_names), "names": list(m.class_names)},
        "input": {
            "name": m.input_name, "shape": list(m.input_shape), "dtype": m.input_dtype, "layout": m.input_layout,
            "pixel_scale": m.pixel_scale, "mean": list(m.mean), "std": list(m.std),
            "normalisation": f"(x / {m.pixel_scale:g} - mean) / std, inside the graph",
            "dynamic_size": m.dynamic_size, "resize": resize_description(m.resize_policy, m.crop_fraction),
            "onnxruntime": None if session is None else [{"name": i.name, "shape": list(i.shape), "type": i.type} for i in session.get_inputs()],
        },
        "outputs": {
            "names": list(m.output_names), "classify_on": m.classify_on,
            "onnxruntime": None if session is None else [{"name": o.name, "shape": list(o.shape), "type": o.type} for o in session.get_outputs()],
        },
        "mask": None if m.explain != "mask" else {"block_size": m.block_size, "threshold": float(m.mask_threshold)},
        "target": m.target,
        "opset": m.opset,
        "custom_ops": ops,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "provenance": m.provenance,
    }


def _names(names: list[str], shown: int = 4) -> str:
    """All of a short list, the first ``shown`` and last two of a long one: ``a, b, c, d, …, y, z``."""
    if len(names) <= 2 * shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, …, {', '.join(names[-2:])}"


def _epoch(epoch: Any) -> str:
    """The checkpoint's epoch as its training log counts it: ``Checkpoint.epoch`` is 0-based, the log's rows 1-based."""
    if epoch is None:
        return ""
    return f"epoch {epoch + 1}" if isinstance(epoch, int) and not isinstance(epoch, bool) else f"epoch {epoch}"


def _shape(shape: list[Any]) -> str:
    return "×".join(str(d) for d in shape)


def info_report(info: dict[str, Any]) -> str:
    """:func:`bundle_info`'s report as the lines ``keepbits info`` prints (``--json``: all of it).

    Example:
        >>> import tempfile
        >>> from keepbits.runtime.info import bundle_info, info_report
        >>> from keepbits.runtime.synthetic import toy_bundle
        >>> print(info_report(bundle_info(toy_bundle(tempfile.mkdtemp() + "/b", size=16))).splitlines()[2])
        classes     2: dark, bright
    """
    i, o, ops, prov = info["input"], info["outputs"], info["custom_ops"], info.get("provenance") or {}
    names = info["classes"]["names"]
    size = "the graph takes any H×W" if i["dynamic_size"] else "the graph takes this size only"
    explain = {"mask": "mask", "simplify": "simplified image"}.get(info["explain"], info["explain"])
    what = f"{explain}: {info['generator']} generator + {info['classifier']} classifier"
    if info.get("mask"):
        what += f", block {info['mask']['block_size']}, threshold {info['mask']['threshold']:g}"
    graph_io = (", ".join(f"{t['name']} [{', '.join(str(d) for d in t['shape'])}] {t['type']}" for t in o["onnxruntime"])
                if o["onnxruntime"] is not None else f"{', '.join(o['names'])} (per the manifest: ONNX Runtime cannot load the graph here)")
    runs = f"{info['target']}, opset {info['opset']}; custom ops "
    runs += f"{', '.join(ops['ops'])} -> {ops['runs_with']}" if ops["ops"] else "none"
    if ops["runs_with"] == "native kernels":
        runs += f" ({ops['native']['path']})"
    lines = [
        ("bundle", f"{info['bundle']} ({info['total_bytes']:,} B in {len(info['files'])} file{'s' if len(info['files']) != 1 else ''}), "
                   f"digest {info['digest'][:12]}… verified ({info['digest_check']})"),
        ("explains", what),
        ("classes", f"{len(names)}: {_names(names)}"),
        ("input", f"{i['name']}: {_shape(i['shape'])} {i['dtype']} {i['layout']}, {size}; "
                  f"{i['normalisation']}, mean {i['mean']}, std {i['std']}"),
        ("resize", i["resize"]),
        ("outputs", f"{graph_io}; classifies the {o['classify_on']} image"),
        ("runs with", runs),
    ]
    if prov:  # written by keepbits export, but any JSON in a hostile bundle: shown as text, never trusted to have a shape
        made = [f"exported {prov['exported_utc']}" if prov.get("exported_utc") else "",
                f"by keepbits {prov['keepbits_version']}" if prov.get("keepbits_version") else "",
                f"from {prov['checkpoint']} (sha256 {str(prov.get('checkpoint_sha256', ''))[:12]}…)" if prov.get("checkpoint") else "",
                _epoch(prov.get("epoch"))]
        lines.append(("provenance", ", ".join(m for m in made if m) or "recorded (--json)"))
        if prov.get("training_command"):
            lines.append(("trained by", str(prov["training_command"])))
        quantization = prov.get("quantization")
        if isinstance(quantization, dict):  # keepbits export int8: how, on what, and what it cost against float32
            versus = quantization.get("evaluation_vs_fp32") if isinstance(quantization.get("evaluation_vs_fp32"), dict) else {}
            measured = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in versus.items()
                                 if k in ("argmax_agreement", "mask_agreement", "accuracy_reference", "accuracy_candidate")
                                 and isinstance(v, float))
            when = f"{quantization['quantized_utc']}, " if quantization.get("quantized_utc") else ""
            when += f"ONNX Runtime {quantization['onnxruntime_version']}, " if quantization.get("onnxruntime_version") else ""
            lines.append(("quantized", f"{when}{quantization.get('method', '?')}; {quantization.get('calibration', 'minmax')} "
                                       f"calibration on {quantization.get('calibration_images', '?')} "
                                       f"images of {quantization.get('calibration_data', '?')}"
                                       + (f"; float32 ends: {len(quantization['float32_nodes'])} nodes"
                                          if isinstance(quantization.get("float32_nodes"), list) and quantization["float32_nodes"] else "")
                                       + (f"; against float32 on {versus.get('images', '?')} images: {measured}" if measured else "")))
            if quantization.get("command"):
                lines.append(("quantized by", str(quantization["command"])))
        metrics = prov.get("metrics") if isinstance(prov.get("metrics"), dict) else {}
        final = metrics.get("final")
        if isinstance(final, dict) and final:
            values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
            split = metrics.get("final_split")
            lines.append(("metrics", values + (f" (on {split})" if split else "")))
    return "\n".join(f"{key:<11} {_printable(value)}" for key, value in lines)


def _printable(text: str, limit: int = 600) -> str:
    """``text`` with control characters (newlines, ANSI escapes from a hostile manifest) shown
    escaped, cut to ``limit`` characters (a manifest may hold a megabyte in one field)."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


__all__ = ["RESIZE_DESCRIPTIONS", "bundle_info", "custom_op_status", "info_report", "resize_description"]
