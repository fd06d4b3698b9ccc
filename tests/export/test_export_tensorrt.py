"""TensorRT path without TensorRT: one clear error, cache keys, function-body stripping, profiles.

Nothing here claims an engine works: building and the parity check need a GPU and TensorRT.
"""
from __future__ import annotations

import sys

import pytest
from onnx import TensorProto, helper

from keepbits.bundle import Manifest, load_bundle, write_bundle
from keepbits.cli import main
from keepbits.errors import InputError
from keepbits.export import ops
from keepbits.export.tensorrt import EngineSpec, engine_key, import_tensorrt, strip_function_bodies


def _bundle(tmp_path, dynamic: bool = True):
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, "H", "W"]) for n in ("image", "logits")]
    node = helper.make_node("HardConcreteMask", ["image"], ["logits"], domain="keepbits", **ops.gate_attrs())
    model = helper.make_model(helper.make_graph([node], "g", io[:1], io[1:]), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("keepbits", 1)])
    ops.attach_function_bodies(model)
    manifest = Manifest(input_shape=[1, 28, 28], input_dtype="float32", input_layout="NCHW", mean=[0.5], std=[0.5],
                        class_names=["0", "1"], block_size=4, mask_threshold=0.5, generator="g", classifier="c",
                        dynamic_size=dynamic, custom_ops=["HardConcreteMask"])
    return load_bundle(write_bundle(tmp_path / "b", manifest, {"model.onnx": model.SerializeToString()})), model


def test_missing_tensorrt_is_one_clear_error(tmp_path, monkeypatch, capsys):
    bundle, _ = _bundle(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    with pytest.raises(InputError, match="TensorRT is not installed"):
        import_tensorrt()
    assert main(["export", "tensorrt", "--model", str(bundle.source)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed" in err[0]


def test_strip_function_bodies(tmp_path):
    _, model = _bundle(tmp_path)
    stripped = strip_function_bodies(model)
    assert len(model.functions) == 1 and len(stripped.functions) == 0
    assert [n.op_type for n in stripped.graph.node] == ["HardConcreteMask"]


def test_engine_key_covers_every_input():
    base = ("NVIDIA H100", "9.0", "10.3.0", "a" * 64, "fp16", ((1, 28, 28), (4, 28, 28), (8, 28, 28)), "b" * 64)
    keys = {engine_key(*base)}
    for i, other in enumerate(["NVIDIA L4", "8.9", "10.4.0", "c" * 64, "fp32", ((1, 28, 28),) * 3, "d" * 64]):
        keys.add(engine_key(*base[:i], other, *base[i + 1:]))
    assert len(keys) == 8 and engine_key(*base) == engine_key(*base)


def test_profile_validation(tmp_path):
    bundle, _ = _bundle(tmp_path)
    assert EngineSpec(batch=(1, 2, 8)).profile(bundle) == ((1, 28, 28), (2, 28, 28), (8, 28, 28))
    assert EngineSpec(height=(16, 28, 64), width=(16, 28, 64)).profile(bundle)[2] == (8, 64, 64)
    with pytest.raises(InputError, match="min <= opt <= max"):
        EngineSpec(batch=(4, 2, 8)).profile(bundle)
    fixed, _ = _bundle(tmp_path / "fixed", dynamic=False)
    with pytest.raises(InputError, match="28×28 images only"):
        EngineSpec(height=(16, 28, 64)).profile(fixed)


def test_the_users_mistakes_come_before_what_the_machine_lacks(tmp_path, monkeypatch, capsys):
    """A bad profile or tolerance is named even where TensorRT is missing (it was "TensorRT is not
    installed" first, and --tolerance nan was accepted: no engine could have failed the check)."""
    bundle, _ = _bundle(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for extra, message in ((["--batch", "8,1,4"], "min <= opt <= max"), (["--tolerance", "nan"], "argument --tolerance"),
                           (["--tolerance", "-1"], "argument --tolerance"), (["--samples", "0"], "argument --samples"),
                           (["--cache", str(bundle.model_path)], "a file, not a folder")):
        assert main(["export", "tensorrt", "--model", str(bundle.source), *extra]) == 2
        assert message in capsys.readouterr().err
    from keepbits.export.tensorrt import build_engine

    with pytest.raises(InputError, match="tolerance must be a finite number > 0"):
        build_engine(bundle.source, EngineSpec(), tmp_path / "cache", tolerance=float("nan"))
