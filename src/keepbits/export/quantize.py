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

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from keepbits.bundle import Bundle, load_bundle, write_bundle
from keepbits.data import ImageDataset, has_split, load_dataset
from keepbits.data.images import is_labelled_set
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
#: ORT's profiler on a 2-core AVX-512 VNNI EPYC). int8 suits runtimes whose int8 kernels are
#: the fast path (e.g. TensorRT, ARM).
ACTIVATION_TYPES = ("uint8", "int8")


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


def _footage_split(data: str | Path, manifest: Any, calibration_images: int, eval_images: int,
                   frame_step: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration and comparison images from unlabelled footage: one seeded draw of both
    (:func:`keepbits.data.images.model_images`, fitted by the bundle's preprocessing), shuffled
    (seed 0) and cut in two disjoint parts; where the footage holds fewer images than both ask
    for, at most half of them compare."""
    from keepbits.data import Preprocessing
    from keepbits.data.images import model_images

    c, h, w = manifest.input_shape
    pre = Preprocessing((h, w), tuple(manifest.mean), tuple(manifest.std), manifest.resize_policy, manifest.crop_fraction)
    drawn = model_images(data, pre, num_images=calibration_images + eval_images, seed=0, frame_step=frame_step, channels=c)
    x, source = drawn.images, drawn.source
    if len(x) < 2:
        raise InputError(f"{data}: {len(x)} readable image(s); calibration and comparison need at least one each")
    order = np.random.default_rng(0).permutation(len(x))
    n_eval = eval_images if len(x) >= calibration_images + eval_images else min(eval_images, len(x) // 2)
    n_cal = min(calibration_images, len(x) - n_eval)
    return x[order[:n_cal]], x[order[n_cal:n_cal + n_eval]], source


def quantize_bundle(bundle_path: str | Path, out: str | Path, data: str | Path, calibration_images: int = 256,
                    eval_images: int = 1000, per_channel: bool = True, overwrite: bool = False,
                    activations: str = "uint8", frame_step: int = 1) -> tuple[Bundle, dict]:
    """Quantise ``bundle_path`` to INT8 (calibration: ``calibration_images`` of the ``data`` train
    split) and compare on ``eval_images`` of the test split (the train split when there is none);
    both are seeded class-balanced samples (:func:`keepbits.data.sample_indices`, seed 0).
    ``data`` may be unlabelled footage instead (image folders of any nesting, videos: every
    ``frame_step``-th frame): calibration and comparison are then disjoint parts of one seeded
    draw, compared by argmax and mask agreement only (no accuracy without labels).
    ``activations`` is one of :data:`ACTIVATION_TYPES`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if activations not in ACTIVATION_TYPES:
        raise InputError(f"activations must be one of {ACTIVATION_TYPES}, got {activations!r}")

    source = load_bundle(bundle_path)
    m = source.manifest
    if not m.function_bodies:
        raise InputError(f"{bundle_path}: a {m.target} bundle without function bodies cannot be calibrated in ONNX Runtime")
    if is_labelled_set(Path(data), "train"):
        fit = dict(size=(m.input_shape[1], m.input_shape[2]), policy=m.resize_policy, crop_fraction=m.crop_fraction)  # class folders
        train = load_dataset(data, "train", **fit)
        test: ImageDataset = load_dataset(data, "test", **fit) if has_split(data, "test") else train
        calib = train.sample(calibration_images, seed=0).x
        evaluation = test.sample(eval_images, seed=0)
        eval_x, eval_y, described = evaluation.x, evaluation.y if evaluation.num_classes == len(m.class_names) else None, str(data)
    else:
        calib, eval_x, described = _footage_split(data, m, calibration_images, eval_images, frame_step)
        eval_y = None
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "model.onnx"
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # onnxruntime.quantization advises pre-processing through the root logger
        try:
            quantize_static(str(source.model_path), str(quantized), _Reader(m.input_name, bundle_inputs(m, calib), 16),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8,
                            per_channel=per_channel, op_types_to_quantize=QUANTIZED_OPS)
        finally:  # for this call only: the caller's warnings (keepbits' own included) stay on
            root.setLevel(level)
        provenance = dict(m.provenance)
        provenance["quantization"] = {
            "method": f"onnxruntime.quantization.quantize_static, QDQ, {activations} activations, int8 weights",
            "per_channel": per_channel, "op_types": QUANTIZED_OPS, "calibration_images": len(calib),
            "calibration_data": described, "source_bundle_digest": source.digest,
        }
        manifest = dataclasses.replace(m, provenance=provenance, files={})
        staged = write_bundle(Path(tmp) / "staged", manifest, {m.model_file: quantized})
        report = compare(source, load_bundle(staged), eval_x, eval_y)
        provenance["quantization"]["evaluation_vs_fp32"] = report
        bundle = load_bundle(write_bundle(out, dataclasses.replace(manifest, provenance=provenance), {m.model_file: quantized},
                                          overwrite=overwrite))
    return bundle, report
