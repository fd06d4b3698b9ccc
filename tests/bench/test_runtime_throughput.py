"""bench/runtime_throughput.py: the classifier-only workers share one frame queue, as run_stream's do."""
from __future__ import annotations

import threading
from queue import SimpleQueue
from types import SimpleNamespace

import pytest


def test_drain_hands_every_item_to_exactly_one_of_several_threads(bench_script):
    bench = bench_script("runtime_throughput")
    todo: SimpleQueue = SimpleQueue()
    for i in range(2000):
        todo.put(i)
    taken: list[list[int]] = [[] for _ in range(3)]
    threads = [threading.Thread(target=lambda out=out: out.extend(bench.drain(todo))) for out in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(i for out in taken for i in out) == list(range(2000))


def test_paired_blocks_ratios_steps_and_the_naive_loop_from_abba_runs(bench_script, monkeypatch):
    """Each block runs every measure twice (ABBA); ratios are per block, steps chain them."""
    bench = bench_script("runtime_throughput")
    fps = {"classifier": 100.0, "graph": 95.0, "no_encode": 90.0, "pipeline": 81.0, "naive": 20.0}
    calls: list[str] = []

    def session_workers(session, outputs, pipe, frames, workers):
        calls.append(session)
        return fps[session]

    def pipeline(pipe, frames, workers=1, opencv_threads=None):
        calls.append(pipe.name)
        return fps[pipe.name], {}

    def naive() -> float:
        calls.append("naive")
        return fps["naive"]

    monkeypatch.setattr(bench, "run_session_workers", session_workers)
    monkeypatch.setattr(bench, "run_pipeline", pipeline)
    pipes = {name: SimpleNamespace(name=name, session="graph") for name in ("pipeline", "no_encode")}
    out = bench.paired_blocks(6, [None], {"workers": "classifier"}, None, pipes["pipeline"], pipes["no_encode"], 2, naive)
    assert calls[:10] == ["classifier", "graph", "no_encode", "pipeline", "naive", "naive", "pipeline", "no_encode", "graph", "classifier"]
    assert len(calls) == 60
    assert out["ratio_median"] == pytest.approx(0.81) and out["ratio_median_ci95"] == pytest.approx([0.81, 0.81])
    assert out["ratios"]["graph_only"]["median"] == pytest.approx(0.95) and "naive" not in out["ratios"]
    assert out["steps_median"] == pytest.approx({"generator": 0.95, "stream_work": 90.0 / 95.0, "encode": 0.9})
    assert out["pipeline_over_naive"]["median"] == pytest.approx(81.0 / 20.0)
    assert "pipeline_over_naive" not in bench.paired_blocks(6, [None], {"workers": "classifier"}, None, pipes["pipeline"], pipes["no_encode"], 2)


def test_naive_loop_runs_a_feature_generator_on_one_classifier_pass(bench_script, monkeypatch):
    """nice_taps reads the classifier's features: the naive loop takes logits and features from one
    forward_taps call per frame, as the exported graph does, and never runs the classifier again."""
    import numpy as np
    import torch

    from keepbits import registry

    bench = bench_script("runtime_throughput")
    monkeypatch.setattr(bench, "SIZE", 64)
    classifier = registry.build("efficientnet_lite0", image_size=(64, 64), num_classes=10).eval()
    generator = registry.build("nice_taps").attach(classifier).eval()
    counts = {"taps": 0, "forward": 0}
    forward_taps = classifier.forward_taps

    def counted_taps(x, taps):
        counts["taps"] += 1
        return forward_taps(x, taps)

    classifier.forward_taps = counted_taps
    classifier.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    frames = [np.zeros((48, 80, 3), np.uint8)] * 3
    assert bench.run_naive(generator, classifier, frames, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)) > 0
    assert counts == {"taps": 3, "forward": 0}
