"""Checkpoints: one ``.pt`` file per model, written atomically, read with ``weights_only=True``.

Layout (a plain dict of tensors, numbers, strings, lists and dicts, nothing pickled):

    format: "keepbits-checkpoint", version: 1,
    kind: "classifier" | "nice" | "simplebits" | "density",
    models: {role: {"arch": registry name, "kwargs": {...}, "state_dict": {...}}},
    input_shape: [C, H, W], normalization: {"mean": [...], "std": [...]},
    class_names: [...], settings: {...}, command: str, metrics: {...},
    epoch: int, optimizer: state (optional), scheduler: state (optional)

``models`` holds every network of the run by role (``classifier``, ``generator``,
``simplifier``, ``density``) so one checkpoint restores a whole NICE or SimpleBits model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from keepbits import registry
from keepbits._fs import sibling_temp
from keepbits.errors import CheckpointError

FORMAT = "keepbits-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see module doc) atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "version": VERSION, **payload}
    tmp = sibling_temp(path)
    try:
        torch.save(record, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); check format and, if given, ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's weights-only unpickler raises any type (IndexError, KeyError, ...) on foreign bytes
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable keepbits checkpoint ({reason})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a keepbits checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {record.get('version')} is not supported (expected {VERSION})")
    if kind is not None and record.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {record.get('kind')} checkpoint, expected {kind}")
    return record


def model_entry(arch: str, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The ``models[role]`` record of a network: registry name, build kwargs, weights."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {"arch": arch, "kwargs": dict(kwargs), "state_dict": state}


def build_model(record: dict[str, Any], role: str, expected_arch: str | None = None) -> torch.nn.Module:
    """Rebuild and load ``record['models'][role]``; a clear error if the arch or shapes differ."""
    entry = record.get("models", {}).get(role)
    if entry is None:
        raise CheckpointError(f"checkpoint has no {role} model (has: {', '.join(record.get('models', {}))})")
    if expected_arch is not None and entry["arch"] != expected_arch:
        raise CheckpointError(f"checkpoint {role} is a {entry['arch']}, not a {expected_arch}")
    model = registry.build(entry["arch"], **entry["kwargs"])
    try:
        model.load_state_dict(entry["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{role} weights do not fit a {entry['arch']} with {entry['kwargs']}: {str(exc).splitlines()[0]}") from None
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
