"""keepbits custom ops: ONNX function bodies vs native C++ kernels vs keepbits.core (numpy).

Fresh random inputs every run (the seed is printed on failure): batch 1–8, odd sizes,
b ∈ {1, 2, 8, size}. The native half needs ``native/build.sh``; without the library it is
skipped and only the function bodies are checked.
"""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from keepbits import native
from keepbits.core import deterministic_mask, mixed_resolution
from keepbits.errors import InputError
from keepbits.export import ops

SEED = int(np.random.SeedSequence().entropy % (1 << 32))
TOL = 1e-5
needs_native = pytest.mark.skipif(native.library_path() is None, reason="native library not built (native/build.sh)")


def op_model(fused: bool, block_size: int, gate: dict[str, float] | None = None, mask_channels: int | str = 1) -> bytes:
    """A graph of just the keepbits ops: (log_alpha, x) -> (mask, mixed)."""
    gate = ops.gate_attrs() if gate is None else gate
    la = helper.make_tensor_value_info("log_alpha", TensorProto.FLOAT, ["N", mask_channels, "H", "W"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, "H", "W"]) for n, c in (("mask", mask_channels), ("mixed", "C"))]
    if fused:
        nodes = [helper.make_node("MaskCompose", ["log_alpha", "x"], ["mask", "mixed"], domain="keepbits", block_size=block_size, **gate)]
    else:
        nodes = [
            helper.make_node("HardConcreteMask", ["log_alpha"], ["mask"], domain="keepbits", **gate),
            helper.make_node("MixedResCompose", ["x", "mask"], ["mixed"], domain="keepbits", block_size=block_size),
        ]
    model = helper.make_model(helper.make_graph(nodes, "ops", [la, x], outs), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("keepbits", 1)])
    ops.attach_function_bodies(model)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _inputs(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> dict[str, np.ndarray]:
    return {"log_alpha": rng.normal(0.0, 3.0, (n, 1, h, w)).astype(np.float32), "x": rng.random((n, c, h, w), dtype=np.float32)}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("b", [1, 2, 8, "size"])
def test_ops_match_numpy_reference(fused, b):
    rng = np.random.default_rng(SEED)
    sizes = [(37, 51), (int(rng.integers(1, 40)), int(rng.integers(1, 40)))]
    use_native = native.library_path() is not None
    for h, w in sizes:
        block = max(h, w) if b == "size" else b
        model = op_model(fused, block)
        sessions = {"bodies": native.make_session(model, native=False)}
        if use_native:
            sessions["native"] = native.make_session(model)
        feed = _inputs(rng, int(rng.integers(1, 9)), 3, h, w)
        ref_mask = deterministic_mask(feed["log_alpha"])
        ref_mixed = mixed_resolution(feed["x"], ref_mask, block)
        for name, session in sessions.items():
            mask, mixed = session.run(None, feed)
            assert np.abs(mask - ref_mask).max() <= TOL, (name, SEED, h, w)
            assert np.abs(mixed - ref_mixed).max() <= TOL, (name, SEED, h, w)


@needs_native
def test_native_reads_node_attributes():
    """Non-default β, γ, ζ and b: the kernels must read the attribute names the nodes carry."""
    rng = np.random.default_rng(SEED)
    gate = {"beta": 0.5, "gamma": -0.2, "zeta": 1.3}
    for fused in (True, False):
        model = op_model(fused, 3, gate)
        feed = _inputs(rng, 2, 2, 11, 7)
        want = native.make_session(model, native=False).run(None, feed)
        got = native.make_session(model).run(None, feed)
        for a, b in zip(want, got):
            assert np.abs(a - b).max() <= TOL, SEED


@needs_native
def test_native_kernel_runs_instead_of_body(tmp_path):
    so = native.session_options()
    so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / "prof")
    session = ort.InferenceSession(op_model(True, 4), so, providers=["CPUExecutionProvider"])
    session.run(None, _inputs(np.random.default_rng(0), 1, 3, 9, 9))
    events = json.loads(open(session.end_profiling()).read())
    executed = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert executed == {"MaskCompose"}, executed  # one fused kernel, not the body's Pad/ReduceSum/…


@needs_native
def test_native_rejects_bad_shapes_and_attributes():
    session = native.make_session(op_model(True, 2, mask_channels="K"))  # the graph lets any shape through
    with pytest.raises(Exception, match="N×1×H×W"):
        session.run(None, {"log_alpha": np.zeros((1, 3, 4, 4), np.float32), "x": np.zeros((1, 3, 4, 4), np.float32)})
    with pytest.raises(Exception, match="block_size >= 1"):
        native.make_session(op_model(True, 0))


def test_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setenv("KEEPBITS_NATIVE", "0")
    monkeypatch.setattr(native, "_warned", set())
    with caplog.at_level(logging.INFO, logger="keepbits.native"):
        for _ in range(3):
            session = native.make_session(op_model(True, 2))
    said = [r for r in caplog.records if "function bodies" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO  # no fault: an installed package has no native/ (silent under -q)
    mask, _ = session.run(None, _inputs(np.random.default_rng(0), 1, 1, 5, 5))
    assert mask.shape == (1, 1, 5, 5)
    monkeypatch.setenv("KEEPBITS_NATIVE", "1")
    monkeypatch.setenv("KEEPBITS_NATIVE_LIB", "/nonexistent/libkeepbits_ort.so")
    with pytest.raises(InputError, match="KEEPBITS_NATIVE_LIB"):
        native.library_path()


def _gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


CUDA_TEST = Path(__file__).resolve().parent.parent / "native" / "build" / "keepbits_cuda_test"


@pytest.mark.skipif(not CUDA_TEST.is_file() or not _gpu_present(), reason="needs `native/build.sh --cuda` and an NVIDIA GPU")
def test_cuda_kernels_match_cpu_kernels_on_gpu():
    run = subprocess.run([str(CUDA_TEST), str(SEED)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
