"""TensorRT engines from model bundles, with the ``keepbits`` plugins and a parity check.

TensorRT's ONNX parser expands model-local functions before it looks for plugins, so the
custom nodes are handed to it without function bodies (bundles exported with
``--target tensorrt`` have none; others are stripped here). The plugin library
(``native/cuda``, ``libkeepbits_trt.so``) provides ``HardConcreteMask``, ``MixedResCompose`` and
``MaskCompose`` as IPluginV3 plugins.

Engines are cached under ``cache_dir`` by a key of GPU model + compute capability, TensorRT
version, bundle digest, precision, optimisation profile and plugin library hash. After a build
(or a cache hit) the engine runs sample batches next to ONNX Runtime and the per-output
max abs / rel errors must stay within tolerance, else :class:`BundleError`.

TensorRT is imported lazily: without it every entry point raises one :class:`InputError`.
Status: written against the TensorRT 10 Python API; it has not run on a GPU yet (see
``docs/export.md``), so results are only "verified" in a report produced by an actual run.

Example:
    >>> from keepbits.export.tensorrt import engine_key
    >>> len(engine_key("H100", "9.0", "10.3", "ab" * 32, "fp16", ((1, 224, 224), (8, 224, 224), (8, 224, 224)), "cd" * 32))
    64
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from keepbits.bundle import Bundle, load_bundle, sha256_file
from keepbits.errors import BundleError, InputError

_log = logging.getLogger("keepbits.export")
PLUGIN_LIBRARY = "libkeepbits_trt.so"
PRECISIONS = ("fp32", "fp16")
#: Default parity tolerances (max abs error on ẑ and x̃/pixel scale; logits argmax must agree).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or one clear :class:`InputError` when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise InputError(
            "TensorRT is not installed: `keepbits export tensorrt` needs NVIDIA TensorRT 10 (pip install tensorrt) "
            "and a CUDA GPU; no engine was built. The bundle itself runs with ONNX Runtime (keepbits run)."
        ) from None
    return tensorrt


def plugin_library_path() -> Path:
    """``$KEEPBITS_TRT_PLUGIN`` or ``native/build/libkeepbits_trt.so`` (``native/build.sh --cuda``)."""
    explicit = os.environ.get("KEEPBITS_TRT_PLUGIN")
    path = Path(explicit) if explicit else Path(__file__).resolve().parents[3] / "native" / "build" / PLUGIN_LIBRARY
    if not path.is_file():
        raise InputError(f"TensorRT plugin library not found at {path}: build it with `native/build.sh --cuda` "
                         "(TENSORRT_INCLUDE_DIR set) or set KEEPBITS_TRT_PLUGIN")
    return path


def strip_function_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the ``keepbits`` function bodies (TensorRT then uses the plugins)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]
    stripped.functions.extend(f for f in model.functions if f.domain != "keepbits")
    return stripped


def engine_key(gpu: str, compute_capability: str, trt_version: str, bundle_digest: str, precision: str,
               profile: tuple[tuple[int, int, int], ...], plugin_sha256: str) -> str:
    """Cache key of an engine: everything that makes a serialized engine valid or different."""
    text = json.dumps([gpu, compute_capability, trt_version, bundle_digest, precision, [list(p) for p in profile], plugin_sha256])
    return hashlib.sha256(text.encode()).hexdigest()


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of device 0, from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        raise InputError("no NVIDIA GPU found (nvidia-smi failed): TensorRT engines need one") from None
    name, cap = (part.strip() for part in out.split(",", 1))
    return name, cap


@dataclass
class EngineSpec:
    """What to build: precision and the optimisation profile (batch and H×W: min, opt, max)."""

    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 1, 8)
    height: tuple[int, int, int] | None = None  # default: the bundle's training size, fixed
    width: tuple[int, int, int] | None = None

    def profile(self, bundle: Bundle) -> tuple[tuple[int, int, int], ...]:
        """((N, H, W) min, opt, max)."""
        _, h, w = bundle.manifest.input_shape
        hs, ws = self.height or (h, h, h), self.width or (w, w, w)
        for name, dims in (("batch", self.batch), ("height", hs), ("width", ws)):
            if not (1 <= dims[0] <= dims[1] <= dims[2]):
                raise InputError(f"{name} profile must satisfy 1 <= min <= opt <= max, got {dims}")
        if not bundle.manifest.dynamic_size and (hs != (h, h, h) or ws != (w, w, w)):
            raise InputError(f"this bundle accepts {h}×{w} images only (dynamic_size false)")
        return tuple((self.batch[i], hs[i], ws[i]) for i in range(3))


@dataclass
class EngineReport:
    engine: str
    key: str
    cached: bool
    tensorrt_version: str
    gpu: str
    precision: str
    profile: list[list[int]]
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    verified: bool = False


def _input_shape(bundle: Bundle, n: int, h: int, w: int) -> tuple[int, ...]:
    c = bundle.manifest.input_shape[0]
    return (n, h, w, c) if bundle.manifest.input_layout == "NHWC" else (n, c, h, w)


def build_engine(bundle_path: str | Path, spec: EngineSpec, cache_dir: str | Path, samples: int = 4,
                 tolerance: float | None = None, seed: int | None = None) -> EngineReport:
    """Build (or reuse) a TensorRT engine for a bundle and check it against ONNX Runtime.

    Example:
        >>> # build_engine("nice.bundle", EngineSpec("fp16", batch=(1, 4, 8)), "~/.cache/keepbits/trt")
    """
    if spec.precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {spec.precision!r}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise InputError(f"tolerance must be a finite number > 0, got {tolerance!r}")  # NaN would pass any engine
    if not (isinstance(samples, int) and samples >= 1):
        raise InputError(f"samples must be an int >= 1, got {samples!r}")
    cache = Path(cache_dir).expanduser()
    if cache.exists() and not cache.is_dir():
        raise InputError(f"engine cache {cache_dir}: a file, not a folder")
    bundle = load_bundle(bundle_path)
    profile = spec.profile(bundle)  # the user's mistakes first, then what this machine lacks
    try:
        import torch  # noqa: F401 - the parity check's CUDA buffers
    except ModuleNotFoundError:
        raise InputError("building a TensorRT engine needs torch with CUDA for its parity check: pip install 'keepbits[train]'") from None
    trt = import_tensorrt()
    plugin = plugin_library_path()
    gpu, capability = gpu_identity()
    key = engine_key(gpu, capability, trt.__version__, bundle.digest, spec.precision, profile, sha256_file(plugin))
    cache.mkdir(parents=True, exist_ok=True)
    engine_path = cache / f"{key}.engine"
    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    if registry.load_library(str(plugin)) is None:
        raise InputError(f"TensorRT could not load the plugin library {plugin}")
    cached = engine_path.is_file()
    if not cached:
        _build(trt, logger, bundle, spec.precision, profile, engine_path)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise BundleError(f"{engine_path}: TensorRT could not deserialize the engine (delete it to rebuild)")
    report = EngineReport(str(engine_path), key, cached, trt.__version__, f"{gpu} (sm {capability})", spec.precision,
                          [list(p) for p in profile])
    tol = TOLERANCE[spec.precision] if tolerance is None else tolerance
    report.parity = _parity(engine, bundle, profile, samples, np.random.default_rng(seed))
    compared = [name for name in bundle.manifest.output_names if name != "logits"]  # ẑ, and x̃ when the bundle has it
    worst = max(r[f"{name}_max_abs"] for r in report.parity.values() for name in compared)
    non_finite = sum(r[f"{name}_non_finite"] for r in report.parity.values() for name in bundle.manifest.output_names)
    if worst > tol or non_finite or min(r["argmax_agree"] for r in report.parity.values()) < 1.0:
        raise BundleError(f"TensorRT engine disagrees with ONNX Runtime beyond tolerance {tol}: {report.parity}")
    report.verified = True
    (cache / f"{key}.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _build(trt: Any, logger: Any, bundle: Bundle, precision: str, profile: tuple, engine_path: Path) -> None:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    model = strip_function_bodies(onnx.load(str(bundle.model_path)))
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {bundle.model_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(bundle.manifest.input_name, *(_input_shape(bundle, *p) for p in profile))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build an engine for {bundle.source} (see the TensorRT log above)")
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)


def _parity(engine: Any, bundle: Bundle, profile: tuple, samples: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Run ``samples`` random batches (min, opt, max shapes, then random ones) in TensorRT and ONNX Runtime."""
    import torch  # CUDA buffers for TensorRT

    from keepbits.native import make_session
    from keepbits.runtime.parity import compare_outputs

    session = make_session(bundle.model_path)
    context = engine.create_execution_context()
    m = bundle.manifest
    shapes = list(profile)[:samples]
    while len(shapes) < samples:
        shapes.append(tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(profile[0], profile[2])))
    report = {}
    stream = torch.cuda.Stream()
    for n, h, w in shapes:
        shape = _input_shape(bundle, n, h, w)
        image = rng.integers(0, 256, shape, dtype=np.uint8) if m.input_dtype == "uint8" else rng.random(shape, dtype=np.float32)
        reference = session.run(None, {m.input_name: image})
        device_in = torch.from_numpy(image).cuda()
        context.set_input_shape(m.input_name, shape)
        context.set_tensor_address(m.input_name, device_in.data_ptr())
        outputs = {}
        for name in m.output_names:
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise BundleError(f"TensorRT execution failed for input shape {shape}")
        stream.synchronize()
        got = tuple(outputs[name].cpu().numpy() for name in m.output_names)
        row = compare_outputs(tuple(reference), got, m.pixel_scale, names=m.output_names)
        for name, ref, val in zip(m.output_names, reference, got):
            row[f"{name}_max_rel"] = float(np.max(np.abs(val - ref) / np.maximum(np.abs(ref), 1e-6), initial=0.0))
        report["x".join(map(str, shape))] = row
    return report
