"""INT8 static quantisation of a bundle with ONNX Runtime's tools, and its cost in accuracy and masks.

``quantize_bundle`` calibrates on training images, quantises the convolutions and matrix
products with their activations and residual additions (:data:`QUANTIZED_OPS`; QDQ, int8
weights, per channel; uint8 activations by default, int8 on request; the
``keepbits`` nodes stay float32 and keep their function bodies), writes a new bundle whose manifest records the calibration and the
comparison with the float bundle on test images: classifier accuracy, argmax agreement,
mask agreement (ẑ > mask_threshold, NICE Eq. 11) and the largest ẑ / x̃ deviations.

    keepbits export int8 --model BUNDLE --data DATA --out BUNDLE_INT8

Example:
    >>> from keepbits.export.quantize import quantize_bundle
    >>> # bundle, report = quantize_bundle("mnist.bundle", "mnist-int8.bundle", "data/mnist")
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from keepbits.bundle import Bundle, load_bundle, refuse_existing, write_bundle
from keepbits.data import Preprocessing, has_split, load_dataset, sample_indices
from keepbits.data.images import is_labelled_set, model_images
from keepbits.errors import InputError
from keepbits.native import make_session
from keepbits.runtime.parity import Parity
from keepbits.runtime.pipeline import bundle_inputs

#: Operators quantised. The activations (Clip = ReLU6, Relu) and the residual Add are among them
#: so that ONNX Runtime's QDQ quantiser folds an activation into the convolution before it and
#: quantises the convolution's output at the activation's range: without them each convolution
#: output kept its full pre-activation range in 8 bits and EfficientNet-Lite0 fell from 76.0 %
#: to 62.5 % top-1 (200 validation images; 75.0 % with them, bench/results/flagship_bundle_*.json).
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Clip", "Relu", "Add"]
#: Activation types. ORT 1.32's x86 CPU kernels fuse DQ→Conv→Q into QLinearConv for uint8
#: activations; with int8 activations most convolutions stayed float Conv between
#: Dequantize/Quantize nodes (ResNet-18 at 224: 10.9 ms vs 4.6 ms per frame, measured with
#: ORT's profiler on a 2-core x86 host). int8 suits runtimes whose int8 kernels are
#: the fast path (e.g. TensorRT, ARM).
ACTIVATION_TYPES = ("uint8", "int8")
#: How activation ranges are calibrated (ONNX Runtime's ``CalibrationMethod``): ``minmax`` takes the
#: extremes seen; ``percentile`` clips the 0.001 % tails; ``entropy`` picks the range whose 8-bit
#: histogram keeps the most information (KL divergence).
CALIBRATIONS = ("minmax", "percentile", "entropy")


def _float_ends(model_path: Path) -> list[str]:
    """Names of the classifier's first convolution and the graph's last Gemm/MatMul (the
    classifier's input and output layers), which ``float_ends=True`` leaves in float32. In a NICE
    graph the generator's convolutions often come first in node order; the classifier's are the
    ones whose weights are named ``classifier.*`` (the exported module's attribute), and a graph
    without such names (any other ONNX model) gives its first convolution."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    convs = [n for n in nodes if n.op_type == "Conv"]
    first = next((n.name for n in convs if n.input[1:2] and n.input[1].startswith("classifier.")), convs[0].name if convs else None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over batches of one array."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self._batches: Iterator[dict[str, np.ndarray]] = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def compare(reference: Bundle, candidate: Bundle, images: np.ndarray, labels: np.ndarray | None, batch: int = 64) -> dict[str, float]:
    """Accuracy, argmax / mask agreement and max ẑ, x̃/scale deviation of ``candidate`` vs
    ``reference`` (``mixed_max_abs`` None for bundles without the x̃ output), by
    :class:`keepbits.runtime.parity.Parity`."""
    m = reference.manifest
    sessions = [make_session(b.model_path) for b in (reference, candidate)]
    parity = Parity(m.output_names, m.pixel_scale, m.mask_threshold)
    predictions: list[list[np.ndarray]] = [[], []]
    x = bundle_inputs(m, images)
    for i in range(0, len(x), batch):
        outputs = [s.run(m.output_names, {m.input_name: x[i:i + batch]}) for s in sessions]
        parity.add(*outputs)
        for k, out in enumerate(outputs):
            predictions[k].append(out[0].argmax(1))
    r = parity.report()
    report = {
        "images": len(x),
        "argmax_agreement": r["argmax_agree"],
        "mask_agreement": r["mask_agree"],
        "kept_fraction_reference": r["kept_fraction_reference"],
        "mask_max_abs": r["mask_max_abs"],
        "mixed_max_abs": r.get("mixed_max_abs"),
    }
    if labels is not None:
        report["accuracy_reference"] = float(np.mean(np.concatenate(predictions[0]) == labels))
        report["accuracy_candidate"] = float(np.mean(np.concatenate(predictions[1]) == labels))
    return report


def _cut(n: int, calibration_images: int, eval_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint calibration and comparison positions among ``n`` drawn images (shuffled, seed 0);
    where fewer than both ask for were drawn, at most half of them compare."""
    order = np.random.default_rng(0).permutation(n)
    n_eval = eval_images if n >= calibration_images + eval_images else min(eval_images, n // 2)
    n_cal = min(calibration_images, n - n_eval)
    return order[:n_cal], order[n_cal:n_cal + n_eval]


def calibration_split(data: str | Path, manifest: Any, calibration_images: int, eval_images: int,
                      frame_step: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """Calibration images, comparison images, their labels (None: unlabelled, or classes that
    are not the bundle's) and a description of ``data``; never an image in both.

    A labelled set with a test split calibrates on a seeded class-balanced sample of its train
    split and compares on one of its test split; without a test split (class folders), and for
    unlabelled footage (image folders of any nesting, videos: every ``frame_step``-th frame), one
    seeded draw (class-balanced where labelled) is cut into two disjoint parts (:func:`_cut`).
    """
    c, h, w = manifest.input_shape
    if is_labelled_set(Path(data), "train"):
        fit = dict(size=(h, w), policy=manifest.resize_policy, crop_fraction=manifest.crop_fraction, channels=c)  # class folders
        train = load_dataset(data, "train", **fit)
        if has_split(data, "test"):
            test = load_dataset(data, "test", **fit).sample(eval_images, seed=0)
            calib, eval_x, eval_y, described = train.sample(calibration_images, seed=0).x, test.x, test.y, str(data)
        else:
            chosen = sample_indices(train.y, calibration_images + eval_images, seed=0)
            cal, comparison = _cut(len(chosen), calibration_images, eval_images)
            calib, eval_x, eval_y = train.x[chosen[cal]], train.x[chosen[comparison]], train.y[chosen[comparison]]
            described = f"{data} (no test split: calibration and comparison are disjoint parts of one draw)"
        if calib.shape[-1] != c:
            raise InputError(f"{data}: images with {calib.shape[-1]} channels, the bundle takes {c} (calibrate on the data it was trained for)")
        return calib, eval_x, eval_y if train.num_classes == len(manifest.class_names) else None, described
    pre = Preprocessing((h, w), tuple(manifest.mean), tuple(manifest.std), manifest.resize_policy, manifest.crop_fraction)
    drawn = model_images(data, pre, num_images=calibration_images + eval_images, seed=0, frame_step=frame_step, channels=c)
    if len(drawn.images) < 2:
        raise InputError(f"{data}: {len(drawn.images)} readable image(s); calibration and comparison need at least one each")
    cal, comparison = _cut(len(drawn.images), calibration_images, eval_images)
    return drawn.images[cal], drawn.images[comparison], None, drawn.source


def quantize_bundle(bundle_path: str | Path, out: str | Path, data: str | Path, calibration_images: int = 256,
                    eval_images: int = 1000, per_channel: bool = True, overwrite: bool = False,
                    activations: str = "uint8", frame_step: int = 1, calibration: str = "minmax",
                    float_ends: bool = False, command: str | None = None) -> tuple[Bundle, dict]:
    """Quantise ``bundle_path`` to INT8 (calibration: ``calibration_images`` of ``data``) and
    compare on ``eval_images`` others (:func:`calibration_split`: the test split, or a disjoint
    part of one seeded draw); unlabelled footage is compared by argmax and mask agreement only
    (no accuracy without labels).
    ``activations`` is one of :data:`ACTIVATION_TYPES`, ``calibration`` one of :data:`CALIBRATIONS`;
    ``float_ends`` keeps the first convolution and the last Gemm/MatMul in float32."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if activations not in ACTIVATION_TYPES:
        raise InputError(f"activations must be one of {ACTIVATION_TYPES}, got {activations!r}")
    if calibration not in CALIBRATIONS:
        raise InputError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if Path(out).resolve() == Path(bundle_path).resolve():
        raise InputError(f"--out {out} is the float32 bundle being quantized; write the INT8 bundle beside it")
    refuse_existing(out, overwrite)

    source = load_bundle(bundle_path)
    m = source.manifest
    if "quantization" in m.provenance:
        raise InputError(f"{bundle_path}: already an INT8 bundle (keepbits export int8); quantize the float32 bundle it came from")
    if not m.function_bodies:
        raise InputError(f"{bundle_path}: a {m.target} bundle without function bodies cannot be calibrated in ONNX Runtime")
    calib, eval_x, eval_y, described = calibration_split(data, m, calibration_images, eval_images, frame_step)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "model.onnx"
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # onnxruntime.quantization advises pre-processing through the root logger
        kept_float = _float_ends(source.model_path) if float_ends else []
        try:  # its histogram calibrators print progress to stdout, where `keepbits export int8` writes its JSON report
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(source.model_path), str(quantized), _Reader(m.input_name, bundle_inputs(m, calib), 16),
                                quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8, per_channel=per_channel, op_types_to_quantize=QUANTIZED_OPS,
                                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                                  "entropy": CalibrationMethod.Entropy}[calibration],
                                nodes_to_exclude=kept_float or None)
        finally:  # for this call only: the caller's warnings (keepbits' own included) stay on
            root.setLevel(level)
        provenance = dict(m.provenance)
        provenance["quantization"] = {
            "method": f"onnxruntime.quantization.quantize_static, QDQ, {activations} activations, int8 weights",
            "per_channel": per_channel, "op_types": QUANTIZED_OPS, "calibration_images": len(calib), "calibration": calibration,
            "float32_nodes": kept_float,
            "calibration_data": described, "source_bundle_digest": source.digest,
            "command": command, "onnxruntime_version": onnxruntime.__version__,
            "quantized_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        manifest = dataclasses.replace(m, provenance=provenance, files={})
        staged = write_bundle(Path(tmp) / "staged", manifest, {m.model_file: quantized})
        report = compare(source, load_bundle(staged), eval_x, eval_y)
        provenance["quantization"]["evaluation_vs_fp32"] = report
        bundle = load_bundle(write_bundle(out, dataclasses.replace(manifest, provenance=provenance), {m.model_file: quantized},
                                          overwrite=overwrite))
    return bundle, report
