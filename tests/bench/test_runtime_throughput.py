"""bench/runtime_throughput.py: the classifier-only workers share one frame queue, as run_stream's do."""
from __future__ import annotations

import threading
from queue import SimpleQueue


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
