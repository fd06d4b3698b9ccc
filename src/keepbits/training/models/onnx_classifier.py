"""ONNX classifiers as torch modules (``onnx2torch``), so masks can be trained for a model that
exists only as an ``.onnx`` file.

:class:`OnnxClassifier` holds the ONNX file itself (a uint8 buffer ``onnx_model``, saved with
its weights) and the torch module ``onnx2torch`` converts it to. A checkpoint therefore carries
everything needed to rebuild it: the registry builder ``onnx2torch`` takes the embedded bytes
(named in its ``state_dict_args``) and the file's sha256 (``onnx_sha256``, checked), converts
them again, and the state dict then restores the weights (which fine-tuning may have changed).
Rebuilding needs ``onnx2torch`` (``pip install 'keepbits[onnx2torch]'``); its absence is a
one-line :class:`keepbits.errors.InputError` naming the extra.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from keepbits.errors import CheckpointError, InputError
from keepbits.registry import register

EXTRA = "onnx2torch"


def convert_onnx(data: bytes, source: str = "<bytes>") -> nn.Module:
    """The torch module ``onnx2torch`` makes of the ONNX model ``data``."""
    try:
        import onnx
        from onnx2torch import convert
    except Exception as exc:  # noqa: BLE001 - onnx2torch imports torchvision, which fails in several ways when mismatched
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("onnx", "onnx2torch"):
            raise InputError(f"{source}: ONNX classifiers need onnx2torch: pip install 'keepbits[{EXTRA}]' ({reason})") from None
        raise InputError(f"{source}: onnx2torch is installed but does not import ({reason}); it needs the torchvision release "
                         f"made for torch {torch.__version__}, from the index torch came from (a CPU torch: "
                         "--index-url https://download.pytorch.org/whl/cpu)") from None
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own error types
        raise InputError(f"{source}: not a readable ONNX model ({type(exc).__name__})") from None
    try:
        return convert(model)
    except Exception as exc:  # noqa: BLE001 - unsupported ops raise NotImplementedError and others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source}: onnx2torch cannot convert this model ({first})") from None


class OnnxClassifier(nn.Module):
    """An ONNX classifier converted to torch; ``forward`` returns the graph's first output (logits)."""

    def __init__(self, data: bytes, source: str = "<bytes>"):
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.net = convert_onnx(data, source)

    @property
    def onnx_sha256(self) -> str:
        return hashlib.sha256(self.onnx_model.numpy().tobytes()).hexdigest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (tuple, list)) else out


@register("onnx2torch", "classifier")
def onnx2torch(onnx_sha256: str, onnx_model: torch.Tensor | None = None, source: str = "") -> nn.Module:
    """An ONNX classifier converted by onnx2torch, rebuilt from the ONNX file embedded in its state dict."""
    if onnx_model is None:
        raise CheckpointError("an onnx2torch classifier is rebuilt from its embedded ONNX file (state dict entry 'onnx_model'), "
                              "which is missing")
    data = onnx_model.numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != onnx_sha256:
        raise CheckpointError(f"embedded ONNX classifier {source or ''} has sha256 {digest[:12]}…, the checkpoint records {onnx_sha256[:12]}…")
    return OnnxClassifier(data, source or "embedded ONNX classifier")


onnx2torch.state_dict_args = ("onnx_model",)
