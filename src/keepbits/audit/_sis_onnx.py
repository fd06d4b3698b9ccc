"""BackSelect evaluation of ONNX models (plain ``.onnx`` classifiers and keepbits bundles).

:func:`torch_twin` converts the graph to torch (:mod:`keepbits.audit._onnx_torch`) where every
operator has a torch twin and the twin's logits agree with ONNX Runtime's; BackSelect then uses
the torch evaluators (incremental screen, float64 re-scoring) on the graph's own input space
through :class:`GraphInputSpace`. Where it does not convert (or torch is not installed):
:class:`OnnxScreen` runs candidate batches with ONNX Runtime in the graph's own input space
(uint8 NHWC for bundles), built by one gather and one scatter per chunk (on CUDA the output
stays on the device through I/O binding; on the CPU plain ``run`` measured faster);
:class:`OnnxFloat64` is the exact evaluator: the same graph with every float
tensor made float64, run by the ONNX reference evaluator (``onnx.reference``; ONNX Runtime
has no float64 convolution). It is slow, so :mod:`keepbits.audit.sis` calls it only when
float32 rounding leaves more than one candidate in the running for a step.
:func:`module_screen` gives a torch model the same ONNX Runtime screen (exported once to a
temporary file): :mod:`keepbits.audit.sis` takes it for the plain path where it spends less
CPU time than torch (ResNet-20 at 32×32: about half).
"""
from __future__ import annotations

import logging
import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from keepbits.audit._base import OnnxAdapter
from keepbits.audit._sis_eval import CHUNK_SIZES, masked_pixel, tune_chunk
from keepbits.errors import InputError

log = logging.getLogger("keepbits")


class _Feed:
    """Candidate images in the graph's input space (layout, dtype) for one adapter."""

    def __init__(self, adapter: OnnxAdapter, dtype: Any):
        self.adapter, self.dtype = adapter, dtype
        self.channels_last = adapter._feed == "uint8-nhwc"

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        c = len(mask_value)
        self.base = np.array(self.adapter._pixels(np.asarray(x), self.dtype))
        pixel = self.adapter._pixels(np.asarray(mask_value, np.float64).reshape(1, c, 1, 1), self.dtype)
        self.mask_value = pixel.reshape(c)
        self.width = x.shape[3]

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        rows, cols = pix // self.width, pix % self.width
        if self.channels_last:
            self.base[img, rows, cols, :] = self.mask_value
        else:
            self.base[img, :, rows, cols] = self.mask_value

    def batch(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        return masked_pixel(self.base, img, pix, self.mask_value, self.width, self.channels_last)


def _same_logits(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether a stand-in's logits ``got`` reproduce ``want`` (same shape, relative 1e-3)."""
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-3, atol=1e-3 * (1 + np.abs(want).max())))


def torch_twin(adapter: OnnxAdapter) -> tuple[Any, str]:
    """(the graph as a torch module taking its input as float N×C×H×W, "") or (None, why not).
    The twin must reproduce ONNX Runtime's logits on random inputs (relative 1e-3)."""
    try:
        import torch

        from keepbits.audit._onnx_torch import NotConvertible, onnx_module
    except ImportError as exc:
        return None, f"torch is not installed ({exc})"
    nhwc = adapter._feed == "uint8-nhwc"
    try:
        module = onnx_module(adapter.model_path, adapter._input_name, adapter._output, adapter.input_shape, nhwc)
    except NotConvertible as exc:
        return None, f"no torch twin of the graph: {exc}"
    batch = adapter.session.get_inputs()[0].shape[0]
    probe = np.random.default_rng(0).normal(size=(batch if isinstance(batch, int) and batch > 0 else 2, *adapter.input_shape))
    feed = adapter._pixels(probe)
    want = np.asarray(adapter.session.run([adapter._output], {adapter._input_name: feed})[0], np.float64)
    graph_input = np.asarray(feed, np.float32).transpose(0, 3, 1, 2) if nhwc else np.asarray(feed, np.float32)
    try:
        with torch.inference_mode():
            got = module(torch.from_numpy(np.ascontiguousarray(graph_input))).double().numpy()
    except Exception as exc:  # noqa: BLE001 - a twin that does not run is no twin
        return None, f"the torch twin does not run ({str(exc).splitlines()[0]})"
    if not _same_logits(got, want):
        difference = np.abs(got - want).max() if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
        return None, f"the torch twin differs from ONNX Runtime ({difference})"
    return module, ""


def gradient_module(adapter: Any) -> Any:
    """The classifier of ``adapter`` as a differentiable torch module of normalised float32
    N×C×H×W images, for gradient BackSelect: a torch model's own module; an ONNX model's graph
    twin (:func:`torch_twin`) behind :class:`keepbits.audit._onnx_torch.GraphInput` (built once
    per adapter); otherwise :class:`InputError` saying why not and what to use instead."""
    if adapter.torch_module is not None:
        return adapter.torch_module
    if not isinstance(adapter, OnnxAdapter):
        raise InputError(f"{adapter.source}: gradient BackSelect needs a torch model or an ONNX graph")
    module = adapter._gradient_module
    if module is None:
        twin, why = torch_twin(adapter)
        if twin is None and why.startswith("torch is not installed"):
            raise InputError(f"{adapter.source}: gradient BackSelect needs torch, which is not installed here "
                             "(pip install 'keepbits[train,audit]'); the exact method (method 'plain') runs on ONNX Runtime alone")
        if twin is None:
            raise InputError(f"{adapter.source}: gradient BackSelect takes gradients through the graph in torch, and here {why}; "
                             "use the exact method (method 'plain', run by ONNX Runtime) or audit the torch classifier "
                             "(a checkpoint or registry name)")
        from keepbits.audit._onnx_torch import GraphInput

        module = adapter._gradient_module = GraphInput(twin, adapter.mean, adapter.std, adapter._feed).eval()
    return module


class GraphInputSpace:
    """A torch evaluator of an ONNX graph's twin, fed normalised images: ``reset`` and
    ``image_logits`` map them to the graph's input space (uint8 NHWC values as float N×C×H×W
    for bundles) first, so candidates are masked exactly as ONNX Runtime would see them."""

    def __init__(self, inner: Any, adapter: OnnxAdapter):
        self.inner, self.adapter = inner, adapter

    def _graph_input(self, x: np.ndarray) -> np.ndarray:
        pixels = self.adapter._pixels(np.asarray(x, np.float64), np.float64)
        return pixels.transpose(0, 3, 1, 2).astype(np.float64) if self.adapter._feed == "uint8-nhwc" else pixels

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        c = len(mask_value)
        self.inner.reset(self._graph_input(x), self._graph_input(np.asarray(mask_value, np.float64).reshape(1, c, 1, 1)).reshape(c))

    def image_logits(self, images: np.ndarray) -> np.ndarray:
        return self.inner.image_logits(self._graph_input(images))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class OnnxScreen:
    """Float32 logits of candidate images by ONNX Runtime (CPU, or CUDA with ``device="cuda"``)."""

    def __init__(self, adapter: OnnxAdapter, device: Any = None, chunk: int | None = None):
        self.adapter, self.feed = adapter, _Feed(adapter, np.float32)
        self.session = adapter.session
        kind = str(device or "cpu").split(":")[0]
        self.cuda = kind == "cuda"
        if kind == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError(f"{adapter.source}: ONNX Runtime here has no CUDA execution provider (install keepbits[gpu])")
            index = str(device).split(":")[1] if ":" in str(device) else "0"
            self.session = ort.InferenceSession(str(adapter.model_path), providers=[("CUDAExecutionProvider", {"device_id": index}),
                                                                                  "CPUExecutionProvider"])
        elif kind != "cpu":
            raise InputError(f"device must be 'cpu' or 'cuda[:N]' for ONNX models, got {device!r}")
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.chunk = self.fixed or chunk or None

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        self.feed.reset(x, mask_value)
        if self.chunk is None:
            probe = np.repeat(self.feed.base[:1], CHUNK_SIZES[-1], 0)
            self.chunk = tune_chunk(lambda size: self._run(probe[:size]), CHUNK_SIZES[:-1])[0]

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        self.feed.mask(img, pix)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.fixed and n < self.fixed:  # a graph with a fixed batch size: pad the last chunk
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed - n, 0)])
        batch = np.ascontiguousarray(batch)
        if not self.cuda:  # on the CPU I/O binding measured slower than run() for large batches
            return np.asarray(self.session.run([self.adapter._output], {self.adapter._input_name: batch})[0][:n], np.float64)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.adapter._input_name, batch)
        binding.bind_output(self.adapter._output, "cuda")
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0][:n], np.float64)

    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        out = [self._run(self.feed.batch(img[i : i + self.chunk], pix[i : i + self.chunk])) for i in range(0, len(img), self.chunk)]
        return np.concatenate(out) if out else np.zeros((0, 0))

    def base_logits(self) -> np.ndarray:
        return np.concatenate([self._run(self.feed.base[i : i + 1]) for i in range(len(self.feed.base))])


def module_screen(module: Any, shape: tuple[int, int, int], chunk: int | None = None) -> tuple[OnnxScreen | None, str]:
    """(an ONNX Runtime float32 screen of the torch ``module``, "") or (None, why not). The module
    (a float32 eval copy, on the CPU) is exported once to a temporary ONNX file, loaded and the
    file removed; ONNX Runtime gets one intra-op thread per torch thread. Its logits must match
    the module's on inputs other than the export's (relative 1e-3), as a twin's must; the float64
    re-scoring of :mod:`keepbits.audit.sis` absorbs the float32 differences that remain."""
    import torch

    net = copy.deepcopy(module).float().cpu().eval()
    generator = torch.Generator().manual_seed(0)
    # exported with one input, checked on others (a trace that froze a value would pass its own input)
    example, probe = torch.randn(2, *shape, generator=generator), torch.randn(3, *shape, generator=generator)
    with tempfile.TemporaryDirectory(prefix="keepbits-sis-") as folder:
        path = Path(folder) / "screen.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
                want = net(probe).double().numpy()
            adapter = OnnxAdapter(path, input_shape=shape, threads=torch.get_num_threads())
            got = adapter.logits(probe.numpy())
        except Exception as exc:  # noqa: BLE001 - a model that does not export keeps the torch screen
            return None, f"no ONNX export ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if not _same_logits(got, want):
        return None, "the exported graph differs from the module"
    return OnnxScreen(adapter, "cpu", chunk), ""


def _fast_max_pool() -> type:
    """The reference evaluator's MaxPool (a Python loop over windows) as a separable maximum
    over strided numpy views for 2-D pooling without ``auto_pad``/``ceil_mode`` (same values)."""
    from onnx.reference.ops.op_max_pool import MaxPool as ReferenceMaxPool

    class MaxPool(ReferenceMaxPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None, storage_order=None,
                 strides=None):
            if len(self.output) > 1 or (auto_pad not in (None, "NOTSET")) or ceil_mode or len(kernel_shape) != 2:
                return super()._run(x, auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order, strides)
            k, s, d = kernel_shape, strides or (1, 1), dilations or (1, 1)
            p = pads or (0, 0, 0, 0)
            x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])), constant_values=-np.inf)
            for axis in (2, 3):
                i = axis - 2
                out = (x.shape[axis] - d[i] * (k[i] - 1) - 1) // s[i] + 1
                taps = [np.take(x, np.arange(t * d[i], t * d[i] + (out - 1) * s[i] + 1, s[i]), axis=axis) for t in range(k[i])]
                x = np.maximum.reduce(taps)
            return (x,)

    return MaxPool


def _float64_model(path: Any) -> Any:
    """The ONNX model at ``path`` with float tensors, casts, constants, inputs and outputs in float64."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))

    def tensor(t: Any) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def nodes(node_list: Any) -> None:
        for node in node_list:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.DOUBLE
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensor(attr.t)
                if attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for v in list(g.input) + list(g.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = TensorProto.DOUBLE
        del g.value_info[:]
        nodes(g.node)

    graph(model.graph)
    for fn in model.functions:
        nodes(fn.node)
    return model


class OnnxFloat64:
    """Float64 logits of candidate images: the graph in float64 on the ONNX reference evaluator.

    :func:`create` returns ``None`` (with a log line) when the graph does not convert or its
    float64 outputs disagree with ONNX Runtime's (custom operators, say)."""

    path_scores = False  # slow: used only to break float32 near-ties

    def __init__(self, adapter: OnnxAdapter, evaluator: Any):
        self.adapter, self.evaluator, self.feed = adapter, evaluator, _Feed(adapter, np.float64)

    @classmethod
    def create(cls, adapter: OnnxAdapter, probe: np.ndarray) -> "OnnxFloat64 | None":
        try:
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(_float64_model(adapter.model_path), new_ops=[_fast_max_pool()])
            exact = cls(adapter, evaluator)
            exact.feed.reset(probe, np.zeros(probe.shape[1]))
            got = exact.base_logits()
            want = adapter.logits(probe.astype(np.float32))
            if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * (1 + np.abs(want).max())):
                raise ValueError(f"float64 graph differs from ONNX Runtime by {np.abs(got - want).max():.3g}")
            return exact
        except Exception as exc:  # any failure: BackSelect ranks ONNX Runtime's float32 margins instead
            log.info("%s: no float64 evaluation (%s); ties are broken on float32 margins", adapter.source, str(exc).splitlines()[0])
            return None

    def reset(self, x: np.ndarray, mask_value: np.ndarray) -> None:
        self.feed.reset(x, mask_value)

    def mask(self, img: np.ndarray, pix: np.ndarray) -> None:
        self.feed.mask(img, pix)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.evaluator.run([self.adapter._output], {self.adapter._input_name: batch})[0]
        return np.asarray(out, np.float64)

    def logits(self, img: np.ndarray, pix: np.ndarray) -> np.ndarray:
        return self._run(self.feed.batch(img, pix))

    def base_logits(self) -> np.ndarray:
        return self._run(self.feed.base)
