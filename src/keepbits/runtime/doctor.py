"""Is this install usable, and on what? (``keepbits doctor``)

:func:`diagnose` reports Python, keepbits and the runtime's packages, ONNX Runtime (version,
providers, which distributions are installed), the native kernels (found, loaded, and why
not: :func:`keepbits.native.status`), OpenCV's video I/O (FFmpeg, GStreamer, V4L2, H.264
writer), the optional extras that are installed (torch and CUDA, onnx, paho-mqtt) and a
self-test: the shipped demo bundle classifies a frame and its payload decodes to x̃ exactly.

Every check has a ``status``: ``ok``, ``info`` (an optional part that is absent), ``warning``
(usable, but probably not what was meant) or ``problem`` (something this install promises is
broken: a runtime dependency does not import, the self-test fails, a native library named by
``$KEEPBITS_NATIVE_LIB`` does not load, an installed extra's package does not import).

Example:
    >>> from keepbits.runtime.doctor import diagnose
    >>> report = diagnose(self_test=False)
    >>> sorted(report)[:3], report["checks"]["python"]["status"]
    (['checks', 'problems', 'warnings'], 'ok')
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from keepbits import native
from keepbits._version import __version__

#: Imports the device runtime needs (``pip install keepbits``): module -> distribution.
RUNTIME_MODULES = {"numpy": "numpy", "PIL": "pillow", "cv2": "opencv-python-headless", "zlib_ng": "zlib-ng",
                   "tqdm": "tqdm", "onnxruntime": "onnxruntime"}
#: ONNX Runtime distributions; more than one installed share the ``onnxruntime`` module and clash (docs/install.md).
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-qnn")
#: Optional extras: distribution -> (module, extra that installs it).
EXTRAS = {"torch": ("torch", "train"), "onnx": ("onnx", "train"), "onnxscript": ("onnxscript", "train"),
          "paho-mqtt": ("paho.mqtt", "mqtt"), "matplotlib": ("matplotlib", "bench")}


def _check(status: str, detail: str, **facts: Any) -> dict[str, Any]:
    return {"status": status, "detail": detail, **facts}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(module: str) -> tuple[Any, str | None]:
    """The module, or None and why it does not import."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - a broken install fails in any way
        return None, f"{type(exc).__name__}: {exc}"


def _runtime_packages() -> dict[str, Any]:
    versions, broken = {}, {}
    for module, distribution in RUNTIME_MODULES.items():
        imported, error = _import(module)
        if imported is None:
            broken[distribution] = error
        versions[distribution] = _version(distribution) or getattr(imported, "__version__", None)
    if broken:
        return _check("problem", f"runtime dependencies do not import: {broken}", versions=versions)
    return _check("ok", "the runtime's dependencies import", versions=versions)


def _onnxruntime() -> dict[str, Any]:
    ort, error = _import("onnxruntime")
    installed = {d: v for d in ORT_DISTRIBUTIONS if (v := _version(d))}
    if ort is None:
        return _check("problem", f"onnxruntime does not import ({error})", distributions=installed)
    facts = {"version": ort.__version__, "providers": ort.get_available_providers(), "device": ort.get_device(),
             "distributions": installed}
    if len(installed) > 1:
        return _check("warning", f"{' and '.join(installed)} are installed together: they share the onnxruntime module and "
                      "overwrite each other's files; keep one (docs/install.md)", **facts)
    if "onnxruntime-gpu" in installed and "CUDAExecutionProvider" not in facts["providers"]:
        return _check("warning", "onnxruntime-gpu is installed but offers no CUDAExecutionProvider (CUDA/cuDNN libraries "
                      "missing?); runs use the CPU", **facts)
    return _check("ok", f"ONNX Runtime {ort.__version__}: {', '.join(facts['providers'])}", **facts)


def _native() -> dict[str, Any]:
    status = native.status()
    if status["loaded"]:
        return _check("ok", f"native kernels loaded from {status['path']}", **status)
    if status["requested"]:
        return _check("problem", f"KEEPBITS_NATIVE_LIB is set but the library does not load: {status['reason']}", **status)
    return _check("info", f"native kernels not in use ({status['reason']}); ONNX Runtime runs the ops' ONNX function bodies "
                  "and the codec its numpy/OpenCV path, with the same results", **status)


def _opencv() -> dict[str, Any]:
    from keepbits.runtime.video import build_video_io, h264_available, has_backend

    import cv2

    backends = {name: has_backend(name) for name in ("FFMPEG", "GSTREAMER", "V4L2")}
    facts = {"version": cv2.__version__, "backends": backends, "build_video_io": build_video_io(),
             "h264_writer": h264_available()}
    missing = [name for name, ok in backends.items() if not ok]
    detail = (f"OpenCV {cv2.__version__}: video back-ends {', '.join(n for n, ok in backends.items() if ok) or 'none'}"
              + (f"; without {', '.join(missing)}" if missing else "")
              + ("; annotated videos in H.264" if facts["h264_writer"] else "; annotated videos in mp4v (no H.264 writer)"))
    return _check("ok" if backends["FFMPEG"] else "warning", detail + ("" if backends["FFMPEG"] else ": video files and RTSP need FFmpeg"),
                  **facts)


def _torch() -> dict[str, Any]:
    if _version("torch") is None:
        return _check("info", "torch is not installed (training, export and torch audits need keepbits[train])")
    torch, error = _import("torch")
    if torch is None:
        return _check("problem", f"torch is installed but does not import ({error})", version=_version("torch"))
    cuda = bool(torch.cuda.is_available())
    facts = {"version": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
             "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    return _check("ok", f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}: {', '.join(facts['devices'])}" if cuda
                                                          else "no CUDA device (CPU)"), **facts)


def _extras() -> dict[str, Any]:
    installed, broken = {}, {}
    for distribution, (module, extra) in EXTRAS.items():
        version = _version(distribution)
        if version is None:
            continue
        installed[distribution] = {"version": version, "extra": extra}
        error = None if distribution == "torch" else _import(module)[1]  # torch has its own check
        if error is not None:
            broken[distribution] = error
    if broken:
        return _check("problem", f"installed optional packages do not import: {broken}", installed=installed)
    return _check("ok" if installed else "info", f"optional packages: {', '.join(installed) or 'none'}", installed=installed)


def _self_test() -> dict[str, Any]:
    """The shipped demo bundle on one frame through :class:`keepbits.runtime.Pipeline`; its
    lossless payload must decode to x̃ bit-exactly."""
    from keepbits.codec import decode
    from keepbits.runtime import Pipeline

    bundle = Path(__file__).resolve().parent.parent / "assets" / "lite0_nice_bundle.zip"  # keepbits.cli.demo.DEMO_BUNDLE
    try:
        pipe = Pipeline.from_bundle(bundle, backend="onnxruntime")
        frame = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
        result = pipe(frame)
        image, _, meta = decode(result.payload)
        exact = bool(np.array_equal(image, result.mixed))
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return _check("problem", f"the demo bundle does not run here: {type(exc).__name__}: {exc}")
    if not exact:
        return _check("problem", "the demo bundle's payload does not decode to x̃ exactly")
    return _check("ok", f"demo bundle: label {result.label!r}, {meta.total_bytes} B payload decodes to x̃ exactly "
                  f"({', '.join(pipe.providers)})", providers=pipe.providers, payload_bytes=meta.total_bytes)


def diagnose(self_test: bool = True) -> dict[str, Any]:
    """Every check (see the module docstring) and the counts of ``problems`` and ``warnings``."""
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "python": lambda: _check("ok", f"Python {platform.python_version()} ({sys.executable})",
                                 version=platform.python_version(), executable=sys.executable, platform=platform.platform()),
        "keepbits": lambda: _check("ok", f"keepbits {__version__}", version=__version__,
                                   location=str(Path(__file__).resolve().parents[1])),
        "runtime_packages": _runtime_packages,
        "onnxruntime": _onnxruntime,
        "native": _native,
        "opencv": _opencv,
        "torch": _torch,
        "extras": _extras,
    }
    if self_test:
        checks["self_test"] = _self_test
    results: dict[str, dict[str, Any]] = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001 - a check that crashes reports, the others still run
            results[name] = _check("problem", f"check failed: {type(exc).__name__}: {exc}")
    return {"checks": results, "problems": sum(r["status"] == "problem" for r in results.values()),
            "warnings": sum(r["status"] == "warning" for r in results.values())}


__all__ = ["EXTRAS", "ORT_DISTRIBUTIONS", "RUNTIME_MODULES", "diagnose"]
