"""The eager torch backend of :class:`keepbits.runtime.Pipeline`: a NICE checkpoint run
through :class:`keepbits.export.NiceGraph`, the torch reference of the exported graph.

For checking a checkpoint on frames before exporting it, and for parity with a bundle.

Example:
    >>> from keepbits.export import torch_pipeline
    >>> # pipe = torch_pipeline("runs/nice/nice.pt"); pipe(frame).mask
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from keepbits.bundle import Bundle, sha256_file
from keepbits.errors import InputError
from keepbits.export.graphs import NiceGraph
from keepbits.export.onnx_export import checkpoint_manifest
from keepbits.runtime import Pipeline
from keepbits.training.nice import load_nice


class TorchSession:
    """``run(outputs, feed)`` / ``get_providers()`` like an ONNX Runtime session, over a NiceGraph."""

    def __init__(self, graph: NiceGraph):
        self.graph = graph.eval()

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            named = dict(zip(self.output_names, self.graph(torch.from_numpy(next(iter(feed.values()))))))
        return [named[name].numpy() for name in outputs]

    @property
    def output_names(self) -> list[str]:
        """What :meth:`run` can give: logits and ẑ, and x̃ when the graph composes it."""
        return ["logits", "mask", "mixed"] if self.graph.mixed_output else ["logits", "mask"]

    def get_providers(self) -> list[str]:
        return ["torch"]


def torch_pipeline(checkpoint: str | Path, *, input_dtype: str = "uint8", classify_on: str | None = None,
                   mixed_output: bool = False, **pipeline_options: Any) -> Pipeline:
    """A :class:`Pipeline` running a ``nice`` checkpoint eagerly in torch with the semantics of
    the graph :func:`keepbits.export.export_onnx` writes for the same ``input_dtype``,
    ``classify_on`` and ``mixed_output`` (so a bundle is compared with its own twin);
    ``pipeline_options`` as for :class:`Pipeline`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"the torch backend needs a NICE checkpoint file (.pt), got {checkpoint}")
    generator, classifier, ckpt = load_nice(checkpoint)
    manifest = checkpoint_manifest(ckpt, checkpoint, input_dtype=input_dtype, classify_on=classify_on, mixed_output=mixed_output)
    graph = NiceGraph(generator, classifier, manifest.mean, manifest.std, manifest.block_size, manifest.input_dtype,
                      manifest.classify_on, mixed_output=mixed_output)
    bundle = Bundle(root=checkpoint.parent, manifest=manifest, digest=sha256_file(checkpoint), source=checkpoint)
    return Pipeline(bundle, session=TorchSession(graph), **pipeline_options)


__all__ = ["TorchSession", "torch_pipeline"]
