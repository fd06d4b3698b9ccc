"""Post-hoc simplification (SimpleBits Alg. 1 and 2) and ``keepbits audit simplify``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from keepbits import registry
from keepbits.cli import main
from keepbits.data import sample_mnist_path
from keepbits.errors import InputError
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
from keepbits.training.posthoc import PosthocConfig, forgetting_gradients, interpolate, posthoc_loss, simplify_posthoc


def _glow(c=1, size=8):
    torch.manual_seed(0)
    return registry.build("glow", kind="density", in_channels=c, image_size=(size, size), levels=2, depth=1, hidden=4).requires_grad_(False)


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def test_forgetting_gradients_and_loss_vanish_for_the_original():
    net, flow, x = _net(), _glow(), torch.rand(1, 1, 8, 8)
    scales = {n: torch.full(p.shape, 0.9, requires_grad=True) for n, p in net.named_parameters()}
    grads = forgetting_gradients(net, scales, net(x).detach(), x, create_graph=False)
    assert [g.shape for g in grads] == [p.shape for p in net.parameters()]
    loss, stats = posthoc_loss(net, flow, x, x.clone().requires_grad_(True), scales, lambda_sim=0.0)
    assert stats["l_grad"] == pytest.approx(0.0, abs=1e-5) and stats["l_pred"] == pytest.approx(0.0, abs=1e-6)


def test_classifier_terms_use_the_interpolated_image_and_bpd_the_simplified_one():
    net, flow, x = _net(), _glow(), torch.rand(1, 1, 8, 8)
    scales = {n: torch.full(p.shape, 0.9, requires_grad=True) for n, p in net.named_parameters()}
    x_sim = torch.rand(1, 1, 8, 8, requires_grad=True)
    # x_α = x_orig: L_grad and L_pred vanish although x_sim is a different image; its bpd still counts
    loss, stats = posthoc_loss(net, flow, x, x_sim, scales, lambda_sim=1.0, x_interp=x.clone())
    assert stats["l_grad"] == pytest.approx(0.0, abs=1e-5) and stats["l_pred"] == pytest.approx(0.0, abs=1e-6)
    assert stats["bpd"] == pytest.approx(float(flow.bpd(x_sim.detach(), dequantize=False)), rel=1e-5)
    _, moved = posthoc_loss(net, flow, x, x_sim, scales, lambda_sim=1.0)
    assert moved["l_pred"] > 1e-4  # without x_interp the classifier terms see x_sim


def test_latent_interpolation_path():
    flow = _glow()
    x = 0.25 + 0.5 * torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        zs, _ = flow.encode(flow.to_flow_range(x, dequantize=False))
    deltas = [0.05 * torch.randn_like(z) for z in zs]  # G(z + α·δ) stays inside [0, 1] (no clamping)
    assert torch.allclose(interpolate(flow, zs, deltas, 0.0, x.shape), x, atol=1e-4)  # α = 0: the original
    half = interpolate(flow, zs, deltas, 0.5, x.shape)
    with torch.no_grad():
        z_half, _ = flow.encode(flow.to_flow_range(half, dequantize=False))
    for z, d, zh in zip(zs, deltas, z_half):
        assert torch.allclose(zh, z + 0.5 * d, atol=1e-3)  # α = ½: halfway in the latent, not in pixels


def test_simplify_draws_alpha_and_returns_the_simplified_image():
    net, flow = _net(), _glow()
    out = simplify_posthoc(net, flow, torch.rand(2, 1, 8, 8), PosthocConfig(steps=6, lr=0.2, path_points=5))
    for r in out:
        alphas = [h["alpha"] for h in r["history"]]
        assert len(alphas) == 6 and all(0.0 < a <= 1.0 for a in alphas) and len(set(alphas)) == 6
        assert r["path"][0]["t"] == 0.0 and r["path"][-1]["t"] == 1.0
        assert r["simplified"].shape == (1, 1, 8, 8) and torch.equal(r["simplified"] * 255, (r["simplified"] * 255).round())
        assert r["path"][-1]["bpd"] == pytest.approx(r["bpd_sim"], abs=0.05)  # t = 1 is the result (before 8-bit rounding)
        assert r["kept"] == (r["label_sim"] == r["label"] and r["kl"] <= 0.1)
    torch.manual_seed(1)
    images = torch.rand(1, 1, 8, 8)
    again = simplify_posthoc(net, flow, images, PosthocConfig(steps=3, lr=0.2, path_points=3), device="cpu")  # --device cpu
    assert torch.equal(again[0]["simplified"], simplify_posthoc(net, flow, images, PosthocConfig(steps=3, lr=0.2, path_points=3))[0]["simplified"])


def test_progress_counts_the_steps_and_changes_nothing(capsys):
    net, flow, images = _net(), _glow(), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cfg = PosthocConfig(steps=3, lr=0.2, path_points=3)
    quiet, shown = (simplify_posthoc(net, flow, images, cfg, progress=p) for p in (False, True))
    err = capsys.readouterr().err
    assert "simplify" in err and "0/6" in err and "image 2/2" in err  # the bar redraws at each image (its count only every 0.1 s)
    assert all(torch.equal(a["simplified"], b["simplified"]) for a, b in zip(quiet, shown))


def test_a_density_model_of_another_size_is_refused_before_any_step():
    """Alg. 2 works in the Glow's latent: under an 8×8 Glow a 16×16 image would be resized to 8×8
    and back before it is simplified, so the run is refused, naming both sizes; a grey classifier
    under a colour Glow of its size is fine."""
    with pytest.raises(InputError, match=r"scores 8×8 images and these are 16×16.*--image-size 16"):
        simplify_posthoc(_net(), _glow(), torch.rand(1, 1, 16, 16), PosthocConfig(steps=1))
    assert len(simplify_posthoc(_net(), _glow(c=3), torch.rand(1, 1, 8, 8), PosthocConfig(steps=1, path_points=2))) == 1


def test_audit_simplify_cli_writes_report(tmp_path):
    kwargs = {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    torch.manual_seed(0)
    clf = registry.build("lenet5", **kwargs)
    save_checkpoint(tmp_path / "clf.pt", Checkpoint(kind="classifier", models={"classifier": ModelEntry.of("lenet5", kwargs, clf)},
                                                    input_shape=[1, 28, 28], normalization=Normalization([0.13], [0.31]),
                                                    class_names=[str(i) for i in range(10)]))
    dkw = {"in_channels": 1, "image_size": [28, 28], "levels": 2, "depth": 1, "hidden": 4}
    save_checkpoint(tmp_path / "d.pt", Checkpoint(kind="density", models={"density": ModelEntry.of("glow", dkw, registry.build("glow", **dkw))},
                                                  input_shape=[1, 28, 28]))
    out = tmp_path / "report"
    rc = main(["-q", "audit", "simplify", "--model", str(tmp_path / "clf.pt"), "--data", str(sample_mnist_path()), "--out", str(out),
               "--density", str(tmp_path / "d.pt"), "--num-images", "1", "--steps", "2"])
    assert rc == 0
    html = (out / "report.html").read_text()
    assert "Before / after" in html and "data:image/png;base64" in html
    data = json.loads((out / "report.json").read_text())
    assert len(data["data"]["per_image"]) == 1
    # which image, its label in the data, and the predictions named as predictions (the "label" column was the prediction)
    row = data["data"]["per_image"][0]
    from keepbits.data.images import load_images

    sample = load_images(sample_mnist_path(), split="test", num_images=1, seed=0)
    assert row["image"] == sample.names[0] and row["data_label"] == str(int(sample.labels[0]))
    assert "predicted on simplified" in html and "data label" in html
    assert main(["-q", "audit", "simplify", "--model", str(tmp_path / "nope.pt"), "--data", str(sample_mnist_path()), "--out", str(out)]) == 2
    # a registry classifier with its weights, on unlabelled footage (nested folder, any size: fitted to 28×28)
    torch.save(clf.state_dict(), tmp_path / "w.pth")
    (tmp_path / "footage" / "cam0" / "day1").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)).save(tmp_path / "footage" / "cam0" / "day1" / "a.png")
    assert main(["-q", "audit", "simplify", "--model", "lenet5", "--classifier-weights", str(tmp_path / "w.pth"), "--classifier-kwargs",
                 json.dumps(kwargs), "--image-size", "28", "28", "--mean", "0.13", "--std", "0.31", "--resize-policy", "resize",
                 "--data", str(tmp_path / "footage"),
                 "--out", str(tmp_path / "r2"), "--density", str(tmp_path / "d.pt"), "--num-images", "1", "--steps", "2"]) == 0
    assert "footage: 1 images read" in json.loads((tmp_path / "r2" / "report.json").read_text())["meta"]["images"]


def test_onnx_models_are_refused():
    from keepbits.audit import FunctionAdapter
    from keepbits.audit.simplify import SimplifyExplainer

    with pytest.raises(InputError, match="torch model"):
        SimplifyExplainer(FunctionAdapter(lambda x: x.reshape(len(x), -1), input_shape=(1, 1, 2)))


@pytest.mark.parametrize("settings", [{"lambda_sim": -1.0}, {"lambda_sim": float("nan")}, {"lr": 0.0}, {"kl_tolerance": float("inf")},
                                      {"scale_low": 0.9, "scale_high": 0.8}, {"steps": -1}, {"path_points": 0}])
def test_settings_out_of_range_are_refused(settings):
    with pytest.raises(InputError, match="must be|need"):
        PosthocConfig(**settings)
