"""NICE generators, training (fixed / finetuned / target sparsity), checkpoint contract, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keepbits import registry
from keepbits.cli import main
from keepbits.data import channel_stats, load_dataset
from keepbits.errors import InputError
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, load_checkpoint, save_checkpoint
from keepbits.training.classifier import FitConfig, fit_classifier
from keepbits.training.data import TensorArrays
from keepbits.training.nice import NiceConfig, evaluate_nice, load_nice, nice_loss, saliency_target, topk_mask, train_nice


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier_checkpoint(path, data_path, arch="lenet5", seed=0, train_steps=0):
    """A classifier checkpoint for ``data_path`` (kind="classifier"), trained ``train_steps`` full-batch Adam steps
    (AdamW without weight decay, constant lr)."""
    torch.manual_seed(seed)
    ds = load_dataset(data_path)
    c, h, w = ds.shape_chw
    kwargs = {"in_channels": c, "num_classes": ds.num_classes, "image_size": [h, w]}
    model = registry.build(arch, **kwargs)
    mean, std = channel_stats(ds.x)
    x = (torch.from_numpy(ds.x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if train_steps:
        fit_classifier(model, TensorArrays(x, ds.y), FitConfig(steps=train_steps, batch_size=len(ds), optimizer="adamw", lr=1e-3, weight_decay=0.0,
                                                               schedule="none", augment="none", progress=False))
    save_checkpoint(path, Checkpoint(kind="classifier", models={"classifier": ModelEntry.of(arch, kwargs, model)}, input_shape=[c, h, w],
                                     normalization=Normalization(mean, std), class_names=ds.class_names))
    return path


def _config(tiny_npz, tmp_path, clf, **overrides):
    base = dict(data=str(tiny_npz), classifier=str(clf), out=str(tmp_path / "nice"), generator="nice_mnist",
                block_size=4, epochs=2, batch_size=16, lr=0.05, progress=False)
    return NiceConfig(**{**base, **overrides})


@pytest.mark.parametrize("name", ["nice_mnist", "nice_caltech", "nice_unet"])
@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (33, 50)])
def test_generators_return_n1hw_for_any_size(name, hw):
    gen = registry.build(name, in_channels=3).eval()
    assert tuple(gen(torch.randn(2, 3, *hw)).shape) == (2, 1, *hw)


def test_nice_caltech_is_table1_and_spatially_aligned():
    gen = registry.build("nice_caltech", in_channels=3)
    assert sum(p.numel() for p in gen.parameters()) == (27 + 1) + (9 + 1) * 2
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_()
        out = gen.eval()(torch.randn(2, 3, 20, 21))
    # Upsample(8) of ceil-mode pooled maps, cropped: constant on 8×8 cells, partial cells at the edges
    cells = out[..., ::8, ::8].repeat_interleave(8, -2).repeat_interleave(8, -1)[..., :20, :21]
    assert torch.equal(out, cells)


def test_default_generator_size_and_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    gen = registry.build("nice_unet", in_channels=3)
    assert 1e5 < sum(p.numel() for p in gen.parameters()) < 1e6
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.1)
    gen.eval()
    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=2, max=2048), 3: torch.export.Dim("w", min=2, max=2048)}
    path = tmp_path / "gen.onnx"
    torch.onnx.export(gen, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, dynamic_shapes={"x": dims}, input_names=["x"])
    session = ort.InferenceSession(str(path))
    for hw in [(32, 32), (29, 45)]:
        x = torch.randn(3, 3, *hw)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, gen(x).detach().numpy(), atol=1e-4)


def test_nice_loss_is_eq10_per_pixel():
    log_alpha = torch.randn(2, 1, 5, 6)
    logits, labels = torch.randn(2, 4), torch.tensor([1, 3])
    loss, parts = nice_loss(log_alpha, logits, labels, 2.0, 3.0)
    assert parts["l0"] == pytest.approx(torch.sigmoid(log_alpha - (2 / 3) * np.log(0.1 / 1.1)).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["ce"] + 2.0 * parts["l0"] + 3.0 * parts["smooth"], rel=1e-5)


def test_l0_decreases_and_checkpoint_contract(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    summary = train_nice(_config(tiny_npz, tmp_path, clf, epochs=4, lambda_l0=20.0, lambda_smooth=0.5))
    l0 = [row["train_l0"] for row in summary["history"]]
    assert l0[-1] < l0[0] - 0.05
    ckpt = load_checkpoint(summary["checkpoint"], "nice")
    assert set(ckpt.models) == {"generator", "classifier"}
    assert ckpt.input_shape == [3, 16, 16] and ckpt.class_names == ["a", "b", "c"]
    assert len(ckpt.normalization.mean) == len(ckpt.normalization.std) == 3
    settings = ckpt.settings
    assert settings["block_size"] == 4 and isinstance(settings["block_size"], int)
    assert settings["mask_threshold"] == 0.5 and settings["mode"] == "fixed" and settings["target_fraction"] is None
    assert settings["lambda_l0"] == 20.0 and settings["lambda_smooth"] == 0.5
    assert "final" in ckpt.metrics and ckpt.command == ""
    gen, classifier, _ = load_nice(summary["checkpoint"])
    assert tuple(gen(torch.zeros(1, 3, 16, 16)).shape) == (1, 1, 16, 16)


def test_fixed_mode_leaves_classifier_unchanged(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz, arch="resnet20")  # has batch-norm buffers
    before = load_checkpoint(clf).models["classifier"].state_dict
    summary = train_nice(_config(tiny_npz, tmp_path, clf, epochs=1, lambda_l0=1.0))
    after = load_checkpoint(summary["checkpoint"]).models["classifier"].state_dict
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_finetuned_mode_trains_only_the_chosen_blocks(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz, arch="resnet20")
    before = load_checkpoint(clf).models["classifier"].state_dict
    summary = train_nice(_config(tiny_npz, tmp_path, clf, epochs=1, mode="finetuned", train_blocks=["fc"], classifier_lr=0.1))
    after = load_checkpoint(summary["checkpoint"]).models["classifier"].state_dict
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    with pytest.raises(InputError, match="no block"):
        train_nice(_config(tiny_npz, tmp_path, clf, mode="finetuned", train_blocks=["layer9"], overwrite=True))


def test_target_sparsity_reaches_requested_fraction(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz, train_steps=40)
    target = 0.3  # b = 16: the dropped pixels become the image mean, so the bright quadrant (1/4) must be kept
    summary = train_nice(_config(tiny_npz, tmp_path, clf, generator="nice_unet", generator_kwargs={"widths": [4, 8]},
                                 block_size=16, epochs=10, batch_size=8, lr=0.01, lambda_l0=0.1, target_fraction=target, target_rate=0.05,
                                 val_fraction=0.0))  # all 60 images train; the final evaluation is on them
    assert abs(summary["final"]["kept_fraction"] - target) < 0.1
    assert summary["lambda_l0_final"] > 0.1  # λ1 rose from its start value to remove pixels
    assert load_checkpoint(summary["checkpoint"]).settings["target_fraction"] == target


def test_saliency_target_keeps_the_pixels_the_classifier_reads():
    class CornerReader(torch.nn.Module):  # class 1's logit reads the top-left 2×2 pixels only
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x[:, :, :2, :2].sum((1, 2, 3))], 1)

    x = torch.rand(2, 3, 6, 5)
    target = saliency_target(CornerReader(), x, torch.tensor([1, 1]), fraction=4 / 30, smooth=1)
    expected = torch.zeros(6, 5)
    expected[:2, :2] = 1
    assert torch.equal(target[:, 0], expected.expand(2, 6, 5))
    smoothed = saliency_target(CornerReader(), x, torch.tensor([1, 1]), fraction=4 / 30, smooth=3)
    assert smoothed[:, 0, :3, :3].sum().item() == 8  # smoothing keeps the kept pixels beside the read ones


def test_warm_start_fits_the_requested_fraction_then_trains(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz, train_steps=40)
    summary = train_nice(_config(tiny_npz, tmp_path, clf, generator="nice_unet", generator_kwargs={"widths": [4, 8]},
                                 lr=0.01, epochs=1, warmup_steps=60, warmup_fraction=0.25, warmup_smooth=3))
    warm, first = summary["history"]
    assert warm["epoch"] == 0 and first["epoch"] == 1 and warm["warmup_fraction"] == 0.25
    assert abs(warm["warmup_train_kept"] - 0.25) < 0.1  # started from every pixel kept (INIT_LOG_ALPHA)
    assert warm["warmup_bce"] < 0.5
    with pytest.raises(InputError, match="warm-up"):
        train_nice(_config(tiny_npz, tmp_path, clf, warmup_steps=-1))
    only = train_nice(_config(tiny_npz, tmp_path, clf, out=str(tmp_path / "warm_only"), epochs=0, warmup_steps=3))
    assert [row["epoch"] for row in only["history"]] == [0] and load_nice(only["checkpoint"])[2].settings["epochs"] == 0
    with pytest.raises(InputError, match="epochs"):
        train_nice(_config(tiny_npz, tmp_path, clf, epochs=0))


def test_evaluate_uses_deterministic_mask_on_the_held_out_validation_split(tiny_npz, tmp_path):
    from keepbits.data import train_val_split
    from keepbits.training.data import TensorImages

    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    summary = train_nice(_config(tiny_npz, tmp_path, clf, epochs=1, val_fraction=0.2))
    gen, classifier, ckpt = load_nice(summary["checkpoint"])
    ds = load_dataset(tiny_npz)
    _, val_idx = train_val_split(ds.y, 0.2, seed=0)
    data = TensorImages(ds.subset(val_idx), ckpt.normalization.mean, ckpt.normalization.std)
    first = evaluate_nice(gen, classifier, data, 4)
    assert first == evaluate_nice(gen, classifier, data, 4)  # no sampling at evaluation
    # no test split in this file: the final evaluation is the validation split's, as every epoch's row
    # (the trainer normalises as one multiply-add, hence the tolerance)
    assert summary["final_split"] == "val" and first == pytest.approx(summary["final"], abs=1e-5)
    val_row = {k[len("val_"):]: v for k, v in summary["history"][-1].items() if k.startswith("val_")}
    assert val_row == pytest.approx(first, abs=1e-5)
    assert not any(k.startswith("test_") for row in summary["history"] for k in row)


def test_topk_mask_counts():
    scores = torch.rand(3, 5, 7)
    mask = topk_mask(scores, torch.tensor([0, 4, 35]))
    assert mask.shape == (3, 1, 5, 7)
    assert mask.flatten(1).sum(1).tolist() == [0.0, 4.0, 35.0]


def test_bad_settings_raise_input_error(tiny_npz, tmp_path):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    for bad in (dict(block_size=0), dict(mode="frozen"), dict(target_fraction=1.5), dict(generator="nope"), dict(optimizer="rmsprop")):
        with pytest.raises(InputError):
            train_nice(_config(tiny_npz, tmp_path, clf, **bad))
    other = tmp_path / "gray.npz"
    np.savez(other, x=np.zeros((4, 16, 16, 1), np.uint8), y=np.arange(4) % 3)
    with pytest.raises(InputError, match="expects"):
        train_nice(_config(other, tmp_path, clf))


def test_cli_train_and_bench(tiny_npz, tmp_path, capsys):
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    out = tmp_path / "run"
    code = main(["-q", "train", "nice", "--data", str(tiny_npz), "--classifier", str(clf), "--out", str(out),
                 "--generator", "nice_unet", "--generator-kwargs", '{"widths": [4, 8]}', "-b", "4", "--epochs", "1", "--batch-size", "32"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("nice.pt")
    report = tmp_path / "bench.json"
    code = main(["-q", "bench", "nice", "--model", str(out / "nice.pt"), "--data", str(tiny_npz), "-b", "1", "4", "16",
                 "--qualities", "50", "--num-images", "12", "--sis-k", "16", "--out", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert [row["block_size"] for row in result["per_block_size"]] == [1, 4, 16]
    row = result["per_block_size"][1]
    assert {"nice", "random", "saliency_topk", "sis_backselect"} <= set(row)
    assert row["nice"]["png_bytes_per_image"] > 0 and 0 <= row["nice"]["accuracy"] <= 1
    assert result["num_images"] == 12
    from keepbits.cli.bench_nice import headline

    lines = headline(result)  # what stderr shows without -q: one line per b, the numbers of the JSON
    payload = next(p["bytes_per_image"] for p in row["nice"]["payloads"] if p["codec"] == "png")
    assert len(lines) == 3 and lines[1].startswith(f"12 images, NICE keeps {result['kept_fraction']:.1%} of the pixels; b = 4: top-1 NICE ")
    assert f"SIS {row['sis_backselect']['accuracy']:.1%}" in lines[1] and f"lossless payload {payload:,.0f} B" in lines[1]


def test_cli_bad_input_exits_2(tiny_npz, tmp_path, capsys):
    assert main(["train", "nice", "--data", str(tiny_npz), "--classifier", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2
    assert "classifier not found" in capsys.readouterr().err
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    assert main(["train", "nice", "--data", str(tiny_npz), "--classifier", str(clf), "--out", str(tmp_path), "--generator-kwargs", "{x"]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["bench", "nice", "--model", str(clf), "--data", str(tiny_npz)]) == 2  # a classifier, not a nice checkpoint
    assert "expected nice" in capsys.readouterr().err


def test_cli_train_nice_default_generator(tiny_npz, tmp_path, capsys):
    """Without --generator the default ``auto`` resolves from the input size (16 px: nice_unet);
    the config's validation must not look ``auto`` up in the registry (issue 20, item 11)."""
    clf = _classifier_checkpoint(tmp_path / "clf.pt", tiny_npz)
    out = tmp_path / "run"
    code = main(["-q", "train", "nice", "--data", str(tiny_npz), "--classifier", str(clf), "--out", str(out),
                 "--generator-kwargs", '{"widths": [4, 8]}', "-b", "4", "--epochs", "1", "--batch-size", "32"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out / "nice.pt", "nice").models["generator"].arch == "nice_unet"
    NiceConfig(data="d", classifier="c", out="o").validate()  # the default config validates


@pytest.mark.parametrize("change", [{"lambda_l0": float("nan")}, {"lambda_smooth": float("inf")}, {"lambda_l0": -0.5},
                                    {"max_minutes": float("nan")}])
def test_config_refuses_weights_and_limits_that_are_not_finite_numbers_in_range(change):
    with pytest.raises(InputError, match="λ1 and λ2|max minutes"):
        NiceConfig(data="d", classifier="c", out="o", **change).validate()
