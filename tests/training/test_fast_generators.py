"""`nice_fast` generator: log α shape for odd sizes, parameter/FLOP budget against ResNet-18,
ONNX export (dynamo) of a NICE bundle and ẑ (Eq. 11) / x̃ (Eq. 12) parity torch vs ONNX Runtime
(function bodies and, when built, the native kernels) at sizes other than the export's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from keepbits import native, registry
from keepbits.errors import InputError
from keepbits.export import NiceGraph, compare_outputs, export_onnx
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, load_checkpoint, save_checkpoint

TOL = 1e-5


@registry.register("test_fast_fcn", "classifier")
def _fcn(in_channels: int = 3, num_classes: int = 4, image_size=None) -> nn.Module:
    """Tiny fully convolutional classifier (any H×W)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [(2, 3, 37, 50), (1, 3, 224, 224), (3, 1, 28, 28), (1, 3, 9, 5), (1, 1, 1, 1)])
def test_log_alpha_shape_any_size(shape):
    gen = registry.build("nice_fast", in_channels=shape[1]).eval()
    with torch.no_grad():
        out = gen(torch.randn(shape))
    assert tuple(out.shape) == (shape[0], 1, *shape[2:])
    assert torch.allclose(out, torch.ones_like(out))  # zero head weight: log α starts at INIT_LOG_ALPHA


def test_budget_vs_resnet18():
    gen = registry.build("nice_fast", in_channels=3)
    assert sum(p.numel() for p in gen.parameters()) <= 300_000
    x = torch.zeros(1, 3, 224, 224)
    ratio = _flops(gen, x) / _flops(registry.build("resnet18", in_channels=3, num_classes=10), x)
    assert ratio <= 0.04, ratio


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_export_parity(tmp_path, input_dtype):
    torch.manual_seed(0)
    gen_kwargs, clf_kwargs = {"in_channels": 3}, {"in_channels": 3, "num_classes": 4}
    gen, clf = registry.build("nice_fast", **gen_kwargs), registry.build("test_fast_fcn", **clf_kwargs)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    with torch.no_grad():  # BatchNorm statistics away from identity; keep about half of the pixels
        for m in gen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        gen.head.weight.normal_(0, 20.0)
        gen.head.bias.zero_()
        normalised = (torch.rand(4, 3, 32, 32) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        gen.head.bias.copy_(-gen.eval()(normalised).median())
    ckpt = save_checkpoint(tmp_path / "nice.pt", Checkpoint(
        kind="nice",
        models={"generator": ModelEntry.of("nice_fast", gen_kwargs, gen), "classifier": ModelEntry.of("test_fast_fcn", clf_kwargs, clf)},
        input_shape=[3, 32, 32], normalization=Normalization(mean, std),
        class_names=["a", "b", "c", "d"], settings={"block_size": 4, "mask_threshold": 0.5}, command="test", epoch=1,
    ))
    bundle = export_onnx(ckpt, tmp_path / "bundle", input_dtype=input_dtype)
    m = bundle.manifest
    assert m.dynamic_size and m.generator == "nice_fast"
    record = load_checkpoint(ckpt, "nice")
    graph = NiceGraph(build_model(record, "generator"), build_model(record, "classifier"), m.mean, m.std, m.block_size, m.input_dtype)
    sessions = {"bodies": native.make_session(bundle.model_path, native=False)}
    if native.library_path() is not None:
        sessions["native"] = native.make_session(bundle.model_path)
    rng = np.random.default_rng(0)
    for n, h, w in [(2, 37, 51), (1, 64, 48), (3, 13, 29)]:
        if input_dtype == "uint8":
            image = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        else:
            image = rng.random((n, 3, h, w), dtype=np.float32)
        with torch.no_grad():
            reference = tuple(t.numpy() for t in graph(torch.from_numpy(image)))
        assert 0.0 < (reference[1] > 0.5).mean() < 1.0  # a mask that keeps some pixels
        for name, session in sessions.items():
            report = compare_outputs(reference, session.run(None, {m.input_name: image}), m.pixel_scale)
            assert report["mask_max_abs"] <= TOL and report["mixed_max_abs"] <= TOL, (name, (n, h, w), report)
            assert report["argmax_agree"] == 1.0 and report["logits_max_abs"] <= 1e-3, (name, (n, h, w), report)


# -- nice_taps: a head on the classifier's own features -------------------------------------------------------------------

def test_nice_taps_reads_an_attached_classifier_and_owns_only_its_head():
    gen = registry.build("nice_taps")
    with pytest.raises(InputError, match="attach"):
        gen(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InputError, match="forward_taps"):
        gen.attach(nn.Conv2d(3, 3, 1))
    clf = registry.build("efficientnet_lite0", image_size=(64, 64)).eval()
    gen.attach(clf).eval()
    assert all(k.split(".")[0] in ("lateral", "mix", "head") for k in gen.state_dict())
    assert sum(p.numel() for p in gen.parameters()) < 30_000 and not any(p is q for p in gen.parameters() for q in clf.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gen(x), torch.full((2, 1, 64, 64), 1.0))  # zero head weight: log α starts at INIT_LOG_ALPHA
        gen.head.weight.normal_()
        log_alpha = gen(x)
        _, features = clf.forward_taps(x, gen.taps)
        assert torch.equal(log_alpha, gen.from_features(features, (64, 64)))
    cells = log_alpha.reshape(2, 1, 8, 8, 8, 8)  # finest tap at 1/8: one gate per 8×8 cell
    assert torch.equal(cells, cells[:, :, :, :1, :, :1].expand_as(cells)) and log_alpha.std() > 0


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resize_by_whole_factors_equals_resize_to_the_size(mode):
    from keepbits.training.models.fast_generators import resize

    x = torch.randn(2, 3, 7, 5)
    align = None if mode == "nearest" else False
    for size in [(28, 20), (21, 15), (14, 5), (9, 11)]:  # whole multiples (scale path) and not
        assert torch.equal(resize(x, size, mode), F.interpolate(x, size=size, mode=mode, align_corners=align))


def test_nice_taps_bundle_graph_gates_cells_then_repeats_them_as_gating_the_image_does():
    from keepbits.training import functional as KF

    clf = registry.build("efficientnet_lite0", image_size=(64, 64)).eval()
    gen = registry.build("nice_taps").attach(clf).eval()
    with torch.no_grad():
        gen.head.weight.normal_(std=3.0)
        gen.head.bias.fill_(0.0)
        graph = NiceGraph(gen, clf, [0.5] * 3, [0.25] * 3, 8, mixed_output=False)
        image = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
        logits, mask = graph(image)
        xn = graph.normalise(image.permute(0, 3, 1, 2).float())
        expected = KF.deterministic_mask(gen(xn))  # Eq. 11 on the image-sized log α
    # the same values up to float32 rounding (the sigmoid's vectorised and scalar paths may differ by an ulp)
    assert (mask - expected).abs().max() <= 1e-6 and torch.equal(logits, clf(xn))
    assert 0 < (mask > 0.5).float().mean() < 1  # gates on both sides of the threshold: the comparison means something


def test_nice_taps_trains_fixed_reloads_attached_and_exports_one_classifier_pass(tiny_npz, tmp_path):
    from keepbits.runtime import Pipeline
    from keepbits.training.nice import NiceConfig, load_nice, train_nice

    torch.set_num_threads(1)
    tiny = np.load(tiny_npz)
    data = tmp_path / "tiny32.npz"  # the quadrant data set at 32×32, so that Lite0's 1/32 tap is one pixel
    np.savez(data, x=tiny["x"].repeat(2, axis=1).repeat(2, axis=2), y=tiny["y"], class_names=tiny["class_names"])
    base = dict(out=str(tmp_path / "nice"), classifier="efficientnet_lite0", classifier_kwargs={"image_size": [32, 32], "num_classes": 3, "pretrained": False},
                data=str(data), generator="nice_taps", preprocessing={"input_size": (32, 32), "resize_policy": "resize", "class_names": ["a", "b", "c"]},
                block_size=8, epochs=1, batch_size=8, lr=0.02, target_fraction=0.3, labels="predicted", progress=False, device="cpu")
    with pytest.raises(InputError, match="--mode fixed"):
        train_nice(NiceConfig(**{**base, "mode": "finetuned"}))
    train_nice(NiceConfig(**base))
    generator, classifier, ckpt = load_nice(tmp_path / "nice" / "nice.pt")
    assert generator.classifier is classifier and ckpt.models["generator"].arch == "nice_taps"
    bundle = export_onnx(tmp_path / "nice" / "nice.pt", tmp_path / "bundle", mixed_output=False)
    import onnx

    convs = sum(node.op_type == "Conv" for node in onnx.load(str(bundle.model_path)).graph.node)
    assert convs == sum(isinstance(m, nn.Conv2d) for m in (*classifier.modules(), *generator.modules()))  # no second trunk
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    graph = NiceGraph(generator, classifier, ckpt.normalization.mean, ckpt.normalization.std, 8, mixed_output=False)
    with torch.no_grad():
        logits, mask = (t.numpy() for t in graph(torch.from_numpy(frames)))
    results = Pipeline.from_bundle(bundle.source).predict(list(frames), fitted=True)
    assert [r.label_index for r in results] == logits.argmax(1).tolist()
    assert np.abs(np.stack([r.mask for r in results]) - mask[:, 0]).max() <= TOL
