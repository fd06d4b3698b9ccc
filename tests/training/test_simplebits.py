"""SimpleBits: identity simplifier at init, unrolled optimiser step, classifier trained on the simplified batch, 8-bit rounding, loss gating, CLI."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from keepbits import registry
from keepbits.cli import main
from keepbits.data import sample_mnist_path
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
from keepbits.export import export_simplifier_onnx
from keepbits.training.simplebits import LOSS_GATE, load_simplebits, quantize_8bit, simplebits_loss, simplebits_step, unrolled_step


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


def test_unrolled_step_equals_a_step_of_the_classifier_optimizer():
    torch.manual_seed(0)
    net, x, y = TinyNet(), torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    nn.functional.cross_entropy(net(torch.randn(5, 1, 6, 6)), y).backward()
    opt.step()  # the unrolled step must use the optimiser's moment estimates from earlier steps
    fast, _ = unrolled_step(net, x, y, opt)
    manual = copy.deepcopy((net, opt))
    manual[1].zero_grad()
    nn.functional.cross_entropy(manual[0](x), y).backward()
    manual[1].step()
    for name, p in manual[0].named_parameters():
        assert torch.allclose(fast[name], p, atol=1e-6), name
    # and it stays differentiable: gradients reach the input through θ'
    x.requires_grad_(True)
    fast, _ = unrolled_step(net, x, y, opt)
    (fast["fc.bias"] ** 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class Dimmer(nn.Module):
    """A simplifier that is not the identity: x ↦ x·σ(w) (w = 0: half the contrast)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x * torch.sigmoid(self.w)


def test_classifier_update_uses_only_the_simplified_batch():
    torch.manual_seed(0)
    net, sim = TinyNet(), Dimmer()
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    bits = lambda v: 5.0 + 0.1 * v.flatten(1).mean(1)  # noqa: E731 - a bpd that rewards darker images
    opt_clf, opt_sim = torch.optim.AdamW(net.parameters(), lr=1e-2), torch.optim.AdamW(sim.parameters(), lr=1e-1)
    before = copy.deepcopy(net)
    simplebits_step(net, sim, bits, x, y, 1.0, opt_clf, opt_sim)
    assert sim.w.item() != 0.0  # the simplifier moved first

    def grads(images):
        loss = nn.functional.cross_entropy(before(images), y)
        return torch.autograd.grad(loss, list(before.parameters()))

    x_sim = quantize_8bit(sim(x)).detach()  # the simplified batch of the updated simplifier
    for got, on_sim, on_orig in zip([p.grad for p in net.parameters()], grads(x_sim), grads(x)):
        assert torch.allclose(got, on_sim, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(grads(x_sim), grads(x)))
    # and the step taken is the optimiser's step on that gradient
    replay = torch.optim.AdamW(before.parameters(), lr=1e-2)
    for p, g in zip(before.parameters(), grads(x_sim)):
        p.grad = g
    replay.step()
    for p, q in zip(net.parameters(), before.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_simplified_images_are_rounded_to_8_bits():
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    q = quantize_8bit(x * 0.3)
    assert torch.equal(q * 255, (q * 255).round())
    (g,) = torch.autograd.grad(q.sum(), x)
    assert torch.allclose(g, torch.full_like(g, 0.3))  # straight-through


def test_l_sim_is_gated_per_example_by_the_unrolled_loss():
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sim = registry.build("simplebits_unet", kind="simplifier", in_channels=1, base=4)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    bits = lambda v: torch.full((len(v),), 5.0) + 0 * v.sum()  # noqa: E731 - constant bpd
    loss_0, stats = simplebits_loss(net, sim, bits, x, y, 0.0, opt)
    loss_1, _ = simplebits_loss(net, sim, bits, x, y, 1.0, opt)
    # an untrained 3-class net has CE ≈ log 3 > 0.1 everywhere, so L_sim is off for every example
    assert stats["gate"] == 0.0 and loss_1.item() == pytest.approx(loss_0.item())
    assert LOSS_GATE == 0.1
    # the classifier loss reaches the simplifier through both the unrolled step and f(X_sim)
    sim.weight.data.fill_(0.5)
    loss, _ = simplebits_loss(net, sim, bits, x, y, 1.0, opt)
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


def test_resume_continues_the_run_exactly_and_refuses_changed_settings(tmp_path, tiny_density):
    """Each step seeds its own batch and noise; both optimizers' states travel in OUT's .last.pt:
    2 steps, then --resume to 4, equals 4 straight (both networks)."""
    from keepbits.errors import CheckpointError
    from keepbits.training.checkpoint import load_checkpoint, resume_path
    from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits

    def cfg(name, **kw):
        return SimpleBitsConfig(**{**dict(data=str(sample_mnist_path()), out=str(tmp_path / name / "sb.pt"), density=str(tiny_density),
                                          arch="lenet5", unet_base=4, steps=4, batch_size=4, max_test=8, checkpoint_every=1,
                                          device="cpu", threads=1), **kw})

    straight = train_simplebits(cfg("a"))
    train_simplebits(cfg("b", steps=2))
    assert load_checkpoint(resume_path(tmp_path / "b" / "sb.pt"), "simplebits").metrics["steps_run"] == 2
    resumed = train_simplebits(cfg("b", resume=True))
    assert resumed["metrics"]["gate_open"] == pytest.approx(straight["metrics"]["gate_open"])
    a, b = (load_checkpoint(tmp_path / n / "sb.pt", "simplebits").models for n in ("a", "b"))
    for role in ("simplifier", "classifier"):
        assert all(torch.allclose(a[role].state_dict[k], b[role].state_dict[k], atol=1e-6) for k in a[role].state_dict), role
    with pytest.raises(CheckpointError, match="cannot resume.*lambda_sim: 1.0 then, 2.0 now"):
        train_simplebits(cfg("b", steps=6, lambda_sim=2.0, resume=True))


@pytest.mark.slow
def test_two_cpu_ranks_take_the_step_of_the_whole_batch(tmp_path, tiny_density, free_port):
    """torchrun, 2 gloo ranks × 4 images = 1 process × 8 images: the unrolled step's gradient and both
    updates are the ranks' means (λ_sim 0, so the dequantisation noise, drawn per rank, plays no part)."""
    import os
    import subprocess
    import sys

    from keepbits.training.checkpoint import load_checkpoint
    from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits

    common = ["--data", str(sample_mnist_path()), "--density", str(tiny_density), "--arch", "lenet5", "--unet-base", "4", "--steps", "3",
              "--num-test-images", "8", "--lambda-sim", "0", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port), "-m", "keepbits", "-q",
           "train", "simplebits", *common, "--batch-size", "4", "--out", str(tmp_path / "two" / "sb.pt")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deprecated" not in done.stderr and done.stdout.count('"metrics"') == 1  # -q: quiet; one JSON, not one per rank
    train_simplebits(SimpleBitsConfig(data=str(sample_mnist_path()), out=str(tmp_path / "one" / "sb.pt"), density=str(tiny_density),
                                      arch="lenet5", unet_base=4, steps=3, batch_size=8, max_test=8, lambda_sim=0.0, device="cpu", threads=1))
    two, one = load_checkpoint(tmp_path / "two" / "sb.pt", "simplebits"), load_checkpoint(tmp_path / "one" / "sb.pt", "simplebits")
    digests = two.metrics["rank_parameter_digests"]
    assert two.settings["world_size"] == 2 and digests[0] == digests[1]
    for role in ("simplifier", "classifier"):
        a, b = one.models[role].state_dict, two.models[role].state_dict
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-5, (role, worst)


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


@pytest.mark.parametrize("change", [{"lambda_sim": float("nan")}, {"lambda_sim": -1.0}, {"inner_lr": float("nan")}, {"steps": -1}])
def test_settings_out_of_range_are_refused_before_anything_is_read(tmp_path, change):
    from keepbits.errors import InputError
    from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits

    with pytest.raises(InputError, match="need lambda_sim >= 0"):
        train_simplebits(SimpleBitsConfig(data=str(tmp_path / "no-data"), out=str(tmp_path / "s.pt"), **change))
    assert not list(tmp_path.iterdir())
