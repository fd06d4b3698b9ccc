import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from keepbits.cli import main
from keepbits.data import sample_mnist_path
from keepbits.errors import CheckpointError, InputError
from keepbits.training.checkpoint import Normalization, load_checkpoint, save_checkpoint
from keepbits.training.classifier import ClassifierConfig, load_classifier, train_classifier


def _cfg(tmp_path, **kw):
    base = dict(data=str(sample_mnist_path()), arch="lenet5", out=str(tmp_path / "run"), epochs=2, optimizer="adamw",
                max_train=800, progress=False, threads=2)
    base.update(kw)
    return ClassifierConfig(**base)


def test_trains_above_chance_and_records_everything(tmp_path):
    summary = train_classifier(_cfg(tmp_path))
    assert summary["history"][-1]["test_accuracy"] > 0.6  # 10 classes: chance is 0.1
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt", "classifier")
    assert ckpt.models["classifier"].arch == "lenet5"
    assert ckpt.input_shape == [1, 28, 28] and len(ckpt.class_names) == 10
    assert ckpt.normalization.mean[0] == pytest.approx(0.13, abs=0.02)
    assert ckpt.metrics["history"][0]["epoch"] == 1 and ckpt.optimizer is not None
    assert ckpt.preprocessing == {}  # an .npz: no resize
    model, _ = load_classifier(tmp_path / "run" / "best.pt", expected_arch="lenet5")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_max_train_is_a_class_balanced_sample_of_class_sorted_data(tmp_path):
    from keepbits.training.classifier import _prepare_data

    labels = np.repeat(np.arange(4), 50)  # stored sorted by class: the first 40 would all be class 0
    np.savez(tmp_path / "sorted.npz", x=np.zeros((200, 8, 8, 1), np.uint8), y=labels)
    train, val, _ = _prepare_data(_cfg(tmp_path, data=str(tmp_path / "sorted.npz"), max_train=40, val_fraction=0.2))
    assert np.bincount(train.y, minlength=4).tolist() == [10, 10, 10, 10] and len(val) == 40


def test_best_is_selected_on_the_validation_split_never_on_test(tmp_path, monkeypatch):
    """Per-epoch scores are faked so validation and test disagree: best.pt must follow validation;
    without a validation split nothing is selected (no best.pt), however good test looks."""
    import keepbits.training.classifier as classifier

    fake = {"val": iter([0.2, 0.9, 0.5]), "test": iter([0.95, 0.1, 0.3])}
    monkeypatch.setattr(classifier, "evaluate", lambda model, data, **kw: {"accuracy": next(fake["test" if len(data) == 500 else "val"]), "loss": 0.0})
    summary = train_classifier(_cfg(tmp_path, epochs=3, max_train=64, val_fraction=0.2))
    assert summary["best"]["epoch"] == 2 and summary["best"]["selected_by"] == "val_accuracy"
    assert summary["best"]["val_accuracy"] == 0.9 and summary["best"]["test_accuracy"] == 0.1  # test is recorded, not used
    assert load_checkpoint(tmp_path / "run" / "best.pt", "classifier").epoch == 1

    fake["test"] = iter([0.95, 0.1])
    summary = train_classifier(_cfg(tmp_path, out=str(tmp_path / "noval"), epochs=2, max_train=64, val_fraction=0.0))
    assert summary["best"] is None and summary["checkpoints"]["best"] is None
    assert not (tmp_path / "noval" / "best.pt").exists() and (tmp_path / "noval" / "last.pt").exists()
    assert [h["test_accuracy"] for h in summary["history"]] == [0.95, 0.1]


def test_validation_split_is_stratified_on_class_sorted_data(tmp_path):
    from keepbits.training.classifier import _prepare_data

    labels = np.repeat(np.arange(4), [80, 40, 40, 40])  # stored sorted by class
    np.savez(tmp_path / "sorted.npz", x=np.zeros((200, 8, 8, 1), np.uint8), y=labels)
    train, val, _ = _prepare_data(_cfg(tmp_path, data=str(tmp_path / "sorted.npz"), max_train=None, val_fraction=0.25))
    assert np.bincount(val.y, minlength=4).tolist() == [20, 10, 10, 10] and len(train) == 150


def test_resume_continues_where_it_stopped(tmp_path):
    train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    last = tmp_path / "run" / "last.pt"
    first = load_checkpoint(last, "classifier")  # as if the first process had run for 1,000 s
    history = [{**first.metrics["history"][0], "elapsed_s": 1000.0}]
    save_checkpoint(last, dataclasses.replace(first, metrics={**first.metrics, "history": history}))
    summary = train_classifier(_cfg(tmp_path, epochs=2, resume=True, max_train=64))
    assert summary["epochs_run"] == 1 and [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][1]["elapsed_s"] >= 1000.0  # the clock goes on from the first process's (it restarted at 0)
    # resuming the finished run: nothing to train, and its checkpoints are left as they are (they were rewritten, exit 0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")}
    with pytest.raises(InputError, match="has run 2 of 2 epochs already: nothing to do; give more --epochs"):
        train_classifier(_cfg(tmp_path, epochs=2, resume=True, max_train=64))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")} == before


def test_resume_refuses_a_changed_recipe_but_not_more_epochs(tmp_path):
    """Resuming with another learning rate or sample would silently mix two runs in one
    checkpoint: refused, naming what changed; more epochs (run control) is a resume."""
    train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    with pytest.raises(CheckpointError, match=r"cannot resume.*lr: 0\.001 then, 0\.5 now.*max_train: 64 then, 32 now"):
        train_classifier(_cfg(tmp_path, epochs=2, resume=True, max_train=32, lr=0.5))
    # the default lr named explicitly and the data path spelled another way are the same recipe (both were refused)
    again = _cfg(tmp_path, epochs=2, resume=True, max_train=64, lr=1e-3,
                 data=os.path.relpath(sample_mnist_path().parent / "." / sample_mnist_path().name))  # relative now, absolute then
    assert train_classifier(again)["epochs_run"] == 1
    last = tmp_path / "run" / "last.pt"
    two_ranks = load_checkpoint(last, "classifier")  # as written under torchrun with 2 processes: --batch-size was per process
    save_checkpoint(tmp_path / "ranks" / "last.pt", dataclasses.replace(two_ranks, settings={**two_ranks.settings, "world_size": 2}))
    with pytest.raises(CheckpointError, match="world_size: 2 then, 1 now"):
        train_classifier(_cfg(tmp_path, out=str(tmp_path / "ranks"), epochs=3, resume=True, max_train=64))
    save_checkpoint(last, dataclasses.replace(load_checkpoint(last, "classifier"), metrics={"history": "lost"}))  # a damaged record
    with pytest.raises(CheckpointError, match="must hold the run's history"):
        train_classifier(_cfg(tmp_path, epochs=3, resume=True, max_train=64))


def test_resume_from_another_working_folder(tmp_path, monkeypatch):
    """Paths are recorded absolute: the same data and output folder named relative to another
    working folder resume the run (the relative data path was refused as another recipe)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.npz").write_bytes(sample_mnist_path().read_bytes())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    train_classifier(_cfg(tmp_path, out="run", data="data/mnist.npz", epochs=1, max_train=64))
    assert load_checkpoint(tmp_path / "run" / "last.pt", "classifier").settings["data"] == str(tmp_path / "data" / "mnist.npz")
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = _cfg(tmp_path, out="../run", data="../data/mnist.npz", epochs=2, resume=True, max_train=64)
    assert train_classifier(resumed)["epochs_run"] == 1


def test_precision_auto_is_float32_on_the_cpu_and_bf16_needs_cuda(tmp_path):
    summary = train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    with pytest.raises(InputError, match="bf16 needs CUDA"):
        train_classifier(_cfg(tmp_path, out=str(tmp_path / "bf16"), precision="bf16", device="cpu"))
    assert not (tmp_path / "bf16").exists()  # refused before any work


def test_resume_without_a_last_checkpoint_says_it_starts_afresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        summary = train_classifier(_cfg(tmp_path, out=str(tmp_path / "typo"), epochs=1, max_train=64, resume=True))
    assert summary["epochs_run"] == 1 and "nothing to resume from; starting a new run" in caplog.text


def test_resume_refuses_another_arch(tmp_path):
    train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    with pytest.raises(CheckpointError, match="cannot resume.*arch: 'lenet5' then, 'resnet20' now"):
        train_classifier(_cfg(tmp_path, arch="resnet20", resume=True))


def test_init_starts_from_another_checkpoints_weights_and_normalisation(tmp_path):
    train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    first = load_checkpoint(tmp_path / "run" / "last.pt", "classifier")
    save_checkpoint(tmp_path / "init.pt", dataclasses.replace(first, normalization=Normalization([0.5], [0.25])))
    # lr 0: the weights stay what --init gave, so they must equal the init checkpoint's
    train_classifier(_cfg(tmp_path, out=str(tmp_path / "second"), epochs=1, max_train=64, lr=0.0, init=str(tmp_path / "init.pt")))
    second = load_checkpoint(tmp_path / "second" / "last.pt", "classifier")
    assert second.normalization == Normalization([0.5], [0.25])
    for name, tensor in first.models["classifier"].state_dict.items():
        assert torch.equal(second.models["classifier"].state_dict[name], tensor), name
    with pytest.raises(CheckpointError, match="do not fit"):
        train_classifier(_cfg(tmp_path, out=str(tmp_path / "third"), arch="resnet20", init=str(tmp_path / "init.pt")))


def test_cli_trains_and_prints_summary(tmp_path, capsys):
    code = main(["-q", "train", "classifier", "--data", str(sample_mnist_path()), "--arch", "lenet5", "--out", str(tmp_path / "c"),
                 "--epochs", "1", "--optimizer", "adamw", "--num-train-images", "300"])
    assert code == 0
    assert "best.pt" in json.loads(capsys.readouterr().out)["checkpoints"]["best"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data.npz", "--arch", "lenet5"], "data path not found"),
        (["--data", "SAMPLE", "--arch", "resnet9000"], "unknown classifier 'resnet9000'"),
        (["--data", "BAD", "--arch", "lenet5"], "label out of range"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.array([0, 1, 2, 7]), class_names=np.array(["a", "b", "c"]))
    args = [str(sample_mnist_path()) if a == "SAMPLE" else str(bad) if a == "BAD" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "keepbits", "train", "classifier", *args, "--out", str(tmp_path / "o"), "--epochs", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_resume_on_other_data_is_refused_in_one_line(tmp_path):
    train_classifier(_cfg(tmp_path, epochs=1, max_train=64))
    three = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(three, x=rng.integers(0, 255, (30, 28, 28, 1), dtype=np.uint8), y=np.arange(30) % 3)
    proc = subprocess.run([sys.executable, "-m", "keepbits", "train", "classifier", "--data", str(three), "--arch", "lenet5",
                           "--out", str(tmp_path / "run"), "--epochs", "2", "--resume"], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "three.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_image_folder_with_explicit_size_and_policy(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)).save(tmp_path / "tree" / name / f"{i}.png")
    code = main(["-q", "train", "classifier", "--data", str(tmp_path / "tree"), "--arch", "lenet5", "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--image-size", "28", "24", "--resize-policy", "letterbox", "--val-fraction", "0"])
    assert code == 0
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt", "classifier")
    assert ckpt.input_shape == [3, 28, 24] and ckpt.class_names == ["cat", "dog"]
    assert ckpt.settings["resize_policy"] == "letterbox" and ckpt.preprocessing == {"resize_policy": "letterbox"}


def test_fit_classifier_on_arrays_learns_and_honours_a_step_budget():
    """The in-memory entry point of the one trainer: float arrays, exactly ``steps`` optimizer steps."""
    from keepbits.core import accuracy
    from keepbits.training.classifier import FitConfig, fit_classifier, predict_logits
    from keepbits.training.data import TensorArrays

    rng = np.random.default_rng(0)
    y = np.arange(96) % 2
    x = rng.normal(size=(96, 1, 4, 4)).astype(np.float32) + (2 * y - 1)[:, None, None, None].astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    steps = []
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    rows = []
    cfg = FitConfig(steps=7, batch_size=32, optimizer="sgd", lr=0.1, augment="none", progress=False)
    fit_classifier(net, TensorArrays(x, y), cfg, optimizer=optimizer, after_epoch=lambda epoch, row: rows.append(row))
    assert len(steps) == 7 and [r["epoch"] for r in rows] == [1, 2, 3]  # 3 steps per epoch: 3 + 3 + 1
    assert accuracy(predict_logits(net, x), y) > 0.9
    with pytest.raises(InputError, match="augment"):
        fit_classifier(net, TensorArrays(x, y), FitConfig(augment="mirror"))
    for lr in (float("nan"), float("inf"), -1.0):  # NaN trained NaN weights without a word; -1 was the optimizer's traceback
        with pytest.raises(InputError, match="learning rate must be finite and >= 0"):
            fit_classifier(net, TensorArrays(x, y), FitConfig(lr=lr))
