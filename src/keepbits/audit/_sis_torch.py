"""Dense BackSelect evaluation of torch models: every candidate image through the model.

:class:`DenseTorch` evaluates "base image with one more pixel masked" for batches of
candidates of several images: the batch is one gather of the base images plus one scatter of
the masked pixels (no per-candidate Python work), run through the model in chunks. In
float32 it is the plain screen (batch-norm folded into convolutions where torch.fx can trace
the model, chunk size timed once per model); in float64 it is the exact evaluator that
re-scores the candidates a float32 screen cannot separate (:mod:`keepbits.audit.sis`).
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from keepbits.audit._sis_eval import CHUNK_SIZES, tune_chunk

_tuned: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def model_device(module: nn.Module, device: Any = None) -> torch.device:
    """``device`` if given, else the device of the module's first parameter (CPU without parameters)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def float32_copy(module: nn.Module) -> nn.Module:
    """Float32 eval copy, batch norm folded into the convolutions before it where torch.fx traces the model
    (a screen only: folding changes float32 rounding, which the float64 re-scoring absorbs)."""
    module = copy.deepcopy(module).float().eval()
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(module)
    except Exception:  # models torch.fx cannot trace keep their modules
        return module


class DenseTorch:
    """Logits of candidate images (base image ``img[i]`` with pixel ``pix[i]`` masked).

    ``dtype=torch.float64``: the exact evaluator (a float64 copy of the model, unchanged);
    ``torch.float32``: the screen (batch norm folded). ``chunk`` candidates per forward pass;
    ``None`` times the model once (cached per model and device).

    Example:
        >>> import numpy as np, torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> ev = DenseTorch(net, (1, 2, 2), torch.float64)
        >>> ev.reset(np.ones((1, 1, 2, 2)), np.zeros(1))
        >>> ev.logits(np.array([0, 0]), np.array([0, 3])).shape
        (2, 2)
    """

    rescore_single = True  # as the exact evaluator: cheap enough to give every step's winner its float64 score

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                 device: Any = None, chunk: int | None = None):
        self.device, self.dtype = model_device(module, device), dtype
        self.shape = tuple(int(v) for v in input_shape)
        net = copy.deepcopy(module).eval() if dtype == torch.float64 else float32_copy(module)
        self.net = net.to(device=self.device, dtype=dtype)
        self.chunk = chunk or self._tuned_chunk(module)

    def _tuned_chunk(self, module: nn.Module) -> int:
        key = (str(self.device), str(self.dtype), self.shape)
        cache = _tuned.setdefault(module, {})
        if key not in cache:
            if self.device.type == "cuda":  # a GPU wants the largest batches
                cache[key] = CHUNK_SIZES[-1]
            else:
                probe = torch.zeros(CHUNK_SIZES[-1], *self.shape, dtype=self.dtype, device=self.device)
                with torch.inference_mode():
                    cache[key] = tune_chunk(lambda size: self.net(probe[:size]))
        return cache[key]

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        """Start runs on the B normalised images ``x`` (B×C×H×W)."""
        self.base = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device).clone()
        self.mask_value = torch.as_tensor(np.asarray(mask_value, np.float64), dtype=self.dtype, device=self.device)

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        w = self.shape[2]
        img, pix = np.asarray(img, np.int64), np.asarray(pix, np.int64)
        self.base[torch.as_tensor(img), :, torch.as_tensor(pix // w), torch.as_tensor(pix % w)] = self.mask_value

    @torch.inference_mode()
    def base_logits(self) -> np.ndarray:
        return self.net(self.base).double().cpu().numpy()

    @torch.inference_mode()
    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        w = self.shape[2]
        img, pix = np.asarray(img, np.int64), np.asarray(pix, np.int64)
        out = []
        for i in range(0, len(img), self.chunk):
            ii = torch.as_tensor(img[i : i + self.chunk], device=self.device)
            pp = torch.as_tensor(pix[i : i + self.chunk], device=self.device)
            batch = self.base[ii]
            batch[torch.arange(len(ii), device=self.device), :, pp // w, pp % w] = self.mask_value
            out.append(self.net(batch).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))
