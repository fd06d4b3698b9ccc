"""Find and register the native ONNX Runtime kernels of the ``keepbits`` custom ops.

Bundles carry ONNX function bodies for ``HardConcreteMask``, ``MixedResCompose`` and
``MaskCompose`` (NICE Eqs. 11–12), so they run on any ONNX runtime. With the C++ library
of ``native/`` registered, ONNX Runtime runs the vectorised kernels instead. The library
is looked up in ``$KEEPBITS_NATIVE_LIB``, then ``native/build/`` of a source checkout
(``native/build.sh`` builds it); ``KEEPBITS_NATIVE=0`` disables it. When it is missing (logged
once as information) or fails to load (a warning, once) keepbits uses the function bodies. The
same library exports C helpers of the codec (:func:`c_function`); without it the codec runs its
numpy/OpenCV path, with the same output. Torch-free.

Example:
    >>> from keepbits import native
    >>> so = native.session_options()        # registers the kernels when present
    >>> isinstance(native.available(), bool)
    True
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from keepbits.errors import InputError

LIBRARY_NAME = "libkeepbits_ort.so"
_ENV_PATH = "KEEPBITS_NATIVE_LIB"
_ENV_SWITCH = "KEEPBITS_NATIVE"
_log = logging.getLogger("keepbits.native")
_warned: set[str] = set()


def _warn_once(key: str, message: str, level: int = logging.WARNING) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.log(level, message)


def library_path() -> Path | None:
    """Path of the native library, or None (disabled with ``KEEPBITS_NATIVE=0`` or not built).

    ``$KEEPBITS_NATIVE_LIB`` naming a missing file is an :class:`InputError`.
    """
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get(_ENV_PATH)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise InputError(f"{_ENV_PATH}={explicit}: no such file")
        return path
    package = Path(__file__).resolve().parent
    # a wheel may ship the library inside the package; a source checkout builds it in native/build (src/ layout)
    for candidate in (package / "_native" / LIBRARY_NAME, package.parents[1] / "native" / "build" / LIBRARY_NAME):
        if candidate.is_file():
            return candidate
    return None


def _load_error(options: Any, path: Path) -> str | None:
    """Register the library at ``path`` on ``options``; None, or why ONNX Runtime refused it."""
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeError types
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def register(options: Any) -> bool:
    """Register the native kernels on an ``onnxruntime.SessionOptions``; True when registered.

    Falls back (returns False, logs once why) when the library is absent or does not load.
    """
    path = library_path()
    if path is None:
        # not a fault (an installed package has no native/ folder; the function bodies give the same
        # outputs), so information, silent under -q
        _warn_once("missing", "native keepbits kernels not found (a source checkout builds them with native/build.sh); "
                   "ONNX Runtime runs the ONNX function bodies of the keepbits ops instead", logging.INFO)
        return False
    error = _load_error(options, path)
    if error is not None:
        _warn_once(f"load:{path}", f"native keepbits kernels at {path} did not load ({error}); using the ONNX function bodies")
        return False
    return True


def available() -> bool:
    """True when the native library exists and registers into this onnxruntime."""
    import onnxruntime as ort

    return library_path() is not None and register(ort.SessionOptions())


def status() -> dict[str, Any]:
    """Whether the native library was found and loads into this ONNX Runtime, and if not, why
    (for ``keepbits doctor`` and ``keepbits info``): ``path``, ``found``, ``loaded``, ``reason``
    and ``requested`` (True when ``$KEEPBITS_NATIVE_LIB`` names a library: then a failure is an
    error, not the fallback).

    Example:
        >>> from keepbits import native
        >>> s = native.status()
        >>> s["loaded"] == native.available(), s["loaded"] or bool(s["reason"])
        (True, True)
    """
    import onnxruntime as ort

    requested = bool(os.environ.get(_ENV_PATH))
    report: dict[str, Any] = {"path": None, "found": False, "loaded": False, "reason": None, "requested": requested}
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return {**report, "reason": f"disabled by {_ENV_SWITCH}={os.environ[_ENV_SWITCH]}"}
    try:
        path = library_path()
    except InputError as exc:
        return {**report, "reason": str(exc)}
    if path is None:
        return {**report, "reason": f"{LIBRARY_NAME} not found: not in the package and not built in native/build "
                                    f"(native/build.sh builds it; {_ENV_PATH} names one)"}
    error = _load_error(ort.SessionOptions(), path)
    return {**report, "path": str(path), "found": True, "loaded": error is None,
            "reason": None if error is None else f"ONNX Runtime {ort.__version__} cannot load it: {error}"}


def session_options(threads: int | None = None, *, native: bool = True, spinning: bool = False) -> Any:
    """A fresh ``onnxruntime.SessionOptions`` as keepbits uses them: ``threads`` intra-op threads
    (None: ONNX Runtime's choice, one per core), the native kernels registered when ``native``
    and present, and spinning off unless ``spinning``.

    Spinning intra-op threads busy-wait between operators; next to a stream's writer and
    grabber threads (or other processes) they take the cores those need and are themselves
    preempted inside parallel operators, so keepbits turns spinning off by default.

    Example:
        >>> from keepbits.native import session_options
        >>> session_options(2, native=False).intra_op_num_threads
        2
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if native:
        register(options)
    return options


def make_session(model: str | os.PathLike | bytes, native: bool = True, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (path or bytes), native kernels when present.

    Example:
        >>> from keepbits.native import make_session
        >>> # session = make_session(load_bundle("b").model_path)
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads, native=native),
                                providers=list(providers) if providers else ["CPUExecutionProvider"])


#: The codec's C helpers (``native/cpu/codec_kernels.cc``): name -> (argument kinds), all returning int.
_C_SIGNATURES = {
    "keepbits_png_paeth": ("ptr", "ptr", "int64", "int64", "int64", "ptr"),
    "keepbits_block_means": ("ptr", "int64", "int64", "int64", "int64", "ptr"),
    "keepbits_kept_blocks": ("ptr", "int64", "int64", "int64", "ptr"),
    "keepbits_mosaic": ("ptr", "ptr", "ptr", "ptr", "int64", "int64", "int64", "int64", "int64", "int64", "ptr"),
    "keepbits_blocks_scanlines": ("ptr", "ptr", "int64", "int64", "int64", "int64", "ptr", "ptr", "ptr", "ptr", "int64", "ptr"),
}


@functools.cache
def c_function(name: str) -> Any | None:
    """One of the codec's C helpers of the native library (``native/cpu/codec_kernels.cc``) as a
    ``ctypes`` function, or None when the library is absent, does not load or lacks it (the
    caller then uses its numpy/OpenCV path). Looked up once per process; ``ctypes`` releases
    the GIL during the call.

    Example:
        >>> from keepbits import native
        >>> fn = native.c_function("keepbits_png_paeth")
        >>> fn is None or callable(fn)
        True
    """
    import ctypes

    kinds = {"ptr": ctypes.c_void_p, "int64": ctypes.c_int64}
    path = library_path()
    if path is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError) as exc:
        _warn_once(f"c:{path}:{name}", f"native keepbits library at {path}: no {name} ({exc}); using the Python path")
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [kinds[k] for k in _C_SIGNATURES[name]]
    return fn


__all__ = ["LIBRARY_NAME", "library_path", "register", "available", "status", "session_options", "make_session", "c_function"]
