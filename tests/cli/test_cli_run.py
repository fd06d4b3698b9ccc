"""CLI: keepbits run / receive / demo end to end, errors (exit 2), SIGINT flushing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from keepbits.cli import main
from keepbits.cli.demo import DEMO_BUNDLE, DEMO_STREAM
from keepbits.codec import decode
from keepbits.runtime.synthetic import toy_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return toy_bundle(tmp_path_factory.mktemp("b") / "toy.zip", size=32, block=4)


def _video(path, n: int, size=(40, 30)) -> str:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 20, size)
    for i in range(n):
        frame = np.full((size[1], size[0], 3), 30, np.uint8)
        frame[5:20, i % 20:(i % 20) + 12] = 250
        writer.write(frame)
    writer.release()
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_writes_sinks_and_prints_summary(bundle, tmp_path, capsys):
    video = _video(tmp_path / "in.mp4", 15)
    rc = main(["-q", "run", "--model", str(bundle), "--source", video, "--sink", f"files:{tmp_path / 'out'}",
               "--sink", f"video:{tmp_path / 'ann.mp4'}", "--max-frames", "10", "--compare", "jpeg", "png",
               "--codec", "webp", "--quality", "80", "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == summary["written"] == 10 and summary["ratio_vs_png"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["frames"] == 10
    payload = sorted((tmp_path / "out" / "payloads").iterdir())[0].read_bytes()
    assert decode(payload)[2].codecs["foreground"] == "webp"
    assert (tmp_path / "ann.mp4").stat().st_size > 0


def test_run_compares_like_with_like_and_warns_without_a_sink(bundle, tmp_path, capsys, caplog):
    """By default a lossless payload is compared with the frame's PNG, a lossy one with JPEG q90; the
    progress line says "larger" when the payload is (it never calls a bigger payload "0.4x smaller")."""
    from keepbits.cli.run import compared

    video = _video(tmp_path / "in.mp4", 6)
    with caplog.at_level("WARNING"):
        assert main(["run", "--model", str(bundle), "--source", video]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert "ratio_vs_png" in summary and "jpeg_bytes" not in summary
    assert "no --sink" in caplog.text and "than PNG" in err
    assert main(["-q", "run", "--model", str(bundle), "--source", video, "--codec", "webp", "--mode", "mixed"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "ratio_vs_jpeg" in summary and "png_bytes" not in summary
    assert compared(2.5, "PNG") == "2.5x smaller than PNG" and compared(0.4, "JPEG q90") == "2.5x larger than JPEG q90"


def test_run_with_model_workers_keeps_source_order(bundle, tmp_path, capsys):
    video = _video(tmp_path / "in.mp4", 12)
    rc = main(["-q", "run", "--model", str(bundle), "--source", video, "--sink", f"files:{tmp_path / 'out'}",
               "--workers", "2", "--threads", "1", "--mode", "mixed", "--codec", "webp", "--quality", "70", "--webp-method", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 12 and summary["workers"] == 2
    assert {k: summary["pipeline"]["codec"][k] for k in ("mode", "codec", "quality", "webp_method")} == {
        "mode": "mixed", "codec": "webp", "quality": 70, "webp_method": 1}
    first = decode((tmp_path / "out" / "payloads" / "00000000.kbit").read_bytes())
    assert first[2].mode == "mixed" and first[2].codecs == {"mixed": "webp", "mask": "bits"} and first[1] is not None
    assert main(["run", "--model", str(bundle), "--source", video, "--webp-method", "7"]) == 2  # argparse's error: one line
    assert "keepbits: error: argument --webp-method: invalid choice: 7" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert [r["sequence"] for r in records] == [r["source_index"] for r in records] == list(range(12))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sink", "ftp:x"], "unknown sink"),
        (["--sink", "tcp:nohostport"], "HOST:PORT"),
        (["--max-frames", "0"], "max-frames"),
        (["--quality", "0"], "quality"),
        (["--workers", "0"], "--workers"),
        (["--source", "missing.mp4"], "source not found"),
    ],
)
def test_run_errors_exit_2(bundle, tmp_path, capsys, argv, message):
    base = {"--model": str(bundle), "--source": _video(tmp_path / "in.mp4", 3)}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    args = [a for kv in base.items() for a in kv]
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_run_missing_bundle_exit_2(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path / "none"), "--source", "0"]) == 2
    assert "not found" in capsys.readouterr().err


def test_run_to_receive_over_loopback(bundle, tmp_path, capsys):
    port = _free_port()
    rx = threading.Thread(target=main, args=(["-q", "receive", "--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "rx"),
                                              "--once", "--idle-timeout", "20", "--video", str(tmp_path / "rx.mp4")],))
    rx.start()
    time.sleep(0.3)
    rc = main(["-q", "run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 8), "--sink", f"tcp:127.0.0.1:{port}"])
    rx.join(30)
    assert rc == 0 and not rx.is_alive()
    assert len(list((tmp_path / "rx").glob("*[0-9].png"))) == len(list((tmp_path / "rx").glob("*_mask.png"))) == 8
    lines = (tmp_path / "rx" / "frames.jsonl").read_text().splitlines()
    assert [json.loads(x)["sequence"] for x in lines] == list(range(8))


def test_receive_exits_1_when_frames_are_lost_or_none_arrive(bundle, tmp_path, capsys):
    """Frames the receiver could not write (its folder removed under it) are counted apart from
    broken connections, and like an idle run that received nothing, the exit is 1 with one line."""
    port, codes = _free_port(), []
    out = tmp_path / "rx"
    rx = threading.Thread(target=lambda: codes.append(main(["-q", "receive", "--listen", f"127.0.0.1:{port}", "--out", str(out),
                                                            "--once", "--idle-timeout", "20"])))
    rx.start()
    deadline = time.monotonic() + 10
    while not (out / "frames.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(out)  # frames.jsonl stays open; every PNG now fails to be written
    assert main(["-q", "run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 3), "--sink", f"tcp:127.0.0.1:{port}"]) == 0
    rx.join(30)
    captured = capsys.readouterr()
    decoder, text, printed = json.JSONDecoder(), captured.out, []
    while text.strip():  # the run's summary and the receiver's, in either order
        value, end = decoder.raw_decode(text.lstrip())
        printed.append(value)
        text = text.lstrip()[end:]
    stats = next(p for p in printed if "connections" in p)
    assert codes == [1] and stats["write_errors"] == 3 and stats["frames"] == 0 and stats["protocol_errors"] == 0
    assert "lost: 3 frames not written (disk)" in captured.err
    assert main(["-q", "receive", "--listen", f"127.0.0.1:{_free_port()}", "--out", str(tmp_path / "idle"), "--idle-timeout", "0.3"]) == 1
    assert "0 frames written; nothing received" in capsys.readouterr().err


def test_run_to_receive_over_mqtt(bundle, mosquitto, tmp_path, capsys):
    url = f"{mosquitto.url}/cams/1/kbit?qos=1"
    rx = threading.Thread(target=main, args=(["-q", "receive", "--mqtt", f"{mosquitto.url}/cams/+/kbit", "--out", str(tmp_path / "rx"),
                                              "--max-frames", "8", "--idle-timeout", "30"],))
    rx.start()
    assert mosquitto.logged("Received SUBSCRIBE")
    rc = main(["-q", "run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 8), "--sink", url])
    rx.join(30)
    assert rc == 0 and not rx.is_alive()
    printed = [json.loads(block) for block in capsys.readouterr().out.replace("}\n{", "}\n\x00{").split("\x00")]
    run_summary = next(p for p in printed if "sinks" in p)  # the receiver may finish printing first
    receive_summary = next(p for p in printed if "sinks" not in p)
    sink = run_summary["sinks"][0]
    assert sink["kind"] == "mqtt" and sink["delivered"] == 8 and receive_summary["frames"] == 8
    lines = (tmp_path / "rx" / "frames.jsonl").read_text().splitlines()
    assert [json.loads(x)["sequence"] for x in lines] == list(range(8))


def test_mqtt_sink_to_a_broker_that_freezes_exits_5_undelivered(bundle, mosquitto, tmp_path, capsys):
    url = f"{mosquitto.url}/t?qos=1&queue=2&flush_timeout=0.3"
    argv = ["-q", "run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 6), "--loop", "--max-frames", "300",
            "--sink", url]
    freezer = threading.Thread(target=lambda: mosquitto.logged("New client connected") and mosquitto.pause())
    freezer.start()  # the broker freezes once the sink has connected
    try:
        rc = main(argv)
    finally:
        freezer.join(10)
        mosquitto.resume()
    out, err = capsys.readouterr()
    sink = json.loads(out)["sinks"][0]
    assert rc == 5 and sink["undelivered"] > 0 and sink["undelivered"] == sink["dropped"] + sink["unconfirmed"]
    assert sink["delivered"] + sink["undelivered"] == 300 and "undelivered: mqtt sink" in err


def test_mqtt_sink_without_a_broker_or_without_paho_exits_2(bundle, tmp_path, capsys):
    pytest.importorskip("paho.mqtt")
    rc = main(["run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 2),
               "--sink", f"mqtt://127.0.0.1:{_free_port()}/t?connect_timeout=0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the MQTT broker" in err and "Traceback" not in err
    video = _video(tmp_path / "in2.mp4", 2)
    for argv in (["receive", "--mqtt", "mqtt://127.0.0.1:1/t", "--out", str(tmp_path / "rx")],
                 ["run", "--model", str(bundle), "--source", video, "--sink", f"files:{tmp_path / 'files'}", "--sink", "mqtt://127.0.0.1:1/t"]):
        blocked = ("import importlib.abc, sys\n"
                   "class B(importlib.abc.MetaPathFinder):\n"
                   "    def find_spec(self, name, path=None, target=None):\n"
                   "        if name.split('.')[0] == 'paho':\n"
                   "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                   "sys.meta_path.insert(0, B())\n"
                   "from keepbits.cli import main\n"
                   f"sys.exit(main({argv!r}))\n")
        done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "keepbits[mqtt]" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # refused before any output was made (both left empty folders behind)
    assert not (tmp_path / "rx").exists() and not (tmp_path / "files").exists()


def test_sigint_flushes_every_accepted_frame(bundle, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "keepbits", "-q", "run", "--model", str(bundle), "--source", _video(tmp_path / "in.mp4", 50),
           "--loop", "--sink", f"files:{out}", "--queue-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jsonl = out / "frames.jsonl"
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 20:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    lines = (out / "frames.jsonl").read_text().splitlines()
    assert summary["interrupted"] and summary["frames"] >= 20
    assert summary["frames"] == summary["written"] == len(lines) == len(list((out / "payloads").iterdir()))


def test_demo_runs_on_the_bundled_assets(tmp_path, capsys):
    assert DEMO_BUNDLE.is_file() and DEMO_STREAM.is_file()
    assert main(["-q", "demo", "--out", str(tmp_path), "--max-frames", "6"]) == 0
    report = capsys.readouterr().out
    assert "JPEG at matched agreement" in report or "JPEG: no quality" in report
    assert "Intel IoT DevKit sample videos" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["written"] == 6 and summary["ratio_vs_jpeg"] > 0 and summary["ratio_vs_png"] > 0
    assert summary["pipeline"]["codec"]["mode"] == "mixed" and "payload (mixed, x̃ webp q75)" in report
    assert decode((tmp_path / "payloads" / sorted(p.name for p in (tmp_path / "payloads").iterdir())[0]).read_bytes())[2].mode == "mixed"
    comparison = summary["matched_agreement"]
    assert comparison["frames"] == 6 and set(comparison["matched"]) == {"jpeg", "webp"}
    assert all(row is None or row["agreement"] >= comparison["payload"]["agreement"] for row in comparison["matched"].values())
    assert "Intel IoT DevKit sample videos" in summary["credit"]
    assert (tmp_path / "annotated.mp4").stat().st_size > 0 and len(list((tmp_path / "payloads").iterdir())) == 6


def test_demo_replaces_only_its_own_output(bundle, tmp_path, capsys):
    """The old demo deleted the payloads of any --out folder (FilesSink(replace=True)) and wrote its
    files over whatever was there; now a folder is the demo's own when its summary.json says so."""
    video = _video(tmp_path / "in.mp4", 4)
    demo = ["-q", "demo", "--model", str(bundle), "--source", video, "--no-compare"]
    theirs = tmp_path / "theirs"
    (theirs / "payloads").mkdir(parents=True)
    (theirs / "payloads" / "00000000.kbit").write_bytes(b"someone's payload")
    (theirs / "annotated.mp4").write_bytes(b"someone's video")
    assert main([*demo, "--out", str(theirs)]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (theirs / "payloads" / "00000000.kbit").read_bytes() == b"someone's payload"
    assert (theirs / "annotated.mp4").read_bytes() == b"someone's video"

    ours = tmp_path / "ours"
    assert main([*demo, "--out", str(ours), "--max-frames", "3"]) == 0
    assert json.loads((ours / "summary.json").read_text())["written_by"] == "keepbits demo"
    capsys.readouterr()
    assert main([*demo, "--out", str(ours), "--max-frames", "2"]) == 0  # a rerun replaces the earlier demo's output
    assert len(list((ours / "payloads").iterdir())) == 2 and json.loads((ours / "summary.json").read_text())["written"] == 2
    assert f"wrote {ours / 'annotated.mp4'}" in capsys.readouterr().out


def test_demo_that_delivers_nothing_exits_3_and_claims_no_files(bundle, tmp_path, capsys):
    """The old demo exited 0 with "written": 0 and printed "wrote …/annotated.mp4", which it had not written."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--model", str(bundle), "--source", str(broken), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    assert "keepbits: source_failed: no frame from the source" in captured.err
    assert "annotated.mp4" not in captured.out and f"wrote {out / 'summary.json'}" in captured.out
    assert not (out / "annotated.mp4").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "source_failed" and summary["written"] == 0

