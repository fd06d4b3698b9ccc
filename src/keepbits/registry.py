"""One registry for every model keepbits builds: classifiers, mask generators,
simplifiers and density models.

Providers register builders with :func:`register`; the registry imports provider modules
(which need torch) only when a model is listed or built, so ``import keepbits`` stays
torch-free.

Example:
    >>> from keepbits import registry
    >>> "lenet5" in registry.names("classifier")
    True
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from keepbits.errors import InputError

KINDS = ("classifier", "generator", "simplifier", "density")

#: Modules whose import registers models (each calls :func:`register` at import time).
PROVIDERS = (
    "keepbits.training.models.classifiers",
    "keepbits.training.models.generators",
    "keepbits.training.models.fast_generators",
    "keepbits.training.models.simplifiers",
    "keepbits.training.models.density",
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    builder: Callable[..., Any]
    description: str


_MODELS: dict[str, ModelSpec] = {}
_loaded = False


def register(name: str, kind: str, description: str = "") -> Callable:
    """Decorator registering ``builder(**kwargs) -> torch.nn.Module`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")

    def wrap(builder: Callable) -> Callable:
        if name in _MODELS and _MODELS[name].builder is not builder:
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = ModelSpec(name, kind, builder, description or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return wrap


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    for module in PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a provider that exists but fails to import is a bug
                raise
    _loaded = True


def names(kind: str | None = None) -> list[str]:
    """Registered model names, optionally of one kind, sorted."""
    _load_providers()
    return sorted(n for n, s in _MODELS.items() if kind is None or s.kind == kind)


def spec(name: str, kind: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; :class:`InputError` naming the choices if unknown."""
    _load_providers()
    found = _MODELS.get(name)
    if found is None or (kind is not None and found.kind != kind):
        raise InputError(f"unknown {kind or 'model'} {name!r}; choose one of: {', '.join(names(kind))}")
    return found


def build(name: str, kind: str | None = None, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_channels``, ``num_classes``)."""
    return spec(name, kind).builder(**kwargs)
