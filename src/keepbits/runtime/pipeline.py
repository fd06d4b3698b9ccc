"""predict → explain → compress: run a model bundle on frames and pack the payload.

One ONNX Runtime session per :class:`Pipeline`, created once; ``session.run`` is
thread-safe, so one pipeline may serve several threads. Each call allocates one
model-size batch (the results' ``image`` arrays are views into it) and nothing per frame
beyond the outputs it returns.

Bundles with ``explain: "simplify"`` (SimpleBits, ``docs/simplebits.md``) replace the mask
by the simplifier's image: results carry ``simplified`` (``mask`` is None) and payloads use
the codec's ``"simplified"`` mode.

Frames: numpy uint8 H×W×3 in ``color`` order (``"rgb"`` default; ``"bgr"`` for OpenCV
frames), H×W grey, or PIL images. They reach the model size by the bundle's resize policy
(``manifest.resize_policy``: the classifier's own preprocessing, letterbox for bundles that
record none) through :func:`keepbits.data.fit_into`; its :class:`keepbits.data.ImageFit`
(``Result.fit``) records the mapping back to the frame.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.runtime import Pipeline
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b", size=32))
    >>> r = pipe(np.zeros((48, 64, 3), np.uint8))
    >>> r.label, r.mask.shape, r.fit.roi, len(r.payload) > 0
    ('dark', (32, 32), (0, 4, 32, 24), True)
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from keepbits.core import softmax
from keepbits.data import ImageFit, fit_into
from keepbits.errors import InputError
from keepbits.runtime.sources import as_rgb

if TYPE_CHECKING:
    from keepbits.codec import FrameRecord

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass
class Result:
    """One processed frame. ``mask`` is ẑ (model size, float32 in [0, 1]), None for a
    SimpleBits bundle, whose ``simplified`` is the simplifier's image (model size, uint8 RGB,
    the graph output rounded); ``image`` is the model-size uint8 frame the model saw (RGB), and
    ``fit`` where it came from in the source frame (:class:`keepbits.data.ImageFit`);
    ``timings`` are milliseconds per stage (preprocess and model are shared by a batch: the
    batch's time divided by its size). ``error`` says why the frame is unusable (the model's
    logits or explanation for it are NaN or infinite; then :meth:`checked` raises), else None."""

    label: str
    label_index: int
    score: float
    probabilities: np.ndarray
    mask: np.ndarray | None
    image: np.ndarray
    fit: ImageFit
    block: int
    threshold: float
    sequence: int
    timestamp: float
    payload: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    simplified: np.ndarray | None = None
    error: str | None = None

    def checked(self) -> "Result":
        """This result, or :class:`InputError` with :attr:`error` when its model outputs are not finite
        (a stream counts it as that frame's failure; the same wording again is counted, not logged)."""
        if self.error is not None:
            raise InputError(self.error)
        return self

    @property
    def roi(self) -> tuple[int, int, int, int]:
        """Where the source region lies in the model image (x0, y0, w, h)."""
        return self.fit.roi

    @property
    def source_size(self) -> tuple[int, int]:
        """(width, height) of the source region the model image shows: the whole frame, or the
        centre crop under the ``center-crop`` policy (what a receiver can map the roi back to)."""
        return self.fit.crop[2], self.fit.crop[3]

    @property
    def kept_fraction(self) -> float | None:
        """Share of pixels the hard mask keeps at full resolution (None without a mask)."""
        return None if self.mask is None else np.count_nonzero(self.mask > self.threshold) / self.mask.size

    def frame_record(self) -> "FrameRecord":
        """The fields :func:`keepbits.codec.encode` writes besides the pixels."""
        from keepbits.codec import FrameRecord

        return FrameRecord(mask=self.mask, block=self.block, threshold=self.threshold, label_index=self.label_index,
                           label=self.label, score=self.score, sequence=self.sequence, timestamp=self.timestamp,
                           roi=self.roi, source_size=self.source_size)

    @property
    def mixed(self) -> np.ndarray:
        """The transmitted image, what a lossless receiver rebuilds: x̃ (hard mask, uint8 block
        means), or the simplified image for a SimpleBits bundle."""
        from keepbits.codec import mixed_image

        if self.mask is None:
            return self.simplified
        return mixed_image(self.image, self.mask, self.block, self.threshold)


@dataclass
class Prepared:
    """A model-size batch (N×H×W×C uint8), its :class:`keepbits.data.ImageFit` and sequence number per
    frame (drawn in :meth:`Pipeline.prepare` call order) and the time it took (ms)."""

    batch: np.ndarray
    boxes: list[ImageFit]
    preprocess_ms: float
    sequences: list[int]


def _non_finite(logits_ok: bool, explained_ok: bool, explained: str) -> str | None:
    """Why a frame's model outputs are unusable (its logits, its mask or simplified image, NaN or infinite), or None."""
    bad = [name for name, ok in (("logits", logits_ok), (explained, explained_ok)) if not ok]
    return f"the model's {' and '.join(bad)} {'are' if bad[0] == 'logits' else 'is'} NaN or infinite" if bad else None


def check_session(session: Any, manifest: Any, where: str) -> None:
    """Check a bundle's graph against its manifest at load, so that a mismatch is a
    :class:`~keepbits.errors.BundleError` there and not an ONNX Runtime error on the first frame:
    the session's inputs and outputs (:func:`keepbits.bundle.check_graph_io`, when it describes
    them), then one model-size zero frame through the model, whose outputs must have the shapes
    the manifest implies (symbolic graph sizes are only checked so)."""
    from keepbits.bundle import check_graph_io
    from keepbits.errors import BundleError

    if hasattr(session, "get_inputs") and hasattr(session, "get_outputs"):
        check_graph_io(manifest, session.get_inputs(), session.get_outputs(), where)
    c, h, w = manifest.input_shape
    names = ["logits", manifest.output_names[1]]
    try:
        outputs = session.run(names, {manifest.input_name: bundle_inputs(manifest, np.zeros((1, h, w, c), np.uint8))})
    except Exception as exc:  # noqa: BLE001 - ORT and substitute sessions raise their own error types
        message = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise BundleError(f"{where}: the model fails on a {w}x{h} frame of the manifest's input_shape ({message})") from None
    image = (1, h, w, c) if manifest.input_layout == "NHWC" else (1, c, h, w)
    expected = {"logits": (1, len(manifest.class_names)), "mask": (1, 1, h, w), "mixed": image, "simplified": image}
    for name, value in zip(names, outputs):
        if np.shape(value) != expected[name]:
            raise BundleError(f"{where}: on one {w}x{h} frame the model's {name!r} is {np.shape(value)}, the manifest "
                              f"implies {expected[name]} (input_shape, input_layout, class_names)")


def bundle_inputs(manifest: Any, images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C images in the bundle's input format (NHWC uint8 or NCHW float 0..1): what
    the pipeline, ``keepbits compare`` and INT8 calibration feed a model.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.pipeline import bundle_inputs
        >>> from keepbits.runtime.synthetic import toy_bundle
        >>> from keepbits.bundle import load_bundle
        >>> import tempfile
        >>> bundle_inputs(load_bundle(toy_bundle(tempfile.mkdtemp() + "/b")).manifest, np.zeros((2, 5, 7, 3), np.uint8)).shape
        (2, 5, 7, 3)
    """
    if images.shape[-1] != manifest.input_shape[0]:
        raise InputError(f"images have {images.shape[-1]} channels, the bundle expects {manifest.input_shape[0]}")
    if not manifest.dynamic_size and list(images.shape[1:3]) != manifest.input_shape[1:]:
        raise InputError(f"images are {images.shape[1]}×{images.shape[2]}, the bundle accepts {manifest.input_shape[1]}×{manifest.input_shape[2]} only")
    if manifest.input_dtype == "uint8":
        return np.ascontiguousarray(images)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def _providers(backend: str, providers: Sequence[Any] | None) -> list[Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise InputError(f"ONNX Runtime providers {missing} are not available here (have {available})")
        return list(providers)
    if backend == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise InputError(f"backend 'tensorrt' needs onnxruntime-gpu with TensorRT (have {available})")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if backend == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Pipeline:
    """A loaded bundle plus codec settings; call it on a frame or use :meth:`process_batch`.

    ``session`` replaces the ONNX Runtime session by any object with ONNX Runtime's
    ``run(output_names, feed)`` and ``get_providers()`` (e.g. the eager torch twin of the
    graph, :func:`keepbits.export.torch_pipeline`); ``bundle`` then only supplies the manifest.
    """

    def __init__(
        self,
        bundle: Any,
        *,
        session: Any = None,
        backend: str = "auto",
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        spinning: bool = False,
        compress: bool = True,
        codec_options: dict[str, Any] | None = None,
    ):
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if bundle.manifest.input_shape[0] not in (1, 3):
            from keepbits.errors import BundleError

            raise BundleError(f"{bundle.source}: input_shape has {bundle.manifest.input_shape[0]} channels; the runtime "
                              "and the payload take 1 (grey) or 3 (RGB)")
        self.session = session if session is not None else self._ort_session(bundle, backend, providers, threads, spinning)
        m = self.manifest = bundle.manifest
        self.bundle = bundle
        self.channels, self.height, self.width = m.input_shape
        self.class_names = list(m.class_names)
        self.block, self.threshold = m.block_size, float(m.mask_threshold)
        self.resize_policy, self.crop_fraction = m.resize_policy, float(m.crop_fraction)
        self.explain = m.explain
        self.compress_enabled = compress
        self.codec_options = dict(codec_options or {})
        # the payload mode follows the explain stage: a mask (blocks/mixed/paper) or the simplified image
        mode = self.codec_options.setdefault("mode", "simplified" if self.explain == "simplify" else "blocks")
        if (mode == "simplified") != (self.explain == "simplify"):
            raise InputError(f"{bundle.source}: codec mode {mode!r} does not fit a bundle with explain {self.explain!r} "
                             f"({'simplified' if self.explain == 'simplify' else 'blocks, mixed or paper'})")
        self.providers = self.session.get_providers()
        self._outputs = ["logits", m.output_names[1]]
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.threads, self.spinning = threads, spinning
        check_session(self.session, m, str(self.bundle.source))

    def _feed(self, batch: np.ndarray) -> np.ndarray:
        """The model input for an N×H×W×C uint8 batch: itself (uint8 NHWC) or float NCHW in 0..1."""
        return bundle_inputs(self.manifest, batch)

    def close(self) -> None:
        """Release the bundle: the unpacked copy of a ``.zip`` bundle is removed (the session
        keeps the model it loaded; the pipeline still runs)."""
        close = getattr(self.bundle, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _ort_session(bundle: Any, backend: str, providers: Sequence[Any] | None, threads: int | None, spinning: bool) -> Any:
        import onnxruntime as ort

        from keepbits import native

        # native kernels when built (and the graph has custom ops); else the graph's ONNX function bodies
        options = native.session_options(threads, native=bool(bundle.manifest.custom_ops), spinning=spinning)
        chosen = _providers(backend, providers)
        try:
            return ort.InferenceSession(str(bundle.model_path), options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own error types
            raise InputError(f"{bundle.source}: ONNX Runtime cannot load the model ({exc})") from None

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        providers: Sequence[Any] | None = None,
        *,
        threads: int | None = None,
        spinning: bool = False,
        compress: bool = True,
        expected_digest: str | None = None,
        **codec_options: Any,
    ) -> "Pipeline":
        """Load and verify a bundle folder or ``.zip``; ``codec_options`` go to :func:`keepbits.codec.encode`.

        ``threads`` sets ONNX Runtime's intra-op threads; ``spinning`` lets them busy-wait
        between operators (off by default, see :func:`keepbits.native.session_options`).

        Example:
            >>> import tempfile
            >>> from keepbits.runtime import Pipeline
            >>> from keepbits.runtime.synthetic import toy_bundle
            >>> Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"), codec="jpeg", quality=80).providers
            ['CPUExecutionProvider']
        """
        from keepbits.bundle import load_bundle

        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                             "(a NICE checkpoint runs eagerly through keepbits.export.torch_pipeline)")
        bundle = load_bundle(path, expected_digest)
        try:
            return cls(bundle, backend=backend, providers=providers, threads=threads, spinning=spinning, compress=compress,
                       codec_options=codec_options)
        except BaseException:
            bundle.close()
            raise

    # -- stages ------------------------------------------------------------------------
    def _fit(self, image: np.ndarray, out: np.ndarray) -> ImageFit:
        """Bring ``image`` to the model size in ``out`` (H×W×C) by the bundle's resize policy
        (:func:`keepbits.data.fit_into`: only the visible region is resized, straight into ``out``)."""
        return fit_into(image, out, self.resize_policy, self.crop_fraction)

    def _place(self, image: np.ndarray, out: np.ndarray) -> ImageFit:
        """Copy a model-size image into ``out`` (the identity fit); :class:`InputError` for another size."""
        image = image.reshape(*image.shape[:2], -1)
        if image.shape != out.shape:
            raise InputError(f"a fitted frame must be {out.shape[1]}×{out.shape[0]}×{out.shape[2]} (the model size), got "
                             f"{image.shape[1]}×{image.shape[0]}×{image.shape[2]}")
        out[...] = image
        return ImageFit.plan((self.width, self.height), (self.width, self.height), "resize")

    def reserve_sequences(self, count: int) -> list[int]:
        """The next ``count`` frame sequence numbers (what :meth:`prepare` takes when given none)."""
        with self._lock:
            return [next(self._counter) for _ in range(count)]

    def prepare(self, frames: Sequence[Any], *, color: str = "rgb", fitted: bool = False,
                sequences: Sequence[int] | None = None) -> "Prepared":
        """Fit a batch into one model-size uint8 buffer: the first half of :meth:`predict`.
        ``fitted=True``: the frames are model images already (e.g. a decoded payload's x̃) and go
        in as they are; the resize policy is not applied a second time. ``sequences``: the
        frames' numbers from :meth:`reserve_sequences` (a stream numbers frames in source order,
        then fits them in parallel); default the next ones.

        Example:
            >>> import numpy as np, tempfile
            >>> from keepbits.runtime import Pipeline
            >>> from keepbits.runtime.synthetic import toy_bundle
            >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b", size=32))
            >>> prepared = pipe.prepare([np.zeros((48, 64, 3), np.uint8)])
            >>> prepared.batch.shape, [r.label for r in pipe.infer(prepared)]
            ((1, 32, 32, 3), ['dark'])
        """
        t0 = time.perf_counter()
        batch = np.empty((len(frames), self.height, self.width, self.channels), np.uint8)
        boxes = [self._place(as_rgb(f, color), batch[i]) if fitted else self._fit(as_rgb(f, color), batch[i]) for i, f in enumerate(frames)]
        if sequences is None:
            sequences = self.reserve_sequences(len(frames))
        elif len(sequences) != len(frames):
            raise ValueError(f"{len(sequences)} sequence numbers for {len(frames)} frames")
        return Prepared(batch, boxes, (time.perf_counter() - t0) * 1e3, list(sequences))

    def infer(self, prepared: "Prepared", *, timestamps: Sequence[float] | None = None) -> list[Result]:
        """Run the model on a :meth:`prepare`-d batch and build the results (no payload): the
        second half of :meth:`predict`. Safe to call from several threads at once."""
        n, batch, boxes = len(prepared.boxes), prepared.batch, prepared.boxes
        if not n:
            return []
        feed = self._feed(batch)
        t1 = time.perf_counter()
        logits, explained = self.session.run(self._outputs, {self.manifest.input_name: feed})
        t2 = time.perf_counter()
        logits, explained = np.asarray(logits).reshape(n, -1), np.asarray(explained, np.float32)
        probs = softmax(logits, np.float32)
        finite_logits, finite_explained = np.isfinite(logits).all(1), np.isfinite(explained.reshape(n, -1)).all(1)
        masks: list[np.ndarray | None] = [None] * n
        simplified: list[np.ndarray | None] = [None] * n
        if self.explain == "simplify":
            pixels = explained * (255.0 / self.manifest.pixel_scale)
            if self.manifest.input_layout == "NCHW":
                pixels = pixels.transpose(0, 2, 3, 1)
            simplified = list(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        else:
            masks = list(explained.reshape(n, self.height, self.width))
        now = time.time()
        results = []
        for i in range(n):
            k = int(probs[i].argmax())
            results.append(Result(
                label=self.class_names[k] if k < len(self.class_names) else str(k), label_index=k,
                score=float(probs[i, k]), probabilities=probs[i], mask=masks[i], image=batch[i],
                fit=boxes[i], block=self.block, threshold=self.threshold, sequence=prepared.sequences[i],
                timestamp=timestamps[i] if timestamps is not None else now, simplified=simplified[i],
                error=_non_finite(finite_logits[i], finite_explained[i], "simplified image" if self.explain == "simplify" else "mask"),
            ))
        t3 = time.perf_counter()
        for r in results:
            r.timings.update(preprocess=prepared.preprocess_ms / n, model=(t2 - t1) * 1e3 / n, postprocess=(t3 - t2) * 1e3 / n)
        return results

    def predict(self, frames: Sequence[Any], *, color: str = "rgb", timestamps: Sequence[float] | None = None,
                fitted: bool = False) -> list[Result]:
        """Classify and explain (mask, or simplified image) a batch (no payload yet); see :meth:`compress`.

        Example:
            >>> import numpy as np, tempfile
            >>> from keepbits.runtime import Pipeline
            >>> from keepbits.runtime.synthetic import toy_bundle
            >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))
            >>> [r.label for r in pipe.predict([np.full((8, 8, 3), 250, np.uint8)])]
            ['bright']
        """
        if not len(frames):
            return []
        return self.infer(self.prepare(frames, color=color, fitted=fitted), timestamps=timestamps)

    def compress(self, result: Result) -> Result:
        """Fill ``result.payload`` with :func:`keepbits.codec.encode` and time it (``timings['encode']``):
        the frame and its mask, or (SimpleBits bundles) the simplified image in mode ``"simplified"``."""
        from keepbits.codec import encode

        result.checked()
        t0 = time.perf_counter()
        frame = result.image if result.simplified is None else result.simplified
        result.payload = encode(frame, result.frame_record(), **self.codec_options)
        result.timings["encode"] = (time.perf_counter() - t0) * 1e3
        return result

    def process_batch(self, frames: Sequence[Any], *, color: str = "rgb") -> list[Result]:
        """:meth:`predict` then (unless ``compress=False``) :meth:`compress` each result.

        Example:
            >>> import numpy as np, tempfile
            >>> from keepbits.runtime import Pipeline
            >>> from keepbits.runtime.synthetic import toy_bundle
            >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))
            >>> len(pipe.process_batch([np.zeros((8, 8, 3), np.uint8)] * 2))
            2
        """
        results = self.predict(frames, color=color)
        if self.compress_enabled:
            for r in results:
                self.compress(r)
        return results

    def __call__(self, frame: Any, *, color: str = "rgb") -> Result:
        return self.process_batch([frame], color=color)[0]

    def describe(self) -> dict[str, Any]:
        """Model size, classes, block size, providers and codec settings (with the deflate
        implementation in use, :mod:`keepbits.codec.deflate`), for summaries."""
        from keepbits.codec import deflate

        return {
            "bundle": str(self.bundle.source), "digest": self.bundle.digest,
            "input": [self.channels, self.height, self.width], "classes": len(self.class_names),
            "resize_policy": self.resize_policy, "crop_fraction": self.crop_fraction,
            "explain": self.explain, "block": self.block, "threshold": self.threshold, "providers": self.providers,
            "threads": self.threads, "spinning": self.spinning,
            "codec": {"codec": "png", "background": "auto", "quality": 90, "png_level": None, "webp_method": None, **self.codec_options,
                      "deflate": deflate.name()},
        }


__all__ = ["Pipeline", "Prepared", "Result", "BACKENDS", "bundle_inputs"]
