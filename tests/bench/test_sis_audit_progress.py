"""bench/sis_audit_progress.py: the progress record of a (partial) exact-SIS audit counts only the
chunks of the audited model and the runs the audit itself would make."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_progress_counts_this_models_chunks_and_the_runs_the_audit_needs(tmp_path, bench_script):
    from keepbits import registry
    from keepbits.audit.sis_report import sis_audit
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    def checkpoint(seed: int):
        torch.manual_seed(seed)
        kwargs = {"in_channels": 3, "num_classes": 3, "image_size": [8, 8]}
        return save_checkpoint(tmp_path / f"m{seed}.pt", Checkpoint(
            kind="classifier", models={"classifier": ModelEntry.of("convnet3", kwargs, registry.build("convnet3", **kwargs))},
            input_shape=[3, 8, 8], normalization=Normalization([0.5] * 3, [0.25] * 3), class_names=["a", "b", "c"]))

    rng = np.random.default_rng(0)
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "test.npz", x=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), y=np.arange(12) % 3)
    model, other = checkpoint(0), checkpoint(1)
    from keepbits.data import load_dataset

    images = load_dataset(str(tmp_path / "cifar10"), "test").sample(3, 0)
    audit = tmp_path / "audit"
    more = load_dataset(str(tmp_path / "cifar10"), "test").sample(4, 1)
    sis_audit(str(model), images.x, images.y, audit, threshold=0.0, thresholds=[0.0], progress=False)
    # another model's chunk beside them (an audit refuses to write there now; a folder from before that may hold one)
    sis_audit(str(other), more.x, more.y, tmp_path / "other", threshold=0.0, thresholds=[0.0], progress=False)
    shutil.copy(tmp_path / "other" / "orders" / "chunk_0000003.json", audit / "orders")
    record = bench_script("sis_audit_progress").progress(audit, model, tmp_path / "cifar10", 3, 0, [0.0], 2)
    assert record["backselect_runs_needed"] == 3 and record["backselect_runs_done"] == 3
    assert record["chunk_files"] == 4 and record["chunk_files_of_other_models"] == 1  # not counted
    assert record["hours_left_projected"] == 0 and record["seconds_per_backselect"]["median"] > 0
    interim = record["interim"]  # the partial report over the finished runs: here all of them
    assert (interim["backselect_runs"], interim["backselect_runs_done"]) == (3, 3) and (audit / "report_partial.html").exists()
    assert sum(c["needed"] for c in interim["per_class"].values()) == sum(c["done"] for c in interim["per_class"].values()) == 3
    assert interim["sis_size_fraction"][0]["threshold"] == 0.0 and interim["sis_size_fraction"][0]["images"] == 3
    assert len(record["chunks_written_utc"]) == 2 and record["chunks_written_utc"][0] <= record["chunks_written_utc"][1]
    assert record["chunks_without_write_time"] == 0
    json.dumps(record)
    # an audit run in two pieces (killed, resumed a day later): the rate counts the hours it ran, not the gap;
    # the times come from the chunks, not from the files (a checkout gives every file the same time)
    mine = [p for p in sorted((audit / "orders").glob("chunk_*.json")) if json.loads(p.read_text())["model"] == record["model_fingerprint"]]
    for path, t in zip(mine, (1_000_000.0, 1_000_000.0 + 3600, 1_000_000.0 + 86_400)):
        chunk = json.loads(path.read_text())
        chunk["written_at"] = t
        for result in chunk["results"]:
            result["seconds"] = 3000.0  # runs of 50 minutes: a chunk an hour apart is the same piece, a day apart is not
        path.write_text(json.dumps(chunk))
        os.utime(path, (2_000_000.0, 2_000_000.0))
    record = bench_script("sis_audit_progress").progress(audit, model, tmp_path / "cifar10", 3, 0, [0.0], 2)
    assert [piece["chunks"] for piece in record["pieces"]] == [2, 1] and record["runs_per_hour_within_pieces"] == 1.0
    # a chunk from before chunks recorded their time is counted as done but left out of the rate
    chunk = json.loads(mine[2].read_text())
    del chunk["written_at"]
    mine[2].write_text(json.dumps(chunk))
    record = bench_script("sis_audit_progress").progress(audit, model, tmp_path / "cifar10", 3, 0, [0.0], 2)
    assert record["backselect_runs_done"] == 3 and record["chunks_without_write_time"] == 1
    assert [piece["chunks"] for piece in record["pieces"]] == [2]
