"""Parity of one model across backends and artefacts, in the Polygraphy sense (``keepbits compare``).

A *backend* is a bundle run by ONNX Runtime one way (with the native kernels, with the ONNX
function bodies, on CUDA, on TensorRT) or any session with ONNX Runtime's ``run(names, feed)``
(the eager torch graph of a checkpoint, :func:`keepbits.export.torch_pipeline`). Every backend
sees the same images (fitted by its resize policy); :class:`Parity` accumulates, per output, the max and mean
absolute difference from the reference (pixel outputs x̃ / simplified divided by the pixel
scale) over the values both give as finite numbers, the count of values where either gives NaN
or ±inf (a failed check whatever the tolerances, as Polygraphy's output validation), the argmax
agreement of the logits and the agreement of the hard masks (ẑ > threshold, NICE Eq. 11).
:func:`check` holds them against stated tolerances.

Example:
    >>> import numpy as np
    >>> from keepbits.runtime.parity import compare_outputs
    >>> a = (np.eye(2), np.full((2, 1), 255.0))
    >>> compare_outputs(a, (np.eye(2), np.zeros((2, 1))), 255.0, names=("logits", "simplified"))["simplified_max_abs"]
    1.0
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from keepbits import native
from keepbits.bundle import EXPLAIN_OUTPUTS, Manifest, load_bundle
from keepbits.errors import InputError
from keepbits.runtime.pipeline import Pipeline, bundle_inputs

#: Graph outputs in pixel space (0..255 for uint8 input): compared after dividing by the pixel scale.
PIXEL_OUTPUTS = ("mixed", "simplified")
#: How a bundle can be run: ``auto`` (as ``keepbits run`` does: native kernels when they load,
#: CUDA when available), ``functions`` (CPU, the ONNX function bodies), ``native`` (CPU, the
#: native kernels, required), ``cuda`` and ``tensorrt`` (those ONNX Runtime providers, required).
BUNDLE_BACKENDS = ("auto", "functions", "native", "cuda", "tensorrt")


class Parity:
    """Running differences of ``names`` outputs between a reference and a candidate, batch by batch."""

    def __init__(self, names: Sequence[str], pixel_scale: float = 1.0, threshold: float = 0.5):
        self.names, self.pixel_scale, self.threshold = list(names), float(pixel_scale), float(threshold)
        self.max = dict.fromkeys(self.names, 0.0)
        self.sum = dict.fromkeys(self.names, 0.0)
        self.count = dict.fromkeys(self.names, 0)
        self.non_finite = dict.fromkeys(self.names, 0)
        self.images = self.argmax_agree = self.mask_agree = self.mask_pixels = self.kept = 0

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> "Parity":
        """One batch: the outputs ``names`` of both, in that order."""
        for name, ref, got in zip(self.names, reference, candidate):
            ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
            if ref.shape != got.shape:
                raise InputError(f"output {name!r} has shape {got.shape} here and {ref.shape} in the reference")
            finite = np.isfinite(ref) & np.isfinite(got)
            self.non_finite[name] += int(finite.size - np.count_nonzero(finite))
            diff = np.abs(got - ref)[finite] / (self.pixel_scale if name in PIXEL_OUTPUTS else 1.0)
            self.max[name] = max(self.max[name], float(diff.max(initial=0.0)))
            self.sum[name] += float(diff.sum())
            self.count[name] += diff.size
            if name == "logits":
                self.images += len(ref)
                self.argmax_agree += int((ref.argmax(1) == got.argmax(1)).sum()) if len(ref) else 0
            if name == "mask":
                keep_ref, keep_got = ref > self.threshold, got > self.threshold
                self.mask_agree += int((keep_ref == keep_got).sum())
                self.mask_pixels += keep_ref.size
                self.kept += int(keep_ref.sum())
        return self

    def report(self) -> dict[str, float]:
        """``<name>_max_abs`` and ``<name>_mean_abs`` (over values finite in both) and
        ``<name>_non_finite`` (values NaN or ±inf in either) per output, ``argmax_agree`` (1 with
        no images), and with a mask ``mask_agree`` and ``kept_fraction_reference``."""
        out: dict[str, float] = {}
        for name in self.names:
            out[f"{name}_max_abs"] = self.max[name]
            out[f"{name}_mean_abs"] = self.sum[name] / self.count[name] if self.count[name] else 0.0
            out[f"{name}_non_finite"] = self.non_finite[name]
        if "logits" in self.names:
            out["argmax_agree"] = self.argmax_agree / self.images if self.images else 1.0
        if "mask" in self.names:
            out["mask_agree"] = self.mask_agree / self.mask_pixels if self.mask_pixels else 1.0
            out["kept_fraction_reference"] = self.kept / self.mask_pixels if self.mask_pixels else 0.0
        return out


def compare_outputs(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    pixel_scale: float = 1.0,
    names: Sequence[str] = tuple(EXPLAIN_OUTPUTS["mask"]),
    threshold: float = 0.5,
) -> dict[str, float]:
    """:meth:`Parity.report` of one batch: max/mean abs difference of every output (pixel
    outputs divided by ``pixel_scale``), ``argmax_agree`` of the logits, ``mask_agree``."""
    return Parity(names, pixel_scale, threshold).add(reference, candidate).report()


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Limits a candidate must meet; None skips that check. ``*_atol``: max abs difference of
    the logits, of ẑ and of the pixel outputs (on the 0..1 scale); ``min_*``: agreements."""

    logits_atol: float | None = 1e-3
    mask_atol: float | None = 1e-3
    pixels_atol: float | None = 1e-3
    min_argmax_agree: float | None = 1.0
    min_mask_agree: float | None = 0.999


def check(report: Mapping[str, float], tolerances: Tolerances) -> list[dict[str, Any]]:
    """One row per check that applies: ``name``, ``value``, ``limit``, ``passed``; every
    ``<output>_non_finite`` count in ``report`` is checked against 0 whatever the tolerances.

    Example:
        >>> from keepbits.runtime.parity import Tolerances, check
        >>> [(c["name"], c["passed"]) for c in check({"logits_max_abs": 0.01, "argmax_agree": 1.0}, Tolerances())]
        [('logits_max_abs', False), ('argmax_agree', True)]
    """
    limits = [("logits_max_abs", tolerances.logits_atol, "max"), ("mask_max_abs", tolerances.mask_atol, "max"),
              *((f"{name}_max_abs", tolerances.pixels_atol, "max") for name in PIXEL_OUTPUTS),
              ("argmax_agree", tolerances.min_argmax_agree, "min"), ("mask_agree", tolerances.min_mask_agree, "min")]
    limits += [(key, 0.0, "max") for key in report if key.endswith("_non_finite")]
    rows = []
    for key, limit, kind in limits:
        if limit is None or key not in report:
            continue
        value = float(report[key])
        rows.append({"name": key, "value": value, "limit": float(limit), "kind": kind,
                     "passed": value <= limit if kind == "max" else value >= limit})
    return rows


def bundle_pipeline(path: str | Path, backend: str = "auto", threads: int | None = None) -> Pipeline:
    """A :class:`keepbits.runtime.Pipeline` of the bundle at ``path`` run the ``backend`` way
    (:data:`BUNDLE_BACKENDS`); :class:`InputError` when this machine cannot run it that way."""
    import onnxruntime as ort

    if backend not in BUNDLE_BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BUNDLE_BACKENDS)}")
    if backend == "auto":
        return Pipeline.from_bundle(path, "auto", threads=threads)
    bundle = load_bundle(path)
    if backend == "native" and not native.available():
        raise InputError(f"backend 'native' needs the native keepbits kernels, which are not in use here: {native.status()['reason']}")
    if backend == "functions" and not bundle.manifest.function_bodies:
        raise InputError(f"{path}: a {bundle.manifest.target} bundle has no ONNX function bodies; use backend native or tensorrt")
    provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(backend, "CPUExecutionProvider")
    available = ort.get_available_providers()
    if provider not in available:
        raise InputError(f"backend {backend!r} needs ONNX Runtime's {provider}, which this install does not have ({', '.join(available)})")
    providers = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}.get(backend, [provider])
    try:
        session = native.make_session(bundle.model_path, native=backend != "functions", providers=providers, threads=threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own error types
        raise InputError(f"{path}: ONNX Runtime cannot load the model with backend {backend!r} ({exc})") from None
    return Pipeline(bundle, session=session)


def run_outputs(pipeline: Pipeline, images: Sequence[np.ndarray], names: Sequence[str], batch_size: int = 32) -> list[list[np.ndarray]]:
    """``names`` outputs of ``pipeline``'s session on ``images`` (fitted to its model size by its resize policy
    by :meth:`keepbits.runtime.Pipeline.prepare`), one list of arrays per batch."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = pipeline.prepare(list(images[start:start + batch_size])).batch
        feed = {pipeline.manifest.input_name: bundle_inputs(pipeline.manifest, batch)}
        out.append([np.asarray(a) for a in pipeline.session.run(list(names), feed)])
    return out


def compare_pipelines(reference: Pipeline | Callable[[Manifest], Pipeline], candidates: Mapping[str, Pipeline],
                      images: Sequence[np.ndarray], tolerances: Tolerances, batch_size: int = 32) -> dict[str, Any]:
    """Run ``reference`` and every candidate (name -> :class:`keepbits.runtime.Pipeline`) on
    ``images`` and compare the outputs they share; ``passed`` is False when any candidate
    misses a tolerance. ``reference`` may be a function of a candidate's manifest giving the
    reference built like that candidate (a checkpoint's torch twin of each bundle: the image it
    classifies, its input type). Pixel outputs are compared on 0..1 in N×C×H×W whatever each
    side's layout and scale (a uint8 NHWC bundle against a float32 NCHW one)."""
    twins: dict[tuple[Any, ...], Pipeline] = {}

    def reference_like(c: Manifest) -> Pipeline:
        if isinstance(reference, Pipeline):
            return reference
        key = (c.input_dtype, c.classify_on, tuple(c.output_names))
        if key not in twins:
            twins[key] = reference(c)
        return twins[key]

    rows = []
    reference_outputs: dict[tuple[Any, ...], list[list[np.ndarray]]] = {}
    for name, candidate in candidates.items():
        c = candidate.manifest
        ref_pipe = reference_like(c)
        m = ref_pipe.manifest
        if list(c.input_shape) != list(m.input_shape) or len(c.class_names) != len(m.class_names):
            raise InputError(f"{name}: input {c.input_shape} and {len(c.class_names)} classes differ from the reference's "
                             f"{m.input_shape} and {len(m.class_names)}: not the same model")
        # two bundles classifying different images (original / x̃) are not meant to agree on logits: ẑ and x̃ only
        skipped = [] if c.classify_on == m.classify_on else [
            f"logits: {name} classifies the {c.classify_on} image, the reference the {m.classify_on} one"]
        names = tuple(n for n in m.output_names if n in c.output_names and n in _session_outputs(candidate)
                      and n in _session_outputs(ref_pipe) and not (skipped and n == "logits"))
        if (id(ref_pipe), names) not in reference_outputs:
            reference_outputs[id(ref_pipe), names] = [_unit_pixels(m, names, batch)
                                                      for batch in run_outputs(ref_pipe, images, names, batch_size)]
        parity = Parity(names, 1.0, m.mask_threshold)
        for ref, got in zip(reference_outputs[id(ref_pipe), names], run_outputs(candidate, images, names, batch_size)):
            parity.add(ref, _unit_pixels(c, names, got))
        report = parity.report()
        checks = check(report, tolerances)
        rows.append({"model": name, "providers": candidate.providers, "outputs": list(names), "metrics": report,
                     "checks": checks, "passed": all(c["passed"] for c in checks), **({"skipped": skipped} if skipped else {})})
    providers = reference.providers if isinstance(reference, Pipeline) else sorted({p for t in twins.values() for p in t.providers})
    return {"images": len(images), "reference_providers": providers, "tolerances": dataclasses.asdict(tolerances),
            "comparisons": rows, "passed": all(r["passed"] for r in rows)}


def _unit_pixels(manifest: Manifest, names: Sequence[str], outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``outputs`` with the pixel outputs (x̃, simplified) as N×C×H×W on 0..1: a uint8 NHWC
    bundle's are N×H×W×C on 0..255, a float32 one's N×C×H×W on 0..1."""
    converted = []
    for name, array in zip(names, outputs):
        if name in PIXEL_OUTPUTS:
            array = np.asarray(array, np.float64) / manifest.pixel_scale
            if manifest.input_layout == "NHWC":
                array = array.transpose(0, 3, 1, 2)
        converted.append(array)
    return converted


def _session_outputs(pipeline: Pipeline) -> list[str]:
    """Outputs the pipeline's session gives: ONNX Runtime lists them, the torch backend names them."""
    outputs = getattr(pipeline.session, "get_outputs", None)
    if outputs is not None:
        return [o.name for o in outputs()]
    return list(getattr(pipeline.session, "output_names", ["logits", "mask"]))


__all__ = ["BUNDLE_BACKENDS", "PIXEL_OUTPUTS", "Parity", "Tolerances", "bundle_pipeline", "check",
           "compare_outputs", "compare_pipelines", "run_outputs"]
