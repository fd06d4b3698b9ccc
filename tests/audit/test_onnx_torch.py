"""ONNX graphs as torch twins for BackSelect: every shape family of the incremental tests,
exported to ONNX, converts and reproduces the torch model; BackSelect on the ONNX model then
screens incrementally and equals the float64 loop; graphs that do not convert fall back to
ONNX Runtime with the same result; hostile constants are refused."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from keepbits.audit import backselect, backselect_batch, load_model  # noqa: E402
from keepbits.audit import sis as sis_module  # noqa: E402
from keepbits.audit._onnx_torch import NotConvertible, onnx_module  # noqa: E402
from keepbits.audit._sis_incremental import GraphScreen  # noqa: E402
from keepbits.errors import InputError  # noqa: E402

from test_sis_incremental import FAMILIES, SHAPE, images, make  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def export(net: nn.Module, path, shape=SHAPE, dtype=torch.float32, dynamic: bool = True) -> str:
    torch.onnx.export(net, (torch.zeros(1, *shape, dtype=dtype),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}} if dynamic else None, dynamo=False)
    return str(path)


class SamePad(nn.Module):
    """TF "same" padding computed from the input's size at run time, as EfficientNet ports do:
    exported as Shape/Gather/integer Div/ConstantOfShape/backwards-Slice arithmetic feeding a Pad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = max((-(-h // 2) - 1) * 2 + 3 - h, 0), max((-(-w // 2) - 1) * 2 + 3 - w, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_shape_arithmetic_is_folded(tmp_path):
    """The twin equals ONNX Runtime on the graph (the legacy exporter bakes the traced pads in,
    so the graph, not the torch module, is the reference), and BackSelect through the twin
    equals BackSelect screened by ONNX Runtime."""
    torch.manual_seed(0)
    path = export(SamePad().eval(), tmp_path / "same.onnx")
    twin = onnx_module(path, "x", "logits", SHAPE, nhwc=False)
    model = load_model(path, input_shape=SHAPE, threads=1)
    x = images(1, 3)
    with torch.no_grad():
        assert np.allclose(twin(torch.as_tensor(x)).numpy(), model.logits(x), rtol=1e-5, atol=1e-5)
    auto, plain = backselect(model, images(2)[0], method="auto"), backselect(model, images(2)[0], method="plain")
    assert np.array_equal(auto.order, plain.order)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_twin_reproduces_every_family_and_keeps_local_ops(family, tmp_path):
    net = make(family)
    twin = onnx_module(export(net, tmp_path / "m.onnx"), "x", "logits", SHAPE, nhwc=False)
    x = torch.as_tensor(images(2, 4))
    with torch.no_grad():
        assert torch.allclose(twin(x), net(x), rtol=1e-5, atol=1e-5)
    # the twin's convolutions and pools are local ops of the incremental screen, as the torch model's are
    assert GraphScreen(twin, SHAPE).local_nodes == GraphScreen(net, SHAPE).local_nodes >= 1


def test_fixed_batch_graph_runs_any_batch(tmp_path):
    net = make("concat")  # reshape(x.shape[0], -1): a constant [1, 80] target once exported at batch 1
    twin = onnx_module(export(net, tmp_path / "m.onnx", dynamic=False), "x", "logits", SHAPE, nhwc=False)
    x = torch.as_tensor(images(3, 5))
    with torch.no_grad():
        assert torch.allclose(twin(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["residual", "unsupported-node"])
def test_onnx_backselect_is_incremental_and_equals_float64_loop(family, tmp_path, float64_backselect):
    net = make(family)
    model = load_model(export(net, tmp_path / "m.onnx"), input_shape=SHAPE, threads=1)
    xs = images(7, 2)
    got = backselect_batch(model, xs, method="auto")
    plain = backselect_batch(model, xs, [r.target for r in got], method="plain")  # ONNX Runtime screen, float64 twin
    for g, p, x in zip(got, plain, xs):
        order, scores = float64_backselect(make(family), x, g.target)
        assert g.method in ("incremental", "plain") and p.method == "plain"
        assert np.array_equal(g.order, order) and np.array_equal(p.order, order)
        assert np.allclose(g.scores, scores, rtol=1e-6)  # the exporter folds batch norm: float32-rounded weights
    assert backselect(model, xs[0], method="incremental").method == "incremental"


def test_bundle_graph_twin_takes_pixels(tmp_path, float64_backselect, pixel_bundle):
    """A bundle graph (uint8 NHWC in, normalisation inside): its twin masks uint8 pixel values
    exactly as ONNX Runtime is fed, and the orders equal a float64 loop over those values."""
    bundle, graph = pixel_bundle(make("concat"), SHAPE, [0.4, 0.5], [0.2, 0.25], tmp_path)
    model = load_model(bundle, threads=1)
    screen, _, used = sis_module._evaluators(model, "auto", None, None)
    assert used in ("incremental", "plain") and hasattr(screen, "inner")
    image = np.random.default_rng(3).integers(0, 256, (SHAPE[1], SHAPE[2], SHAPE[0]), dtype=np.uint8)
    res = backselect(model, image, method="incremental")
    mask_pixel = model.denormalize(np.zeros((1, SHAPE[0], 1, 1)))[0, 0, 0].astype(np.float64)

    graph64 = graph.double()

    class Shifted(nn.Module):  # the graph on float pixels, masked value moved to 0 for the reference loop
        def forward(self, x):
            return graph64(x.permute(0, 2, 3, 1) + torch.as_tensor(mask_pixel))

    order, _ = float64_backselect(Shifted(), image.transpose(2, 0, 1).astype(np.float64) - mask_pixel[:, None, None], res.target)
    assert res.method == "incremental" and np.array_equal(res.order, order)


def test_gradient_backselect_of_a_bundle_takes_gradients_through_its_twin(tmp_path, pixel_bundle):
    """Gradient BackSelect of an ONNX bundle: the gradients through the graph's torch twin (uint8
    pixels rounded straight through) equal the torch classifier's own, and every f it records is
    ONNX Runtime's on the masked image."""
    from keepbits.audit import TorchAdapter, gradient_backselect
    from keepbits.audit._sis_onnx import gradient_module

    net = make("global-pool").eval()
    mean, std = [0.4, 0.6], [0.25, 0.5]  # mean·255 whole: the masked value is a pixel value exactly
    bundle, _ = pixel_bundle(net, SHAPE, mean, std, tmp_path)
    model, reference = load_model(bundle, threads=1), TorchAdapter(net, SHAPE, mean=mean, std=std)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (2, SHAPE[1], SHAPE[2], SHAPE[0]), dtype=np.uint8)
    x = torch.from_numpy(reference.normalize(pixels))
    mask = torch.from_numpy((rng.random((2, 1, SHAPE[1], SHAPE[2])) < 0.3).astype(np.float32))

    def mask_gradient(module: nn.Module) -> np.ndarray:
        m = mask.clone().requires_grad_(True)
        return torch.autograd.grad(torch.softmax(module(x * (1 - m)), 1)[:, 1].sum(), m)[0].numpy()

    want = mask_gradient(net)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(mask_gradient(gradient_module(model)), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    for r, image in zip(gradient_backselect(model, pixels, k=8, batch_size=2), reference.normalize(pixels)):
        assert sorted(r.order.tolist()) == list(range(SHAPE[1] * SHAPE[2]))
        boundaries = np.flatnonzero(np.isfinite(r.scores))
        assert boundaries.tolist() == list(range(0, SHAPE[1] * SHAPE[2] + 1, 8))
        for j in boundaries:
            masked = image.copy()
            masked[:, r.order[:j] // SHAPE[2], r.order[:j] % SHAPE[2]] = 0.0
            np.testing.assert_allclose(r.scores[j], model.probabilities(masked[None])[0, r.target], rtol=1e-5, atol=1e-7)


def test_sis_audit_of_a_zip_bundle_keeps_its_files_and_names_it(tmp_path, pixel_bundle, capsys):
    """A .zip bundle is unpacked to a temp folder that lives as long as the loaded bundle: the audit
    reads the model file again after loading (fingerprint, twin), and its report and errors name the
    .zip, not the unpacked copy. A graph with no twin gets one line saying why and what to use."""
    import json

    import cv2

    from keepbits.cli import main

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    bundle, _ = pixel_bundle(net, (3, 8, 8), [0.5] * 3, [0.25] * 3, tmp_path, archive=True)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        cv2.imwrite(str(frames / f"{i}.png"), np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    argv = ["audit", "sis", "--model", str(bundle), "--data", str(frames), "--num-images", "2", "--threshold", "0.3",
            "--thresholds", "0.3", "-q"]
    for method in ("gradient", "plain"):
        assert main([*argv, "--method", method, "--k", "16", "--out", str(tmp_path / method)]) == 0, capsys.readouterr().err
        report = json.loads((tmp_path / method / "report.json").read_text())
        assert report["meta"]["model"] == str(bundle) and report["data"]["summary"]["backselect_runs"] == 2
        assert ("gradients" in report["meta"]) == (method == "gradient")
    erf = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(192, 3)).eval()
    erf_bundle = export(Erf3(erf), tmp_path / "erf.onnx", shape=(3, 8, 8))
    assert main([*argv[:3], erf_bundle, *argv[4:], "--method", "gradient", "--out", str(tmp_path / "erf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{erf_bundle}: gradient BackSelect" in err and "no torch twin" in err and "plain" in err


class Erf3(nn.Module):
    """A classifier with an ONNX Erf node, which has no torch twin here."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.erf(x))


def test_unconvertible_graph_falls_back_to_onnxruntime(tmp_path, float64_backselect):
    class Erf(nn.Module):  # ONNX Erf: no torch twin here
        def forward(self, x):
            return torch.erf(x)

    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), Erf(), nn.Flatten(), nn.Linear(3 * 9 * 8, 3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    path = export(net, tmp_path / "lrn.onnx")
    with pytest.raises(NotConvertible, match="Erf"):
        onnx_module(path, "x", "logits", SHAPE, nhwc=False)
    model = load_model(path, input_shape=SHAPE, threads=1)
    x = images(4)[0]
    res = backselect(model, x, method="auto")
    assert res.method == "plain" and np.array_equal(res.order, float64_backselect(net, x, res.target)[0])
    with pytest.raises(InputError, match="Erf"):
        backselect(model, x, method="incremental")


def test_hostile_constant_is_refused(tmp_path):
    """A ConstantOfShape asking for 2^40 elements is refused at conversion, not allocated."""
    shape = helper.make_tensor("big", TensorProto.INT64, [2], [1 << 20, 1 << 20])
    nodes = [helper.make_node("ConstantOfShape", ["big"], ["c"]), helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0),
             helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Add", ["f", "s"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], [shape])
    path = tmp_path / "hostile.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(NotConvertible, match="ConstantOfShape"):
        onnx_module(path, "x", "logits", (1, 2, 2), nhwc=False)


def test_attribute_constants_and_reshape_of_a_hand_built_graph(tmp_path):
    nodes = [helper.make_node("Constant", [], ["s"], value_float=2.0), helper.make_node("Constant", [], ["shape"], value_ints=[-1, 4]),
             helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])])
    path = tmp_path / "constants.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    twin = onnx_module(path, "x", "logits", (1, 2, 2), nhwc=False)
    x = torch.randn(3, 1, 2, 2)
    assert torch.equal(twin(x), (x * 2).reshape(3, 4))


def _merged_graph(tmp_path, name: str, reverse: bool):
    """x (N×1×2×2) → Reshape to 1-D (the whole batch in one axis) → Gather of computed indices
    (in order, or reversed: elements of other images) → Reshape to N×4, as the dynamo exporter
    spells a flatten of a channels-last tensor."""
    nodes = [helper.make_node("Constant", [], ["flat_shape"], value_ints=[-1]), helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Shape", ["flat"], ["count"]), helper.make_node("Squeeze", ["count"], ["total"]),
             helper.make_node("Constant", [], ["zero"], value_int=0), helper.make_node("Constant", [], ["one"], value_int=1),
             helper.make_node("Range", ["zero", "total", "one"], ["index"]),
             *([helper.make_node("Constant", [], ["last"], value_int=-1), helper.make_node("Sub", ["last", "index"], ["picked"])]
               if reverse else [helper.make_node("Identity", ["index"], ["picked"])]),
             helper.make_node("Gather", ["flat", "picked"], ["gathered"], axis=0),
             helper.make_node("Constant", [], ["shape"], value_ints=[-1, 4]), helper.make_node("Reshape", ["gathered", "shape"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])])
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_flatten_spelled_through_the_whole_batch_converts_and_a_mixing_one_does_not(tmp_path):
    """The dynamo exporter spells a flatten of a channels-last tensor (bundles exported before the
    contiguous permute, the shipped demo bundle among them) as a Reshape of the whole batch to 1-D,
    a Gather and a Reshape back: kept as one per-image reshape when the elements stay in their
    order; a Gather that moves elements between images is not convertible."""
    twin = onnx_module(_merged_graph(tmp_path, "kept", reverse=False), "x", "logits", (1, 2, 2), nhwc=False)
    x = torch.randn(3, 1, 2, 2)
    assert torch.equal(twin(x), x.reshape(3, 4))
    with pytest.raises(NotConvertible, match="merges the batch axis"):
        onnx_module(_merged_graph(tmp_path, "mixed", reverse=True), "x", "logits", (1, 2, 2), nhwc=False)


def test_the_shipped_demo_bundle_has_a_torch_twin():
    """The flagship bundle (EfficientNet-Lite0 + NICE, exported before the contiguous permute: its
    flatten goes through the whole batch) converts: the generator's custom ops pruned, the flatten
    kept as a reshape, and the twin's logits equal ONNX Runtime's (checked inside ``torch_twin``)."""
    from keepbits.audit._sis_onnx import torch_twin
    from keepbits.cli.demo import DEMO_BUNDLE

    twin, why = torch_twin(load_model(DEMO_BUNDLE, threads=1))
    assert twin is not None, why


def test_graph_that_fails_to_run_has_no_twin(tmp_path):
    """A Reshape to an impossible shape raises NotConvertible (callers fall back), not a torch error."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 5])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], [shape])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(NotConvertible, match="Reshape"):
        onnx_module(path, "x", "logits", (1, 2, 2), nhwc=False)
