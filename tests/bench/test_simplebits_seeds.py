"""bench/simplebits_seeds.py: rows of per-seed sweep files grouped by setting, with their spread."""
from __future__ import annotations

import pytest


def _run(seed: int, rows: list[dict]) -> dict:
    return {"settings": {"seed": seed}, "rows": rows}


def test_rows_grouped_by_setting_across_seeds(bench_script):
    seeds = bench_script("simplebits_seeds")
    runs = [_run(0, [{"mode": "original", "bpd": 3.5, "accuracy": 0.96}, {"mode": "joint", "lambda_sim": 10.0, "bpd": 3.0, "accuracy": 0.80, "acc_orig": 0.7}]),
            _run(1, [{"mode": "joint", "lambda_sim": 10.0, "bpd": 2.8, "accuracy": 0.90, "acc_orig": 0.8},
                     {"mode": "joint", "lambda_sim": 3.0, "bpd": 3.4, "accuracy": 0.95}]),
            _run(1, [{"mode": "retrain", "simplifier_from": "joint", "lambda_sim": 10.0, "bpd": 2.8, "accuracy": 0.92}])]
    rows = {tuple(sorted((k, r[k]) for k in ("mode", "simplifier_from", "lambda_sim") if k in r)): r for r in seeds.group_rows(runs)}
    joint10 = rows[(("lambda_sim", 10.0), ("mode", "joint"))]
    assert joint10["seeds"] == [0, 1]
    assert joint10["bpd"]["mean"] == pytest.approx(2.9) and joint10["accuracy"]["sd"] == pytest.approx(0.0707107, abs=1e-6)
    assert (joint10["accuracy"]["min"], joint10["accuracy"]["max"]) == (0.80, 0.90)
    assert joint10["acc_orig"]["mean"] == pytest.approx(0.75)
    assert rows[(("lambda_sim", 3.0), ("mode", "joint"))]["accuracy"]["sd"] is None      # one seed: no spread
    assert rows[(("lambda_sim", 10.0), ("mode", "retrain"), ("simplifier_from", "joint"))]["seeds"] == [1]   # retrain kept apart from joint


def test_a_seed_repeating_a_setting_must_agree(bench_script):
    seeds = bench_script("simplebits_seeds")
    original = {"mode": "original", "bpd": 3.5, "accuracy": 0.96}
    assert seeds.group_rows([_run(1, [original]), _run(1, [dict(original)])])[0]["seeds"] == [1]
    with pytest.raises(ValueError, match="seed 1 ran .*original.* different"):
        seeds.group_rows([_run(1, [original]), _run(1, [{**original, "accuracy": 0.95}])])
