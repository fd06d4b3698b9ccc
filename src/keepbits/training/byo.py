"""Bring your own classifier: any torch ``nn.Module`` (or an ``.onnx`` file) with its
:class:`keepbits.data.Preprocessing`, as the classifier NICE, SimpleBits, the audits and export
work with.

A :class:`Classifier` is the network, how to rebuild it (``arch``: a registry name or
``package.module:factory``, and its ``kwargs``; this is what a checkpoint records) and its
preprocessing (input size, mean/std, resize policy, crop fraction, class names), given once.
:func:`resolve_classifier` makes one from what a user names on the command line (``SPEC``):

* a keepbits checkpoint (``.pt``) holding a classifier: its network, its recorded preprocessing;
* a registry name (``efficientnet_lite0``, a plugin's model): built with ``kwargs``; weights from
  ``weights`` (a state dict file, read with ``weights_only=True``), else ``pretrained=True`` when
  the builder takes it; preprocessing from the builder's ``preprocessing`` attribute;
* ``package.module:factory``: imported and called with ``kwargs`` (returns an ``nn.Module``);
  weights and preprocessing as for a registry name;
* an ``.onnx`` file: converted to torch by ``onnx2torch`` (:mod:`keepbits.training.models.onnx_classifier`;
  the checkpoint embeds the file and records its sha256); preprocessing from the model's metadata
  properties (``mean``, ``std``, ``class_names``, ``input_shape``, ``resize_policy``,
  ``crop_fraction``, JSON values) and its input's static size.

``preprocessing`` overrides (a :class:`Preprocessing`, or a dict of some of its fields) replace
what the source says; a classifier whose input size nobody gives is an :class:`InputError`.

Example:
    >>> from keepbits import registry
    >>> from keepbits.data import Preprocessing
    >>> from keepbits.training.byo import Classifier
    >>> kwargs = {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    >>> pre = Preprocessing((28, 28), mean=(0.13,), std=(0.31,), resize_policy="resize")
    >>> clf = Classifier.of(registry.build("lenet5", **kwargs), pre, arch="lenet5", kwargs=kwargs)
    >>> clf.input_shape, clf.class_names[:3]
    ([1, 28, 28], ['0', '1', '2'])
    >>> Classifier.of(registry.build("lenet5", **kwargs), pre, arch="lenet5", kwargs={**kwargs, "num_classes": 3})
    Traceback (most recent call last):
    keepbits.errors.InputError: classifier arch 'lenet5' builds a model whose weights differ from the one given (shapes differ at ['classifier.3.bias', 'classifier.3.weight']); pass the factory (and kwargs) that build this network
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from keepbits import registry
from keepbits.data import Preprocessing
from keepbits.errors import CheckpointError, InputError
from keepbits.training.checkpoint import ModelEntry, Normalization, build_model, load_checkpoint, load_weights

log = logging.getLogger("keepbits")

#: Largest ``.onnx`` classifier read (protobuf's own limit).
MAX_ONNX_BYTES = 2 << 30


@dataclass
class Classifier:
    """A classifier to explain: ``module`` (eval mode), how a checkpoint rebuilds it (``arch``,
    ``kwargs``), its :class:`Preprocessing`, and where it came from (``source``, for messages)."""

    module: nn.Module
    preprocessing: Preprocessing
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def of(cls, module: nn.Module, preprocessing: Preprocessing, arch: str | None = None,
           kwargs: Mapping[str, Any] | None = None) -> "Classifier":
        """A classifier from a network in memory. ``arch`` (default: the module's class,
        ``package.module:Class``, called with ``kwargs``) must rebuild a network with the same
        parameter names and shapes; checked here by building one. Empty ``class_names`` become
        ``"0"``..``"K-1"`` (K from one forward pass)."""
        if not isinstance(module, nn.Module):
            raise InputError(f"a classifier must be a torch nn.Module, got {type(module).__name__}")
        if not isinstance(preprocessing, Preprocessing):
            raise InputError(f"preprocessing must be a keepbits.data.Preprocessing, got {type(preprocessing).__name__}")
        kwargs = dict(kwargs or {})
        if arch is None:
            kind = type(module)
            arch = f"{kind.__module__}:{kind.__qualname__}"
            if kind.__module__ == "__main__" or "<locals>" in kind.__qualname__:
                raise InputError(f"classifier class {kind.__qualname__} is defined in {kind.__module__} (not importable by "
                                 "another process); name a 'package.module:factory' that builds it: "
                                 "keepbits.training.byo.Classifier.of(net, preprocessing, arch=...), and pass that classifier")
        _check_rebuilds(module, arch, kwargs)
        return cls(module.eval(), _named_classes(module, preprocessing, arch), arch, kwargs, arch)

    @property
    def input_shape(self) -> list[int]:
        return [self.preprocessing.channels, *self.preprocessing.input_size]

    @property
    def normalization(self) -> Normalization:
        return Normalization(list(self.preprocessing.mean), list(self.preprocessing.std))

    @property
    def class_names(self) -> list[str]:
        return list(self.preprocessing.class_names)

    def checkpoint_preprocessing(self) -> dict[str, Any]:
        """The checkpoint's ``preprocessing`` field (the parts without a field of their own)."""
        return {"resize_policy": self.preprocessing.resize_policy, "crop_fraction": self.preprocessing.crop_fraction}

    def entry(self, module: nn.Module | None = None) -> ModelEntry:
        """The checkpoint entry of ``module`` (default: this classifier's, possibly fine-tuned since)."""
        return ModelEntry.of(self.arch, self.kwargs, self.module if module is None else module)


def _named_classes(module: nn.Module, pre: Preprocessing, source: str) -> Preprocessing:
    """``pre`` with class names for each of ``module``'s K logits: ``"0"``..``"K-1"`` when it
    names none; :class:`InputError` when it names another number of classes."""
    classes = _num_outputs(module, pre, source)
    if not pre.class_names:
        return dataclasses.replace(pre, class_names=tuple(str(i) for i in range(classes)))
    if len(pre.class_names) != classes:
        raise InputError(f"classifier {source}: {len(pre.class_names)} class names for {classes} logits")
    return pre


def _num_outputs(module: nn.Module, pre: Preprocessing, arch: str) -> int:
    """K of the N×K logits of one zero image at the preprocessing's size; a network that cannot
    take that size is an :class:`InputError` here, not a traceback in the first training step."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    shape = (1, pre.channels, *pre.input_size)
    try:
        with torch.no_grad():
            out = module(torch.zeros(shape, device=device))
    except (RuntimeError, ValueError) as exc:
        first = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise InputError(f"classifier {arch} fails on a {'×'.join(map(str, shape[1:]))} image (channels × the preprocessing's "
                         f"input size; the channels are as many as the mean/std values: one each (--mean M --std S) for a "
                         f"grey-image classifier): {first}") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError(f"a classifier must return N×K logits, got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return int(out.shape[1])


def _call_builder(builder: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> Any:
    """``builder(**kwargs)``; one-line :class:`InputError` naming ``what`` when the arguments do not
    fit its signature, or when the call raises (a user's factory may fail in any way)."""
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        raise InputError(f"{what}: cannot be called with {sorted(kwargs)}: {exc}") from None
    except ValueError:  # no signature to read (a builtin): the call itself says
        pass
    try:
        return builder(**kwargs)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise InputError(f"{what}: its factory raised {type(exc).__name__}: {exc}") from None


def _check_rebuilds(module: nn.Module, arch: str, kwargs: Mapping[str, Any]) -> None:
    """Build ``arch(**kwargs)`` once and compare its state-dict names and shapes with ``module``'s."""
    if ":" in arch:
        registry.trust(arch)  # named by the caller, in this process
    builder = registry.resolve(arch)
    extra = {name: module.state_dict()[name] for name in getattr(builder, "state_dict_args", ())}
    rebuilt = _call_builder(builder, {**kwargs, **extra}, f"classifier arch {arch!r}")
    if not isinstance(rebuilt, nn.Module):
        raise InputError(f"classifier arch {arch!r} returned a {type(rebuilt).__name__}, not a torch nn.Module")
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    new = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if own != new:
        missing = sorted(set(own) - set(new))
        unexpected = sorted(set(new) - set(own))
        shapes = sorted(k for k in set(own) & set(new) if own[k] != new[k])
        detail = "; ".join(part for part in (f"missing {missing[:3]}" if missing else "", f"extra {unexpected[:3]}" if unexpected else "",
                                             f"shapes differ at {shapes[:3]}" if shapes else "") if part)
        raise InputError(f"classifier arch {arch!r} builds a model whose weights differ from the one given ({detail}); "
                         "pass the factory (and kwargs) that build this network")


def merge_preprocessing(base: Preprocessing | None, overrides: Preprocessing | Mapping[str, Any] | None, source: str) -> Preprocessing:
    """``base`` with the fields of ``overrides`` (None values ignored); :class:`InputError` when no input size is known."""
    if isinstance(overrides, Preprocessing):
        return overrides
    fields = base.to_dict() if base is not None else {}
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if fields.get("resize_policy", "center-crop") != "center-crop" and "crop_fraction" not in (overrides or {}):
        fields["crop_fraction"] = 1.0
    if "input_size" not in fields:
        raise InputError(f"classifier {source}: its preprocessing is unknown; give the input size and how images reach it "
                         "(CLI: --image-size H W, --mean, --std, --resize-policy, --class-names; Python: preprocessing=Preprocessing(...))")
    pre = Preprocessing.from_dict(fields)
    missing = [(name, flag, value) for name, key, flag, value in (
        ("mean", "mean", "--mean", list(pre.mean)), ("std", "std", "--std", list(pre.std)),
        ("resize policy", "resize_policy", "--resize-policy", pre.resize_policy)) if key not in fields]
    if missing:  # a wrong guess here costs accuracy without a sign, so say what was assumed, and how to give just that
        log.warning("classifier %s: %s not given, assumed %s (CLI: %s)", source, ", ".join(name for name, _, _ in missing),
                    "; ".join(f"{name} {value}" for name, _, value in missing), ", ".join(flag for _, flag, _ in missing))
    return pre


def onnx_preprocessing(data: bytes, source: str) -> Preprocessing | None:
    """The preprocessing an ONNX classifier declares: JSON metadata properties ``mean``, ``std``,
    ``class_names``, ``input_shape``, ``resize_policy``, ``crop_fraction``; the input size from
    the graph's first input (N×C×H×W) when static. None when no input size is known."""
    import onnx

    model = onnx.load_from_string(data)
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key in ("mean", "std", "class_names", "input_shape", "resize_policy", "crop_fraction"):
            try:
                meta[prop.key] = json.loads(prop.value)
            except json.JSONDecodeError:
                meta[prop.key] = prop.value
    shape = meta.pop("input_shape", None)
    if shape is None and model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and all(dims[1:]):
            shape = dims[1:]
    if shape is None:
        return None
    channels = int(shape[0])
    if not {"mean", "std"} <= set(meta):
        log.warning("%s: no mean/std metadata; assumed mean 0, std 1 (inputs in [0, 1]; CLI: --mean, --std)", source)
    fields = {"input_size": (int(shape[1]), int(shape[2])), "mean": (0.0,) * channels, "std": (1.0,) * channels, **meta}
    try:
        return Preprocessing.from_dict(fields)
    except InputError as exc:
        raise InputError(f"{source}: metadata does not describe the preprocessing: {exc}") from None


def _onnx_classifier(path: Path) -> tuple[nn.Module, str, dict[str, Any], Preprocessing | None]:
    from keepbits.training.models.onnx_classifier import OnnxClassifier

    if path.stat().st_size > MAX_ONNX_BYTES:
        raise InputError(f"{path}: larger than {MAX_ONNX_BYTES >> 30} GiB")
    data = path.read_bytes()
    module = OnnxClassifier(data, str(path))
    kwargs = {"onnx_sha256": hashlib.sha256(data).hexdigest(), "source": path.name}
    return module, "onnx2torch", kwargs, onnx_preprocessing(data, str(path))


def _refuse_bundle(path: Path) -> None:
    """:class:`InputError` when ``path`` is a keepbits model bundle (a folder or ``.zip`` with a
    manifest): its graph runs in ONNX Runtime, and a classifier spec means the torch network."""
    from keepbits.bundle import is_bundle, load_bundle

    if not is_bundle(path):
        return
    try:
        bundle = load_bundle(path)
        name = bundle.manifest.classifier
        bundle.close()
    except InputError:
        name = ""
    hint = f" (this bundle's classifier: {name})" if name in registry.names("classifier") else ""
    raise InputError(f"{path}: a model bundle (its graph runs in ONNX Runtime); this needs the torch classifier: "
                     f"its checkpoint, a registry name{hint} or package.module:factory")


def resolve_classifier(spec: str, *, weights: str | Path | None = None, kwargs: Mapping[str, Any] | None = None,
                       preprocessing: Preprocessing | Mapping[str, Any] | None = None) -> Classifier:
    """The :class:`Classifier` named by ``spec`` (module doc: checkpoint, registry name,
    ``package.module:factory`` or ``.onnx``), eval mode, on the CPU."""
    path = Path(spec)
    kwargs = dict(kwargs or {})
    _refuse_bundle(path)
    if path.suffix.lower() == ".onnx" or path.suffix.lower() in (".pt", ".pth") or path.is_file():
        if not path.is_file():
            raise InputError(f"classifier not found: {path}")
        if weights is not None or kwargs:
            raise InputError(f"{path}: classifier weights and kwargs apply to a registry name or package.module:factory, not a file")
        if path.suffix.lower() == ".onnx":
            module, arch, kwargs, base = _onnx_classifier(path)
        else:
            ckpt = load_checkpoint(path)
            if "classifier" not in ckpt.models:
                raise CheckpointError(f"{path}: holds no classifier (kind {ckpt.kind})")
            module, base = build_model(ckpt, "classifier"), ckpt.preprocessing_record()
            arch, kwargs = ckpt.models["classifier"].arch, dict(ckpt.models["classifier"].kwargs)
        pre = _named_classes(module, merge_preprocessing(base, preprocessing, str(path)), str(path))
        return Classifier(module.eval(), pre, arch, kwargs, str(path))
    if ":" in spec:
        registry.trust(spec)  # the user named it; the checkpoints made from it may name it again
    builder = registry.resolve(spec, None if ":" in spec else "classifier")
    call = dict(kwargs)
    takes = inspect.signature(builder).parameters if callable(builder) else {}
    if weights is None and "pretrained" in takes and "pretrained" not in call:
        call["pretrained"] = True
    module = _call_builder(builder, call, f"classifier {spec}")
    if not isinstance(module, nn.Module):
        raise InputError(f"classifier {spec} returned a {type(module).__name__}, not a torch nn.Module")
    if weights is not None:
        load_weights(module, weights)
    elif "pretrained" not in call:
        log.warning("classifier %s: no --classifier-weights given; using the weights the factory built", spec)
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    pre = merge_preprocessing(getattr(builder, "preprocessing", None), preprocessing, spec)
    clf = Classifier.of(module, pre, arch=spec, kwargs=kwargs)
    clf.source = spec
    return clf


def as_classifier(classifier: Classifier | nn.Module | str, preprocessing: Preprocessing | Mapping[str, Any] | None = None,
                  **spec_options: Any) -> Classifier:
    """A :class:`Classifier` from one, from an ``nn.Module`` plus ``preprocessing`` (required), or
    from a spec string (:func:`resolve_classifier`, ``spec_options``: ``weights``, ``kwargs``)."""
    if isinstance(classifier, Classifier):
        return classifier if preprocessing is None else dataclasses.replace(
            classifier, preprocessing=merge_preprocessing(classifier.preprocessing, preprocessing, classifier.source))
    if isinstance(classifier, nn.Module):
        if preprocessing is None:
            raise InputError("a torch classifier needs its preprocessing: preprocessing=keepbits.data.Preprocessing(...)")
        pre = merge_preprocessing(None, preprocessing, type(classifier).__name__)
        return Classifier.of(classifier, pre, spec_options.get("arch"), spec_options.get("kwargs"))
    return resolve_classifier(str(classifier), preprocessing=preprocessing, **spec_options)


__all__ = ["Classifier", "as_classifier", "merge_preprocessing", "onnx_preprocessing", "resolve_classifier"]
