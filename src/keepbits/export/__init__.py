"""ONNX export of NICE and SimpleBits checkpoints into model bundles, custom ops with function
bodies, INT8 quantisation, TensorRT, and the eager torch backend of the runtime.

Imports torch (``keepbits.bundle`` and ``keepbits.native`` are the torch-free halves).

Example:
    >>> from keepbits.export import export_onnx
    >>> # bundle = export_onnx("runs/nice/nice.pt", "runs/nice.bundle")
"""
from keepbits.export.graphs import NiceGraph, SimplifierGraph
from keepbits.export.onnx_export import checkpoint_manifest, export_onnx, export_simplifier_onnx
from keepbits.export.torch_backend import torch_pipeline
from keepbits.runtime.parity import compare_outputs

__all__ = ["NiceGraph", "SimplifierGraph", "checkpoint_manifest", "compare_outputs", "export_onnx", "export_simplifier_onnx",
           "torch_pipeline"]
