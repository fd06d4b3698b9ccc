"""``keepbits.audit.sis_report``: images below every τ skip BackSelect and the report stays the same."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keepbits.audit import sis_report  # noqa: E402


def _model_and_images():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).eval()
    with torch.no_grad():
        net[3].weight.mul_(150.0)  # confidences from 1/3 to ~0.96 on these images
    images = np.random.default_rng(5).integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    return net, images


def test_images_below_every_threshold_skip_backselect_and_the_report_is_unchanged(tmp_path, monkeypatch):
    net, images = _model_and_images()
    labels = np.arange(8) % 3
    taus = (0.6, 0.8)
    kwargs = dict(threshold=0.8, thresholds=taus, method="plain", input_shape=(1, 6, 6), progress=False)
    skipping = sis_report.sis_audit(net, images, labels, tmp_path / "skip", **kwargs)
    runs = skipping["summary"]["backselect_runs"]
    assert 0 < runs < len(images), "the fixture must hold images on both sides of the smallest τ"
    stored = [r for p in sorted((tmp_path / "skip" / "orders").glob("chunk_*.json")) for r in json.loads(p.read_text())["results"]]
    assert len(stored) == runs == sum(r["backselect"] for r in skipping["images"])

    monkeypatch.setattr(sis_report, "CONFIDENCE_SLACK", float("inf"))  # every image BackSelected, as before the skip
    every = sis_report.sis_audit(net, images, labels, tmp_path / "every", **kwargs)
    assert every["summary"]["backselect_runs"] == len(images)
    for a, b in zip(skipping["images"], every["images"]):
        if not a["backselect"]:
            assert all(v is None for v in b["sis_size"].values()) and a["confidence"] < taus[0]
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
        for key in ("label", "predicted", "correct", "sis_size", "sis"):
            assert a[key] == b[key], key
    assert json.dumps(skipping["size_stats"]) == json.dumps(every["size_stats"])  # NaN-safe
    assert np.array_equal(skipping["heatmap"], every["heatmap"])
    for key in ("images", "below_threshold", "threshold", "method", "accuracy", "sis_size_mean", "sis_size_ci95"):
        assert skipping["summary"][key] == every["summary"][key], key
    reached = [r["sis_size"][str(kwargs["threshold"])] for r in skipping["images"] if r["sis_size"][str(kwargs["threshold"])] is not None]
    if reached:  # the headline size: the mean fraction of pixels over the images reaching τ
        assert skipping["summary"]["sis_size_mean"] == pytest.approx(np.mean(reached) / images[0].size)


def test_an_audit_whose_images_are_all_below_tau_runs_no_backselect(tmp_path):
    net, images = _model_and_images()
    names = ["ant", "bee", "cat"]
    data = sis_report.sis_audit(net, images, None, tmp_path / "r", threshold=0.999, thresholds=(0.999,), method="plain",
                                input_shape=(1, 6, 6), class_names=names, progress=False)
    assert data["summary"]["backselect_runs"] == 0 and data["summary"]["below_threshold"] == len(images)
    assert data["summary"]["method"].startswith("none") and not np.any(data["heatmap"])
    assert data["summary"]["sis_size_mean"] is None and json.dumps(data["summary"], allow_nan=False)  # no NaN in the JSON
    page = (tmp_path / "r" / "report.html").read_text()
    assert "No image reaches τ = 0.999: no SIS to locate." in page and "SIS location frequency" not in page
    assert ">nan<" not in page and ">None<" not in page and "<td>–</td>" in page  # means over no image: a dash
    predicted = data["images"][0]["predicted"]
    assert f"<td>{predicted} {names[predicted]}</td>" in page  # classes by index and name


AUDIT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from test_sis_report import _model_and_images
from keepbits.audit.sis_report import sis_audit

net, images = _model_and_images()
sis_audit(net, images, np.arange(8) % 3, sys.argv[1], threshold=0.8, thresholds=(0.6, 0.8), method="plain",
          input_shape=(1, 6, 6), progress=False)
"""


@pytest.mark.slow
def test_two_torchrun_processes_write_the_single_process_report(tmp_path, free_port):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "audit_script.py"
    script.write_text(AUDIT_SCRIPT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                    str(script), str(tmp_path / "multi"), str(Path(__file__).parent)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    net, images = _model_and_images()
    single = sis_report.sis_audit(net, images, np.arange(8) % 3, tmp_path / "single", threshold=0.8, thresholds=(0.6, 0.8),
                                  method="plain", input_shape=(1, 6, 6), progress=False)
    multi = json.loads((tmp_path / "multi" / "report.json").read_text())["data"]
    assert 0 < multi["summary"]["backselect_runs"] == single["summary"]["backselect_runs"] < len(images)
    assert [r["sis"] for r in multi["images"]] == [r["sis"] for r in single["images"]]
    assert [(s["images_at_threshold"], s["size"]["mean"]) for s in multi["size_stats"]] == \
        [(s["images_at_threshold"], s["size"]["mean"]) for s in single["size_stats"]]


def test_a_partial_report_covers_the_finished_runs_and_counts_the_rest(tmp_path):
    """``partial=True`` computes nothing: the rows of finished runs are those of the complete
    audit, images still waiting are counted (overall and per class), and report.html stays."""
    net, images = _model_and_images()
    labels = np.arange(8) % 3
    kwargs = dict(threshold=0.6, thresholds=(0.6,), method="plain", input_shape=(1, 6, 6), progress=False)
    out = tmp_path / "audit"
    with pytest.raises(sis_report.InputError, match="no audit to report on"):
        sis_report.sis_audit(net, images, labels, out, partial=True, **kwargs)
    full = sis_report.sis_audit(net, images, labels, out, **kwargs)
    chunks = sorted((out / "orders").glob("chunk_*.json"))
    assert len(chunks) >= 3, "the fixture must need several BackSelect runs"
    for path in chunks[::2]:
        path.unlink()
    finished = len(chunks) - len(chunks[::2])
    stamp = (out / "report.html").stat().st_mtime_ns
    part = sis_report.sis_audit(net, images, labels, out, partial=True, **kwargs)
    assert not list((out / "orders").glob("chunk_*.json"))[finished:], "a partial report must compute no run"
    assert (out / "report.html").stat().st_mtime_ns == stamp and (out / "report_partial.json").exists()
    summary = part["summary"]
    assert (summary["backselect_runs"], summary["backselect_runs_done"]) == (full["summary"]["backselect_runs"], finished)
    assert summary["below_threshold"] == full["summary"]["below_threshold"] and summary["accuracy"] == full["summary"]["accuracy"]
    pending = [r for r in part["images"] if r["pending"]]
    assert len(pending) == len(chunks) - finished and all(r["sis"] is None for r in pending)
    for a, b in zip(part["images"], full["images"]):
        if not a["pending"]:
            assert (a["sis"], a["sis_size"], a["predicted"]) == (b["sis"], b["sis_size"], b["predicted"])
    assert part["size_stats"][0]["images"] == finished
    page = (out / "report_partial.html").read_text()
    assert "SIS audit (partial)" in page and f"{finished} of {len(chunks)} BackSelect runs finished" in page


def test_a_partial_report_with_other_arguments_says_so(tmp_path, caplog):
    """Chunks on disk, none of them this audit's (another --method here): a warning says the
    arguments differ, instead of a report that just reads "none finished yet"."""
    net, images = _model_and_images()
    kwargs = dict(threshold=0.6, thresholds=(0.6,), input_shape=(1, 6, 6), progress=False)
    sis_report.sis_audit(net, images, None, tmp_path, method="plain", **kwargs)
    with caplog.at_level("WARNING", logger="keepbits"):
        part = sis_report.sis_audit(net, images, None, tmp_path, method="gradient", k=4, partial=True, **kwargs)
    assert part["summary"]["backselect_runs_done"] == 0
    assert any("none made with these arguments" in r.getMessage() for r in caplog.records)
