"""NICE runs: --resume continues a run exactly, 2 torchrun CPU ranks (gloo) match one process
with twice the batch, predicted labels, footage (nested folders, video frames, .npz) streamed
by worker processes with corrupt files counted, --device, and CUDA (fp32, bf16) where there is one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from keepbits.cli import main
from keepbits.data import Preprocessing, load_dataset
from keepbits.errors import CheckpointError, InputError
from keepbits.training.byo import Classifier
from keepbits.training.checkpoint import load_checkpoint
from keepbits.training.data import TensorImages
from keepbits.training.nice import NiceConfig, evaluate_nice, load_nice, train_nice

#: A generator without batch norm (per-rank batch statistics would differ from one process's) and
#: a small colour classifier, importable by torchrun's processes as ``tinynets:...``.
TINY_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def generator(in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def classifier(num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(32, num_classes))
""")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tinynets(plugin_module):
    return plugin_module("tinynets", TINY_MODULE)


def _base(tiny_npz, tmp_path, **overrides):
    base = dict(out=str(tmp_path / "nice"), classifier="tinynets:classifier", data=str(tiny_npz), generator="tinynets:generator",
                preprocessing={"input_size": (16, 16), "resize_policy": "resize"}, block_size=4, epochs=2, batch_size=8,
                lr=0.02, target_fraction=0.3, labels="predicted", progress=False, device="cpu")
    return NiceConfig(**{**base, **overrides})


def _weights(path):
    return load_checkpoint(path).models["generator"].state_dict


def test_resume_continues_the_run_exactly(tiny_npz, tmp_path, tinynets):
    straight = train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "a")))
    train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "b"), epochs=1))
    resumed = train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "b"), epochs=2, resume=True))
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert resumed["lambda_l0_final"] == pytest.approx(straight["lambda_l0_final"], abs=1e-6)
    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert load_checkpoint(tmp_path / "b" / "last.pt").optimizer is not None
    with pytest.raises(CheckpointError, match="cannot resume.*block_size: 4 then, 2 now"):
        train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "b"), epochs=3, block_size=2, resume=True))


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process(tiny_npz, tmp_path, tinynets, free_port):
    single = train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "one"), batch_size=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port), "-m", "keepbits",
           "-q", "train", "nice", "--classifier", "tinynets:classifier", "--image-size", "16", "16", "--resize-policy", "resize",
           "--data", str(tiny_npz), "--generator", "tinynets:generator", "--block-size", "4", "--epochs", "2", "--batch-size", "4",
           "--lr", "0.02", "--target-fraction", "0.3", "--labels", "predicted", "--device", "cpu", "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "two" / "nice.pt", "nice")
    assert ckpt.settings["world_size"] == 2
    assert ckpt.settings["lambda_l0_final"] == pytest.approx(single["lambda_l0_final"], abs=1e-5)
    a, b = _weights(single["checkpoint"]), ckpt.models["generator"].state_dict
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_predicted_labels_are_the_classifiers_own_decisions(tiny_npz, tmp_path, tinynets):
    """With predicted labels the sampled-gate score is agreement with the classifier (and is named so), not accuracy
    on the data's labels: an untrained classifier's decisions are easy to keep, the data's labels are not."""
    common = dict(epochs=1, target_fraction=None, lambda_l0=0.0)
    predicted = train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "p"), **common))
    true = train_nice(_base(tiny_npz, tmp_path, out=str(tmp_path / "t"), labels="true", **common))
    assert load_checkpoint(predicted["checkpoint"]).settings["labels"] == "predicted"
    assert predicted["history"][-1]["train_agreement_sampled"] > 0.9 and "train_accuracy_sampled" not in predicted["history"][-1]
    assert true["history"][-1]["train_accuracy_sampled"] < 0.7
    assert predicted["final"]["agreement"] > 0.9 and "accuracy" in predicted["final"]


def _footage(root):
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = root / "site" / f"cam{i % 2}" / f"day{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (root / "site" / "cam0" / "broken.png").write_bytes(b"\x89PNG truncated")
    writer = cv2.VideoWriter(str(root / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 24))
    for i in range(9):
        writer.write(np.full((24, 32, 3), 20 * i, np.uint8))
    writer.release()
    np.savez(root / "more.npz", x=rng.integers(0, 255, (5, 18, 18, 3), dtype=np.uint8))
    return root


def test_footage_with_workers_feeds_nice_and_counts_corrupt_files(tmp_path, tinynets):
    root = _footage(tmp_path / "footage")
    cfg = NiceConfig(out=str(tmp_path / "nice"), classifier="tinynets:classifier", footage=[str(root)], frame_step=3, workers=2,
                     preprocessing={"input_size": (16, 16), "resize_policy": "center-crop"}, generator="tinynets:generator",
                     block_size=4, epochs=1, batch_size=4, lr=0.02, progress=False, device="cpu")
    summary = train_nice(cfg)
    # 6 pictures + 3 of 9 frames + 5 npz images per pass, the broken file skipped and counted (in the workers);
    # the counts are the training passes': the final evaluation (no --val-footage) reads whole frames, not the
    # training stream's random crops (it reported their agreement), from a reader of its own
    assert summary["history"][-1]["train_images"] == 14
    assert summary["footage"] == {"files": {"images": 7, "videos": 1, "npz": 1}, "read": {"images": 11, "frames": 3, "skipped": 1}}
    assert summary["final_split"] == "train" and summary["final"]["images"] == 14
    ckpt = load_checkpoint(summary["checkpoint"], "nice")
    assert ckpt.settings["labels"] == "predicted"  # auto: unlabelled footage
    assert ckpt.preprocessing_record().resize_policy == "center-crop"
    with pytest.raises(InputError, match="unlabelled"):
        train_nice(NiceConfig(**{**cfg.__dict__, "labels": "true", "out": str(tmp_path / "x")}))
    with pytest.raises(InputError, match="1 file.* of the validation footage are training footage too .*held out"):  # leakage
        train_nice(NiceConfig(**{**cfg.__dict__, "val_footage": [str(root / "clip.mp4")], "out": str(tmp_path / "y")}))
    # resumed for a second epoch: the counts go on from the first process's (2 training passes)
    resumed = train_nice(NiceConfig(**{**cfg.__dict__, "epochs": 2, "resume": True}))
    assert resumed["footage"]["read"] == {"images": 22, "frames": 6, "skipped": 2}


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3])
def test_a_learning_rate_that_cannot_train_is_refused_before_training(tiny_npz, tmp_path, lr):
    with pytest.raises(InputError, match="learning rate must be finite and >= 0"):
        _base(tiny_npz, tmp_path, lr=lr).validate()


def test_footage_where_nothing_can_be_read_is_an_error_not_a_checkpoint(tmp_path, tinynets):
    """Every file unreadable: no epoch trains on nothing, no checkpoint with made-up metrics."""
    root = tmp_path / "bad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "clip.mp4").write_bytes(b"not a video either")
    cfg = NiceConfig(out=str(tmp_path / "nice"), classifier="tinynets:classifier", footage=[str(root)], workers=0,
                     preprocessing={"input_size": (16, 16)}, generator="tinynets:generator", block_size=4, epochs=1,
                     batch_size=4, progress=False, device="cpu")
    with pytest.raises(InputError, match=r"read no training image from 2 footage files .*2 files skipped as unreadable"):
        train_nice(cfg)
    assert not (tmp_path / "nice" / "nice.pt").exists()


def test_nn_module_and_preprocessing_in_python(tiny_npz, tmp_path, tinynets):
    import tinynets

    pre = Preprocessing((16, 16), mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3), resize_policy="resize", class_names=("a", "b", "c"))
    clf = Classifier.of(tinynets.classifier(), pre, arch="tinynets:classifier")
    summary = train_nice(_base(tiny_npz, tmp_path, classifier="", preprocessing={}, epochs=1), classifier=clf)
    gen, classifier, ckpt = load_nice(summary["checkpoint"])
    assert ckpt.models["classifier"].arch == "tinynets:classifier" and ckpt.class_names == ["a", "b", "c"]
    assert ckpt.preprocessing_record() == pre
    with pytest.raises(InputError, match="preprocessing"):
        train_nice(_base(tiny_npz, tmp_path, classifier="", preprocessing={}, overwrite=True), classifier=tinynets.classifier())


def test_unimportable_factory_in_a_checkpoint_is_one_line_exit_2(tiny_npz, tmp_path, tinynets, capsys, monkeypatch):
    summary = train_nice(_base(tiny_npz, tmp_path, epochs=1))
    (tinynets / "tinynets.py").unlink()
    monkeypatch.delitem(sys.modules, "tinynets")
    capsys.readouterr()
    code = main(["export", "onnx", "--model", summary["checkpoint"], "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot import 'tinynets'" in err[0], err


def test_device_cpu_is_recorded_and_cuda_without_gpu_is_refused(tiny_npz, tmp_path, tinynets):
    summary = train_nice(_base(tiny_npz, tmp_path, epochs=1))
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    before = (tmp_path / "nice" / "nice.pt").read_bytes()
    with pytest.raises(InputError, match="left by an earlier run; --resume continues it, --force replaces it"):
        train_nice(_base(tiny_npz, tmp_path, epochs=1))  # a new run into the same folder: refused, the first kept
    assert (tmp_path / "nice" / "nice.pt").read_bytes() == before
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            train_nice(_base(tiny_npz, tmp_path, device="cuda", overwrite=True))
    with pytest.raises(InputError, match="bf16 needs CUDA"):
        train_nice(_base(tiny_npz, tmp_path, precision="bf16", overwrite=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_training_reloads_on_the_cpu_with_the_same_metrics(tiny_npz, tmp_path, tinynets, precision):
    summary = train_nice(_base(tiny_npz, tmp_path, device="cuda", precision=precision, epochs=3))
    assert summary["device"].startswith("cuda") and summary["precision"] == precision
    gen, classifier, ckpt = load_nice(summary["checkpoint"])
    data = TensorImages(load_dataset(tiny_npz), ckpt.normalization.mean, ckpt.normalization.std)
    final = evaluate_nice(gen, classifier, data, 4)
    assert final["kept_fraction"] == pytest.approx(summary["final"]["kept_fraction"], abs=0.02)
    assert final["agreement"] == pytest.approx(summary["final"]["agreement"], abs=0.05)
    assert all(np.isfinite(row["train_loss"]) for row in summary["history"])
    json.dumps(summary)  # the CLI prints it
