"""How long ``keepbits demo`` takes (issue 19, section 6: under a minute on 2 cores), measured
as a user runs it: the installed ``keepbits`` command in a child process, its wall time and the
CPU time it and its children used, the machine's load average at the start, and what the demo
reported (stream fps, payload bytes per frame, agreement, JPEG/WebP at matched agreement).

    python bench/demo_time.py            # extra demo arguments after --, e.g. -- --webp-method 2

Writes ``bench/results/demo_time.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="demo_time", help="results name (bench/results/<name>.json)")
    parser.add_argument("demo_args", nargs="*", help="arguments passed on to keepbits demo (after --)")
    args = parser.parse_args()
    command = shutil.which("keepbits") or sys.exit("the keepbits command is not on PATH (pip install -e .)")
    out = Path(tempfile.mkdtemp()) / "demo"
    load = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([command, "demo", "--out", str(out), *args.demo_args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"keepbits demo exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    matched = summary.get("matched_agreement") or {}
    payload = {
        "demo_command": ["keepbits", "demo", "--out", "OUT", *args.demo_args],
        "cpu_count": os.cpu_count(), "load_average_at_start": load,
        "wall_s": round(wall, 2),
        "cpu_s": {"user": round(after.ru_utime - before.ru_utime, 2), "system": round(after.ru_stime - before.ru_stime, 2)},
        "target": "under a minute on 2 cores", "met": wall < 60.0,
        "frames": summary["written"], "stream_seconds": summary["seconds"], "stream_fps": summary["fps"],
        "codec": summary["pipeline"]["codec"], "kept_fraction_mean": summary["kept_fraction_mean"],
        "payload_bytes_per_frame": summary["payload_bytes_per_frame"],
        "agreement_with_full_frame": (matched.get("payload") or {}).get("agreement"),
        "matched_agreement": {fmt: None if row is None else {k: row[k] for k in ("quality", "bytes_per_image", "agreement")}
                              for fmt, row in (matched.get("matched") or {}).items()},
        "baseline_bytes_over_payload": matched.get("ratios"),
    }
    print(write_result(args.name, payload))
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
