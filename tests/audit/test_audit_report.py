"""Shared audit machinery: report writer, model adapters, explainer base."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keepbits.audit import Explainer, FunctionAdapter, Report, load_model, overlay
from keepbits.errors import InputError


def test_report_is_self_contained(tmp_path):
    r = Report("t", meta={"model": "m.pt"})
    s = r.section("Figures", "intro <b>escaped</b>")
    s.image_grid([np.zeros((4, 4, 1), np.uint8), np.random.rand(4, 4, 3)], titles=["a", "b"], cols=2)
    s.heatmap(np.arange(16.0).reshape(4, 4), title="h")
    s.line_plot({"s": ([1, 2, 3], [0.1, float("nan"), 0.3])}, errors={"s": [0.01, 0.0, 0.02]}, xlabel="x")
    s.table([{"a": 1, "b": 0.123456}], caption="c")
    s.text("a note", note=True)
    r.data["numbers"] = np.arange(3)
    html_path, json_path = r.write(tmp_path / "out")
    text = html_path.read_text()
    assert "&lt;b&gt;escaped" in text and text.count("data:image/png;base64,") >= 4 and "<svg" in text
    assert "src=\"http" not in text and "<script" not in text
    rec = json.loads(json_path.read_text())
    assert rec["data"]["numbers"] == [0, 1, 2]
    assert rec["sections"][0]["figures"][1]["values"][3][3] == 15.0
    assert rec["sections"][0]["tables"][0]["rows"][0]["a"] == 1


def test_overlay_tints_mask():
    img = np.full((2, 2, 1), 100, np.uint8)
    out = overlay(img, np.array([[True, False], [False, False]]))
    assert out.shape == (2, 2, 3) and out[0, 0, 0] > out[0, 0, 1] and out[1, 1, 0] == 35


def test_adapter_normalise_roundtrip_and_errors():
    m = FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :3], input_shape=(3, 2, 2), mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    img = np.random.default_rng(0).integers(0, 256, (5, 2, 2, 3), dtype=np.uint8)
    assert np.array_equal(m.denormalize(m.normalize(img)), img)
    assert np.allclose(m.probabilities(m.prepare(img)).sum(1), 1.0)
    with pytest.raises(InputError):
        m.prepare(np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(InputError):
        load_model("/nonexistent/model.onnx")
    # a plain numpy function, as docs/audit.md shows it (it was a TypeError from Path(function))
    fn = lambda x: x.reshape(len(x), -1)[:, :3]  # noqa: E731
    assert isinstance(load_model(fn, input_shape=(3, 2, 2)), FunctionAdapter)
    with pytest.raises(InputError, match="function model needs input_shape"):
        load_model(fn)
    with pytest.raises(InputError, match="cannot audit a int"):
        load_model(3)
    named = FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :2], input_shape=(1, 1, 2), class_names=["cat", "dog"])
    assert [named.class_name(i) for i in (1, 2, -1)] == ["dog", "2", "-1"] and m.class_name(0) == "0"


def test_explainer_targets():
    class Echo(Explainer):
        def _explain(self, x, targets, batch_size):
            return targets.tolist()

    m = FunctionAdapter(lambda x: np.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], 1), input_shape=(1, 1, 1))
    x = np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1)
    assert Echo(m).explain(x) == [0, 1]
    assert Echo(m).explain(x, target=1) == [1, 1]
    with pytest.raises(InputError):
        Echo(m).explain(x, target=[0, 1, 1])


def test_torch_and_onnx_adapters_agree(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 6, 6),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    x = np.random.default_rng(0).normal(size=(7, 1, 6, 6)).astype(np.float32)
    a = load_model(net, input_shape=(1, 6, 6)).probabilities(x)
    b = load_model(path).probabilities(x)
    assert np.allclose(a, b, atol=1e-5)


def test_import_audit_is_torch_free():
    code = "import sys, keepbits.audit; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_written_files_get_the_umask_permissions_not_0600(tmp_path):
    from keepbits import registry
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    entry = ModelEntry.of("lenet5", {}, registry.build("lenet5"))

    old = os.umask(0o022)
    try:
        paths = Report("perm").write(tmp_path)
        paths.append(save_checkpoint(tmp_path / "c.pt", Checkpoint(kind="classifier", models={"classifier": entry}, input_shape=[1, 28, 28],
                                                                   normalization=Normalization([0.1], [0.3]), class_names=list("0123456789"))))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == ["0o644"] * 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_json_says_what_made_it(tmp_path):
    """A report cited as a result names keepbits' version and the machine (reports had a command only)."""
    from keepbits import __version__

    Report("t").write(tmp_path)
    made = json.loads((tmp_path / "report.json").read_text())["generated_by"]
    assert made["keepbits"] == __version__ and made["python"] and made["cpus"] >= 1
