"""bench/gpu_check.py (the one-shot GPU check): its CPU dry run, as CI can run it, and the header
scan of the compile-only step. The GPU parts themselves need the GPU machine (bench/gpu_check.sh)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STEPS = ["probe", "build", "compile_check", "kernel_correctness", "kernel_speed", "nice_first_step", "train_classifier",
         "train_nice", "train_density_simplebits", "audit_sis", "audit_cid"]
#: steps with a CPU reference that the dry run still computes
CPU_PARTS = ("nice_first_step", "audit_sis", "audit_cid")


def test_dry_run_records_every_step_and_computes_the_cpu_references(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run", "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["benchmark"] == "gpu_check" and result["mode"] == "dry run (CPU only)" and result["sizes"] == "tiny"
    assert {"commit", "machine", "command"} <= set(result)
    steps = result["steps"]
    assert list(steps) == STEPS
    assert steps["probe"]["status"] == "ok" and isinstance(steps["probe"]["torch_cuda_available"], bool)
    for name in ("build", "compile_check"):
        assert steps[name]["status"] == "skipped: dry run (--dry-run): nothing is built"
    for name in ("kernel_correctness", "kernel_speed", "train_classifier", "train_nice", "train_density_simplebits"):
        assert steps[name]["status"] == "skipped: dry run (--dry-run)"
    for name in CPU_PARTS:
        assert steps[name]["status"] == "skipped: dry run (--dry-run) (CPU reference computed)", steps[name]
    nice = steps["nice_first_step"]["cpu"]
    assert nice["status"] == "ok" and math.isfinite(nice["loss"]) and nice["loss"] > 0 and nice["images_per_s"] > 0
    sis = steps["audit_sis"]
    assert sis["incremental_resnet20"].startswith(("supported", "not supported"))
    for method, used in (("plain", "plain"), ("incremental", "incremental"), ("gradient", "gradient(k=2)")):
        assert sis[method]["method_used"] == used and sis[method]["cpu_seconds_per_image"] > 0
        assert sis[method]["status"].startswith("skipped: dry run")
    cid = steps["audit_cid"]["cpu"]
    assert cid["status"] == "ok" and math.isfinite(cid["cid"]) and cid["steps"] > 0
    assert not any(entry["status"].startswith("failed") for entry in steps.values())
    assert (tmp_path / "steps.log").is_file()
    assert "audit_cid" in run.stdout  # the closing table


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_missing_headers_names_each_header_the_source_cannot_find(tmp_path, bench_script):
    gpu_check = bench_script("gpu_check")
    (tmp_path / "present.h").write_text("#pragma once\n#include <keepbits_absent_b.h>\n")
    source = tmp_path / "probe.cc"
    source.write_text('#include <keepbits_absent_a.h>\n#include "present.h"\n#include <cstdint>\n')
    assert gpu_check.missing_headers(source, [str(tmp_path)]) == ["keepbits_absent_a.h", "keepbits_absent_b.h"]
    (tmp_path / "keepbits_absent_a.h").write_text("#pragma once\n")
    (tmp_path / "keepbits_absent_b.h").write_text("#pragma once\n")
    assert gpu_check.missing_headers(source, [str(tmp_path)]) == []
