"""keepbits.training.distributed: DistributedDataParallel on CPU (two gloo processes train together and
end on the same weights), and the helper on one process."""
import json
import os
import subprocess
import sys

from keepbits.training.checkpoint import load_checkpoint


def test_two_cpu_ranks_agree(tmp_path, tiny_npz, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
           "-m", "keepbits", "-q", "train", "classifier", "--data", str(tiny_npz), "--arch", "lenet5",
           "--out", str(tmp_path / "ddp"), "--epochs", "2", "--batch-size", "8", "--optimizer", "adamw", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    assert "Grad strides do not match" not in proc.stderr  # -q: DDP's channels-last note is not shown (it was, per rank)
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt", "classifier")
    digests = ckpt.metrics["rank_parameter_digests"]
    assert ckpt.metrics["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # each rank saw half of the 54 training images per epoch: 4 steps of 8 (last one partial)
    assert json.loads(proc.stdout)["best"]["epoch"] in (1, 2)


def test_helper_on_one_process_is_the_identity(monkeypatch):
    """Without torchrun every collective is a no-op on the local value and nothing joins a group."""
    import torch
    import torch.distributed as tdist

    from keepbits.training.distributed import Dist, all_gather, all_reduce_sum, barrier, broadcast_buffers, init_distributed, shutdown

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init_distributed(use_cuda=False)
    assert dist == Dist(0, 1, "cpu", False) and dist.main
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(use_cuda=False) == dist
    barrier(dist)
    assert all_gather(dist, {"digest": "ab"}) == [{"digest": "ab"}]
    stats = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(dist, stats) is stats and stats.tolist() == [1.0, 2.0]
    net = torch.nn.BatchNorm1d(2)
    before = [b.clone() for b in net.buffers()]
    broadcast_buffers(dist, net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
    shutdown(dist)
    assert not tdist.is_initialized()
