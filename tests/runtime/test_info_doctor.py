"""keepbits info's bundle report, doctor's checks, native.status, OpenCV video facts."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from keepbits import native
from keepbits.bundle import load_bundle, write_bundle
from keepbits.cli.demo import DEMO_BUNDLE
from keepbits.errors import BundleError
from keepbits.runtime.doctor import diagnose
from keepbits.runtime.info import bundle_info, info_report
from keepbits.runtime.synthetic import toy_bundle
from keepbits.runtime.video import build_video_io, even_size, h264_available, has_backend, open_video_writer


def test_info_of_a_plain_and_of_the_demo_bundle(tmp_path):
    info = bundle_info(toy_bundle(tmp_path / "toy", size=16, block=2))
    assert info["verified"] and info["input"]["shape"] == [3, 16, 16] and info["mask"] == {"block_size": 2, "threshold": 0.5}
    assert info["custom_ops"]["runs_with"] == "not needed" and info["classes"]["names"] == ["dark", "bright"]
    assert [o["name"] for o in info["outputs"]["onnxruntime"]] == ["logits", "mask", "mixed"]
    assert info["files"]["model.onnx"]["bytes"] == (tmp_path / "toy" / "model.onnx").stat().st_size
    demo = bundle_info(DEMO_BUNDLE)
    assert demo["custom_ops"]["ops"] == ["HardConcreteMask"] and demo["archive_bytes"] == DEMO_BUNDLE.stat().st_size
    assert demo["custom_ops"]["runs_with"] == ("native kernels" if native.available() else "ONNX function bodies")
    assert demo["provenance"] and demo["input"]["resize"].startswith("center-crop (crop fraction 0.875)")
    assert demo["classes"]["count"] == 1000 and demo["outputs"]["names"] == ["logits", "mask"]
    json.dumps(demo)
    report = dict(line.split(None, 1) for line in info_report(demo).splitlines() if not line.startswith(("runs with", "trained by")))
    assert report["classes"].startswith("1000: tench, goldfish") and "epoch" in report["provenance"]
    # the checkpoint's 0-based epoch shown as its training log counts it (the log's last row)
    epoch, history = demo["provenance"]["epoch"], demo["provenance"]["metrics"].get("history") or []
    assert f"epoch {epoch + 1}" in report["provenance"]
    assert not history or history[-1]["epoch"] == epoch + 1


def test_info_report_shows_any_provenance_as_text():
    """A hostile bundle's provenance is any JSON object: the summary shows what it can, never fails on its shape."""
    info = bundle_info(DEMO_BUNDLE)
    for provenance in ({}, {"metrics": [1, 2], "exported_utc": 5, "training_command": ["rm", "-rf"], "epoch": {"a": 1}},
                       {"metrics": {"final": "high", "final_split": 3}, "checkpoint": None},
                       {"training_command": "keepbits train\n\x1b[2Jfake line"}, {"training_command": "x" * 500_000},
                       {"quantization": [1]}, {"quantization": {"evaluation_vs_fp32": "x", "method": 5}}):
        lines = info_report({**info, "provenance": provenance}).splitlines()
        assert lines[0].startswith("bundle ") and len(lines) >= 7 and not any("\x1b" in line for line in lines)
        assert max(map(len, lines)) < 1000


def test_info_refuses_a_modified_bundle_and_a_wrong_pin(tmp_path, monkeypatch):
    path = toy_bundle(tmp_path / "toy")
    with pytest.raises(BundleError, match="expected"):
        bundle_info(path, expected_digest="0" * 64)
    with open(path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="modified"):
        bundle_info(path)
    # a manifest whose classes disagree with the graph: `run` refused it, `info` described it and exited 0
    toy = load_bundle(toy_bundle(tmp_path / "toy2"))
    wrong = write_bundle(tmp_path / "wrong", dataclasses.replace(toy.manifest, class_names=list("abcdefghij"), files={}),
                         {toy.manifest.model_file: toy.model_path})
    with pytest.raises(BundleError, match=r"graph output 'logits' has \d+ at dimension 1, the manifest implies 10"):
        bundle_info(wrong)

    class FixedSizeLayers:  # symbolic graph sizes, layers that take one size only (a Gemm after a flatten)
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Gemm: dimension mismatch")

    real = native.make_session
    monkeypatch.setattr(native, "make_session", lambda *a, **kw: FixedSizeLayers(real(*a, **kw)))
    with pytest.raises(BundleError, match="the model fails on a 16x16 frame of the manifest's input_shape .*Gemm"):
        bundle_info(path.parent / "toy2")  # found by one zero frame, as run finds it (info said the graph takes this size)


def test_info_describes_a_bundle_whose_custom_ops_cannot_run_here(monkeypatch, tmp_path, capsys):
    """A TensorRT-target bundle (custom nodes, no function bodies) without the native kernels:
    info prints its report, saying it cannot run here (it was an error, exit 2)."""
    from onnx import TensorProto, helper

    from keepbits.bundle import Manifest, write_bundle
    from keepbits.cli import main

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, "H", "W"]) for n in ("image", "mask")]
    node = helper.make_node("HardConcreteMask", ["image"], ["mask"], domain="keepbits", beta=0.5, gamma=-0.1, zeta=1.1)
    model = helper.make_model(helper.make_graph([node], "g", io[:1], io[1:]), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("keepbits", 1)])
    manifest = Manifest(input_shape=[1, 8, 8], input_dtype="float32", input_layout="NCHW", mean=[0.5], std=[0.5],
                        class_names=["a", "b"], block_size=4, mask_threshold=0.5, generator="g", classifier="c",
                        target="tensorrt", function_bodies=False, custom_ops=["HardConcreteMask"])
    path = write_bundle(tmp_path / "trt", manifest, {"model.onnx": model.SerializeToString()})
    monkeypatch.setenv("KEEPBITS_NATIVE", "0")
    info = bundle_info(path)
    assert info["custom_ops"]["runs_with"] == "cannot run" and info["outputs"]["onnxruntime"] is None
    assert main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "HardConcreteMask -> cannot run" in out and "ONNX Runtime cannot load the graph here" in out


def test_native_status_explains_itself(monkeypatch, tmp_path):
    monkeypatch.setenv("KEEPBITS_NATIVE", "0")
    assert native.status()["reason"] == "disabled by KEEPBITS_NATIVE=0"
    monkeypatch.setenv("KEEPBITS_NATIVE", "1")
    monkeypatch.setenv("KEEPBITS_NATIVE_LIB", str(tmp_path / "missing.so"))
    assert "no such file" in native.status()["reason"]
    (tmp_path / "bad.so").write_bytes(b"not a library")
    monkeypatch.setenv("KEEPBITS_NATIVE_LIB", str(tmp_path / "bad.so"))
    status = native.status()
    assert status["found"] and not status["loaded"] and status["requested"] and "cannot load" in status["reason"]


def test_doctor_reports_every_check_and_exits_1_on_a_broken_promise(tmp_path):
    report = diagnose(self_test=True)
    assert set(report["checks"]) == {"python", "keepbits", "runtime_packages", "onnxruntime", "native", "opencv", "torch",
                                     "extras", "self_test"}
    assert report["checks"]["self_test"]["status"] == "ok" and report["checks"]["runtime_packages"]["status"] == "ok"
    assert report["checks"]["opencv"]["backends"]["FFMPEG"] == has_backend("FFMPEG")
    (tmp_path / "bad.so").write_bytes(b"not a library")
    env = {**os.environ, "KEEPBITS_NATIVE_LIB": str(tmp_path / "bad.so")}
    done = subprocess.run([sys.executable, "-m", "keepbits", "doctor", "--no-self-test"], capture_output=True, text=True, env=env, timeout=120)
    out = json.loads(done.stdout)
    assert done.returncode == 1 and out["checks"]["native"]["status"] == "problem" and out["problems"] >= 1
    assert "problem native" in done.stderr


def test_video_facts_and_writer(tmp_path):
    assert "FFMPEG" in build_video_io() and even_size(31, 1) == (30, 2)
    with pytest.raises(Exception, match="unknown OpenCV video back-end"):
        has_backend("QUICKTIME")
    writer = open_video_writer(tmp_path / "v.mp4", 10, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    cap = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("ascii", "replace")
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
    assert fourcc.lower() in (("avc1", "h264") if h264_available() else ("mp4v", "fmp4"))  # FFmpeg reads mp4v as FMP4
