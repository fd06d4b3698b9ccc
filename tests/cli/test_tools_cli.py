"""keepbits info / decode / compare / eval / explain / doctor end to end: JSON on stdout, exit
codes (0 fine, 1 a finding: bad payloads, a tolerance missed, a broken install; 2 input errors,
one line), on generated data and the shipped demo bundle."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from keepbits.cli import main
from keepbits.cli.demo import DEMO_BUNDLE
from keepbits.runtime import open_source
from keepbits.runtime.sinks import open_sink
from keepbits.runtime.stream import run_stream
from keepbits.runtime.synthetic import toy_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return toy_bundle(tmp_path_factory.mktemp("b") / "toy.zip", size=32, block=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of unlabelled image files of different sizes."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.integers(0, 90 if i % 2 else 255, (int(rng.integers(24, 60)), int(rng.integers(24, 60)), 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.{'png' if i % 2 else 'jpg'}"), image)
    return folder


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else out, err


def test_info(bundle, capsys):
    code, info, _ = _run(["info", "--model", str(bundle), "--json"], capsys)
    assert code == 0 and info["verified"] and info["input"]["shape"] == [3, 32, 32]
    code, report, _ = _run(["info", "--model", str(bundle)], capsys)  # the summary: one line per topic
    lines = dict(line.split(None, 1) for line in report.splitlines() if not line.startswith(("runs with", "trained by")))
    assert code == 0 and "verified" in lines["bundle"] and lines["input"].startswith("image: 3×32×32 uint8")
    assert lines["classes"].startswith(f"{len(info['classes']['names'])}: ")
    code, _, err = _run(["info", "--model", str(bundle), "--expect-digest", "ab" * 32], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not match" in err


def test_decode_files_sink_output(bundle, tmp_path, capsys):
    from keepbits.runtime import Pipeline

    frames = [np.full((24, 32, 3), 40 + 20 * i, np.uint8) for i in range(4)]
    run_stream(Pipeline.from_bundle(bundle), open_source(frames), [open_sink(f"files:{tmp_path / 'sent'}")])
    code, summary, _ = _run(["-q", "decode", "--payloads", str(tmp_path / "sent"), "--out", str(tmp_path / "dec")], capsys)
    assert code == 0 and summary["decoded"] == 4 and summary["bad_payloads"] == 0
    assert len(list((tmp_path / "dec").glob("*_mask.png"))) == 4
    (tmp_path / "bad.kbit").write_bytes(b"nope")
    code, summary, err = _run(["decode", "--payloads", str(tmp_path / "sent" / "payloads" / "00000000.kbit"), str(tmp_path / "bad.kbit"),
                               "--out", str(tmp_path / "dec2"), "--no-masks"], capsys)
    assert code == 1 and summary["decoded"] == 1 and summary["bad_payloads"] == 1 and "1 bad payloads skipped" in err
    assert not list((tmp_path / "dec2").glob("*_mask.png"))
    code, _, err = _run(["decode", "--payloads", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not found" in err and "Traceback" not in err


def test_decode_video_notice_is_one_line(bundle, tmp_path):
    """The video falls back to mp4v with one notice line where OpenCV has no H.264 writer."""
    from keepbits.codec import encode
    from keepbits.runtime.video import h264_available

    (tmp_path / "p").mkdir()
    for i in range(3):
        (tmp_path / "p" / f"{i}.kbit").write_bytes(encode(np.full((16, 16, 3), 50 * i, np.uint8), np.ones((16, 16)), block=4, sequence=i))
    done = subprocess.run([sys.executable, "-m", "keepbits", "decode", "--payloads", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                           "--video", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "mp4v" in line]
    assert len(notices) == (0 if h264_available() else 1)
    cap = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()


def test_eval_labelled_and_unlabelled(tmp_path, photos, capsys):
    labelled = tmp_path / "labelled"  # class folders named like two of the demo bundle's ImageNet classes
    for name in ("water bottle", "tench"):
        (labelled / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(labelled / name / f"{i}.png"), np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    code, result, _ = _run(["-q", "eval", "--model", str(DEMO_BUNDLE), "--data", str(labelled), "--num-images", "4",
                            "--codecs", "png", "webp", "--qualities", "60", "--baseline-qualities", "30", "--out", str(tmp_path / "ev"),
                            "--examples", "2"], capsys)
    assert code == 0 and result["labelled"] and result["num_images"] == 4 and result["labels_matched"] == "by name"
    assert "sample 4, seed 0" in result["data"] and len(result["baselines"]) == 3
    assert [(p["mode"], p["codec"]) for p in result["payload"]] == [("blocks", "png"), ("blocks", "webp"), ("mixed", "png"), ("mixed", "webp")]
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"eval.html", "eval.json", "rate_accuracy.png"}
    assert "smallest_within" in result
    code, _, err = _run(["eval", "--model", str(DEMO_BUNDLE), "--data", str(labelled), "--num-images", "4", "--codecs", "png",
                         "--modes", "blocks", "--baselines", "png", "--out", str(tmp_path / "ev1")], capsys)
    assert code == 0 and "smallest with accuracy >= " in err and "whole frame png" in err  # the headline on stderr
    code, result, _ = _run(["-q", "eval", "--model", str(DEMO_BUNDLE), "--data", str(photos), "--codecs", "jpeg", "--qualities", "50",
                            "--modes", "mixed", "--baselines", "--out", str(tmp_path / "ev2")], capsys)
    assert code == 0 and not result["labelled"] and result["num_images"] == 5 and result["baselines"] == []
    assert [p["series"] for p in result["payload"]] == ["payload mixed jpeg t=0.5 b=4"]
    code, _, err = _run(["eval", "--model", str(DEMO_BUNDLE), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "data path not found" in err


def test_eval_and_explain_on_camera_footage_a_video_and_folders_that_are_not_classes(tmp_path, photos, capsys, caplog):
    """A camera's footage (day/camera folders, a video, a corrupt file) is unlabelled: agreement with
    the full frame; folders that merely look like class folders fall back to agreement, with a warning."""
    footage = tmp_path / "footage"
    for cam in ("cam0", "cam1"):
        (footage / "day1" / cam).mkdir(parents=True)
        for image in sorted(photos.iterdir())[:2]:
            (footage / "day1" / cam / image.name).write_bytes(image.read_bytes())
    (footage / "cut.jpg").write_bytes(b"\xff\xd8 truncated")
    writer = cv2.VideoWriter(str(footage / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(8):
        writer.write(np.full((48, 64, 3), 25 * i, np.uint8))
    writer.release()
    argv = ["--codecs", "jpeg", "--qualities", "50", "--modes", "mixed", "--baseline-qualities", "50", "--examples", "1"]
    code, result, _ = _run(["-q", "eval", "--model", str(DEMO_BUNDLE), "--data", str(footage), "--frame-step", "4", *argv,
                            "--out", str(tmp_path / "ev")], capsys)
    assert code == 0 and not result["labelled"] and result["num_images"] == 6  # 4 pictures + frames 0 and 4
    assert "4 images, 2 frames read, one video frame in 4, 1 unreadable files skipped" in result["data"]
    assert result["data_counts"] == {"images": 4, "frames": 2, "skipped": 1}
    code, result, _ = _run(["-q", "eval", "--model", str(DEMO_BUNDLE), "--data", str(footage / "day1"), *argv, "--out", str(tmp_path / "ev2")],
                           capsys)
    assert code == 0 and not result["labelled"] and result["labels_matched"].startswith("not used: the data has 2 classes ['cam0', 'cam1']")
    assert "not the model's classes" in caplog.text
    code, report, _ = _run(["-q", "explain", "--model", str(DEMO_BUNDLE), "--data", str(footage / "clip.avi"), "--frame-step", "3",
                            "--num-images", "0", "--out", str(tmp_path / "look")], capsys)
    assert code == 0 and [r["name"] for r in report["images"]] == ["clip.avi_frame0", "clip.avi_frame3", "clip.avi_frame6"]


def test_explain_one_image_and_a_folder(tmp_path, photos, capsys):
    code, report, err = _run(["explain", "--model", str(DEMO_BUNDLE), "--data", str(photos / "img0.jpg"), "--out", str(tmp_path / "one")], capsys)
    assert code == 0 and len(report["images"]) == 1 and report["images"][0]["name"] == "img0" and "img0:" in err
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"img0_overlay.png", "img0_mask.png", "img0_mixed.png", "explain.json"}
    h, w = cv2.imread(str(photos / "img0.jpg")).shape[:2]
    scale = -(-224 // min(h, w))  # small images are enlarged by a whole factor to --min-side
    assert cv2.imread(str(tmp_path / "one" / "img0_mixed.png")).shape[:2] == (h * scale, w * scale)
    # a folder holding an earlier run's pictures (its explain.json gone): they are kept, the new ones named apart
    (tmp_path / "one" / "explain.json").unlink()
    before = (tmp_path / "one" / "img0_mixed.png").read_bytes()
    code, report, _ = _run(["-q", "explain", "--model", str(DEMO_BUNDLE), "--data", str(photos / "img0.jpg"), "--out", str(tmp_path / "one")],
                           capsys)
    assert code == 0 and report["images"][0]["files"]["mixed"] == "img0-1_mixed.png"
    assert (tmp_path / "one" / "img0_mixed.png").read_bytes() == before
    code, report, _ = _run(["-q", "explain", "--model", str(DEMO_BUNDLE), "--data", str(photos), "--num-images", "3",
                            "--mode", "paper", "--out", str(tmp_path / "three")], capsys)
    assert code == 0 and len(report["images"]) == 3 and report["pipeline"]["codec"]["mode"] == "paper"


def test_compare_exit_codes(bundle, tmp_path, photos, capsys):
    code, report, err = _run(["compare", "--model", f"{DEMO_BUNDLE}@functions", "--model", str(DEMO_BUNDLE), "--data", str(photos)], capsys)
    assert code == 0 and report["passed"] and report["images"] == 5 and ": pass: logits_max_abs " in err and "argmax_agree 1 >= " in err
    assert [c["name"] for c in report["comparisons"][0]["checks"]] == ["logits_max_abs", "mask_max_abs", "argmax_agree", "mask_agree",
                                                                      "logits_non_finite", "mask_non_finite"]  # no x̃
    code, _, err = _run(["compare", "--model", f"{DEMO_BUNDLE}@functions", "--model", str(DEMO_BUNDLE), "--data", str(photos),
                         "--min-mask-agree", "1.5"], capsys)  # a share no comparison can reach
    assert code == 2 and err.strip() == ("keepbits: error: argument --min-mask-agree: must be a number >= 0 and <= 1, got '1.5'; "
                                         "see keepbits compare --help")
    crop = toy_bundle(tmp_path / "crop.zip", size=32, block=4, resize_policy="center-crop", crop_fraction=0.5)  # sees another part
    code, report, err = _run(["compare", "--model", str(bundle), "--model", str(crop), "--data", str(photos), "--logits-atol", "none"], capsys)
    assert code == 1 and not report["passed"] and ": FAIL: mask_max_abs 1 <= 0.001 (no), mixed_max_abs" in err
    assert [c["name"] for c in report["comparisons"][0]["checks"]] == ["mask_max_abs", "mixed_max_abs", "argmax_agree", "mask_agree",
                                                                      "logits_non_finite", "mask_non_finite", "mixed_non_finite"]
    for argv, message in [([f"{DEMO_BUNDLE}"], "at least two"), ([f"{DEMO_BUNDLE}@torch", str(DEMO_BUNDLE)], "needs a NICE checkpoint"),
                          ([str(tmp_path / "nope.zip"), str(DEMO_BUNDLE)], "model not found")]:
        code, _, err = _run(["compare", *sum((["--model", m] for m in argv), []), "--data", str(photos)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_doctor_json_and_exit_code(capsys):
    code, report, err = _run(["doctor", "--no-self-test"], capsys)
    assert code == (1 if report["problems"] else 0) and "self_test" not in report["checks"]
    assert len(err.strip().splitlines()) == len(report["checks"])


def test_audit_sis_warns_that_exact_backselect_of_large_images_is_impractical(tmp_path, photos, capsys, monkeypatch):
    """Above 64×64 the exact audit's p(p+1)/2 candidates per image are named before it starts, with
    the gradient method's step count; gradient runs and -q say nothing. (The audit itself is
    stubbed: this is about what is said before it.)"""
    from keepbits.audit import sis_report

    seen = []
    monkeypatch.setattr(sis_report, "sis_audit", lambda model, images, *a, **kw: seen.append(len(images)) or {"summary": {}})
    bundle = toy_bundle(tmp_path / "big.zip", size=72)
    argv = ["audit", "sis", "--model", str(bundle), "--data", str(photos), "--num-images", "2", "--out", str(tmp_path / "out")]
    for extra, warned in (([], True), (["--method", "gradient"], False), (["-q"], False)):
        assert main([*argv, *extra]) == 0
        err = capsys.readouterr().err
        assert ("evaluates p(p+1)/2 = 13,439,520 candidates per image" in err and "--k 16: 324)" in err) == warned, err
    assert seen == [2, 2, 2]


def test_audit_sis_partial_reports_on_a_stopped_audit_without_computing(tmp_path, photos, capsys):
    """``--partial`` reads the runs an audit with the same arguments finished (here: all but one
    deleted chunk) and writes report_partial.*; it computes no run and leaves report.html alone."""
    bundle = toy_bundle(tmp_path / "small.zip", size=6)
    out = tmp_path / "out"
    argv = ["-q", "audit", "sis", "--model", str(bundle), "--data", str(photos), "--num-images", "3", "--thresholds", "0.1",
            "--threshold", "0.1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    chunks = sorted((out / "orders").glob("chunk_*.json"))
    assert len(chunks) == 3, "every photo must need a BackSelect run at τ = 0.1"
    chunks[0].unlink()
    assert main([*argv, "--partial"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["backselect_runs"], summary["backselect_runs_done"]) == (3, 2)
    assert summary["report"].endswith("report_partial.html") and (out / "report_partial.html").exists()
    assert len(list((out / "orders").glob("chunk_*.json"))) == 2
