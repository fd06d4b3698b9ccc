"""Checkpoints: one ``.pt`` file per model, written atomically, read with ``weights_only=True``.

In memory a checkpoint is a :class:`Checkpoint`, checked field by field when it is built
(the one constructor every trainer uses) and when it is read. On disk it is a plain dict of
tensors, numbers, strings, lists and dicts, nothing pickled (format version 1):

    format: "keepbits-checkpoint", version: 1,
    kind: "classifier" | "nice" | "simplebits" | "density",
    models: {role: {"arch": registry name or "package.module:factory", "kwargs": {...}, "state_dict": {...}}},
    input_shape: [C, H, W], normalization: {"mean": [...], "std": [...]} (not for density),
    class_names: [...], preprocessing: {...} (optional), settings: {...}, command: str,
    metrics: {...}, epoch: int, optimizer: state (optional), scheduler: state (optional)

``models`` holds every network of the run by role (``classifier``, ``generator``,
``simplifier``, ``density``) so one checkpoint restores a whole NICE or SimpleBits model.
``preprocessing`` records how raw images became ``input_shape``: ``resize_policy`` and
``crop_fraction`` (the classifier trainer writes the policy of class-folder data; NICE and
SimpleBits copy their classifier's); :meth:`Checkpoint.preprocessing_record` gives the whole
:class:`keepbits.data.Preprocessing`. Readers of older files get ``{}`` (letterbox).
``arch`` is a registry name or ``package.module:factory`` (a classifier brought by its user,
:mod:`keepbits.training.byo`).

Example:
    >>> import tempfile
    >>> from keepbits import registry
    >>> from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint
    >>> kwargs = {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    >>> ckpt = Checkpoint(kind="classifier", models={"classifier": ModelEntry.of("lenet5", kwargs, registry.build("lenet5", **kwargs))},
    ...                   input_shape=[1, 28, 28], normalization=Normalization([0.13], [0.31]), class_names=list("0123456789"))
    >>> path = save_checkpoint(tempfile.mkdtemp() + "/c.pt", ckpt)
    >>> type(build_model(load_checkpoint(path, "classifier"), "classifier")).__name__
    'LeNet5'
    >>> Checkpoint(kind="classifier", models=ckpt.models, input_shape=[1, 28], normalization=ckpt.normalization, class_names=["a"])
    Traceback (most recent call last):
    keepbits.errors.CheckpointError: checkpoint field 'input_shape' must be [C, H, W] positive ints, got [1, 28]
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from keepbits import registry
from keepbits._fs import sibling_temp
from keepbits.data import Preprocessing
from keepbits.errors import CheckpointError, InputError

FORMAT = "keepbits-checkpoint"
VERSION = 1
#: Checkpoint kinds and the model roles each must hold.
KINDS = {"classifier": ("classifier",), "nice": ("generator", "classifier"), "simplebits": ("simplifier", "classifier"),
         "density": ("density",)}
ROLES = ("classifier", "generator", "simplifier", "density")


def _bad(name: str, message: str) -> CheckpointError:
    return CheckpointError(f"checkpoint field {name!r} {message}")


def _kind_of(value: Any) -> str:
    return type(value).__name__


def _str_keyed_dict(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(name, f"must be a dict with string keys, got {_kind_of(value)}")
    return dict(value)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _bad(name, f"must hold finite numbers, got {value!r}")
    return float(value)


@dataclass
class ModelEntry:
    """One network of a checkpoint: registry name, the kwargs it is built with, its weights."""

    arch: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @classmethod
    def of(cls, arch: str, kwargs: Mapping[str, Any], model: torch.nn.Module) -> "ModelEntry":
        """The entry of ``model`` (unwrapped from DistributedDataParallel; weights copied to the CPU)."""
        model = model.module if hasattr(model, "module") else model
        return cls(arch, dict(kwargs), {k: v.detach().cpu() for k, v in model.state_dict().items()})

    def check(self, role: str) -> None:
        """Raise :class:`CheckpointError` naming ``models[role]`` and the first bad field."""
        where = f"models[{role}]"
        if not isinstance(self.arch, str) or not self.arch:
            raise _bad(f"{where}.arch", f"must be a registry name, got {self.arch!r}")
        self.kwargs = _str_keyed_dict(f"{where}.kwargs", self.kwargs)
        self.state_dict = _str_keyed_dict(f"{where}.state_dict", self.state_dict)
        for key, value in self.state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise _bad(f"{where}.state_dict", f"must map names to tensors; {key!r} is a {_kind_of(value)}")


@dataclass
class Normalization:
    """Per-channel input normalisation ``(x − mean)/std`` of [0, 1] images."""

    mean: list[float]
    std: list[float]


@dataclass
class Checkpoint:
    """A checkpoint record (module doc). Every field is checked when it is built: a bad one
    raises :class:`CheckpointError` naming it."""

    kind: str
    models: dict[str, ModelEntry]
    input_shape: list[int]
    normalization: Normalization | None = None
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    #: 0-based index of the last epoch trained (the training log's rows count from 1: its row ``epoch + 1``).
    epoch: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise to plain lists/floats/ints) every field."""
        if self.kind not in KINDS:
            raise _bad("kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.models, Mapping):
            raise _bad("models", f"must be a dict of role -> ModelEntry, got {_kind_of(self.models)}")
        self.models = dict(self.models)
        missing = [r for r in KINDS[self.kind] if r not in self.models]
        if missing:
            raise _bad("models", f"of a {self.kind} checkpoint needs the roles {list(KINDS[self.kind])}, has {sorted(self.models)}")
        unknown = [role for role in self.models if role not in ROLES]
        if unknown:
            raise _bad("models", f"has an unknown role {unknown[0]!r} (roles: {list(ROLES)})")
        for role, entry in self.models.items():
            if not isinstance(entry, ModelEntry):
                raise _bad(f"models[{role}]", f"must be a ModelEntry, got {_kind_of(entry)}")
            entry.check(role)
        shape = self.input_shape
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise _bad("input_shape", f"must be [C, H, W] positive ints, got {shape!r}")
        self.input_shape = [int(v) for v in shape]
        norm = self.normalization
        if norm is None:
            if self.kind != "density":
                raise _bad("normalization", f"is required for a {self.kind} checkpoint")
        else:
            if not isinstance(norm, Normalization):
                raise _bad("normalization", f"must be a Normalization, got {_kind_of(norm)}")
            for name in ("mean", "std"):
                values = getattr(norm, name)
                if not isinstance(values, (list, tuple)) or len(values) != self.input_shape[0]:
                    raise _bad(f"normalization.{name}", f"needs {self.input_shape[0]} values (one per channel), got {values!r}")
                setattr(norm, name, [_real(f"normalization.{name}", v) for v in values])
            if any(v <= 0 for v in norm.std):
                raise _bad("normalization.std", f"must be positive, got {norm.std}")
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(c, str) for c in self.class_names):
            raise _bad("class_names", f"must be a list of strings, got {self.class_names!r}")
        self.class_names = list(self.class_names)
        if not self.class_names and self.kind != "density":
            raise _bad("class_names", f"is empty; a {self.kind} checkpoint names its classes")
        for name in ("preprocessing", "settings", "metrics"):
            setattr(self, name, _str_keyed_dict(name, getattr(self, name)))
        if not isinstance(self.command, str):
            raise _bad("command", f"must be a string, got {_kind_of(self.command)}")
        if not isinstance(self.epoch, numbers.Integral) or isinstance(self.epoch, bool) or self.epoch < 0:
            raise _bad("epoch", f"must be an int >= 0, got {self.epoch!r}")
        self.epoch = int(self.epoch)
        for name in ("optimizer", "scheduler"):
            if getattr(self, name) is not None:
                setattr(self, name, _str_keyed_dict(name, getattr(self, name)))

    def preprocessing_record(self) -> Preprocessing:
        """How the classifier sees an image, as a :class:`keepbits.data.Preprocessing`: input size,
        mean/std and class names from their own fields, the resize policy and crop fraction from
        ``preprocessing`` (``letterbox`` for files that do not record one, what the runtime
        applied to them)."""
        if self.normalization is None:
            raise CheckpointError(f"a {self.kind} checkpoint has no classifier preprocessing")
        extra = {k: v for k, v in self.preprocessing.items() if k in ("resize_policy", "crop_fraction")}
        try:
            return Preprocessing(input_size=tuple(self.input_shape[1:]), mean=tuple(self.normalization.mean),
                                 std=tuple(self.normalization.std), class_names=tuple(self.class_names), **extra)
        except InputError as exc:
            raise _bad("preprocessing", f"does not describe the classifier's input: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (module doc); optional fields only when set."""
        record: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": self.kind,
                                  "models": {role: {"arch": e.arch, "kwargs": e.kwargs, "state_dict": e.state_dict}
                                             for role, e in self.models.items()},
                                  "input_shape": list(self.input_shape)}
        if self.normalization is not None:
            record["normalization"] = {"mean": list(self.normalization.mean), "std": list(self.normalization.std)}
        record.update(class_names=list(self.class_names), settings=self.settings, command=self.command, metrics=self.metrics,
                      epoch=self.epoch)
        for name in ("preprocessing", "optimizer", "scheduler"):
            if getattr(self, name):
                record[name] = getattr(self, name)
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint") -> "Checkpoint":
        """Build from the on-disk dict (version 1); unknown or missing required fields and bad values
        raise :class:`CheckpointError` naming ``where`` and the field."""
        if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{where}: not a keepbits checkpoint but bare weights (a state dict); give them as "
                                  "--classifier-weights with --classifier package.module:factory (or a registry name)")
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a keepbits checkpoint")
        if data.get("version") != VERSION:
            raise CheckpointError(f"{where}: checkpoint version {data.get('version')} is not supported (this keepbits reads {VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"format", "version"})
        if unknown:
            raise CheckpointError(f"{where}: unknown checkpoint fields {unknown}")
        missing = [name for name in ("kind", "models", "input_shape") if name not in data]
        if missing:
            raise CheckpointError(f"{where}: checkpoint lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in fields}
        try:
            models = _str_keyed_dict("models", values["models"])
            entries = {}
            for role, entry in models.items():
                entry = _str_keyed_dict(f"models[{role}]", entry)
                if set(entry) != {"arch", "kwargs", "state_dict"}:
                    raise _bad(f"models[{role}]", f"must have arch, kwargs and state_dict, has {sorted(entry)}")
                entries[role] = ModelEntry(**entry)
            values["models"] = entries
            if values.get("normalization") is not None:
                norm = _str_keyed_dict("normalization", values["normalization"])
                if set(norm) != {"mean", "std"}:
                    raise _bad("normalization", f"must have mean and std, has {sorted(norm)}")
                values["normalization"] = Normalization(**norm)
            return cls(**values)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temp file in the same folder, then rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling_temp(path)
        try:
            torch.save(self.to_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically to ``path`` (:meth:`Checkpoint.save`)."""
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"save_checkpoint takes a Checkpoint, got {_kind_of(checkpoint)}")
    return checkpoint.save(path)


def _unreadable(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line; never torch's advice
    to load it with ``weights_only=False`` (that would run the pickle)."""
    first = next(iter(str(exc).strip().splitlines()), "")
    if first.startswith("Weights only load failed"):
        return "it holds pickled Python objects beyond tensors and plain containers; keepbits does not unpickle them"
    if isinstance(exc, (KeyError, IndexError, EOFError, UnicodeDecodeError)) or len(first) < 8:
        return f"not written by torch.save: {type(exc).__name__} {first}".rstrip()  # the unpickler met foreign bytes
    return first


def load_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint safely (``weights_only=True``) and check every field; and ``kind`` if given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's weights-only unpickler raises any type (IndexError, KeyError, ...) on foreign bytes
        from keepbits.bundle import is_bundle

        if is_bundle(path):
            raise CheckpointError(f"{path}: a model bundle (what keepbits export writes), not a training checkpoint (the .pt "
                                  "keepbits train writes); bundles run with keepbits run, eval, explain, compare and audit sis") from None
        raise CheckpointError(f"{path}: not a readable keepbits checkpoint ({_unreadable(exc)})") from None
    checkpoint = Checkpoint.from_dict(data, str(path))
    if kind is not None and checkpoint.kind != kind:
        raise CheckpointError(f"{path}: holds a {checkpoint.kind} checkpoint, expected {kind}")
    return checkpoint


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (names -> tensors) from a weights file, read with ``weights_only=True``; a
    ``{"state_dict": ...}`` wrapper is unwrapped. :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler raises many types on foreign bytes
        raise CheckpointError(f"{path}: cannot read weights ({_unreadable(exc)})") from None
    if isinstance(state, Mapping) and state.get("format") == FORMAT:
        raise CheckpointError(f"{path}: is a keepbits checkpoint, not a weights file; pass it as the model itself")
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors)")
    return dict(state)


def weights_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` fails to fit ``model``: its missing and extra names and the shapes that
    differ (the first three of each, with counts); empty when every name and shape matches."""
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    given = {name: tuple(value.shape) for name, value in state.items()}
    missing = [name for name in own if name not in given]
    extra = [name for name in given if name not in own]
    shapes = [f"{name} {given[name]} (the model: {own[name]})" for name in own if name in given and given[name] != own[name]]
    parts = [f"{label} {len(items)}: {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
             for label, items in (("missing", missing), ("unexpected", extra), ("shapes differ at", shapes)) if items]
    return "; ".join(parts)


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)``; a :class:`CheckpointError` starting with ``what`` and
    naming the mismatch (:func:`weights_mismatch`) when it does not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = weights_mismatch(model, state) or next(iter(str(exc).strip().splitlines()), "")
        raise CheckpointError(f"{what}: {detail}") from None


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load the weights file ``path`` (:func:`read_state_dict`) into ``model``, every name and shape matching."""
    load_state(model, read_state_dict(path), f"{path}: weights do not fit {type(model).__name__}")
    return model


def resume_path(out: str | Path) -> Path:
    """Where a trainer that writes one output file (density, SimpleBits) keeps its resumable state
    (weights, optimizer, steps run): ``<out stem>.last.pt`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last.pt")


def refuse_earlier_run(paths: Sequence[str | Path], resume: bool, overwrite: bool, resumable: str | Path) -> None:
    """A new run never replaces what an earlier run left at its output ``paths`` (hours of
    training, gone by reusing a folder): :class:`InputError` naming them, unless ``overwrite``
    (replace it; CLI ``--force``, as for ``export``) or ``resume`` with the run's ``resumable``
    state there to continue from (``--resume`` where it is missing would start a new run over a
    finished model)."""
    if overwrite or (resume and Path(resumable).exists()):
        return
    found = [str(p) for p in paths if Path(p).exists()]
    if found and resume:
        raise InputError(f"--resume: {resumable} is missing, so this would be a new run over {', '.join(found)} of an "
                         "earlier one; --force replaces it, or give another --out")
    if found:
        raise InputError(f"{', '.join(found)}: left by an earlier run; --resume continues it, --force replaces it, "
                         "or give another --out")


def refuse_finished(path: str | Path, done: int, planned: int, unit: str) -> None:
    """``--resume`` of a run that has done its ``planned`` epochs or steps: :class:`InputError`
    (nothing to train; its outputs are left as they are instead of rewritten)."""
    if done >= planned:
        raise InputError(f"--resume: {path} has run {done} of {planned} {unit} already: nothing to do; give more --{unit} to go on")


#: Run settings that name files or folders (lists of them too): recorded absolute where they exist
#: (:func:`run_settings`), so a run resumed from another working folder compares them as the same paths.
PATH_SETTINGS = frozenset({"data", "out", "footage", "val_footage", "classifier", "classifier_weights",
                           "density", "init"})


def run_settings(config: Any, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A trainer's config (a dataclass) as the settings its checkpoints record: every field but
    ``resume``, ``overwrite`` and ``leave_out``, each :data:`PATH_SETTINGS` value that names an
    existing path made absolute (a registry name or ``module:factory`` stays as given)."""
    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value

    return {k: absolute(v) if k in PATH_SETTINGS else v for k, v in dataclasses.asdict(config).items()
            if k not in ("resume", "overwrite", *leave_out)}


def check_resumable(path: str | Path, saved: Mapping[str, Any], current: Mapping[str, Any], may_change: set[str] | frozenset[str],
                    defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume a run whose recipe changed since ``path`` was written: one
    :class:`CheckpointError` naming every setting of ``current`` that differs from the ``saved``
    settings, except ``may_change`` (run control: epochs, device, workers, ...). Settings the
    checkpoint does not record (older files) are not compared; a setting left None on either side
    is compared as its value in ``defaults`` (an lr left to the optimizer's default is that lr);
    one path spelled two ways is one setting."""
    defaults = defaults or {}

    def plain(value: Any, key: str = "") -> Any:
        return json.loads(json.dumps(defaults[key] if value is None and key in defaults else value, default=str))

    def spelled_alike(value: Any) -> Any:  # one path spelled two ways ("data/", "./data", absolute) is the same setting
        if isinstance(value, str):
            return os.path.realpath(value) if value and os.path.exists(value) else os.path.normpath(value) if value else value
        return [spelled_alike(v) for v in value] if isinstance(value, list) else value

    changed = [k for k in current if k not in may_change and k in saved
               and spelled_alike(plain(saved[k], k)) != spelled_alike(plain(current[k], k))]
    if changed:
        what = "; ".join(f"{k}: {plain(saved[k], k)!r} then, {plain(current[k], k)!r} now" for k in changed)
        raise CheckpointError(f"{path}: cannot resume, this run's settings differ from the checkpoint's ({what}); "
                              "give the same settings, or a new output folder to start afresh")


def load_resumable(path: str | Path, kind: str, settings: Mapping[str, Any], may_change: set[str] | frozenset[str],
                   counters: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None) -> Checkpoint:
    """The ``kind`` checkpoint at ``path`` to resume a run from: its settings must match
    ``settings`` (:func:`check_resumable`), it must hold optimizer state and, as finite numbers
    >= 0, the ``counters`` its trainer continues from (metrics such as ``steps_run``); else one
    :class:`CheckpointError` saying which."""
    checkpoint = load_checkpoint(path, kind)
    check_resumable(path, checkpoint.settings, settings, may_change, defaults)
    if checkpoint.optimizer is None:
        raise CheckpointError(f"{path}: holds no optimizer state to resume from")
    for name in counters:
        value = checkpoint.metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise CheckpointError(f"{path}: metrics[{name!r}] must be a number >= 0 to resume from, got {value!r}")
    return checkpoint


def state_digest(module: torch.nn.Module) -> str:
    """Hex sha256 of a module's state: every state-dict entry's name, dtype, shape and bytes, in order.

    Two modules of one architecture have equal digests exactly when their weights and buffers
    are bit-identical (used to compare ranks and to key cached results to the model they came from).
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)};".encode())
        h.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def build_model(checkpoint: Checkpoint, role: str, expected_arch: str | None = None) -> torch.nn.Module:
    """Rebuild and load ``checkpoint.models[role]``; a clear error if the arch or shapes differ.

    ``arch`` is a registry name or a ``package.module:factory`` (:func:`keepbits.registry.resolve`,
    called only when trusted: :func:`keepbits.registry.trusted`); one that cannot be imported or is
    not trusted is a one-line :class:`CheckpointError`. A builder whose structure
    lives in its weights (an ONNX graph) names the state-dict entries it is built from in its
    attribute ``state_dict_args``; they are passed to it as keyword arguments."""
    entry = checkpoint.models.get(role)
    if entry is None:
        raise CheckpointError(f"{checkpoint.kind} checkpoint has no {role} model (has: {', '.join(checkpoint.models)})")
    if expected_arch is not None and entry.arch != expected_arch:
        raise CheckpointError(f"checkpoint {role} is a {entry.arch}, not a {expected_arch}")
    try:
        builder = registry.resolve(entry.arch, named_by="the checkpoint")
    except InputError as exc:
        raise CheckpointError(f"cannot rebuild the {role} of this {checkpoint.kind} checkpoint: {exc}") from None
    from_weights = {name: entry.state_dict[name] for name in getattr(builder, "state_dict_args", ()) if name in entry.state_dict}
    try:
        model = builder(**entry.kwargs, **from_weights)
    except TypeError as exc:
        raise CheckpointError(f"{role} {entry.arch} cannot be built with {sorted(entry.kwargs)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's factory may fail in any way: one line, not a traceback
        raise CheckpointError(f"{role} {entry.arch}: its builder raised {type(exc).__name__}: {exc}") from None
    load_state(model, entry.state_dict, f"{role} weights do not fit a {entry.arch} with {entry.kwargs}")
    return model


__all__ = ["FORMAT", "KINDS", "ROLES", "VERSION", "PATH_SETTINGS", "Checkpoint", "ModelEntry", "Normalization", "build_model", "check_resumable", "load_checkpoint", "load_resumable", "refuse_earlier_run", "resume_path", "run_settings",
           "load_weights", "read_state_dict", "save_checkpoint", "state_digest", "load_state", "weights_mismatch"]
