"""Glow density model: exact likelihood, invertibility, bpd convention, training CLI."""
from __future__ import annotations

import math

import pytest
import torch

from keepbits import registry
from keepbits.cli import main
from keepbits.data import sample_mnist_path
from keepbits.errors import InputError
from keepbits.training.density import load_density


def _flow(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=3, image_size=(8, 8), levels=2, depth=2, hidden=8)
    args.update(kw)
    return registry.build("glow", kind="density", **args)


def _perturb(flow: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its identity init so the test exercises real layers."""
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))


def test_identity_init_gives_analytic_bpd_on_uniform_noise():
    # At init the flow is a rotation-only map and the priors are N(0, 1): log p(y) = Σ log N(y_i; 0, 1).
    flow = _flow()
    x = torch.rand(16, 3, 8, 8)
    y = (255.0 * x + 0.5) / 256.0 - 0.5
    expected = (0.5 * math.log(2 * math.pi) + 0.5 * (y**2).flatten(1).mean(1) + math.log(256.0)) / math.log(2.0)
    assert torch.allclose(flow.bpd(x, dequantize=False), expected, atol=1e-4)
    # and its mean over U(0,1) pixels is (½ log 2π + 1/24 + log 256)/log 2 ≈ 9.386 bits
    big = flow.bpd(torch.rand(64, 3, 8, 8)).mean().item()
    assert float(big) == pytest.approx((0.5 * math.log(2 * math.pi) + 1 / 24 + math.log(256.0)) / math.log(2.0), abs=0.01)


def test_invertible_after_init_and_perturbation():
    flow = _flow()
    flow.initialize(flow.to_flow_range(torch.rand(32, 3, 8, 8)))
    _perturb(flow)
    y = flow.to_flow_range(torch.rand(4, 3, 8, 8))
    zs, _ = flow.encode(y)
    assert (flow.decode(zs) - y).abs().max() < 1e-4


def test_log_det_matches_brute_force_jacobian():
    flow = _flow(in_channels=1, image_size=(4, 4), levels=2, depth=1, hidden=4).double()
    _perturb(flow, 0.2)
    y = torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5

    def flat(v):
        zs, _ = flow.encode(v.view(1, 1, 4, 4))
        return torch.cat([z.flatten() for z in zs])

    jac = torch.autograd.functional.jacobian(flat, y.flatten())
    _, logdet = flow.encode(y)
    assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-6)


def test_gray_is_replicated_for_a_colour_flow_and_bpd_is_differentiable():
    flow = _flow()
    gray = torch.rand(2, 1, 8, 8, requires_grad=True)
    b = flow.bpd(gray, dequantize=False)
    assert torch.allclose(b, flow.bpd(gray.expand(-1, 3, -1, -1), dequantize=False))
    b.sum().backward()
    assert gray.grad is not None and torch.isfinite(gray.grad).all()


def test_bad_shapes_raise_input_errors():
    with pytest.raises(InputError, match="divisible"):
        registry.build("glow", in_channels=3, image_size=(28, 28), levels=3)
    with pytest.raises(InputError, match="channels"):
        _flow().bpd(torch.rand(1, 2, 8, 8))


def test_train_density_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "d.pt"
    rc = main(["-q", "train", "density", "--data", str(sample_mnist_path()), "--out", str(out), "--levels", "2",
               "--depth", "1", "--hidden", "8", "--steps", "3", "--batch-size", "8", "--num-test-images", "16", "--gray", "native"])
    assert rc == 0
    flow = load_density(out)
    assert flow.in_channels == 1 and not any(p.requires_grad for p in flow.parameters())
    assert torch.isfinite(flow.bpd(torch.rand(2, 1, 28, 28))).all()
    assert main(["-q", "train", "density", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


def _density_cfg(tmp_path, name, **kw):
    from keepbits.training.density import DensityConfig

    base = dict(data=str(sample_mnist_path()), out=str(tmp_path / name / "d.pt"), levels=2, depth=1, hidden=8, steps=6, batch_size=8,
                eval_images=16, gray="native", warmup_steps=2, checkpoint_every=2, device="cpu", threads=1)
    return DensityConfig(**{**base, **kw})


def test_resume_continues_the_run_exactly_and_refuses_changed_settings(tmp_path):
    """Each step seeds its own images and noise: 3 steps, then --resume to 6, equals 6 straight."""
    from keepbits.errors import CheckpointError
    from keepbits.training.checkpoint import load_checkpoint
    from keepbits.training.checkpoint import resume_path
    from keepbits.training.density import train_density

    straight = train_density(_density_cfg(tmp_path, "a"))
    train_density(_density_cfg(tmp_path, "b", steps=3))
    assert load_checkpoint(resume_path(tmp_path / "b" / "d.pt"), "density").metrics["steps_run"] == 3
    resumed = train_density(_density_cfg(tmp_path, "b", resume=True))
    assert resumed["steps_run"] == straight["steps_run"] == 6 and resumed["test_bpd"] == pytest.approx(straight["test_bpd"], abs=1e-5)
    a, b = (load_checkpoint(tmp_path / n / "d.pt", "density").models["density"].state_dict for n in ("a", "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(CheckpointError, match="cannot resume.*lr: 0.001 then, 0.002 now"):
        train_density(_density_cfg(tmp_path, "b", steps=8, lr=2e-3, resume=True))
    from keepbits.errors import InputError

    with pytest.raises(InputError, match="has run 6 of 6 steps already: nothing to do"):  # finished: left as it is
        train_density(_density_cfg(tmp_path, "b", resume=True))
    import dataclasses

    from keepbits.training.checkpoint import save_checkpoint

    last = resume_path(tmp_path / "b" / "d.pt")
    save_checkpoint(last, dataclasses.replace(load_checkpoint(last, "density"), metrics={"steps_run": "many"}))  # a damaged record
    with pytest.raises(CheckpointError, match=r"metrics\['steps_run'\] must be a number >= 0 to resume from, got 'many'"):
        train_density(_density_cfg(tmp_path, "b", steps=8, resume=True))


@pytest.mark.slow
def test_two_cpu_ranks_train_one_flow(tmp_path, free_port):
    """torchrun with 2 gloo ranks: one checkpoint, both ranks' weights bit-identical, world size recorded."""
    import os
    import subprocess
    import sys

    from keepbits.training.checkpoint import load_checkpoint

    out = tmp_path / "two" / "d.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port), "-m", "keepbits", "-q",
           "train", "density", "--data", str(sample_mnist_path()), "--out", str(out), "--levels", "2", "--depth", "1", "--hidden", "8",
           "--steps", "4", "--batch-size", "4", "--num-test-images", "16", "--gray", "native", "--device", "cpu"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = load_checkpoint(out, "density")
    digests = ckpt.metrics["rank_parameter_digests"]
    assert ckpt.settings["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1] and ckpt.metrics["steps_run"] == 4
    assert done.stdout.count("test_bpd") == 1  # one summary, from rank 0
