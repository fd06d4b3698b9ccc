"""One registry for every model keepbits builds: classifiers, mask generators,
simplifiers and density models.

Providers register builders with :func:`register`; the registry imports provider modules
(which need torch) only when a model is listed or built, so ``import keepbits`` stays
torch-free.

Third-party models (plugins) register the same way, from a module keepbits imports before
it lists or builds models: a module named in the environment variable ``KEEPBITS_PLUGINS``
(comma-separated), one passed to :func:`load_plugins`, or one an installed package declares
as an entry point in the group ``keepbits.models`` (``[project.entry-points."keepbits.models"]``
``mymodels = "mypkg.models"``). :func:`resolve` also takes ``package.module:factory``, a
callable that returns the model, without registering it; a module in the working folder is
found as ``python -m`` would find it.

A factory named inside a file (a checkpoint records how to rebuild its models) is code that
file would run, so it is called only when trusted: named by the user in this process (the
classifier or generator a trainer was given; :func:`trust`), listed (``package.module:factory``
or a whole module) in the environment variable ``KEEPBITS_TRUSTED_FACTORIES``
(comma-separated), or a module named in ``KEEPBITS_PLUGINS``. Registered names are always
trusted.

Example:
    >>> from keepbits import registry
    >>> "lenet5" in registry.names("classifier")
    True
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from keepbits.errors import InputError

log = logging.getLogger("keepbits")

KINDS = ("classifier", "generator", "simplifier", "density")

#: Modules whose import registers models (each calls :func:`register` at import time).
PROVIDERS = (
    "keepbits.training.models.classifiers",
    "keepbits.training.models.generators",
    "keepbits.training.models.fast_generators",
    "keepbits.training.models.simplifiers",
    "keepbits.training.models.density",
    "keepbits.training.models.efficientnet_lite",
    "keepbits.training.models.onnx_classifier",
)
#: Entry-point group of installed plugin packages, and the environment variable naming plugin modules.
PLUGIN_GROUP, PLUGIN_ENV = "keepbits.models", "KEEPBITS_PLUGINS"
#: Environment variable listing the factories (or whole modules) a file may name (module doc).
TRUST_ENV = "KEEPBITS_TRUSTED_FACTORIES"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    builder: Callable[..., Any]
    description: str


_MODELS: dict[str, ModelSpec] = {}
_TRUSTED: set[str] = set()
_loaded = False


def _same_builder(a: Callable, b: Callable) -> bool:
    """One builder, or the same function defined again (its module imported a second time)."""
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register(name: str, kind: str, description: str = "") -> Callable:
    """Decorator registering ``builder(**kwargs) -> torch.nn.Module`` under ``name``.

    Registering the same builder again (a module imported twice) replaces it; a different
    builder under a taken name is a :class:`ValueError`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")

    def wrap(builder: Callable) -> Callable:
        taken = _MODELS.get(name)
        if taken is not None and not (taken.kind == kind and _same_builder(taken.builder, builder)):
            where = f"{getattr(taken.builder, '__module__', '?')}.{getattr(taken.builder, '__qualname__', '?')}"
            raise ValueError(f"model name {name!r} is already registered by {where}")
        _MODELS[name] = ModelSpec(name, kind, builder, description or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return wrap


def _import(module: str, what: str) -> Any:
    """Import ``module`` (from the working folder too, after every other place, as ``python -m``
    finds it); one-line :class:`InputError` naming ``what`` asked for it when that fails."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise InputError(f"{what}: {module!r} is not a module name")
    try:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            here = os.getcwd()
            if exc.name != module.split(".")[0] or here in sys.path:
                raise
            sys.path.append(here)  # a console script's sys.path lacks the working folder
            return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - third-party code may fail at import in any way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{what}: cannot import {module!r} ({type(exc).__name__}: {first})") from None


def load_plugins(modules: Iterable[str]) -> None:
    """Import the plugin ``modules`` (each registers its models at import); :class:`InputError`
    naming the first that cannot be imported."""
    for module in modules:
        _import(module.strip(), "plugin")


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as exc:  # noqa: BLE001 - an installed plugin that is broken must not stop keepbits
            log.warning("plugin %r (%s) failed to load: %s: %s", point.name, point.value, type(exc).__name__, exc)


def _load_providers() -> None:
    global _loaded
    if not _loaded:
        for module in PROVIDERS:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # a provider that exists but fails to import is a bug
                    raise
        _loaded = True  # before the plugins: a plugin that lists models at import must not recurse
        _load_entry_points()
    # every time (an imported module is a dictionary look-up): a failing one keeps failing loudly
    load_plugins(m for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip())


def names(kind: str | None = None) -> list[str]:
    """Registered model names, optionally of one kind, sorted."""
    _load_providers()
    return sorted(n for n, s in _MODELS.items() if kind is None or s.kind == kind)


def spec(name: str, kind: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; :class:`InputError` naming the choices if unknown."""
    _load_providers()
    found = _MODELS.get(name)
    if found is None or (kind is not None and found.kind != kind):
        raise InputError(f"unknown {kind or 'model'} {name!r}; choose one of: {', '.join(names(kind))} "
                         f"(your own models: register them in a module named by {PLUGIN_ENV}, or an installed package's "
                         f"'{PLUGIN_GROUP}' entry point)")
    return found


def build(name: str, kind: str | None = None, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_channels``, ``num_classes``)."""
    return spec(name, kind).builder(**kwargs)


def trust(factory: str) -> None:
    """Let files name ``factory`` (``package.module:factory``) in this process: the user named it."""
    _TRUSTED.add(factory)


def trusted(factory: str) -> bool:
    """Whether a file may name ``factory`` (module doc): trusted in this process, listed in
    ``KEEPBITS_TRUSTED_FACTORIES`` (itself or its module), or its module is a ``KEEPBITS_PLUGINS`` one."""
    module = factory.partition(":")[0]
    listed = {item.strip() for env in (TRUST_ENV, PLUGIN_ENV) for item in os.environ.get(env, "").split(",") if item.strip()}
    return factory in _TRUSTED or factory in listed or module in listed


def resolve(name_or_factory: str, kind: str | None = None, named_by: str | None = None) -> Callable[..., Any]:
    """The builder of a registered model name, or the callable ``package.module:factory``
    (imported; a dotted attribute path after the colon is followed). :class:`InputError` (one
    line) when the name is unknown or the module or attribute cannot be imported, or when a file
    (``named_by``, for the message) names a factory that is not :func:`trusted`: importing and
    calling it would run code the file chose.

    Example:
        >>> from keepbits import registry
        >>> registry.resolve("lenet5") is registry.spec("lenet5").builder
        True
        >>> registry.resolve("collections:OrderedDict")()
        OrderedDict()
        >>> registry.resolve("subprocess:getoutput", named_by="evil.pt")
        Traceback (most recent call last):
        keepbits.errors.InputError: evil.pt builds its model by calling subprocess:getoutput, code outside keepbits' registry; if you trust that file, allow it: KEEPBITS_TRUSTED_FACTORIES=subprocess:getoutput
    """
    if ":" not in name_or_factory:
        return spec(name_or_factory, kind).builder
    if named_by is not None and not trusted(name_or_factory):
        raise InputError(f"{named_by} builds its model by calling {name_or_factory}, code outside keepbits' registry; "
                         f"if you trust that file, allow it: {TRUST_ENV}={name_or_factory}")
    module_name, _, attribute = name_or_factory.partition(":")
    target: Any = _import(module_name, f"model factory {name_or_factory!r}")
    for part in attribute.split("."):
        if not part.isidentifier() or not hasattr(target, part):
            raise InputError(f"model factory {name_or_factory!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"model factory {name_or_factory!r} is a {type(target).__name__}, not a callable")
    return target
