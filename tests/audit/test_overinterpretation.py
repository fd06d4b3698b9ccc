"""Overinterpretation pipeline: subsets, statistics, the whole audit (models cached and resumed), CLI reports."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keepbits.audit.overinterpretation import backselect_subsets, mean_ci, random_subsets, sis_size_stats  # noqa: E402
from keepbits.audit.sis import BackSelectResult  # noqa: E402


def test_subsets_and_stats():
    x = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4) + 1
    orders = [BackSelectResult(np.arange(12), np.linspace(1, 0, 13), 0, (3, 4)),
              BackSelectResult(np.arange(12)[::-1].copy(), np.linspace(1, 0, 13), 1, (3, 4))]
    kept = backselect_subsets(x, orders, 0.1)  # ceil(1.2) = 2 pixels: the last two of each order
    assert np.flatnonzero(kept[0].ravel()).tolist() == [10, 11] and np.flatnonzero(kept[1].ravel()).tolist() == [0, 1]
    r1, r2 = random_subsets(x, 0.25, seed=3), random_subsets(x[:1], 0.25, seed=3)
    assert np.array_equal(r1[:1], r2) and (r1.reshape(2, -1) != 0).sum(1).tolist() == [3, 3]
    stats = sis_size_stats(orders, np.array([0, 0]), [0.5])[0]
    assert stats["images_at_threshold"] == 2 and stats["size_correct"]["n"] == 1 and stats["size_wrong"]["n"] == 1
    assert mean_ci([1.0, 1.0])["ci95"] == 0.0


def _checkpoint(path):
    from keepbits import registry
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    torch.manual_seed(0)
    net = registry.build("lenet5", in_channels=1, num_classes=10, image_size=[28, 28])
    kwargs = {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    save_checkpoint(path, Checkpoint(kind="classifier", models={"classifier": ModelEntry.of("lenet5", kwargs, net)}, input_shape=[1, 28, 28],
                                     normalization=Normalization([0.13], [0.31]), class_names=[str(i) for i in range(10)]))
    return path


def test_cli_sis_report(tmp_path):
    from keepbits.cli import main
    from keepbits.data import sample_mnist_path

    ckpt = _checkpoint(tmp_path / "m.pt")
    rc = main(["-q", "audit", "sis", "--model", str(ckpt), "--data", str(sample_mnist_path()), "--out", str(tmp_path / "r"),
               "--num-images", "3", "--method", "gradient", "--k", "98", "--threshold", "0.1", "--thresholds", "0.1", "0.2"])
    assert rc == 0
    html = (tmp_path / "r" / "report.html").read_text()
    data = json.loads((tmp_path / "r" / "report.json").read_text())["data"]
    assert "data:image/png;base64," in html and "<svg" in html and len(data["images"]) == 3
    assert data["summary"]["below_threshold"] == sum(r["sis"] is None for r in data["images"])
    assert main(["-q", "audit", "sis", "--model", str(tmp_path / "missing.pt"), "--data", str(sample_mnist_path()), "--out", str(tmp_path)]) == 2


def test_pipeline_end_to_end_tiny(tmp_path):
    from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
    from keepbits.data import sample_mnist_path

    cfg = OverinterpretationConfig(str(sample_mnist_path()), str(tmp_path), arch="lenet5", epochs=1, train_images=32, test_images=16,
                                   k=196, ensemble=2, dropout_samples=2, batch_size=16, progress=False)
    result = run_overinterpretation(cfg)
    assert set(result["accuracy"]) >= {"original_full", "original_backselect", "original_random", "retrained_backselect", "retrained_random"}
    assert result["kept_pixels"] == 40 and len(result["sis_sizes"]["ensemble"]) == 5
    assert (tmp_path / "report.html").exists() and (tmp_path / "models" / "input_dropout.pt").exists()
    again = run_overinterpretation(cfg)  # resumes: models and orders are reused
    assert again["accuracy"] == result["accuracy"]
