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
import torch.nn.functional as F
from torch import nn

from keepbits.audit._sis_eval import CHUNK_SIZES, tune_chunk
from keepbits.training.distributed import model_device

_tuned: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


def max_pool2d(input: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:
    """:func:`torch.nn.functional.max_pool2d` as a separable maximum over strided views: the
    same values (a maximum rounds nothing), without torch's slow NCHW CPU kernel.

    Example:
        >>> x = torch.randn(2, 3, 9, 7)
        >>> bool(torch.equal(max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, 3, 2, 1, ceil_mode=True)))
        True
    """
    if return_indices:
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, True)
    layout = torch.channels_last if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format  # as torch's kernel returns it
    k = _pair(kernel_size)
    s = _pair(stride) if stride not in (None, (), []) else k
    p, d = _pair(padding), _pair(dilation)
    size = input.shape[-2:]
    out = [_pool_size(size[i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(2)]
    need = [(out[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i in range(2)]
    extra = [need[i] - size[i] - p[i] for i in range(2)]
    if p != (0, 0) or max(extra) > 0:
        input = F.pad(input, (p[1], max(extra[1], 0), p[0], max(extra[0], 0)), value=-float("inf"))
    for axis, i in ((-2, 0), (-1, 1)):
        span = (out[i] - 1) * s[i] + 1
        taps = [input.narrow(axis, t * d[i], span) for t in range(k[i])]
        taps = [v[..., :: s[i], :] if axis == -2 else v[..., :: s[i]] for v in taps]
        result = taps[0]
        for v in taps[1:]:
            result = torch.maximum(result, v)
        input = result
    return input.contiguous(memory_format=layout)


def _fast_pools(gm: Any) -> Any:
    """Max pooling of a traced graph by :func:`max_pool2d` (same values)."""
    modules = dict(gm.named_modules())
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(modules[n.target], nn.MaxPool2d) and not modules[n.target].return_indices:
            m = modules[n.target]
            with gm.graph.inserting_after(n):
                fast = gm.graph.call_function(max_pool2d, n.args, {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                                                                     "dilation": m.dilation, "ceil_mode": m.ceil_mode})
            n.replace_all_uses_with(fast)
            gm.graph.erase_node(n)
        elif n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d):
            n.target = max_pool2d
    gm.graph.lint()
    gm.recompile()
    return gm


def float32_copy(module: nn.Module) -> nn.Module:
    """Float32 eval copy for screening: batch norm folded into the convolutions before it and
    max pooling by :func:`max_pool2d`, where torch.fx traces the model (folding changes float32
    rounding, which the float64 re-scoring absorbs)."""
    module = copy.deepcopy(module).float().eval()
    try:
        from torch.fx.experimental.optimization import fuse

        return _fast_pools(fuse(module))
    except Exception:  # models torch.fx cannot trace keep their modules
        return module


def float64_copy(module: nn.Module) -> nn.Module:
    """Float64 eval copy, the model's own arithmetic (max pooling by :func:`max_pool2d`, the same values, where traceable)."""
    module = copy.deepcopy(module).double().eval()
    try:
        return _fast_pools(torch.fx.symbolic_trace(module))
    except Exception:  # untraceable models run as they are
        return module


class DenseTorch:
    """Logits of candidate images (base image ``img[i]`` with pixel ``pix[i]`` masked).

    ``dtype=torch.float64``: the exact evaluator (:func:`float64_copy`); ``torch.float32``: the
    screen (:func:`float32_copy`). ``chunk`` candidates per forward pass; ``None``: the screen
    times chunk sizes and memory layouts (NCHW, channels-last) once per model and device.

    Example:
        >>> import numpy as np, torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> ev = DenseTorch(net, (1, 2, 2), torch.float64)
        >>> ev.reset(np.ones((1, 1, 2, 2)), np.zeros(1))
        >>> ev.logits(np.array([0, 0]), np.array([0, 3])).shape
        (2, 2)
    """

    path_scores = True  # as the exact evaluator: scores the chosen path (see image_logits)

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                 device: Any = None, chunk: int | None = None):
        self.device, self.dtype = model_device(module, device), dtype
        self.shape = tuple(int(v) for v in input_shape)
        net = float64_copy(module) if dtype == torch.float64 else float32_copy(module)
        self.net = net.to(device=self.device)
        self.channels_last = False
        if dtype == torch.float64:
            self.chunk = chunk or 128
        else:
            self.chunk, self.channels_last = self._tuned(module, chunk)
            if self.channels_last:
                self.net = self.net.to(memory_format=torch.channels_last)

    def _tuned(self, module: nn.Module, chunk: int | None) -> tuple[int, bool]:
        """(chunk, channels-last?) with the lowest CPU time per candidate (cached per model, device and shape)."""
        key = (str(self.device), self.shape, chunk)
        cache = _tuned.setdefault(module, {})
        if key not in cache:
            if self.device.type == "cuda":  # a GPU wants the largest batches
                cache[key] = (chunk or CHUNK_SIZES[-1], False)
            else:
                probe = torch.randn(CHUNK_SIZES[-1], *self.shape, generator=torch.Generator().manual_seed(0))
                options = []
                for last in (False, True):
                    net = copy.deepcopy(self.net).to(memory_format=torch.channels_last) if last else self.net
                    data = probe.contiguous(memory_format=torch.channels_last) if last else probe
                    with torch.inference_mode():
                        try:  # channels-last breaks models that .view() their maps; it must also give the same logits
                            if last and not all(torch.allclose(net(data[:n]), self.net(probe[:n]), rtol=1e-4, atol=1e-4)
                                                for n in (1, 3)):
                                continue
                            size, rate = tune_chunk(lambda n: net(data[:n]), (chunk,) if chunk else CHUNK_SIZES[:-1])
                        except RuntimeError:
                            continue
                    options.append((rate, size, last))
                _, size, last = min(options)
                cache[key] = (size, last)
        return cache[key]

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.net(batch).double().cpu()

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
        return self._run(self.base).numpy()

    @torch.inference_mode()
    def image_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of normalised N×C×H×W ``images`` (BackSelect's path: the base after every step)."""
        out = [self._run(torch.as_tensor(images[i : i + self.chunk], dtype=self.dtype, device=self.device))
               for i in range(0, len(images), self.chunk)]
        return torch.cat(out).numpy()

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
            out.append(self._run(batch))
        return torch.cat(out).numpy() if out else np.zeros((0, 0))
