"""bench/nice_scenes.py: the test rate plot keeps each family's JPEG and WebP payloads, and the scene's codecs, apart."""
from __future__ import annotations

import pytest


def _row(codec: str, quality: int | None, size: float, accuracy: float) -> dict:
    return {"codec": codec, "quality": quality, "bytes_per_image": size, "accuracy": accuracy}


def test_rate_plot_draws_one_series_per_codec(bench_script, monkeypatch, tmp_path):
    scenes = bench_script("nice_scenes")
    drawn = {}
    monkeypatch.setattr(scenes, "plot_curves", lambda path, series, *args, **kwargs: drawn.update(series))
    curve = [_row("png", None, 9000.0, 0.66), _row("jpeg", 10, 2500.0, 0.56), _row("jpeg", 50, 3700.0, 0.65),
             _row("webp", 10, 1300.0, 0.60), _row("webp", 50, 1900.0, 0.64)]
    scene = [_row("png", None, 110000.0, 0.66), _row("jpeg", 50, 8100.0, 0.66), _row("webp", 50, 6100.0, 0.66)]
    results = {"warm": {"test_payload_curve": curve, "test_scene_curve": scene},
               "warm_only": {"test_payload_curve": curve[:3], "test_scene_curve": scene}}
    scenes.plot_rates(results, tmp_path / "rate.png", 1000)
    assert drawn["NICE warm: payload, jpeg blocks"] == ([2500.0, 3700.0], [0.56, 0.65])
    assert drawn["NICE warm: payload, webp blocks"] == ([1300.0, 1900.0], [0.60, 0.64])
    assert drawn["NICE warm_only: payload, webp blocks"] == ([], [])
    assert drawn["scene jpeg"] == ([8100.0], [0.66]) and drawn["scene webp"] == ([6100.0], [0.66])
    assert not any("png" in name for name in drawn)      # lossless rows are compared apart, not on this plot


def _entry(accuracy: float, control: float, payload_bytes: float) -> dict:
    def payload(a: float, size: float) -> dict:
        return {"bytes_per_image": size, "accuracy": {"mean": a}, "minus_scene": {"mean": a - 0.66}}
    return {"kept_fraction": 0.15, "soft_accuracy": accuracy - 0.01, "scene": {"accuracy": {"mean": 0.66}, "png_bytes_per_image": 110000.0},
            "lossless": {"nice_payload": payload(accuracy, payload_bytes), "control_payload": payload(control, payload_bytes),
                         "ratio_vs_scene_png": 110000.0 / payload_bytes},
            "equal_budget_accuracy": {"nice": accuracy, "saliency_smoothed": control, "random": 0.1}}


def test_seed_summary_pairs_within_seed_and_drops_single_seed_families(bench_script):
    scenes = bench_script("nice_scenes")
    runs = [{"protocol": {"scenes": "8000 train / 1000 test, seeds 0/1"}, "test": {"warm": _entry(0.65, 0.64, 22000.0), "warm_only": _entry(0.6, 0.6, 14000.0)}},
            {"protocol": {"scenes": "8000 train / 1000 test, seeds 2/3"}, "test": {"warm": _entry(0.61, 0.63, 27500.0)}}]
    summary = scenes.seed_summary(runs)
    assert list(summary) == ["warm"]                      # warm_only reached the test in one seed only
    warm = summary["warm"]
    assert warm["seeds"] == [0, 2]
    assert warm["nice_minus_control"]["values"] == pytest.approx([0.01, -0.02])
    assert (warm["ratio_vs_scene_png"]["min"], warm["ratio_vs_scene_png"]["max"]) == pytest.approx((4.0, 5.0))
    assert warm["payload_minus_scene"]["mean"] == pytest.approx(-0.03)
    assert warm["equal_budget_accuracy"]["random"]["std"] == pytest.approx(0.0)


def test_seed_summary_merges_runs_of_one_seed_and_rejects_a_family_tested_twice(bench_script):
    scenes = bench_script("nice_scenes")
    run = lambda seed, tested: {"protocol": {"scenes": f"8000 train / 1000 test, seeds {seed}/{seed + 1}"}, "test": tested}
    runs = [run(0, {"warm": _entry(0.65, 0.64, 22000.0)}), run(1, {"warm": _entry(0.67, 0.66, 18000.0)}),
            run(1, {"cold": _entry(0.50, 0.55, 9000.0)}), run(2, {"cold": _entry(0.33, 0.40, 5000.0)})]
    summary = scenes.seed_summary(runs)
    assert summary["warm"]["seeds"] == [0, 1] and summary["cold"]["seeds"] == [1, 2]
    assert summary["cold"]["nice_minus_control"]["values"] == pytest.approx([-0.05, -0.07])
    with pytest.raises(ValueError, match="seed 1: family warm"):
        scenes.seed_summary(runs + [run(1, {"warm": _entry(0.6, 0.6, 1.0)})])
