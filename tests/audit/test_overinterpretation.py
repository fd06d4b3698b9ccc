"""Overinterpretation pipeline: subsets, statistics, the whole audit (models cached and resumed), CLI reports."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keepbits.audit.overinterpretation import (  # noqa: E402
    backselect_subsets, common_sis_sizes, difference_ci, mean_ci, random_subsets, sis_size_stats, split_halves, subset_overlap,
)
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
    assert stats["wrong_minus_correct"]["direction"] == "too few images"
    assert mean_ci([1.0, 1.0])["ci95"] == 0.0
    assert subset_overlap(orders, orders, 0.1)["mean"] == 1.0 and subset_overlap(orders, orders[::-1], 0.1)["mean"] == 0.0


def test_difference_ci_states_the_direction_only_when_the_interval_excludes_zero():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.05, 0.01, 200), rng.normal(0.07, 0.01, 200)
    assert difference_ci(small, large)["direction"] == "lower" and difference_ci(large, small)["direction"] == "higher"
    same = difference_ci(rng.normal(0.05, 0.01, 30), rng.normal(0.05, 0.01, 30))
    assert abs(same["difference"]) < 0.01 and (same["direction"] == "no difference") == (abs(same["difference"]) <= same["ci95"])


def test_intervals_of_few_images_use_students_t():
    """At n = 2 the normal 1.96 made the interval 6.5× too narrow (t₀.₉₇₅ with 1 degree of freedom is 12.71)."""
    two = mean_ci([0.0, 1.0])
    assert two["ci95"] == pytest.approx(12.7062 * np.std([0.0, 1.0], ddof=1) / np.sqrt(2), rel=1e-4)
    nine = mean_ci(np.arange(9.0))
    assert nine["ci95"] == pytest.approx(2.3060 * np.std(np.arange(9.0), ddof=1) / 3, rel=1e-4)
    # Welch with equal variances and sizes: 2n − 2 degrees of freedom (t₀.₉₇₅ of 4 is 2.7764)
    welch = difference_ci([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert welch["ci95"] == pytest.approx(2.7764 * np.sqrt(2 / 3), rel=1e-4) and welch["direction"] == "no difference"


def _order(target, f_at_sizes, pixels=10):
    """A BackSelectResult whose SIS at τ is the smallest size whose f (``f_at_sizes[size]``) reaches τ."""
    scores = np.array([f_at_sizes.get(pixels - i, 0.0) for i in range(pixels + 1)])
    return BackSelectResult(np.arange(pixels), scores, target, (1, pixels))


def test_common_sis_sizes_compare_models_on_the_same_confident_images():
    # model a: confident on images 0 and 1 (SIS 2 and 4 pixels); model b: only on image 1 (SIS 6 pixels)
    a = [_order(0, {10: 0.95, 2: 0.95}), _order(1, {10: 0.95, 4: 0.95}), _order(0, {10: 0.5})]
    b = [_order(0, {10: 0.7}), _order(1, {10: 0.95, 6: 0.95}), _order(1, {10: 0.99, 1: 0.99})]
    row = common_sis_sizes({"a": a, "b": b}, np.array([0, 0, 1]), [0.9], reference="a")[0]
    assert row["common_images"] == 1  # image 1 alone: image 0 is below τ for b, image 2 for a
    assert row["models"]["a"]["size"]["mean"] == pytest.approx(0.4) and row["models"]["b"]["size"]["mean"] == pytest.approx(0.6)
    assert row["models"]["b"]["minus_a"]["mean"] == pytest.approx(0.2) and row["models"]["a"]["accuracy_on_common"]["mean"] == 0.0


def test_split_halves_are_disjoint_stratified_and_sampled():
    labels = np.repeat(np.arange(4), 50)  # class-sorted
    audit, retrain = split_halves(labels, 40, 20, seed=1)
    assert not set(audit) & set(retrain)
    assert np.bincount(labels[audit]).tolist() == [10] * 4 and np.bincount(labels[retrain]).tolist() == [5] * 4
    full_audit, full_retrain = split_halves(labels, None, None, seed=1)
    assert len(full_audit) == len(full_retrain) == 100 and set(audit) <= set(full_audit) and set(retrain) <= set(full_retrain)


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
    # traceable: which images (their indices in the data set: a seeded class-balanced draw) and how the audit ran
    from keepbits.data.images import load_images

    drawn = load_images(sample_mnist_path(), split="test", num_images=3, seed=0)
    assert [r["name"] for r in data["images"]] == drawn.names
    meta = json.loads((tmp_path / "r" / "report.json").read_text())["meta"]
    assert meta["data"] == str(sample_mnist_path()) and meta["seed"] == 0 and meta["command"].startswith("keepbits")
    assert main(["-q", "audit", "sis", "--model", str(tmp_path / "missing.pt"), "--data", str(sample_mnist_path()), "--out", str(tmp_path)]) == 2


def test_pipeline_end_to_end_tiny(tmp_path):
    from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
    from keepbits.data import sample_mnist_path
    from keepbits.training.checkpoint import load_checkpoint

    cfg = OverinterpretationConfig(str(sample_mnist_path()), str(tmp_path), arch="lenet5", epochs=1, audit_images=48, train_images=32,
                                   test_images=16, k=196, ensemble=2, dropout_samples=2, exact_images=0, batch_size=16, progress=False)
    result = run_overinterpretation(cfg)
    assert set(result["accuracy"]) >= {"original_full", "original_backselect", "original_random", "retrained_backselect", "retrained_random",
                                       "control_full", "single_full", "ensemble_full", "input_dropout_full"}
    assert result["kept_pixels"] == 40 and len(result["sis_sizes"]["ensemble"]) == 5 and result["retraining_images_unseen_by_audited_model"]
    assert len(result["mitigations_common_images"]) == 5 and set(result["mitigations_common_images"][0]["models"]) == {"single", "ensemble", "input_dropout"}
    models = tmp_path / "models"
    assert (tmp_path / "report.html").exists() and (models / "input_dropout.pt").exists() and (models / "control_full.pt").exists()
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (tmp_path / "report.html").read_text())
    assert "nan" not in page.lower() and "1 epoch," in page and ": no data" not in page  # undefined statistics show a dash
    assert "lenet5 (replicates, ensemble, input dropout, retrained and control)" in page and "32 unseen images" in page
    full, half = result["accuracy"]["original_full"], result["accuracy_ci95"]["original_full"]
    assert ("the audited model is not above chance" in page) == (full - half <= 1 / result["classes"])  # a 1-epoch model may be
    # one recipe per role: replicates alike (audit half, flips allowed), retraining without augmentation on the other half
    rep = [load_checkpoint(models / f"replicate_{i}.pt").settings["recipe"] for i in range(2)]
    assert rep[0]["images"] == rep[1]["images"] == 48 and rep[0]["epochs"] == rep[1]["epochs"] and rep[0]["seed"] != rep[1]["seed"]
    assert rep[0]["data_sha256"] == rep[1]["data_sha256"] and rep[0]["arch"] == "lenet5"
    for name in ("retrained_backselect", "retrained_random", "control_full"):
        settings = load_checkpoint(models / f"{name}.pt").settings["recipe"]
        assert settings["augment"] == "none" and settings["images"] == 32
    stamps = {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    again = run_overinterpretation(cfg)  # resumes: models and orders are reused
    assert again["accuracy"] == result["accuracy"] and {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")} == stamps
    # another recipe in the same folder: models trained by the old one are not reused
    other = run_overinterpretation(replace(cfg, lr=cfg.lr / 2))
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in models.glob("*.pt"))
    assert load_checkpoint(models / "replicate_0.pt").settings["recipe"]["lr"] == cfg.lr / 2 and other["kept_pixels"] == 40


def test_exact_backselect_sample_is_compared_with_the_gradient_orders(tmp_path, monkeypatch):
    """A linear two-class model: masking a pixel changes the logit margin by its own contribution,
    so exact and gradient BackSelect mask pixels in the same order (same subsets), and the
    gradient SIS, a whole number of k-pixel iterations, is never smaller than the exact one."""
    import keepbits.registry as registry
    from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation

    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    x = (rng.integers(0, 80, (80, 6, 6, 1)) + 120 * y[:, None, None, None]).astype(np.uint8)
    np.savez(tmp_path / "train.npz", x=x[:60], y=y[:60])
    np.savez(tmp_path / "test.npz", x=x[60:], y=y[60:])
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # the test's model leaves the registry as it was
    registry.register("_tiny_linear", "classifier")(
        lambda in_channels=1, num_classes=2, image_size=(6, 6): torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36 * in_channels, num_classes)))
    cfg = OverinterpretationConfig(str(tmp_path), str(tmp_path / "out"), arch="_tiny_linear", epochs=2, k=6, ensemble=2, dropout_samples=1,
                                   test_images=10, exact_images=4, fraction=0.25, thresholds=[0.6, 0.8], batch_size=8, progress=False)
    e = run_overinterpretation(cfg)["exact_vs_gradient"]
    assert e["images"] == 4 and e["gradient_size_step"] == pytest.approx(6 / 36) and e["seconds_per_image_exact"] > 0
    assert e["subset_overlap"]["mean"] == pytest.approx(1.0)
    for exact, gradient in zip(e["sis_sizes"]["exact"], e["sis_sizes"]["gradient"]):
        assert exact["images_at_threshold"] == gradient["images_at_threshold"]
        if exact["images_at_threshold"]:
            assert gradient["size"]["mean"] >= exact["size"]["mean"] - 1e-9


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, "k and epochs must be >= 1"), ({"retrain_epochs": 0}, "retrain_epochs=0"), ({"exact_images": -1}, "exact_images=-1"),
    ({"thresholds": [0.5, 2.0]}, "thresholds must be in (0, 1]"), ({"thresholds": []}, "thresholds must be in (0, 1]"),
    ({"audit_images": 0}, "image counts must be >= 1"),
])
def test_settings_out_of_range_are_refused_before_any_training(tmp_path, change, message):
    from keepbits.audit.overinterpretation import OverinterpretationConfig, run_overinterpretation
    from keepbits.errors import InputError

    cfg = replace(OverinterpretationConfig(str(tmp_path / "no-data"), str(tmp_path / "out"), arch="lenet5", progress=False), **change)
    with pytest.raises(InputError, match=re.escape(message)):  # before the data is even read (the path does not exist)
        run_overinterpretation(cfg)
    assert not (tmp_path / "out").exists()
