"""Shared audit machinery: model adapters and the explainer base class.

Every audit (SIS, CID, SimpleBits) sees a model through a :class:`ModelAdapter`: a
batched ``probabilities(x)`` callable on *normalised* float N×C×H×W inputs, plus the
normalisation that maps uint8 N×H×W×C images into that space. Adapters wrap a torch
``nn.Module``, a keepbits checkpoint, a plain ``.onnx`` classifier or a keepbits model
bundle (ONNX Runtime forward passes only). torch is imported lazily.

Example:
    >>> import numpy as np
    >>> from keepbits.audit import FunctionAdapter
    >>> model = FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :2], input_shape=(1, 2, 1))
    >>> model.probabilities(np.zeros((3, 1, 2, 1), np.float32)).round(2).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from keepbits.core import softmax
from keepbits.errors import InputError

log = logging.getLogger("keepbits")


class ModelAdapter:
    """A classifier seen as "logits / probabilities of normalised N×C×H×W inputs".

    Subclasses implement :meth:`logits`. ``mean``/``std`` are per-channel on the [0, 1]
    scale; ``input_shape`` is (C, H, W); ``torch_module`` is the ``nn.Module`` (float32,
    eval mode) when the model is a torch model, else ``None`` (gradient audits need it).
    """

    torch_module: Any = None
    #: how images reach ``input_shape`` (a :class:`keepbits.data.Preprocessing`), where known
    preprocessing: Any = None

    def __init__(self, input_shape: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None, source: str = "<memory>"):
        c = int(input_shape[0])
        self.input_shape = tuple(int(v) for v in input_shape)
        self.mean = np.asarray(mean if mean is not None else [0.0] * c, dtype=np.float64)
        self.std = np.asarray(std if std is not None else [1.0] * c, dtype=np.float64)
        if self.mean.shape != (c,) or self.std.shape != (c,):
            raise InputError(f"{source}: normalisation needs {c} means and stds, got {self.mean.tolist()} / {self.std.tolist()}")
        self.class_names = [str(n) for n in class_names] if class_names else None
        self.source = source

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits (float64, N×K) of normalised float N×C×H×W inputs."""
        raise NotImplementedError

    def class_name(self, index: int) -> str:
        """The name of class ``index`` where the model has names, else the index as text."""
        names = self.class_names
        return names[index] if names and 0 <= index < len(names) else str(index)

    def probabilities(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities (float64, N×K) of normalised float N×C×H×W inputs."""
        return softmax(self.logits(x, batch_size))

    __call__ = probabilities

    def fingerprint(self) -> str:
        """A digest of everything that decides this model's outputs: its kind, input shape,
        normalisation and the model itself (:meth:`_identity`). Cached results (BackSelect
        chunks) are reused only under the same fingerprint."""
        h = hashlib.sha256(json.dumps([type(self).__name__, self.input_shape, self.mean.tolist(), self.std.tolist()]).encode())
        h.update(self._identity())
        return h.hexdigest()[:20]

    def _identity(self) -> bytes:
        """Bytes identifying the model itself. Default: its float64 logits of two fixed seeded
        inputs (a function has no weights to hash; a model answering differently is another model)."""
        probe = np.random.default_rng(0).standard_normal((2, *self.input_shape)).astype(np.float32)
        return np.ascontiguousarray(self.logits(probe), dtype=np.float64).tobytes()

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C (or H×W×C) images → normalised float32 N×C×H×W."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        c, h, w = self.input_shape
        if images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise InputError(f"{self.source}: uint8 images must be N×{h}×{w}×{c} (the model's H×W×C), got shape {images.shape}")
        x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x.astype(np.float32)

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """Normalised float N×C×H×W → uint8 N×H×W×C (rounded and clipped), for display."""
        img = np.asarray(x, dtype=np.float64) * self.std[:, None, None] + self.mean[:, None, None]
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def prepare(self, inputs: Any) -> np.ndarray:
        """Explainer inputs → normalised float32 N×C×H×W: uint8 images (N×H×W×C) are
        normalised, float arrays / tensors are taken as already normalised N×C×H×W."""
        if hasattr(inputs, "detach"):
            inputs = inputs.detach().cpu().numpy()
        x = np.asarray(inputs)
        if x.dtype == np.uint8:
            x = self.normalize(x)
        elif np.issubdtype(x.dtype, np.floating):
            x = x[None] if x.ndim == 3 else x
            x = x.astype(np.float32)
        else:
            raise InputError(f"inputs must be uint8 N×H×W×C images or normalised float N×C×H×W, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"{self.source}: model expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if not len(x):
            raise InputError(f"{self.source}: no inputs (an empty batch)")
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))
            raise InputError(f"{self.source}: inputs hold NaN or inf values (images {bad[:8].tolist()}"
                             f"{' …' if len(bad) > 8 else ''}); an explanation needs finite inputs")
        return x


class FunctionAdapter(ModelAdapter):
    """Any numpy function ``logits_fn(x: N×C×H×W float32) -> N×K`` as a model (tests, custom models)."""

    def __init__(self, logits_fn: Callable[[np.ndarray], np.ndarray], input_shape: Sequence[int], **kwargs: Any):
        super().__init__(input_shape, **kwargs)
        self._fn = logits_fn

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = [np.asarray(self._fn(x[i : i + batch_size]), dtype=np.float64) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0))


class TorchAdapter(ModelAdapter):
    """A torch classifier (normalised float N×C×H×W → logits), evaluated in float32 where its parameters are."""

    def __init__(self, module: Any, input_shape: Sequence[int], **kwargs: Any):
        super().__init__(input_shape, **kwargs)
        self.torch_module = module.float().eval()

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        where = next(self.torch_module.parameters(), x).device  # a module on a GPU is run there
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                outs.append(self.torch_module(x[i : i + batch_size].to(where)).double().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0))

    def _identity(self) -> bytes:
        from keepbits.training.checkpoint import state_digest

        return f"{self.torch_module!r}\n{state_digest(self.torch_module)}".encode()


class OnnxAdapter(ModelAdapter):
    """An ONNX classifier run with ONNX Runtime (CPU), output ``logits`` (else the first).

    ``feed`` says what the graph takes: ``"normalized"`` (plain classifiers: normalised
    float N×C×H×W), ``"uint8-nhwc"`` (bundles: 0..255 N×H×W×C, inputs are de-normalised and
    rounded first) or ``"float-nchw"`` (bundles: 0..1 N×C×H×W). A plain ``.onnx`` file may
    carry ``mean``/``std``/``class_names``/``input_shape`` as JSON metadata properties.
    ``threads``: ONNX Runtime intra-op threads (default: its own choice). ``input_size`` (H, W)
    gives the size where the graph's is dynamic (the channel count is then the graph's).
    """

    FEEDS = ("normalized", "uint8-nhwc", "float-nchw")
    #: the loaded bundle whose (unpacked) model file this is, kept alive with the adapter
    bundle: Any = None
    #: the graph's differentiable torch twin, built on first use (:func:`keepbits.audit._sis_onnx.gradient_module`)
    _gradient_module: Any = None

    def __init__(self, model_path: str | Path, feed: str = "normalized", input_shape: Sequence[int] | None = None,
                 threads: int | None = None, input_size: Sequence[int] | None = None, **kwargs: Any):
        import onnxruntime as ort

        if feed not in self.FEEDS:
            raise InputError(f"feed must be one of {self.FEEDS}, got {feed!r}")
        path = Path(model_path)
        self.model_path = path
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        inp = self.session.get_inputs()[0]
        self._input_name, self._feed = inp.name, feed
        #: the graph's batch size where it is fixed (torch.onnx.export without dynamic axes: 1)
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = "logits" if "logits" in outputs else outputs[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        for key in ("mean", "std", "class_names"):
            if key in meta and key not in kwargs:
                kwargs[key] = json.loads(meta[key])
        if input_shape is None and "input_shape" in meta:
            input_shape = json.loads(meta["input_shape"])
        dims = inp.shape[1:]
        if input_shape is None and input_size is not None:  # (H, W) given; C from the graph (NCHW) or the normalisation
            channels = dims[0] if len(dims) == 3 and isinstance(dims[0], int) and feed != "uint8-nhwc" else len(kwargs.get("mean") or ()) or 3
            input_shape = (channels, *(int(v) for v in input_size))
        if input_shape is None:
            if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
                raise InputError(f"{path}: input shape {inp.shape} is dynamic; give the input size (--image-size H W, or input_shape=(C, H, W))")
            input_shape = (dims[2], dims[0], dims[1]) if feed == "uint8-nhwc" else tuple(dims)
        super().__init__(input_shape, source=str(path), **kwargs)

    def _pixels(self, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Normalised N×C×H×W → what the graph takes (float inputs in ``dtype``)."""
        if self._feed == "normalized":
            return np.asarray(x, dtype=dtype)
        if self._feed == "uint8-nhwc":
            return self.denormalize(x)
        return (np.asarray(x, np.float64) * self.std[:, None, None] + self.mean[:, None, None]).astype(dtype)

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits of normalised N×C×H×W ``x`` in batches of ``batch_size`` (of the graph's own size
        where it is fixed, the last one padded)."""
        outs = []
        step = self._fixed_batch or batch_size
        for i in range(0, len(x), step):
            feed = self._pixels(np.asarray(x[i : i + step], dtype=np.float32))
            n = len(feed)
            if self._fixed_batch and n < step:
                feed = np.concatenate([feed, np.repeat(feed[-1:], step - n, 0)])
            outs.append(np.asarray(self.session.run([self._output], {self._input_name: feed})[0][:n], dtype=np.float64))
        return np.concatenate(outs) if outs else np.zeros((0, 0))

    def _identity(self) -> bytes:
        from keepbits.bundle import sha256_file

        return f"{self._feed}/{self._output}/{sha256_file(self.model_path)}".encode()


def load_model(model: Any, **kwargs: Any) -> ModelAdapter:
    """A :class:`ModelAdapter` for ``model``: an adapter (returned as is), a torch
    ``nn.Module`` (pass ``input_shape`` and optionally ``mean``/``std``), a
    :class:`keepbits.training.byo.Classifier`, a numpy function of normalised N×C×H×W float32
    returning N×K logits (pass ``input_shape``), a keepbits checkpoint (``.pt``; normalisation read
    from it), a plain ``.onnx`` classifier (ONNX Runtime), a keepbits bundle folder / ``.zip``
    (:mod:`keepbits.bundle`, run with ONNX Runtime), or a registry name / ``package.module:factory``
    (:func:`keepbits.training.byo.resolve_classifier`; ``kwargs``: ``weights``, ``kwargs``,
    ``preprocessing``). Adapters of checkpoints, classifiers and bundles carry their
    :class:`keepbits.data.Preprocessing` (``adapter.preprocessing``)."""
    if isinstance(model, ModelAdapter):
        return model
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        if "input_shape" not in kwargs:
            raise InputError("a torch module needs input_shape=(C, H, W)")
        return TorchAdapter(model, **kwargs)
    if hasattr(model, "preprocessing") and hasattr(model, "module") and hasattr(model, "arch"):  # a byo.Classifier
        return _classifier_adapter(model)
    if callable(model):  # a numpy function of normalised N×C×H×W float32 -> N×K logits
        if "input_shape" not in kwargs:
            raise InputError("a function model needs input_shape=(C, H, W)")
        return FunctionAdapter(model, **kwargs)
    if not isinstance(model, (str, Path)):
        raise InputError(f"cannot audit a {type(model).__name__}: pass a path, a registry name, a torch module, a function or an adapter")
    path = Path(model)
    if path.suffix == ".onnx":
        if not path.exists():
            raise InputError(f"model not found: {path}")
        return _onnx_adapter(path, **kwargs)
    if path.suffix == ".pt" or (not path.exists() and (":" in str(model) or "/" not in str(model))):
        from keepbits.training.byo import resolve_classifier

        return _classifier_adapter(resolve_classifier(str(model), **kwargs))
    if not path.exists():
        raise InputError(f"model not found: {path}")
    from keepbits.bundle import load_bundle
    from keepbits.data import Preprocessing

    bundle = load_bundle(path)
    m = bundle.manifest
    feed = "uint8-nhwc" if m.input_dtype == "uint8" else "float-nchw"
    if m.input_layout != ("NHWC" if feed == "uint8-nhwc" else "NCHW"):
        raise InputError(f"{path}: bundles with {m.input_dtype} {m.input_layout} input are not supported by the audits")
    adapter = OnnxAdapter(bundle.model_path, feed=feed, input_shape=m.input_shape, mean=m.mean, std=m.std, class_names=m.class_names,
                          threads=kwargs.get("threads"))
    # an archive bundle is unpacked into a temp folder that lives as long as ``bundle``; the audits read
    # the model file again later (fingerprint, the ONNX graph's torch twin, a float64 or CUDA session)
    adapter.bundle = bundle
    adapter.source = str(path)  # messages and reports name the user's bundle, not its unpacked copy
    if m.input_shape[0] in (1, 3):  # a Preprocessing describes grey or colour images (audit bundles may have other channels)
        adapter.preprocessing = Preprocessing(tuple(m.input_shape[1:]), tuple(m.mean), tuple(m.std), m.resize_policy, m.crop_fraction,
                                              tuple(m.class_names))
    return adapter


def _onnx_adapter(path: Path, weights: Any = None, kwargs: Any = None, preprocessing: dict[str, Any] | None = None,
                  **options: Any) -> OnnxAdapter:
    """A plain ``.onnx`` classifier with its preprocessing: the ``preprocessing`` overrides (the
    CLI's ``--image-size``/``--mean``/``--std``/``--resize-policy``/``--crop-fraction``/
    ``--class-names``), else the file's metadata properties (JSON values under those names, as
    :func:`keepbits.training.byo.resolve_classifier` reads them), else the graph's input size,
    no normalisation and letterbox. Weights and builder arguments belong to torch classifiers: refused."""
    from keepbits.data import Preprocessing

    if weights or kwargs:
        raise InputError(f"{path}: an ONNX file carries its weights; --classifier-weights/--classifier-kwargs apply to "
                         "checkpoints, registry names and package.module:factory")
    given = dict(preprocessing or {})
    for key in ("mean", "std", "class_names"):
        if key in given:
            options[key] = list(given[key])
    if "input_size" in given:
        options["input_size"] = tuple(given["input_size"])
    adapter = OnnxAdapter(path, **options)
    c, h, w = adapter.input_shape
    meta = adapter.session.get_modelmeta().custom_metadata_map
    if not ({"mean", "std"} <= set(given) | set(meta) | set(options)) and options.get("feed", "normalized") == "normalized":
        # as for a torch classifier: a wrong guess here costs the audit without a sign, so say it
        log.warning("%s: no mean/std given or in its metadata; assumed mean 0, std 1 (inputs in [0, 1]; CLI: --mean, --std)", path)
    if c in (1, 3):
        recorded = {k: json.loads(meta[k]) for k in ("resize_policy", "crop_fraction") if k in meta}
        policy = {**recorded, **{k: given[k] for k in ("resize_policy", "crop_fraction") if k in given}}
        adapter.preprocessing = Preprocessing((h, w), tuple(adapter.mean), tuple(adapter.std), class_names=tuple(adapter.class_names or ()),
                                              **policy)
    return adapter


def _classifier_adapter(classifier: Any) -> "TorchAdapter":
    pre = classifier.preprocessing
    adapter = TorchAdapter(classifier.module, classifier.input_shape, mean=pre.mean, std=pre.std, class_names=pre.class_names,
                           source=classifier.source)
    adapter.preprocessing = pre
    return adapter


def model_targets(model: "ModelAdapter", xs: np.ndarray, target: Any, batch_size: int = 256) -> np.ndarray:
    """``target`` for the prepared inputs ``xs`` as an int64 vector of ``model``'s class indices:
    None → its predictions; an int or N ints, each checked against its class count (one forward pass)."""
    if target is None:
        return np.asarray(model.probabilities(xs, batch_size).argmax(1), np.int64)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":  # 3.7 became 3, True became 1, 'a' a ValueError
        raise InputError(f"target must be None, an int or {len(xs)} ints (class indices), got {target!r}")
    if t.ndim == 0:
        t = np.broadcast_to(t, (len(xs),))
    if t.shape != (len(xs),):
        raise InputError(f"target must be None, an int or {len(xs)} ints, got shape {t.shape}")
    classes = model.logits(xs[:1], 1).shape[1]
    if len(t) and not (0 <= int(t.min()) and int(t.max()) < classes):  # before the cast: 2**64 − 1 wrapped to −1
        raise InputError(f"target must be a class index in 0..{classes - 1}, got {t.min() if t.min() < 0 else t.max()}")
    return t.astype(np.int64)


class Explainer:
    """Base class of the audits: ``explain(inputs, target=None, batch_size=...)``, batch first.

    ``inputs`` are uint8 N×H×W×C images or normalised float N×C×H×W arrays; ``target`` is
    ``None`` (the predicted class), an int or N ints. Subclasses implement
    :meth:`_explain` on prepared inputs and return one result per image.
    """

    def __init__(self, model: Any, **model_kwargs: Any):
        self.model = load_model(model, **model_kwargs)

    def explain(self, inputs: Any, target: Any = None, batch_size: int = 256) -> list[Any]:
        x = self.model.prepare(inputs)
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        return self._explain(x, model_targets(self.model, x, target, batch_size), batch_size)

    def _explain(self, x: np.ndarray, targets: np.ndarray, batch_size: int) -> list[Any]:
        raise NotImplementedError
