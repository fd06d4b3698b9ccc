"""A classifier brought by its user (package.module:factory + weights file, nn.Module + Preprocessing,
.onnx via onnx2torch) through train nice → export → run, bench nice, audit sis and SimpleBits; its
preprocessing travels checkpoint → manifest → runtime, and the runtime's accuracy equals torch's."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from keepbits.bundle import load_bundle
from keepbits.cli import main
from keepbits.data import Preprocessing
from keepbits.export import export_onnx
from keepbits.runtime import Pipeline
from keepbits.training.byo import Classifier, resolve_classifier
from keepbits.training.checkpoint import load_checkpoint
from keepbits.training.classifier import FitConfig, fit_classifier
from keepbits.training.data import TensorArrays
from keepbits.training.nice import NiceConfig, train_nice

TINY_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def classifier(num_classes=3):
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def broken(num_classes=3):
        raise RuntimeError("boom in factory")

    def broken_inside(num_classes=3):
        return nn.Linear("eight", num_classes)  # a TypeError inside the factory, not in its call

    def flat_classifier(num_classes=3, side=16):  # no adaptive pooling: SimpleBits exports with the TorchScript exporter
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * (side // 2) ** 2, num_classes))
""")

PRE = Preprocessing((16, 16), mean=(0.3, 0.3, 0.3), std=(0.25, 0.25, 0.25), resize_policy="center-crop", crop_fraction=0.875,
                    class_names=("a", "b", "c"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tinynets(plugin_module, tmp_path):
    plugin_module("byo_nets", TINY_MODULE)
    import byo_nets

    torch.manual_seed(0)
    net = byo_nets.classifier()
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    return net, weights


def _frames(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames of several sizes whose class is the brightest third (left, middle, right)."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 40)), int(rng.integers(24, 60))
        frame = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
        label = i % 3
        frame[:, label * w // 3:(label + 1) * w // 3] += 120
        frames.append(frame)
        labels.append(label)
    return frames, np.array(labels)


def test_factory_with_weights_through_train_export_run_bench_and_audit(tiny_npz, tmp_path, tinynets, capsys):
    _, weights = tinynets
    out = tmp_path / "nice"
    code = main(["-q", "train", "nice", "--classifier", "byo_nets:classifier", "--classifier-weights", str(weights),
                 "--image-size", "16", "16", "--mean", "0.3", "0.3", "0.3", "--std", "0.25", "0.25", "0.25",
                 "--resize-policy", "center-crop", "--crop-fraction", "0.875", "--data", str(tiny_npz), "--generator", "nice_mnist",
                 "--block-size", "4", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    assert code == 0
    ckpt = load_checkpoint(out / "nice.pt", "nice")
    assert ckpt.models["classifier"].arch == "byo_nets:classifier"
    assert torch.equal(ckpt.models["classifier"].state_dict["0.weight"], torch.load(weights, weights_only=True)["0.weight"])
    bundle_dir = tmp_path / "bundle"
    assert main(["-q", "export", "onnx", "--model", str(out / "nice.pt"), "--out", str(bundle_dir)]) == 0
    manifest = load_bundle(bundle_dir).manifest
    assert (manifest.resize_policy, manifest.crop_fraction, manifest.classifier) == ("center-crop", 0.875, "byo_nets:classifier")
    result = Pipeline.from_bundle(bundle_dir)(_frames(1)[0][0])
    assert result.label in ("0", "1", "2") and result.mask.shape == (16, 16)
    capsys.readouterr()
    assert main(["-q", "bench", "nice", "--model", str(out / "nice.pt"), "--data", str(tiny_npz), "--num-images", "6",
                 "--qualities", "50", "--out", str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["checkpoint"] == str(out / "nice.pt")
    for n, model in enumerate((str(out / "nice.pt"), "byo_nets:classifier")):  # two audits, two folders (each refuses the other's runs)
        extra = [] if model.endswith(".pt") else ["--classifier-weights", str(weights), "--image-size", "16", "16"]
        assert main(["-q", "audit", "sis", "--model", model, *extra, "--data", str(tiny_npz), "--split", "train", "--num-images", "2",
                     "--method", "gradient", "--k", "64", "--out", str(tmp_path / f"sis{n}")]) == 0


def test_preprocessing_travels_checkpoint_manifest_runtime(tiny_npz, tmp_path, tinynets):
    net, _ = tinynets
    clf = Classifier.of(net, PRE, arch="byo_nets:classifier")
    summary = train_nice(NiceConfig(out=str(tmp_path / "nice"), data=str(tiny_npz), generator="nice_mnist", block_size=4, epochs=1,
                                    batch_size=16, progress=False, device="cpu"), classifier=clf)
    ckpt = load_checkpoint(summary["checkpoint"], "nice")
    assert ckpt.preprocessing_record() == PRE
    pipe = Pipeline.from_bundle(export_onnx(summary["checkpoint"], tmp_path / "bundle", verify=False).source)
    m = pipe.manifest
    assert Preprocessing(tuple(m.input_shape[1:]), tuple(m.mean), tuple(m.std), m.resize_policy, m.crop_fraction, tuple(m.class_names)) == PRE
    frame = _frames(1, seed=3)[0][0]
    assert np.array_equal(pipe.prepare([frame]).batch[0], PRE.fit(frame)[0])


@pytest.mark.parametrize("policy, crop", [("center-crop", 0.875), ("resize", 1.0)])
def test_runtime_accuracy_equals_torch_accuracy(tmp_path, tinynets, policy, crop):
    """The classifier's top-1 through Pipeline (ONNX Runtime, uint8 input, the manifest's policy) is its
    top-1 through torch with the same preprocessing: within 0.5 pt, argmax agreement >= 99 %. (The same
    bundle told to letterbox gives other model images: the policy is what is compared.)"""
    net, _ = tinynets
    torch.manual_seed(1)
    pre = Preprocessing((24, 24), mean=(0.3, 0.3, 0.3), std=(0.25, 0.25, 0.25), resize_policy=policy, crop_fraction=crop,
                        class_names=("a", "b", "c"))
    frames, labels = _frames(300, seed=1)
    train_frames, train_labels = _frames(300, seed=2)
    x = torch.from_numpy(np.concatenate([pre.normalize(pre.fit(f)[0]) for f in train_frames]))
    fit_classifier(net, TensorArrays(x, train_labels), FitConfig(steps=150, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.0,
                                                                schedule="none", augment="none", progress=False))
    clf = Classifier.of(net, pre, arch="byo_nets:classifier")
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, save_checkpoint
    from keepbits import registry

    gen_kwargs = {"in_channels": 3}
    ckpt = Checkpoint(kind="nice", models={"generator": ModelEntry.of("nice_mnist", gen_kwargs, registry.build("nice_mnist", **gen_kwargs)),
                                           "classifier": clf.entry()}, input_shape=clf.input_shape, normalization=clf.normalization,
                      class_names=clf.class_names, preprocessing=clf.checkpoint_preprocessing(), settings={"block_size": 4})
    path = save_checkpoint(tmp_path / "nice.pt", ckpt)
    bundle = export_onnx(path, tmp_path / "bundle", mixed_output=False, verify=False).source
    with torch.no_grad():
        torch_pred = np.array([int(net(torch.from_numpy(pre.normalize(pre.fit(f)[0]))).argmax()) for f in frames])
    runtime_pred = np.array([r.label_index for r in Pipeline.from_bundle(bundle, compress=False).predict(frames)])
    assert np.mean(torch_pred == labels) > 0.6  # a classifier that reads the frame
    assert abs(np.mean(runtime_pred == labels) - np.mean(torch_pred == labels)) <= 0.005
    assert np.mean(runtime_pred == torch_pred) >= 0.99
    manifest = load_bundle(bundle).manifest
    (bundle / "manifest.json").write_text(json.dumps({**json.loads(manifest.to_json()), "resize_policy": "letterbox", "crop_fraction": 1.0,
                                                      "files": manifest.files}))
    letterboxed = Pipeline.from_bundle(bundle, compress=False).prepare(frames[:20]).batch
    assert not any(np.array_equal(a, pre.fit(f)[0]) for a, f in zip(letterboxed, frames))  # the policy is what the test checks


def test_simplebits_finetunes_a_factory_classifier(tiny_npz, tmp_path, tinynets):
    import keepbits.training.density as density
    from keepbits.training.simplebits import SimpleBitsConfig, train_simplebits

    import byo_nets

    weights = tmp_path / "flat.pt"
    torch.save(byo_nets.flat_classifier().state_dict(), weights)
    dens = tmp_path / "density.pt"
    density.train_density(density.DensityConfig(data=str(tiny_npz), out=str(dens), levels=2, depth=1, hidden=8, steps=1, batch_size=4,
                                                eval_images=4, device="cpu"))
    cfg = SimpleBitsConfig(data=str(tiny_npz), out=str(tmp_path / "sb.pt"), density=str(dens), classifier="byo_nets:flat_classifier",
                           classifier_weights=str(weights), preprocessing={"input_size": (16, 16)}, unet_base=4, steps=2, batch_size=8,
                           max_test=12, device="cpu")
    train_simplebits(cfg)
    ckpt = load_checkpoint(tmp_path / "sb.pt", "simplebits")
    assert ckpt.models["classifier"].arch == "byo_nets:flat_classifier" and ckpt.preprocessing_record().input_size == (16, 16)
    assert main(["-q", "export", "onnx", "--model", str(tmp_path / "sb.pt"), "--out", str(tmp_path / "sb.bundle")]) == 0


def _onnx2torch_missing() -> str | None:
    try:
        import onnx2torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - torchvision mismatches fail in several ways
        return f"onnx2torch cannot be imported here ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    return None


@pytest.mark.skipif(_onnx2torch_missing() is not None, reason=str(_onnx2torch_missing()))
def test_onnx_classifier_through_train_export_run(tiny_npz, tmp_path, tinynets):
    """An .onnx classifier (its preprocessing in metadata properties) is converted by onnx2torch, trained
    against, embedded in the checkpoint with its sha256, exported and run."""
    import onnx

    net, _ = tinynets
    path = tmp_path / "clf.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    model = onnx.load(str(path))
    for key, value in {"mean": [0.3, 0.3, 0.3], "std": [0.25, 0.25, 0.25], "class_names": ["a", "b", "c"], "resize_policy": "resize"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))
    clf = resolve_classifier(str(path))
    assert clf.preprocessing == Preprocessing((16, 16), (0.3,) * 3, (0.25,) * 3, "resize", 1.0, ("a", "b", "c"))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(clf.module(x), net(x), atol=1e-5)
    assert main(["-q", "train", "nice", "--classifier", str(path), "--data", str(tiny_npz), "--generator", "nice_mnist", "--block-size", "4",
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "nice")]) == 0
    ckpt = load_checkpoint(tmp_path / "nice" / "nice.pt", "nice")
    import hashlib

    assert ckpt.models["classifier"].kwargs["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()  # the checkpoint carries the classifier itself
    assert main(["-q", "export", "onnx", "--model", str(tmp_path / "nice" / "nice.pt"), "--out", str(tmp_path / "bundle")]) == 0
    assert Pipeline.from_bundle(tmp_path / "bundle")(_frames(1)[0][0]).label in ("a", "b", "c")


def test_a_factory_that_raises_is_one_line_exit_2(tinynets, tmp_path, capsys):
    """A user's factory that fails when called was a traceback, exit 1."""
    from keepbits.errors import InputError

    rc = main(["train", "nice", "--classifier", "byo_nets:broken", "--image-size", "16", "16", "--footage", str(tmp_path),
               "--labels", "predicted", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "classifier byo_nets:broken: its factory raised RuntimeError: boom in factory" in err and "Traceback" not in err
    rc = main(["train", "nice", "--classifier", "byo_nets:broken_inside", "--image-size", "16", "16", "--footage", str(tmp_path),
               "--labels", "predicted", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "its factory raised TypeError" in err and "cannot be called with" not in err
    with pytest.raises(InputError, match="classifier arch 'byo_nets:broken_inside': its factory raised TypeError"):  # rebuilt by name
        Classifier.of(tinynets[0], PRE, arch="byo_nets:broken_inside")


def test_a_classifier_that_cannot_take_its_preprocessing_size_is_one_clear_error():
    """Checked with one zero image when the classifier is given, not a traceback in the first
    training step: a network built for another input size, and class names that do not match its logits."""
    from keepbits import registry
    from keepbits.errors import InputError

    lenet = registry.build("lenet5", in_channels=3, num_classes=3)  # its linear layer expects 28×28 inputs
    with pytest.raises(InputError, match=r"fails on a 3×32×32 image"):
        Classifier.of(lenet, Preprocessing(input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3), arch="lenet5",
                      kwargs={"in_channels": 3, "num_classes": 3})
    with pytest.raises(InputError, match="2 class names for 3 logits"):
        Classifier.of(lenet, Preprocessing(input_size=(28, 28), mean=(0.5,) * 3, std=(0.5,) * 3, class_names=("a", "b")),
                      arch="lenet5", kwargs={"in_channels": 3, "num_classes": 3})
    assert Classifier.of(lenet, Preprocessing(input_size=(28, 28), mean=(0.5,) * 3, std=(0.5,) * 3), arch="lenet5",
                         kwargs={"in_channels": 3, "num_classes": 3}).class_names == ["0", "1", "2"]


def test_plain_onnx_classifier_audited_on_unlabelled_footage_with_its_preprocessing_given(tmp_path, tinynets, capsys):
    """A user's .onnx file without metadata: its size, normalisation and resize policy come from the
    command line; nested footage with a video and a corrupt file is sampled, fitted and audited
    (SIS of the predicted class, no accuracy), the model seeing exactly (fit(frame)/255 − mean)/std."""
    import cv2

    net, _ = tinynets
    path = tmp_path / "user.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    footage = tmp_path / "footage"
    (footage / "day1" / "cam0").mkdir(parents=True)
    frames, _ = _frames(4, seed=5)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(footage / "day1" / "cam0" / f"{i}.png"), frame[:, :, ::-1])
    (footage / "day1" / "broken.jpg").write_bytes(b"not a jpeg")
    writer = cv2.VideoWriter(str(footage / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 30))
    for i in range(6):
        writer.write(np.full((30, 40, 3), 30 * i, np.uint8))
    writer.release()
    options = ["--image-size", "16", "16", "--mean", "0.3", "0.3", "0.3", "--std", "0.25", "0.25", "0.25",
               "--resize-policy", "center-crop", "--crop-fraction", "0.875"]
    out = tmp_path / "sis"
    capsys.readouterr()
    assert main(["-q", "audit", "sis", "--model", str(path), *options, "--data", str(footage), "--frame-step", "2",
                 "--num-images", "5", "--thresholds", "0.2", "--threshold", "0.2", "--method", "plain",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] is None and summary["backselect_runs"] == 5  # unlabelled: no accuracy; 3 classes: every f ≥ 1/3 > τ
    data = json.loads((out / "report.json").read_text())["data"]
    from keepbits.data.images import load_footage

    chosen = load_footage(footage, num_images=5, seed=0, frame_step=2)  # the audit's own seeded draw
    assert chosen.counts == {"images": 4, "frames": 3, "skipped": 1}  # 6 video frames, every 2nd
    x = np.stack([PRE.fit(image)[0] for image in chosen.images]).astype(np.float32) / 255
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy((x - 0.3) / 0.25).permute(0, 3, 1, 2)), 1).max(1).values.double().numpy()
    confidences = np.array([row["confidence"] for row in data["images"]])
    assert len(confidences) == 5 and np.allclose(confidences, expected, atol=1e-5)
    assert all(row["label"] is None and row["correct"] is None for row in data["images"])
    assert main(["-q", "audit", "sis", "--model", str(path), "--classifier-weights", str(path), "--data", str(footage),
                 "--out", str(tmp_path / "x")]) == 2  # an ONNX file carries its own weights


def test_audit_sis_matches_class_folders_to_the_models_classes_by_name_and_drops_folders_that_are_not(tmp_path, tinynets, capsys,
                                                                                                       caplog):
    import cv2

    net, _ = tinynets
    path = tmp_path / "user.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    frames, _ = _frames(4, seed=2)
    for folders, root in ((("c", "a"), tmp_path / "labelled"), (("cam0", "cam1"), tmp_path / "cameras")):
        for k, folder in enumerate(folders):
            (root / folder).mkdir(parents=True)
            for i, frame in enumerate(frames[2 * k:2 * k + 2]):
                cv2.imwrite(str(root / folder / f"{i}.png"), frame[:, :, ::-1])
    options = ["--image-size", "16", "16", "--class-names", str(tmp_path / "names.json"), "--method", "plain", "--thresholds", "0.999",
               "--threshold", "0.999", "--num-images", "4"]  # labels only: no image of the untrained net reaches τ
    assert main(["-q", "audit", "sis", "--model", str(path), *options, "--data", str(tmp_path / "labelled"), "--out", str(tmp_path / "s1")]) == 0
    rows = json.loads((tmp_path / "s1" / "report.json").read_text())["data"]["images"]
    assert sorted(row["label"] for row in rows) == [0, 0, 2, 2]  # folders a and c: the model's classes 0 and 2, not 0 and 1
    capsys.readouterr()
    assert main(["-q", "audit", "sis", "--model", str(path), *options, "--data", str(tmp_path / "cameras"), "--out", str(tmp_path / "s2")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is None and "not the model's classes" in caplog.text


def test_a_checkpoint_calls_only_a_factory_its_user_trusted(tmp_path, tinynets, monkeypatch):
    """A checkpoint's ``package.module:factory`` is code the file would run: refused (nothing
    called) unless the user named it in this process or lists it in KEEPBITS_TRUSTED_FACTORIES."""
    from keepbits import registry
    from keepbits.errors import CheckpointError
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, build_model, save_checkpoint

    net, weights = tinynets
    marker = tmp_path / "ran"
    norm = Normalization([0.5] * 3, [0.5] * 3)
    evil = ModelEntry("subprocess:getoutput", {"cmd": f"touch {marker}"}, {})
    save_checkpoint(tmp_path / "evil.pt", Checkpoint("classifier", {"classifier": evil}, [3, 16, 16], norm, ["a", "b", "c"]))
    save_checkpoint(tmp_path / "own.pt", Checkpoint("classifier", {"classifier": ModelEntry.of("byo_nets:classifier", {}, net)},
                                                    [3, 16, 16], norm, ["a", "b", "c"]))
    monkeypatch.setattr(registry, "_TRUSTED", set())  # a fresh process
    monkeypatch.delenv(registry.TRUST_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r"calling subprocess:getoutput, code outside keepbits' registry; .*"
                                              r"KEEPBITS_TRUSTED_FACTORIES=subprocess:getoutput"):
        build_model(load_checkpoint(tmp_path / "evil.pt"), "classifier")
    assert main(["export", "onnx", "--model", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "b.zip")]) == 2
    with pytest.raises(CheckpointError, match="KEEPBITS_TRUSTED_FACTORIES=byo_nets:classifier"):
        build_model(load_checkpoint(tmp_path / "own.pt"), "classifier")
    assert not marker.exists()

    monkeypatch.setenv(registry.TRUST_ENV, "byo_nets")  # a whole module, listed by the user
    rebuilt = build_model(load_checkpoint(tmp_path / "own.pt"), "classifier")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))
    monkeypatch.delenv(registry.TRUST_ENV)
    resolve_classifier("byo_nets:classifier", weights=weights, preprocessing=PRE)  # named by the user: trusted from now on
    build_model(load_checkpoint(tmp_path / "own.pt"), "classifier")
    assert not marker.exists()


def test_a_classifier_file_gets_class_names_checked_and_defaulted(tmp_path, tinynets, monkeypatch):
    """A classifier given as a file (checkpoint, .onnx) goes through the same class-name check as a
    factory: names for every logit, else an error before any training."""
    from keepbits import registry
    from keepbits.errors import InputError

    monkeypatch.setenv(registry.TRUST_ENV, "byo_nets:classifier")
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    net, _ = tinynets
    entry = ModelEntry.of("byo_nets:classifier", {}, net)
    save_checkpoint(tmp_path / "two.pt", Checkpoint("classifier", {"classifier": entry}, [3, 16, 16],
                                                    Normalization([0.5] * 3, [0.5] * 3), ["a", "b"]))
    with pytest.raises(InputError, match="2 class names for 3 logits"):
        resolve_classifier(str(tmp_path / "two.pt"))
    assert resolve_classifier(str(tmp_path / "two.pt"), preprocessing={"class_names": ("x", "y", "z")}).class_names == ["x", "y", "z"]


def test_an_onnx2torch_that_does_not_import_is_told_apart_from_a_missing_one(tmp_path, monkeypatch):
    """A torchvision of another torch makes onnx2torch fail at import: the hint is the matching
    torchvision, not installing the extra again."""
    import sys

    from keepbits.errors import InputError
    from keepbits.training.models.onnx_classifier import convert_onnx

    (tmp_path / "onnx2torch.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "onnx2torch", raising=False)
    with pytest.raises(InputError, match=r"installed but does not import \(RuntimeError: operator torchvision::nms .*"
                                         r"torchvision release made for torch"):
        convert_onnx(b"", "net.onnx")


def test_the_assumed_preprocessing_names_only_what_was_not_given(caplog):
    """Mean and std given, the resize policy not: the warning assumes (and asks for) that alone
    (it named --mean and --std as well, which had been given)."""
    from keepbits.training.byo import merge_preprocessing

    with caplog.at_level("WARNING", logger="keepbits"):
        pre = merge_preprocessing(None, {"input_size": (16, 16), "mean": [0.5], "std": [0.25]}, "mine:net")
    assert pre.mean == (0.5,) or list(pre.mean) == [0.5]
    assert "resize policy not given, assumed resize policy" in caplog.text and "CLI: --resize-policy)" in caplog.text
    assert "--mean" not in caplog.text
