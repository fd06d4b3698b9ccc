"""bench/_results.py: every result file is standard JSON (no NaN/Infinity tokens) with its provenance."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest


def _reject_non_standard(token: str) -> None:
    raise AssertionError(f"non-standard JSON token {token}")


def test_write_result_writes_standard_json_with_missing_values_as_null(tmp_path, bench_script):
    results = bench_script("_results")
    path = results.write_result("probe", {"size": float("nan"), "ratio": np.float32(2.5), "counts": np.arange(3),
                                          "inf": float("inf")}, out_dir=tmp_path)
    text = path.read_text()
    record = json.loads(text, parse_constant=_reject_non_standard)
    assert record["size"] is None and record["inf"] is None
    assert record["ratio"] == 2.5 and record["counts"] == [0, 1, 2]
    assert record["benchmark"] == "probe" and {"commit", "machine", "versions", "command"} <= set(record)


def test_parse_args_with_data_refuses_a_missing_data_folder(bench_script, monkeypatch, capsys):
    """A bench run where ``--data`` has no default (no ``../shared/data``) and none is given is a
    usage error (exit 2) naming ``--data``; a given folder passes through."""
    results = bench_script("_results")
    parser = argparse.ArgumentParser(prog="probe")
    parser.add_argument("--data", default=None)
    monkeypatch.setattr("sys.argv", ["probe"])
    with pytest.raises(SystemExit) as stop:
        results.parse_args_with_data(parser)
    assert stop.value.code == 2 and "--data is required" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["probe", "--data", "somewhere"])
    assert results.parse_args_with_data(parser).data == "somewhere"


def test_parse_args_with_data_names_the_missing_subfolders(bench_script, monkeypatch, capsys, tmp_path):
    """A bench that needs ``cifar10/`` (etc.) under ``--data`` refuses a folder without it, naming what is missing."""
    from pathlib import Path

    results = bench_script("_results")
    parser = argparse.ArgumentParser(prog="probe")
    parser.add_argument("--data", type=Path, default=None)
    (tmp_path / "cifar10").mkdir()
    monkeypatch.setattr("sys.argv", ["probe", "--data", str(tmp_path)])
    assert results.parse_args_with_data(parser, "cifar10").data == tmp_path
    with pytest.raises(SystemExit) as stop:
        results.parse_args_with_data(parser, "kodak", "cifar10")
    assert stop.value.code == 2 and f"no kodak/ under {tmp_path}" in capsys.readouterr().err


def test_median_interval_matches_the_binomial_order_statistics(bench_script):
    """The 95 % interval of the median of 40 values is their 14th and 27th (binomial tables); of 6
    values the extremes; fewer than 6 values cannot give a 95 % interval and say so."""
    results = bench_script("_results")
    values = np.random.default_rng(0).permutation(np.arange(1.0, 41.0))
    assert results.median_interval(values) == [14.0, 27.0]
    assert results.median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == [1.0, 6.0]
    with pytest.raises(ValueError, match="too few"):
        results.median_interval([1.0, 2.0, 3.0, 4.0, 5.0])


def test_data_folders_are_digested_by_their_content(tmp_path, bench_script, monkeypatch):
    """A result records what its --data folder held: the digest changes with a file's bytes or name."""
    results = bench_script("_results")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.npz").write_bytes(b"one")
    (data / "sub" / "b.png").write_bytes(b"two")
    monkeypatch.setattr("sys.argv", ["probe", "--data", str(data), "--out", str(tmp_path / "out")])
    results._data_digests.cache_clear()
    record = json.loads(results.write_result("probe", {}, out_dir=tmp_path).read_text())["data_sha256"]
    assert list(record) == [str(data)] and record[str(data)]["files"] == 2 and record[str(data)]["bytes"] == 6
    first = record[str(data)]["sha256"]
    (data / "sub" / "b.png").write_bytes(b"tw0")
    changed = results.folder_digest(data)["sha256"]
    (data / "sub" / "b.png").rename(data / "sub" / "c.png")
    renamed = results.folder_digest(data)["sha256"]
    assert len({first, changed, renamed}) == 3
    monkeypatch.setattr("sys.argv", ["probe", f"--data={data}"])
    assert results._data_folders() == [data]


def test_machine_records_the_speed_relevant_cpu_flags(tmp_path, bench_script):
    """Results say which vector and 8-bit dot-product instructions the CPU had (INT8 speed hangs on VNNI)."""
    results = bench_script("_results")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni pclmulqdq\n")
    info = results.machine(cpuinfo)
    assert info["cpu_model"] == "Some CPU" and info["cpu_flags"] == ["avx2", "avx512_vnni", "avx512f", "fma"]
    assert "cpu_flags" not in results.machine(tmp_path / "missing")
