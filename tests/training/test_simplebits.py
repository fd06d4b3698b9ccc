"""SimpleBits: identity simplifier at init, unrolled step, loss gating, CLI."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from keepbits import registry
from keepbits.cli import main
from keepbits.data import sample_mnist_path
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
from keepbits.export import export_simplifier_onnx
from keepbits.training.simplebits import LOSS_GATE, load_simplebits, simplebits_loss, unrolled_step


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def tiny_density(tmp_path):
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "image_size": [28, 28], "levels": 2, "depth": 1, "hidden": 4}
    flow = registry.build("glow", kind="density", **kwargs)
    path = tmp_path / "density.pt"
    save_checkpoint(path, Checkpoint(kind="density", models={"density": ModelEntry.of("glow", kwargs, flow)}, input_shape=[1, 28, 28]))
    return path


def test_simplifier_is_identity_at_init():
    torch.manual_seed(0)
    for c, size in ((1, 28), (3, 32)):
        sim = registry.build("simplebits_unet", kind="simplifier", in_channels=c, base=4)
        x = torch.rand(2, c, size, size).clamp(0.5 / 256, 1 - 0.5 / 256)
        assert torch.allclose(sim(x), x, atol=1e-5)
        pixels = torch.randint(0, 256, (2, c, size, size))
        pixels[0, 0, 0, :2] = torch.tensor([0, 255])  # the clamped extremes round back exactly
        assert torch.equal((sim(pixels / 255.0) * 255).round().long(), pixels)


def test_unrolled_step_equals_manual_sgd_step():
    torch.manual_seed(0)
    net, x, y = TinyNet(), torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    fast = unrolled_step(net, dict(net.named_parameters()), x, y, lr=0.3)
    manual = TinyNet()
    manual.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(manual.parameters(), lr=0.3)
    nn.functional.cross_entropy(manual(x), y).backward()
    opt.step()
    for name, p in manual.named_parameters():
        assert torch.allclose(fast[name], p, atol=1e-6)
    # and it stays differentiable: gradients reach the input through θ'
    x.requires_grad_(True)
    fast = unrolled_step(net, dict(net.named_parameters()), x, y, lr=0.3)
    (fast["fc.bias"] ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_l_sim_is_gated_per_example_by_the_unrolled_loss():
    torch.manual_seed(0)
    net = TinyNet()
    sim = registry.build("simplebits_unet", kind="simplifier", in_channels=1, base=4)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    bits = lambda v: torch.full((len(v),), 5.0) + 0 * v.sum()  # noqa: E731 - constant bpd
    loss_0, stats = simplebits_loss(net, sim, bits, x, y, lambda_sim=0.0, inner_lr=0.1)
    loss_1, _ = simplebits_loss(net, sim, bits, x, y, lambda_sim=1.0, inner_lr=0.1)
    # an untrained 3-class net has CE ≈ log 3 > 0.1 everywhere, so L_sim is off for every example
    assert stats["gate"] == 0.0 and loss_1.item() == pytest.approx(loss_0.item())
    assert LOSS_GATE == 0.1
    # the classifier loss reaches the simplifier through both the unrolled step and f(X_sim)
    sim.weight.data.fill_(0.5)
    loss, _ = simplebits_loss(net, sim, bits, x, y, lambda_sim=1.0, inner_lr=0.1)
    loss.backward()
    assert sim.weight.grad is not None and sim.weight.grad.abs() > 0


def test_train_simplebits_cli_roundtrip(tmp_path, tiny_density):
    out = tmp_path / "sb.pt"
    rc = main(["-q", "train", "simplebits", "--data", str(sample_mnist_path()), "--out", str(out), "--density", str(tiny_density),
               "--arch", "lenet5", "--unet-base", "4", "--steps", "2", "--batch-size", "4", "--num-test-images", "8"])
    assert rc == 0
    simplifier, classifier, ckpt = load_simplebits(out)
    assert set(ckpt.metrics) >= {"acc_orig", "acc_sim", "bpd_orig", "bpd_sim"}
    x = torch.rand(2, 1, 28, 28)
    assert simplifier(x).shape == x.shape and classifier(x).shape == (2, 10)
    assert main(["-q", "train", "simplebits", "--data", str(sample_mnist_path()), "--out", str(out), "--density", str(tmp_path / "nope.pt")]) == 2


@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path):
    torch.manual_seed(0)
    sim_kw, clf_kw = {"in_channels": 1, "base": 4}, {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    sim = registry.build("simplebits_unet", **sim_kw)
    sim.weight.data.fill_(0.3)  # off the identity, so the U-Net is exercised
    save_checkpoint(tmp_path / "sb.pt", Checkpoint(
        kind="simplebits", input_shape=[1, 28, 28], normalization=Normalization([0.13], [0.31]), class_names=list("0123456789"),
        models={"simplifier": ModelEntry.of("simplebits_unet", sim_kw, sim), "classifier": ModelEntry.of("lenet5", clf_kw, registry.build("lenet5", **clf_kw))}))
    exported = export_simplifier_onnx(tmp_path / "sb.pt", tmp_path / "simplifier.onnx")
    assert max(exported["max_abs_diff"].values()) < 1e-4
