"""ONNX export of NICE checkpoints into model bundles, custom ops with function bodies, TensorRT.

Imports torch (``keepbits.bundle`` and ``keepbits.native`` are the torch-free halves).

Example:
    >>> from keepbits.export import export_onnx
    >>> # bundle = export_onnx("runs/nice/nice.pt", "runs/nice.bundle")
"""
from keepbits.export.onnx_export import NiceGraph, compare_outputs, export_onnx

__all__ = ["NiceGraph", "compare_outputs", "export_onnx"]
