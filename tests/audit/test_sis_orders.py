"""SIS orders sharded over torchrun processes (2 gloo processes match one), cached chunk by chunk, resumable."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")

from keepbits.audit.sis_orders import compute_orders  # noqa: E402

MODEL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from keepbits.audit import TorchAdapter
    from keepbits.audit.sis_orders import compute_orders

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
        return TorchAdapter(net, (1, 6, 6)), np.random.default_rng(0).normal(size=(7, 1, 6, 6)).astype(np.float32)

    if __name__ == "__main__":
        model, x = setup()
        for method in ("gradient", "incremental"):
            compute_orders(model, x, f"{sys.argv[1]}/{method}", method, k=5, chunk=2, progress=False)
""")


def _orders(folder):
    out = []
    for name in sorted(os.listdir(folder)):
        out += [(r["order"], r["scores"]) for r in json.loads((folder / name).read_text())["results"]]
    return out


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path, monkeypatch, free_port):
    script = tmp_path / "orders_script.py"
    script.write_text(MODEL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                    str(script), str(tmp_path / "multi")], check=True, env=env, capture_output=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    from orders_script import setup

    model, x = setup()
    for method in ("gradient", "incremental"):
        single = compute_orders(model, x, tmp_path / "single" / method, method, k=5, chunk=2, progress=False)
        assert len(single) == 7 and _orders(tmp_path / "single" / method) == _orders(tmp_path / "multi" / method)
    # resume: a deleted chunk is recomputed, the others are reused untouched
    folder = tmp_path / "multi" / "incremental"
    kept = folder / "chunk_0000002.json"
    stamp = kept.stat().st_mtime_ns
    (folder / "chunk_0000004.json").unlink()
    before = time.time()
    compute_orders(model, x, folder, "incremental", k=5, chunk=2, progress=False)
    assert kept.stat().st_mtime_ns == stamp and _orders(folder) == _orders(tmp_path / "single" / "incremental")
    # each chunk records when it was written (a checkout of chunks kept in git resets the files' times)
    assert json.loads((folder / "chunk_0000004.json").read_text())["written_at"] >= before
    assert json.loads(kept.read_text())["written_at"] <= before


SLOW_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    from keepbits.audit import FunctionAdapter
    from keepbits.audit.sis_orders import compute_orders

    def slow(x):
        time.sleep(0.05)
        return x.reshape(len(x), -1)[:, :2] * 4

    if __name__ == "__main__":
        compute_orders(FunctionAdapter(slow, input_shape=(1, 1, 2)), np.ones((400, 1, 1, 2), np.float32), sys.argv[1], "plain",
                       progress=False)
""")


def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux /proc/<pid>/task/<tid>/children to find torchrun's workers")
def test_ranks_stop_when_their_torchrun_agent_is_killed(tmp_path, free_port):
    """torchrun starts workers in sessions of their own: SIGKILL to the agent alone must not leave
    them computing chunks as orphans; they stop before their next chunk, the finished ones stay."""
    import signal
    import time

    script = tmp_path / "slow_orders.py"
    script.write_text(SLOW_SCRIPT)
    folder = tmp_path / "orders"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                              str(script), str(folder)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(folder.glob("chunk_*.json"))) < 4:
            time.sleep(0.1)
        workers = _children(agent.pid)
        assert len(workers) == 2, "both ranks must be running before the agent is killed"
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.1)
        assert not any(_running(w) for w in workers), "the workers went on computing after their agent was killed"
        done = len(list(folder.glob("chunk_*.json")))
        assert 4 <= done < 400
        time.sleep(0.5)
        assert len(list(folder.glob("chunk_*.json"))) == done
    finally:
        for pid in [agent.pid, *(_children(agent.pid) if _running(agent.pid) else [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _small_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))


def test_chunks_of_another_audit_are_never_overwritten(tmp_path):
    """The chunk cache is keyed to the model, images and settings: the same model again reuses
    every chunk; another model (a retrained checkpoint), another image sample or another method
    in the same folder is refused, its finished runs untouched (they were overwritten: a stray
    preview run lost hours of a long audit)."""
    import numpy as np

    from keepbits.audit import TorchAdapter
    from keepbits.errors import InputError

    x = np.random.default_rng(0).normal(size=(3, 1, 6, 6)).astype(np.float32)
    first, other = TorchAdapter(_small_net(0), (1, 6, 6)), TorchAdapter(_small_net(1), (1, 6, 6))
    folder = tmp_path / "orders"
    compute_orders(first, x, folder, "plain", progress=False)
    saved = {p.name: p.read_bytes() for p in folder.glob("chunk_*.json")}
    assert len(saved) == 3
    compute_orders(TorchAdapter(_small_net(0), (1, 6, 6)), x, folder, "plain", progress=False)  # same weights, new object
    for model, images, method in ((other, x, "plain"), (first, x[::-1].copy(), "plain"), (first, x, "gradient")):
        with pytest.raises(InputError, match=r"holds \d BackSelect run\(s\) of another audit .* never overwritten"):
            compute_orders(model, images, folder, method, progress=False)
        assert {p.name: p.read_bytes() for p in folder.glob("chunk_*.json")} == saved
    # a stopped audit whose only finished chunk lies past a smaller audit's images: the smaller one is refused
    # too (it was accepted, and then its chunk blocked the first audit's resume)
    stopped = tmp_path / "stopped"
    compute_orders(first, x, stopped, "plain", progress=False)
    for name in ("chunk_0000000.json", "chunk_0000001.json"):
        (stopped / name).unlink()
    with pytest.raises(InputError, match="holds 1 BackSelect run"):
        compute_orders(other, x[:1], stopped, "plain", progress=False)
    assert sorted(p.name for p in stopped.glob("chunk_*.json")) == ["chunk_0000002.json"]
    more = np.concatenate([x, x[:1] + 1])  # the same images and one more: a resume that adds a chunk
    assert len(compute_orders(first, more, folder, "plain", progress=False)) == 4


def test_model_fingerprints_follow_the_model_not_the_object(tmp_path):
    import numpy as np

    from keepbits.audit import FunctionAdapter, OnnxAdapter, TorchAdapter

    net = _small_net(0)
    a = TorchAdapter(net, (1, 6, 6))
    assert a.fingerprint() == TorchAdapter(_small_net(0), (1, 6, 6)).fingerprint()
    assert a.fingerprint() != TorchAdapter(_small_net(0), (1, 6, 6), mean=[0.5], std=[0.25]).fingerprint()
    with torch.no_grad():
        net[3].bias[0] += 1e-3  # one weight moved: another model
    assert TorchAdapter(net, (1, 6, 6)).fingerprint() != TorchAdapter(_small_net(0), (1, 6, 6)).fingerprint()
    f = FunctionAdapter(lambda v: v.reshape(len(v), -1)[:, :2], input_shape=(1, 1, 2))
    assert f.fingerprint() == FunctionAdapter(lambda v: v.reshape(len(v), -1)[:, :2], input_shape=(1, 1, 2)).fingerprint()
    assert f.fingerprint() != FunctionAdapter(lambda v: 2 * v.reshape(len(v), -1)[:, :2], input_shape=(1, 1, 2)).fingerprint()
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.onnx")
        torch.onnx.export(_small_net(seed), torch.zeros(1, 1, 6, 6), str(paths[-1]), input_names=["x"], output_names=["logits"],
                          dynamo=False)
    onnx_fps = [OnnxAdapter(p).fingerprint() for p in paths]
    assert onnx_fps[0] != onnx_fps[1] and onnx_fps[0] == OnnxAdapter(paths[0]).fingerprint()
    assert np.isfinite(OnnxAdapter(paths[0]).logits(np.zeros((1, 1, 6, 6), np.float32))).all()


def test_chunks_are_visited_in_a_seeded_random_order():
    """A class-balanced draw comes sorted by class: computing chunks in image order would leave a
    stopped audit with its first classes only. The order covers every chunk once, is the same on
    every call, and spreads over the draw from the start."""
    from keepbits.audit.sis_orders import visit_order

    starts = list(range(0, 400, 4))
    order = visit_order(starts)
    assert sorted(order) == starts and order != starts and order == visit_order(starts)
    assert max(order[:25]) - min(order[:25]) > 200, "the first quarter visited must spread over the draw"


def test_read_orders_returns_the_finished_chunks_and_none_for_the_rest(tmp_path):
    import numpy as np

    from keepbits.audit import TorchAdapter
    from keepbits.audit.sis_orders import read_orders

    x = np.random.default_rng(0).normal(size=(4, 1, 6, 6)).astype(np.float32)
    model = TorchAdapter(_small_net(0), (1, 6, 6))
    computed = compute_orders(model, x[:2], tmp_path, "plain", progress=False)
    found = read_orders(model, x, tmp_path, "plain")
    assert [r is None for r in found] == [False, False, True, True]
    assert [r.order.tolist() for r in found[:2]] == [r.order.tolist() for r in computed]
    assert read_orders(TorchAdapter(_small_net(1), (1, 6, 6)), x, tmp_path, "plain") == [None] * 4  # another model's chunks
    assert read_orders(model, x, tmp_path, "gradient") == [None] * 4  # other settings: no gradient chunk there


def test_an_unreadable_chunk_counts_as_not_done_and_is_computed_again(tmp_path, caplog):
    """A truncated or edited chunk file must not end a long audit: it is logged, reported as
    pending by read_orders, and recomputed by the next run; the other chunks stay untouched."""
    import numpy as np

    from keepbits.audit import TorchAdapter
    from keepbits.audit.sis_orders import read_orders

    x = np.random.default_rng(0).normal(size=(3, 1, 6, 6)).astype(np.float32)
    model = TorchAdapter(_small_net(0), (1, 6, 6))
    first = compute_orders(model, x, tmp_path, "plain", progress=False)
    broken, kept = tmp_path / "chunk_0000001.json", tmp_path / "chunk_0000002.json"
    broken.write_text(broken.read_text()[:100])
    stamp = kept.stat().st_mtime_ns
    assert [r is None for r in read_orders(model, x, tmp_path, "plain")] == [False, True, False]
    assert "chunk_0000001.json: unreadable (JSONDecodeError" in caplog.text
    again = compute_orders(model, x, tmp_path, "plain", progress=False)
    assert [r.order.tolist() for r in again] == [r.order.tolist() for r in first]
    assert kept.stat().st_mtime_ns == stamp and json.loads(broken.read_text())["start"] == 1
