"""The Checkpoint record: every field checked (CheckpointError naming it) when built and when
read, version-1 files (the shipped density model, hand-assembled dicts of older writers) still
load, weights-only reading, atomic writes."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from keepbits import registry
from keepbits.errors import CheckpointError
from keepbits.training.checkpoint import (
    Checkpoint,
    ModelEntry,
    Normalization,
    build_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from keepbits.training.density import default_density_path

KWARGS = {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}


@pytest.fixture(scope="module")
def entry() -> ModelEntry:
    torch.manual_seed(0)
    return ModelEntry.of("lenet5", KWARGS, registry.build("lenet5", **KWARGS))


def _classifier(entry: ModelEntry, **changes) -> Checkpoint:
    fields = dict(kind="classifier", models={"classifier": entry}, input_shape=[1, 28, 28], normalization=Normalization([0.13], [0.31]),
                  class_names=[str(i) for i in range(10)])
    return Checkpoint(**{**fields, **changes})


def test_round_trip_keeps_every_field(tmp_path, entry):
    ckpt = _classifier(entry, preprocessing={"resize_policy": "letterbox"}, settings={"lr": 0.1}, command="keepbits train classifier",
                       metrics={"best": {"epoch": 3}}, epoch=2, optimizer={"state": {}, "param_groups": []})
    back = load_checkpoint(save_checkpoint(tmp_path / "c.pt", ckpt), "classifier")
    for f in dataclasses.fields(Checkpoint):
        if f.name != "models":
            assert getattr(back, f.name) == getattr(ckpt, f.name), f.name
    assert back.models["classifier"].arch == "lenet5" and back.models["classifier"].kwargs == KWARGS
    model = build_model(back, "classifier", expected_arch="lenet5")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, entry.state_dict[name]), name
    with pytest.raises(CheckpointError, match="has no generator model"):
        build_model(back, "generator")
    with pytest.raises(CheckpointError, match="not a resnet20"):
        build_model(back, "classifier", expected_arch="resnet20")


@pytest.mark.parametrize("changes, field", [
    ({"kind": "detector"}, "'kind'"),
    ({"models": {}}, "'models'"),
    ({"models": [1]}, "'models'"),
    ({"input_shape": [1, 28]}, "'input_shape'"),
    ({"input_shape": [1, 28, -28]}, "'input_shape'"),
    ({"input_shape": [True, 28, 28]}, "'input_shape'"),
    ({"input_shape": "1x28x28"}, "'input_shape'"),
    ({"normalization": None}, "'normalization'"),
    ({"normalization": {"mean": [0.1], "std": [0.3]}}, "'normalization'"),
    ({"normalization": Normalization([0.1, 0.2], [0.3, 0.3])}, "'normalization.mean'"),
    ({"normalization": Normalization([0.1], [0.0])}, "'normalization.std'"),
    ({"normalization": Normalization([float("nan")], [0.3])}, "'normalization.mean'"),
    ({"normalization": Normalization(["0.1"], [0.3])}, "'normalization.mean'"),
    ({"class_names": []}, "'class_names'"),
    ({"class_names": [0, 1]}, "'class_names'"),
    ({"class_names": "0123456789"}, "'class_names'"),
    ({"preprocessing": ["letterbox"]}, "'preprocessing'"),
    ({"settings": {1: "x"}}, "'settings'"),
    ({"metrics": None}, "'metrics'"),
    ({"command": ["keepbits"]}, "'command'"),
    ({"epoch": -1}, "'epoch'"),
    ({"epoch": 1.5}, "'epoch'"),
    ({"optimizer": [1, 2]}, "'optimizer'"),
])
def test_bad_fields_raise_checkpoint_error_naming_them(entry, changes, field):
    with pytest.raises(CheckpointError, match=field):
        _classifier(entry, **changes)


@pytest.mark.parametrize("models, field", [
    ({"classifier": "lenet5"}, "models\\[classifier\\]"),
    ({"classifier": ModelEntry("", {}, {})}, "models\\[classifier\\].arch"),
    ({"classifier": ModelEntry("lenet5", {1: 2}, {})}, "models\\[classifier\\].kwargs"),
    ({"classifier": ModelEntry("lenet5", {}, {"w": [1.0]})}, "models\\[classifier\\].state_dict"),
    ({"classifier": None, "decoder": None}, "'models' has an unknown role 'decoder'"),
])
def test_bad_model_entries_name_the_role_and_field(entry, models, field):
    with pytest.raises(CheckpointError, match=field):
        _classifier(entry, models=models)


def test_kinds_need_their_roles(entry):
    with pytest.raises(CheckpointError, match=r"nice checkpoint needs the roles \['generator', 'classifier'\]"):
        _classifier(entry, kind="nice")
    density = Checkpoint(kind="density", models={"density": entry}, input_shape=[1, 28, 28])  # no normalisation, no classes
    assert density.normalization is None and density.class_names == []


def test_reading_checks_the_fields_and_names_the_file(tmp_path, entry):
    good = _classifier(entry).to_dict()
    cases = {
        "shape.pt": ({**good, "input_shape": [1, 28]}, "shape.pt: checkpoint field 'input_shape'"),
        "norm.pt": ({**good, "normalization": {"mean": [0.1]}}, "norm.pt: checkpoint field 'normalization' must have mean and std"),
        "entry.pt": ({**good, "models": {"classifier": {"arch": "lenet5"}}}, "entry.pt: checkpoint field 'models\\[classifier\\]'"),
        "unknown.pt": ({**good, "decoder": {}}, "unknown.pt: unknown checkpoint fields \\['decoder'\\]"),
        "missing.pt": ({k: v for k, v in good.items() if k != "input_shape"}, "missing.pt: checkpoint lacks input_shape"),
        "v2.pt": ({**good, "version": 2}, "v2.pt: checkpoint version 2 is not supported"),
        "other.pt": ({**good, "format": "something-else"}, "other.pt: not a keepbits checkpoint"),
    }
    for name, (data, message) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    save_checkpoint(tmp_path / "ok.pt", _classifier(entry))
    with pytest.raises(CheckpointError, match="holds a classifier checkpoint, expected nice"):
        load_checkpoint(tmp_path / "ok.pt", "nice")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_version_1_files_still_load(tmp_path, entry):
    shipped = load_checkpoint(default_density_path(), "density")  # written by the dict-based writer
    assert shipped.input_shape == [3, 32, 32] and shipped.normalization is None and shipped.class_names == []
    assert shipped.models["density"].arch == "glow" and shipped.metrics["test_bpd"] > 0 and shipped.preprocessing == {}
    assert build_model(shipped, "density").bpd(torch.full((1, 3, 32, 32), 0.5)).shape == (1,)
    # what the overinterpretation audit used to write by hand: no command, metrics or epoch
    old = {"format": "keepbits-checkpoint", "version": 1, "kind": "classifier",
           "models": {"classifier": {"arch": "lenet5", "kwargs": KWARGS, "state_dict": entry.state_dict}},
           "input_shape": [1, 28, 28], "normalization": {"mean": [0.13], "std": [0.31]},
           "class_names": [str(i) for i in range(10)], "settings": {"input_dropout_keep": None}}
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt", "classifier")
    assert (ckpt.command, ckpt.metrics, ckpt.epoch, ckpt.optimizer) == ("", {}, 0, None)
    assert ckpt.normalization == Normalization([0.13], [0.31]) and ckpt.settings == {"input_dropout_keep": None}


def test_save_takes_a_checkpoint_only(tmp_path):
    with pytest.raises(TypeError, match="takes a Checkpoint"):
        save_checkpoint(tmp_path / "d.pt", {"kind": "classifier"})


def test_checkpoint_loading_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "keepbits-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable keepbits checkpoint") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)  # never pass on torch's advice to unpickle it
    torch.save({"0.weight": torch.zeros(2, 2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare weights .* as --classifier-weights"):
        load_checkpoint(tmp_path / "bare.pt")
    (tmp_path / "text.pt").write_text("hello world\n")  # the unpickler's KeyError '101' is no reason a user can read
    with pytest.raises(CheckpointError, match=r"text.pt: not a readable keepbits checkpoint \(not written by torch.save: KeyError"):
        load_checkpoint(tmp_path / "text.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.pt")


def test_a_bundle_given_as_a_checkpoint_says_what_it_is(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.zip", "w") as zf:
        zf.writestr("manifest.json", "{}")
        zf.writestr("model.onnx", b"")
    with pytest.raises(CheckpointError, match=r"model.zip: a model bundle \(what keepbits export writes\), not a training checkpoint"):
        load_checkpoint(tmp_path / "model.zip")


def test_atomic_save_leaves_no_temp_files(tmp_path, entry):
    save_checkpoint(tmp_path / "a.pt", _classifier(entry))
    save_checkpoint(tmp_path / "a.pt", _classifier(entry, epoch=1))  # replaces the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"] and load_checkpoint(tmp_path / "a.pt").epoch == 1


def test_weights_that_do_not_fit_name_the_missing_extra_and_resized_entries(tmp_path):
    """Not just torch's first line ("Error(s) in loading state_dict for ..."): what differs."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "2.weight": torch.zeros(2, 3)}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(model, tmp_path / "w.pt")
    message = str(err.value)
    assert "missing 2: 1.weight, 1.bias" in message and "unexpected 1: 2.weight" in message
    assert "0.weight (5, 4) (the model: (3, 4))" in message and "\n" not in message
