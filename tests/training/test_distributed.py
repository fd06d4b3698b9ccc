"""DistributedDataParallel on CPU: two gloo processes train together and end on the same weights."""
import json
import os
import subprocess
import sys

import numpy as np

from keepbits.training.checkpoint import load_checkpoint


def test_two_cpu_ranks_agree(tmp_path, tiny_npz, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
           "-m", "keepbits", "-q", "train", "classifier", "--data", str(tiny_npz), "--arch", "lenet5",
           "--out", str(tmp_path / "ddp"), "--epochs", "2", "--batch-size", "8", "--optimizer", "adamw", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt", "classifier")
    digests = ckpt.metrics["rank_parameter_digests"]
    assert ckpt.metrics["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # each rank saw half of the 54 training images per epoch: 4 steps of 8 (last one partial)
    assert json.loads(proc.stdout)["best"]["epoch"] in (1, 2)
