"""bench/nice_scenes.py: the test rate plot keeps each family's JPEG and WebP payloads, and the scene's codecs, apart."""
from __future__ import annotations


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
