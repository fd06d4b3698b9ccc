"""The receiver's side for files: payloads back to x̃, masks, JSONL and video; bad ones skipped."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from keepbits.errors import InputError
from keepbits.runtime import open_source
from keepbits.runtime.receiver import decode_files, payload_files
from keepbits.runtime.sinks import open_sink
from keepbits.runtime.stream import run_stream


def _frames(n: int) -> list[np.ndarray]:
    frames = []
    for i in range(n):
        f = np.full((24, 40, 3), 30, np.uint8)
        f[3:15, i + 2:i + 14] = 230
        frames.append(f)
    return frames


def test_files_sink_never_mixes_two_runs(tmp_path):
    """A second run into a folder holding the first's payloads is refused (a shorter run would
    leave the longer one's tail under the new frames.jsonl); replace=True (the demo) starts clean."""
    from keepbits.runtime import Pipeline
    from keepbits.runtime.sinks import FilesSink
    from keepbits.runtime.synthetic import toy_bundle

    pipe = Pipeline.from_bundle(toy_bundle(tmp_path / "toy", size=32, block=4))  # its own sequence numbers
    run_stream(pipe, open_source(_frames(5)), [open_sink(f"files:{tmp_path / 'sent'}")])
    with pytest.raises(InputError, match="earlier run's payloads"):
        open_sink(f"files:{tmp_path / 'sent'}")
    assert len(list((tmp_path / "sent" / "payloads").iterdir())) == 5  # nothing lost
    run_stream(pipe, open_source(_frames(2)), [FilesSink(tmp_path / "sent", replace=True)])
    assert sorted(p.name for p in (tmp_path / "sent" / "payloads").iterdir()) == ["00000005.kbit", "00000006.kbit"]
    assert decode_files([tmp_path / "sent"], tmp_path / "out")["decoded"] == 2
    # a run whose source gave nothing leaves an empty frames.jsonl: a restart (a supervisor's) may reuse its folder
    assert run_stream(pipe, open_source([]), [open_sink(f"files:{tmp_path / 'outage'}")])["status"] == "source_failed"
    assert run_stream(pipe, open_source(_frames(1)), [open_sink(f"files:{tmp_path / 'outage'}")])["written"] == 1


def test_decoding_two_runs_at_once_keeps_every_frame(tmp_path):
    """Two runs' folders both hold 00000000.kbit: every file gets its own name (none overwrites
    another); a file named twice is decoded once."""
    from keepbits.codec import encode

    for run, value in (("run1", 10), ("run2", 200)):
        (tmp_path / run).mkdir()
        for i in range(2):
            frame = np.full((8, 8, 3), value + i, np.uint8)
            (tmp_path / run / f"{i:08d}.kbit").write_bytes(encode(frame, np.ones((8, 8)), block=4, sequence=i))
    summary = decode_files([tmp_path / "run1", tmp_path / "run2", tmp_path / "run1" / "00000000.kbit"], tmp_path / "out")
    assert (summary["payloads"], summary["decoded"], summary["write_errors"]) == (4, 4, 0)
    records = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert len({r["image"] for r in records}) == 4
    values = sorted(int(cv2.imread(str(tmp_path / "out" / r["image"]))[0, 0, 0]) for r in records)
    assert values == [10, 11, 200, 201]


def test_files_sink_payloads_decode_to_the_senders_mixed_image_and_mask(pipe, tmp_path):
    frames = _frames(5)
    run_stream(pipe, open_source(frames), [open_sink(f"files:{tmp_path / 'sent'}")])
    (tmp_path / "sent" / "payloads" / "zz-garbage.kbit").write_bytes(b"KBIT" + bytes(80))
    (tmp_path / "sent" / "payloads" / "zz-empty.kbit").write_bytes(b"")
    summary = decode_files([tmp_path / "sent"], tmp_path / "out", video=tmp_path / "out.mp4", fps=5)
    assert (summary["payloads"], summary["decoded"], summary["bad_payloads"]) == (7, 5, 2)
    assert {b["file"].rsplit("/", 1)[-1] for b in summary["bad"]} == {"zz-garbage.kbit", "zz-empty.kbit"}
    records = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert [r["sequence"] for r in records] == list(range(5)) and all(r["mode"] == "blocks" for r in records)
    for i, frame in enumerate(frames):
        ref = pipe(frame)
        x0, y0, w, h = ref.roi
        image = cv2.imread(str(tmp_path / "out" / records[i]["image"]))[:, :, ::-1]
        mask = cv2.imread(str(tmp_path / "out" / records[i]["mask"]), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(image, ref.mixed[y0:y0 + h, x0:x0 + w])
        assert np.array_equal(mask > 0, (ref.mask > ref.threshold)[y0:y0 + h, x0:x0 + w])
        assert records[i]["kept_pixels"] == int((ref.mask > ref.threshold).sum())
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()


def test_sender_and_decoder_records_share_keys_and_name_each_folder_file(pipe, tmp_path):
    """A folder source's records name the file each frame came from (``source_file``: its path under the folder;
    an unreadable file keeps its place in ``source_index``); the decoder's records use the
    sender's keys and meanings for the fields both have (label = class name, label_index,
    payload_bytes)."""
    for i, frame in enumerate(_frames(3)):
        (tmp_path / "cam" / f"day{i % 2}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "cam" / f"day{i % 2}" / f"f{i}.png"), frame)
    (tmp_path / "cam" / "day0" / "f00-broken.png").write_bytes(b"not a png")
    writer = cv2.VideoWriter(str(tmp_path / "cam" / "day1" / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 24))
    for frame in _frames(2):  # a recording beside the pictures: its frames stream too (they were left out)
        writer.write(frame)
    writer.release()
    (tmp_path / "cam" / "day1" / "dead.mp4").write_bytes(b"not a video")
    run_stream(pipe, open_source(tmp_path / "cam"), [open_sink(f"files:{tmp_path / 'sent'}")])
    sent = [json.loads(line) for line in (tmp_path / "sent" / "frames.jsonl").read_text().splitlines()]
    assert [(r["source_file"], r["source_index"]) for r in sent] == [
        ("day0/f0.png", 0), ("day0/f2.png", 2), ("day1/clip.avi#0", 3), ("day1/clip.avi#1", 4), ("day1/f1.png", 6)]
    # --frame-step counts within each video and keeps every picture
    stepped = open_source(tmp_path / "cam", frame_step=2)
    assert [f.file for f in stepped] == ["day0/f0.png", "day0/f2.png", "day1/clip.avi#0", "day1/f1.png"]
    decode_files([tmp_path / "sent"], tmp_path / "out")
    got = [json.loads(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    shared = ("sequence", "label", "label_index", "payload_bytes")
    assert [{k: r[k] for k in shared} for r in got] == [{k: r[k] for k in shared} for r in sent]
    assert all(isinstance(r["label"], str) and isinstance(r["label_index"], int) for r in got)
    assert [r["file"].rsplit("/", 1)[-1] for r in got] == [f"{r['sequence']:08d}.kbit" for r in sent]  # the payload file


def test_oversize_files_count_as_bad_and_paths_are_checked(tmp_path):
    (tmp_path / "big.kbit").write_bytes(bytes(200))
    summary = decode_files([tmp_path / "big.kbit"], tmp_path / "out", max_bytes=100)
    assert summary["bad_payloads"] == 1 and "larger than" in summary["bad"][0]["error"]
    with pytest.raises(InputError, match="not found"):
        payload_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .kbit"):
        payload_files([tmp_path / "empty"])


def _strict_json(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_header_numbers_are_written_as_null(tmp_path):
    """A crafted header with score=inf and timestamp=nan made frames.jsonl lines with Infinity and
    NaN, which no strict JSON reader takes."""
    from keepbits.codec import encode
    from keepbits.runtime.receiver import PayloadWriter

    payload = encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4, score=float("inf"), timestamp=float("nan"))
    with PayloadWriter(tmp_path / "out") as writer:
        record = writer.write(payload)
    line = _strict_json((tmp_path / "out" / "frames.jsonl").read_text())
    assert line["score"] is None and line["timestamp"] is None and record["score"] is None


def test_a_repeated_sequence_number_never_overwrites_a_frame(tmp_path):
    """Files were named by sequence number only: a sender repeating one replaced the first frame's PNG."""
    from keepbits.codec import encode
    from keepbits.runtime.receiver import PayloadWriter

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s-00000009.png").write_bytes(b"a file that was there")
    with PayloadWriter(tmp_path / "out") as writer:
        for value, sequence in ((10, 5), (200, 5), (60, 9)):
            writer.write(encode(np.full((8, 8, 3), value, np.uint8), np.ones((8, 8)), block=4, sequence=sequence), prefix="s-")
    records = [_strict_json(line) for line in (tmp_path / "out" / "frames.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == ["s-00000005.png", "s-00000005~1.png", "s-00000009~1.png"]
    assert [int(cv2.imread(str(tmp_path / "out" / r["image"]))[0, 0, 0]) for r in records] == [10, 200, 60]
    assert writer.renamed == 2 and (tmp_path / "out" / "s-00000009.png").read_bytes() == b"a file that was there"


def test_decode_refuses_outputs_that_exist(tmp_path):
    """decode --payloads DIR --out DIR replaced the sender's frames.jsonl; --video overwrote a video."""
    from keepbits.codec import encode

    sent = tmp_path / "sent"
    (sent / "payloads").mkdir(parents=True)
    (sent / "payloads" / "00000000.kbit").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), block=4))
    (sent / "frames.jsonl").write_text('{"sender": true}\n')
    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    with pytest.raises(InputError, match="holds a frames.jsonl"):
        decode_files([sent], sent)
    with pytest.raises(InputError, match="keepbits never overwrites it"):
        decode_files([sent], tmp_path / "out", video=tmp_path / "old.mp4")
    with pytest.raises(InputError, match="must be a number > 0"):
        decode_files([sent], tmp_path / "out", video=tmp_path / "new.mp4", fps=float("inf"))
    assert (sent / "frames.jsonl").read_text() == '{"sender": true}\n' and (tmp_path / "old.mp4").read_bytes() == b"an earlier video"
    assert decode_files([sent], tmp_path / "out")["decoded"] == 1
    with pytest.raises(InputError, match="holds a frames.jsonl"):  # an earlier decode's folder too
        decode_files([sent], tmp_path / "out")
