"""`keepbits export onnx`: graph validity, torch vs ONNX Runtime (function bodies) vs ONNX Runtime
(native kernels) parity on fresh random batches, bundle round trip, TensorRT-target graph.

Two exports per run (module fixtures, tiny random-init networks):
  A: uint8 NHWC input, fused MaskCompose, classifier on the original image, b = 2 (via the CLI)
  B: float NCHW input, HardConcreteMask + MixedResCompose, classifier on x̃, b = 64 (≥ image size)
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from keepbits import native, registry
from keepbits.bundle import load_bundle
from keepbits.cli import main
from keepbits.codec import decode
from keepbits.errors import InputError
from keepbits.export import NiceGraph, compare_outputs, export_onnx
from keepbits.runtime import Pipeline
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint

SEED = int(np.random.SeedSequence().entropy % (1 << 32))
TOL = 1e-5


@registry.register("test_export_fcn", "classifier")
def _fcn(in_channels: int = 3, num_classes: int = 4, image_size=None) -> nn.Module:
    """Tiny fully convolutional classifier (any H×W)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def _checkpoint(path, block_size: int) -> str:
    torch.manual_seed(0)
    gen_kwargs, clf_kwargs = {"in_channels": 3, "widths": [4, 8]}, {"in_channels": 3, "num_classes": 4}
    gen, clf = registry.build("nice_unet", **gen_kwargs), registry.build("test_export_fcn", **clf_kwargs)
    with torch.no_grad():  # a generator that keeps some pixels and drops others
        gen.head.weight.normal_(0, 2.0)
        gen.head.bias.zero_()
    save_checkpoint(path, Checkpoint(
        kind="nice",
        models={"generator": ModelEntry.of("nice_unet", gen_kwargs, gen), "classifier": ModelEntry.of("test_export_fcn", clf_kwargs, clf)},
        input_shape=[3, 32, 32], normalization=Normalization([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
        class_names=["a", "b", "c", "d"], settings={"block_size": block_size, "mask_threshold": 0.5, "mode": "fixed"},
        metrics={"test_acc": 0.25}, command="keepbits train nice (test)", epoch=1,
    ))
    return str(path)


@pytest.fixture(scope="module")
def bundle_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("a")
    ckpt = _checkpoint(root / "nice.pt", 2)
    assert main(["export", "onnx", "--model", ckpt, "--out", str(root / "bundle")]) == 0
    return ckpt, load_bundle(root / "bundle")


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    ckpt = _checkpoint(root / "nice.pt", 64)
    return ckpt, export_onnx(ckpt, root / "bundle.zip", input_dtype="float32", classify_on="mixed", fused=False)


def _torch_graph(ckpt: str, manifest) -> NiceGraph:
    checkpoint = load_checkpoint(ckpt, "nice")
    return NiceGraph(build_model(checkpoint, "generator"), build_model(checkpoint, "classifier"), manifest.mean, manifest.std,
                     manifest.block_size, manifest.input_dtype, manifest.classify_on, fused=True)


def _batch(rng, manifest, n, h, w) -> np.ndarray:
    c = manifest.input_shape[0]
    if manifest.input_dtype == "uint8":
        return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    return rng.random((n, c, h, w), dtype=np.float32)


def _check_parity(ckpt, bundle):
    m = bundle.manifest
    graph = _torch_graph(ckpt, m)
    sessions = {"bodies": native.make_session(bundle.model_path, native=False)}
    if native.library_path() is not None:
        sessions["native"] = native.make_session(bundle.model_path)
    rng = np.random.default_rng(SEED)
    for h, w in [(37, 51), (int(rng.integers(8, 48)), int(rng.integers(8, 48)))]:
        image = _batch(rng, m, int(rng.integers(1, 9)), h, w)
        with torch.no_grad():
            reference = tuple(t.numpy() for t in graph(torch.from_numpy(image)))
        assert reference[2].shape == image.shape  # x̃ in the input's layout
        for name, session in sessions.items():
            got = session.run(None, {m.input_name: image})
            report = compare_outputs(reference, got, m.pixel_scale)
            assert report["mask_max_abs"] <= TOL and report["mixed_max_abs"] <= TOL, (name, SEED, report)
            assert report["argmax_agree"] == 1.0 and report["logits_max_abs"] <= 1e-3, (name, SEED, report)
    return sessions


def test_graph_is_valid_onnx(bundle_a, bundle_b):
    for _, bundle in (bundle_a, bundle_b):
        model = onnx.load(str(bundle.model_path))
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert [o.name for o in inferred.graph.output] == ["logits", "mask", "mixed"]
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets[""] >= 18 and opsets["keepbits"] == 1
        assert {f.name for f in model.functions} >= set(bundle.manifest.custom_ops)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert all(d.dim_param for d in dims[:3 if bundle.manifest.input_dtype == "uint8" else 1]), dims
        assert bundle.manifest.dynamic_size


def test_bundle_classifier_keeps_the_batch_axis_and_has_a_torch_twin(bundle_a):
    """The uint8 graph's NHWC→NCHW permute is made contiguous before the networks: otherwise the
    dynamo exporter spells the classifier's GAP + flatten as as_strided (a Reshape to 1-D, a Gather
    over the whole batch), which the audits' torch twin cannot convert; with the generator's custom
    ops pruned away, the logits' twin converts."""
    from keepbits.audit import load_model
    from keepbits.audit._sis_onnx import torch_twin

    ops = {n.op_type for n in onnx.load(str(bundle_a[1].model_path)).graph.node}
    assert "MaskCompose" in ops and not {"Gather", "Range"} & ops, ops
    twin, why = torch_twin(load_model(bundle_a[1].root))
    assert twin is not None, why


def test_a_bundle_where_a_torch_classifier_belongs_is_one_line_naming_its_classifier(bundle_a, bundle_b, capsys):
    from keepbits.training.byo import resolve_classifier

    for bundle in (bundle_a[1].root, bundle_b[1].source):  # a folder and a .zip
        with pytest.raises(InputError, match=r"a model bundle .*torch classifier.*\(this bundle's classifier: test_export_fcn\)"):
            resolve_classifier(str(bundle))
    assert main(["audit", "cid", "--model", str(bundle_b[1].source), "--data", str(bundle_b[1].source), "--out", "unused"]) == 2
    assert capsys.readouterr().err.count("a model bundle (its graph runs in ONNX Runtime)") == 1


def test_manifest_fields(bundle_a, bundle_b):
    a, b = bundle_a[1].manifest, bundle_b[1].manifest
    assert (a.input_dtype, a.input_layout, a.classify_on, a.custom_ops, a.block_size) == ("uint8", "NHWC", "original", ["MaskCompose"], 2)
    assert (b.input_dtype, b.input_layout, b.classify_on, b.block_size) == ("float32", "NCHW", "mixed", 64)
    assert b.custom_ops == ["HardConcreteMask", "MixedResCompose"]
    assert a.class_names == ["a", "b", "c", "d"] and a.mean == [0.5, 0.4, 0.3] and a.generator == "nice_unet"
    assert a.provenance["checkpoint_sha256"] and a.provenance["metrics"] == {"test_acc": 0.25}
    assert a.provenance["export_command"].startswith("keepbits")
    assert bundle_b[1].source.suffix == ".zip"


def test_parity_uint8_fused(bundle_a):
    _check_parity(*bundle_a)


def test_parity_float_unfused_classify_mixed(bundle_b):
    _check_parity(*bundle_b)


@pytest.mark.parametrize("which", ["a", "b"])
def test_deployment_bundle_without_mixed_output(bundle_a, bundle_b, tmp_path, which):
    """``--no-mixed-output``: outputs logits and ẑ only, the same values as the full bundle's; a
    classifier of the original image then needs no compose node, one of x̃ still computes it."""
    ckpt, full = bundle_a if which == "a" else bundle_b
    m = full.manifest
    args = ["--input", m.input_dtype, "--classify-on", m.classify_on] + ([] if m.custom_ops == ["MaskCompose"] else ["--unfused"])
    assert main(["export", "onnx", "--model", ckpt, "--out", str(tmp_path / "lean"), "--no-mixed-output", *args]) == 0
    lean = load_bundle(tmp_path / "lean")
    assert lean.manifest.output_names == ["logits", "mask"]
    assert [o.name for o in onnx.load(str(lean.model_path)).graph.output] == ["logits", "mask"]
    assert lean.manifest.custom_ops == (["HardConcreteMask"] if which == "a" else ["HardConcreteMask", "MixedResCompose"])
    image = _batch(np.random.default_rng(SEED), m, 3, 37, 29)
    for use_native in (False, True) if native.library_path() is not None else (False,):
        got = native.make_session(lean.model_path, native=use_native).run(None, {m.input_name: image})
        want = native.make_session(full.model_path, native=use_native).run(None, {m.input_name: image})[:2]
        assert len(got) == 2 and np.array_equal(got[1], want[1]), (which, use_native, SEED)
        assert np.allclose(got[0], want[0], atol=1e-5), (which, use_native, SEED)
    if which == "a":
        frame = np.random.default_rng(SEED).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        r_lean, r_full = Pipeline.from_bundle(lean.source)(frame), Pipeline.from_bundle(full.source)(frame)
        assert r_lean.label == r_full.label and np.array_equal(r_lean.mask, r_full.mask)
        (img_lean, keep_lean, _), (img_full, keep_full, _) = decode(r_lean.payload), decode(r_full.payload)
        assert np.array_equal(img_lean, img_full) and np.array_equal(keep_lean, keep_full)
        from keepbits.export.quantize import quantize_bundle

        rng = np.random.default_rng(SEED)
        data = tmp_path / "data.npz"
        np.savez(data, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 4, 8),
                 x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 4, 8))
        int8, report = quantize_bundle(lean.source, tmp_path / "lean_int8", data, calibration_images=8)
        assert int8.manifest.output_names == ["logits", "mask"] and report["mixed_max_abs"] is None
        assert report["images"] == 8 and 0.0 <= report["mask_agreement"] <= 1.0
        # ONNX Runtime's optimised INT8 graph still transposes the NHWC input before normalising it:
        # the multiply-add must not move into NHWC, where its per-channel broadcast is slow
        import onnxruntime as ort

        options = native.session_options()
        options.optimized_model_filepath, options.log_severity_level = str(tmp_path / "optimised.onnx"), 3
        ort.InferenceSession(str(int8.model_path), options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(str(tmp_path / "optimised.onnx"))
        consumers = {n.op_type for n in optimised.graph.node if m.input_name in n.input} - {"Shape"}
        assert consumers == {"Transpose"}, consumers


def test_round_trip_and_tamper(bundle_a, tmp_path):
    _, bundle = bundle_a
    again = load_bundle(bundle.source, expected_digest=bundle.digest)
    assert again.manifest == bundle.manifest
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.json", "model.onnx"):
        (copy / name).write_bytes((bundle.source / name).read_bytes())
    model = onnx.load(str(copy / "model.onnx"))
    model.graph.node[-1].name += "_tampered"
    onnx.save(model, str(copy / "model.onnx"))
    with pytest.raises(Exception, match="model.onnx was modified"):
        load_bundle(copy)


def test_tensorrt_target_fixed_size_lenet(tmp_path):
    """--target tensorrt: plugin nodes without function bodies; LeNet-5 pins the size (dynamic_size false)."""
    gen, clf = registry.build("nice_mnist", in_channels=1), registry.build("lenet5", in_channels=1, num_classes=10)
    save_checkpoint(tmp_path / "mnist.pt", Checkpoint(
        kind="nice", models={"generator": ModelEntry.of("nice_mnist", {"in_channels": 1}, gen),
                             "classifier": ModelEntry.of("lenet5", {"in_channels": 1, "num_classes": 10}, clf)},
        input_shape=[1, 28, 28], normalization=Normalization([0.13], [0.31]), class_names=list("0123456789"),
        settings={"block_size": 4, "mask_threshold": 0.5}, command="test",
    ))
    bundle = export_onnx(tmp_path / "mnist.pt", tmp_path / "trt", target="tensorrt")
    m = bundle.manifest
    assert (m.target, m.function_bodies, m.dynamic_size, m.custom_ops) == ("tensorrt", False, False, ["MaskCompose"])
    model = onnx.load(str(bundle.model_path))
    assert len(model.functions) == 0
    node = next(n for n in model.graph.node if n.op_type == "MaskCompose")
    assert {a.name for a in node.attribute} == {"beta", "gamma", "zeta", "block_size"}


def test_a_newer_opset_is_written_by_graph_and_function_bodies_alike(tmp_path, bundle_a, caplog):
    """--opset 21: the graph and the function bodies import 21 (ONNX requires them to agree: only
    18 exported before, 19 and up failed the checker after the whole export), ONNX Runtime runs
    it (the export verifies), the manifest says 21, and the log line names the bundle's digest."""
    with caplog.at_level("INFO", logger="keepbits.export"):
        bundle = export_onnx(bundle_a[0], tmp_path / "b21", opset=21)
    model = onnx.load(str(bundle.model_path))
    assert {o.domain: o.version for o in model.opset_import} == {"": 21, "keepbits": 1} and bundle.manifest.opset == 21
    assert all({o.domain: o.version for o in f.opset_import}[""] == 21 for f in model.functions) and model.functions
    assert f"opset 21, digest {bundle.digest[:12]}" in caplog.text


def test_bad_inputs(tmp_path, bundle_a):
    ckpt, _ = bundle_a
    with pytest.raises(InputError, match="input dtype"):
        export_onnx(ckpt, tmp_path / "x", input_dtype="int16")
    for opset in (13, 99, 5000, "19"):
        with pytest.raises(InputError, match="opset must be an int in 18..23"):
            export_onnx(ckpt, tmp_path / "x", opset=opset)
    assert main(["export", "onnx", "--model", ckpt, "--out", str(tmp_path / "x"), "--opset", "99"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="not found"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "x")
    assert main(["export", "onnx", "--model", ckpt, "--out", str(bundle_a[1].source)]) == 2  # exists, no --force
    print(json.dumps({"seed": SEED}))


def test_int8_quantisation_reports_agreement(bundle_a, tmp_path, capsys):
    """``keepbits export int8`` end to end (``keepbits.export.quantize``)."""
    rng = np.random.default_rng(SEED)
    data = tmp_path / "data.npz"
    # every class in each split (a split's class count is its largest label + 1; a random draw could miss class 3)
    np.savez(data, x_train=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), y_train=rng.permutation(np.arange(48) % 4),
             x_test=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_test=rng.permutation(np.arange(24) % 4))
    root_level = logging.getLogger().level
    assert main(["export", "int8", "--model", str(bundle_a[1].source), "--data", str(data), "--out", str(tmp_path / "int8"),
                 "--num-images", "32"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    headline = f"keepbits: wrote {tmp_path / 'int8'}: INT8 vs float32 on 24 comparison images: argmax agreement "
    assert captured.err.count(headline) == 1 and f"top-1 {report['accuracy_candidate']:.1%}" in captured.err
    bundle = load_bundle(report.pop("bundle"), expected_digest=report.pop("digest"))
    model = onnx.load(str(bundle.model_path))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert any(n.op_type == "MaskCompose" for n in model.graph.node) and len(model.functions) >= 1
    q = bundle.manifest.provenance["quantization"]
    assert q["calibration_images"] == 32 and q["source_bundle_digest"] == bundle_a[1].digest
    assert report["images"] == 24 and 0.0 <= report["mask_agreement"] <= 1.0 and "accuracy_candidate" in report
    assert q["evaluation_vs_fp32"] == report
    from keepbits.runtime.info import bundle_info, info_report

    quantized = [line for line in info_report(bundle_info(bundle.source)).splitlines() if line.startswith("quantized   ")]
    assert len(quantized) == 1 and "minmax calibration on 32 images" in quantized[0] and "argmax agreement" in quantized[0]
    assert quantized[0].startswith(f"quantized   {q['quantized_utc']}, ") and q["command"].startswith("keepbits ")
    assert q["onnxruntime_version"] == onnxruntime.__version__
    assert f"ONNX Runtime {onnxruntime.__version__}, " in quantized[0]
    assert any(line.startswith("quantized by keepbits ") for line in info_report(bundle_info(bundle.source)).splitlines())
    # the float32 bundle is never replaced by its own INT8 version
    assert main(["export", "int8", "--model", str(bundle_a[1].source), "--data", str(data), "--out", str(bundle_a[1].source),
                 "--num-images", "8", "--force"]) == 2
    assert "is the float32 bundle being quantized" in capsys.readouterr().err
    # an INT8 bundle is not quantized again (it was a traceback of ONNX Runtime, exit 1)
    assert main(["export", "int8", "--model", str(bundle.source), "--data", str(data), "--out", str(tmp_path / "twice"),
                 "--num-images", "8"]) == 2
    assert "already an INT8 bundle" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert logging.getLogger().level == root_level  # ONNX Runtime's advice silenced for the call only, not every warning after
    # activations default to uint8 (x86 ORT's fused QLinearConv path); int8 on request; anything else refused
    inits = {t.name: t.data_type for t in model.graph.initializer}
    activation_types = {inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}  # weights have no Q node
    assert activation_types == {onnx.TensorProto.UINT8} and "uint8 activations" in q["method"]
    assert main(["export", "int8", "--model", str(bundle_a[1].source), "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--num-images", "8", "--activations", "int4"]) == 2
    assert "activations must be one of" in capsys.readouterr().err


def test_int8_calibration_method_and_float_ends_are_applied_and_recorded(bundle_a, tmp_path, capsys):
    """``--calibration percentile --float-ends``: the manifest records both, and the classifier's first
    convolution (the generator's come first in the graph) and the last Gemm/MatMul keep float32 weights (no DequantizeLinear feeds them); an unknown method is refused."""
    from keepbits.export.quantize import quantize_bundle

    rng = np.random.default_rng(SEED)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_train=np.arange(24) % 4,
             x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    assert main(["-q", "export", "int8", "--model", str(bundle_a[1].source), "--data", str(data), "--out", str(tmp_path / "int8"),
                 "--num-images", "16", "--calibration", "percentile", "--float-ends"]) == 0
    bundle = load_bundle(json.loads(capsys.readouterr().out)["bundle"])
    q = bundle.manifest.provenance["quantization"]
    assert q["calibration"] == "percentile" and len(q["float32_nodes"]) == 2
    graph = onnx.load(str(bundle.model_path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    kept = [n for n in graph.node if n.name in q["float32_nodes"]]
    assert [n.op_type for n in kept][0] == "Conv" and kept[-1].op_type in ("Gemm", "MatMul")
    assert kept[0].input[1].startswith("classifier."), "the classifier's first convolution, not the generator's"
    assert all(n.input[1] not in dequantized for n in kept)
    assert any(n.op_type == "Conv" and n.input[1] in dequantized for n in graph.node), "the other convolutions are INT8"
    with pytest.raises(InputError, match="calibration must be one of"):
        quantize_bundle(bundle_a[1].source, tmp_path / "bad", data, calibration_images=8, calibration="histogram")


def test_int8_calibrates_on_unlabelled_footage_with_disjoint_comparison_frames(bundle_a, tmp_path, capsys):
    """An edge user's own camera footage (nested folders, a video, a corrupt file) calibrates INT8: one
    seeded draw split into calibration and comparison frames that never overlap; agreement, no accuracy."""
    import cv2

    from keepbits.export.quantize import calibration_split

    rng = np.random.default_rng(SEED)
    footage = tmp_path / "footage"
    (footage / "day1" / "cam0").mkdir(parents=True)
    for i in range(10):
        cv2.imwrite(str(footage / "day1" / "cam0" / f"{i}.png"), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    (footage / "day1" / "bad.jpg").write_bytes(b"\xff\xd8 cut")
    writer = cv2.VideoWriter(str(footage / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 36))
    for i in range(12):
        writer.write(np.full((36, 48, 3), 20 * i, np.uint8))
    writer.release()
    assert main(["-q", "export", "int8", "--model", str(bundle_a[1].source), "--data", str(footage), "--frame-step", "2",
                 "--out", str(tmp_path / "int8"), "--num-images", "8", "--num-test-images", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    q = load_bundle(report["bundle"]).manifest.provenance["quantization"]
    assert q["calibration_images"] == 8 and report["images"] == 6 and "accuracy_candidate" not in report
    assert "footage: 10 images, 6 frames read, one video frame in 2, 1 unreadable files skipped" in q["calibration_data"]
    calib, comparison, labels, _ = calibration_split(footage, bundle_a[1].manifest, 8, 6, 2)
    rows = {row.tobytes() for row in calib}
    assert len(calib) == 8 and len(comparison) == 6 and not rows & {row.tobytes() for row in comparison} and labels is None
    calib, comparison, _, _ = calibration_split(footage, bundle_a[1].manifest, 100, 100, 2)  # fewer than asked: half compare
    assert (len(calib), len(comparison)) == (8, 8)


def test_int8_class_folders_without_a_test_split_never_compare_on_calibration_images(bundle_a, tmp_path):
    """Class folders have no test split: calibration and comparison come from one class-balanced
    draw cut in two (they were two samples of the same images, so the agreement was partly
    measured on what calibrated the ranges)."""
    import cv2

    from keepbits.export.quantize import calibration_split

    rng = np.random.default_rng(SEED)
    names = bundle_a[1].manifest.class_names
    for k, name in enumerate(names):
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(tmp_path / "folders" / name / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    calib, comparison, labels, described = calibration_split(tmp_path / "folders", bundle_a[1].manifest, 8, 100)
    assert (len(calib), len(comparison)) == (8, 3 * len(names))  # fewer than asked: half of the 24 compare
    assert not {row.tobytes() for row in calib} & {row.tobytes() for row in comparison}
    assert labels is not None and len(labels) == len(comparison) and "no test split" in described


def test_compare_checkpoint_bundle_backends_and_int8(bundle_a, tmp_path, capsys):
    """``keepbits compare``: the torch checkpoint, the bundle on the function bodies and on the
    native kernels agree within the default tolerances (exit 0); the INT8 bundle misses the
    float tolerances (exit 1) and passes loose ones."""
    from keepbits.export.quantize import quantize_bundle

    ckpt, bundle = bundle_a
    rng = np.random.default_rng(SEED)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 4, 16),
             x_test=rng.integers(0, 256, (12, 40, 36, 3), dtype=np.uint8), y_test=rng.integers(0, 4, 12))
    models = [ckpt, f"{bundle.source}@functions", str(bundle.source)] + ([f"{bundle.source}@native"] if native.available() else [])
    assert main(["compare", *sum((["--model", m] for m in models), []), "--data", str(data), "--mask-atol", "1e-4"]) == 0, SEED
    report = json.loads(capsys.readouterr().out)
    assert report["reference"] == ckpt and len(report["comparisons"]) == len(models) - 1 and report["images"] == 12
    for row in report["comparisons"]:  # the checkpoint's twin is built like the bundle: x̃ compared too
        assert row["outputs"] == ["logits", "mask", "mixed"] and row["metrics"]["argmax_agree"] == 1.0, (row, SEED)
    # a float32 bundle classifying x̃: against the checkpoint (its twin classifies x̃ too; it was compared with a twin
    # classifying the original, logits off by 0.17, exit 1) and against the uint8 bundle (NHWC 0..255 against NCHW 0..1:
    # it was a shape error, exit 2; logits skipped, as the two classify different images)
    floats = export_onnx(ckpt, tmp_path / "f32", input_dtype="float32", classify_on="mixed", fused=False)
    assert main(["compare", "--model", ckpt, "--model", str(floats.source), "--data", str(data), "--mask-atol", "1e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["comparisons"][0]["outputs"] == ["logits", "mask", "mixed"]
    assert main(["compare", "--model", str(bundle.source), "--model", str(floats.source), "--data", str(data),
                 "--mask-atol", "1e-4", "--pixels-atol", "0.003"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)["comparisons"][0]
    assert row["outputs"] == ["mask", "mixed"] and "classifies the mixed image" in row["skipped"][0]
    assert "; not compared: logits:" in captured.err
    int8, _ = quantize_bundle(bundle.source, tmp_path / "int8", data, calibration_images=16)
    strict = ["compare", "--model", str(bundle.source), "--model", str(int8.source), "--data", str(data), "--logits-atol", "1e-6"]
    assert main(strict) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"] and report["comparisons"][0]["metrics"]["logits_max_abs"] > 1e-6
    loose = ["compare", "--model", str(bundle.source), "--model", str(int8.source), "--data", str(data), "--logits-atol", "none",
             "--mask-atol", "none", "--pixels-atol", "none", "--min-argmax-agree", "0", "--min-mask-agree", "0"]
    assert main(loose) == 0
    assert json.loads(capsys.readouterr().out)["passed"]


def test_an_existing_output_is_refused_before_any_work(tmp_path):
    """The bundle's place is checked first: the checkpoint is not even read (it does not exist here)."""
    from keepbits.errors import BundleError
    from keepbits.export.quantize import quantize_bundle

    (tmp_path / "taken.zip").write_bytes(b"the user's file")
    with pytest.raises(BundleError, match="taken.zip exists; replace it with --force"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "taken.zip")
    with pytest.raises(BundleError, match="taken.zip exists; replace it with --force"):
        quantize_bundle(tmp_path / "missing.zip", tmp_path / "taken.zip", tmp_path / "no_data")
    assert (tmp_path / "taken.zip").read_bytes() == b"the user's file"
    # --force replaces a bundle only: the user's file, a run folder, a folder that is not writable, a file as folder
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "nice.pt").write_bytes(b"weights")
    (tmp_path / "ro").write_bytes(b"")
    for out, message in ((tmp_path / "taken.zip", "taken.zip is not a keepbits bundle: --force replaces a keepbits bundle only"),
                         (tmp_path / "run", "run is not a keepbits bundle"),
                         (tmp_path / "ro" / "x.zip", "cannot write bundle .*ro is a file, not a folder")):
        for export in (lambda: export_onnx(tmp_path / "missing.pt", out, overwrite=True),
                       lambda: quantize_bundle(tmp_path / "missing.zip", out, tmp_path / "no_data", overwrite=True)):
            with pytest.raises(BundleError, match=message):
                export()
    assert (tmp_path / "taken.zip").read_bytes() == b"the user's file" and (tmp_path / "run" / "nice.pt").read_bytes() == b"weights"
