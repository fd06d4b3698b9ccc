"""Benchmark bookkeeping: every result JSON records commit, machine, versions and command.

Used by the scripts in ``bench/`` and by ``keepbits bench ...``. Results go to
``bench/results/`` of the source checkout the command runs in (found from the current
folder), else to ``./bench-results``.

Example:
    >>> from keepbits.benchmarking import machine
    >>> "cpus" in machine()
    True
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path



def project_root() -> Path:
    """The keepbits source checkout containing the current folder (or the current folder)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "bench").is_dir():
            return folder
    return here


def results_dir() -> Path:
    root = project_root()
    return root / "bench" / "results" if (root / "bench").is_dir() else root / "bench-results"


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the project root, when present."""
    candidate = project_root().parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _commit() -> str:
    """HEAD of the checkout (``+dirty`` with uncommitted changes); where git or the repository is
    missing (a copied working tree), ``$KEEPBITS_COMMIT`` as given by whoever copied it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(), capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        given = os.environ.get("KEEPBITS_COMMIT", "").strip()
        return f"{given} (from KEEPBITS_COMMIT)" if given else "unknown"


#: The checkout the benchmark started from (a long run may see later commits by the time it writes).
_COMMIT_AT_START = _commit()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("numpy", "torch", "onnx", "onnxruntime", "cv2", "PIL", "zlib_ng"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def machine() -> dict[str, object]:
    info: dict[str, object] = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_result(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<results>/<name>.json`` (or ``<out_dir>/<name>.json``) with provenance around
    ``payload``; returns the path."""
    out_dir = Path(out_dir) if out_dir is not None else results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _COMMIT_AT_START,
        "command": shlex.join([os.path.relpath(sys.argv[0], project_root()) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]),
        "machine": machine(),
        "versions": _versions(),
        **payload,
    }
    if (now := _commit()) != _COMMIT_AT_START:
        record["commit_at_write"] = now
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path
