"""SIS orders sharded over torchrun processes (2 gloo processes match one), cached chunk by chunk, resumable."""
import json
import os
import subprocess
import sys
import textwrap

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
    compute_orders(model, x, folder, "incremental", k=5, chunk=2, progress=False)
    assert kept.stat().st_mtime_ns == stamp and _orders(folder) == _orders(tmp_path / "single" / "incremental")


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
