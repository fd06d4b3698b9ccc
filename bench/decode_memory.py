"""Peak memory of :func:`keepbits.codec.decode` on the largest payloads its default limits let
through (the bound stated in ``docs/codec.md``, "Decoder safety").

Each payload is decoded in a fresh process that only reads it; the peak RSS is reset right before
decoding (``/proc/self/clear_refs``, Linux) and read after it (``VmHWM``): the difference to the RSS
before is what decoding added at its peak (numpy, Pillow and zlib buffers alike). Cases: frames of ``max_pixels`` (2048×2048 by default) with every block dropped
(background means + mask only; the payload needs ≥ 4 KiB under the default 1024 pixels per
byte, so the background is noise), every block kept (lossless PNG and JPEG foregrounds), paper
and simplified mode; plus the issue's 4 KiB payload declaring 5792×5792, refused by default and
measured with both limits lifted.

    python bench/decode_memory.py            # writes bench/results/decode_memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DECODE = r"""
import json, sys, time
from keepbits.codec import decode

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

payload = open(sys.argv[1], "rb").read()
limits = dict(max_pixels=1 << 26, max_pixels_per_byte=None) if sys.argv[2] == "1" else {}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
t = time.perf_counter()
try:
    out, error = decode(payload, **limits)[0].nbytes, None
except Exception as exc:
    out, error = 0, f"{type(exc).__name__}: {exc}"
seconds = time.perf_counter() - t
print(json.dumps({"image_bytes": out, "decode_s": round(seconds, 3), "peak_rss_added_mb": round((status("VmHWM") - before) / 1024, 1),
                  "error": error}))
"""


def payload(side: int, kind: str) -> bytes:
    """The payload of case ``kind`` for a side×side RGB frame."""
    import numpy as np

    from keepbits.codec import encode

    rng = np.random.default_rng(0)
    if kind == "dropped":
        frame, block = np.zeros((side, side, 3), np.uint8), 64
    elif kind == "dropped_noise":  # noise block means: a payload large enough for the default ratio
        frame, block = np.repeat(np.repeat(rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8), 32, 0), 32, 1), 32
    else:
        frame, block = rng.integers(0, 256, (side, side, 3), dtype=np.uint8), 8
    keep = np.full((side, side), kind.startswith("kept"))
    options = {"kept_jpeg": dict(codec="jpeg", quality=90), "kept_paper": dict(mode="paper"),
               "kept_simplified": dict(mode="simplified")}.get(kind, {})
    return encode(frame, keep, block=block, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="decode_memory")
    args = parser.parse_args()
    from _results import write_result

    cases = [(2048, "dropped_noise", False), (2048, "kept", False), (2048, "kept_jpeg", False),
             (2048, "kept_paper", False), (2048, "kept_simplified", False),
             (5792, "dropped", False), (5792, "dropped", True), (5792, "kept", True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side, kind, lift in cases:
            path = Path(tmp) / "payload.kbit"
            data = payload(side, kind)
            path.write_bytes(data)
            out = subprocess.run([sys.executable, "-c", DECODE, str(path), "1" if lift else "0"], check=True,
                                 capture_output=True, text=True).stdout
            rows.append({"side": side, "kind": kind, "limits_lifted": lift, "payload_bytes": len(data), **json.loads(out)})
            print(rows[-1], flush=True)
    decoded = [r for r in rows if r["image_bytes"]]
    worst = max(r["peak_rss_added_mb"] * 2**20 / r["image_bytes"] for r in decoded)
    default = [r for r in decoded if not r["limits_lifted"]]
    write_result(args.name, {"cases": rows, "worst_peak_over_image_bytes": round(worst, 2),
                             "worst_peak_mb_at_default_limits": max(r["peak_rss_added_mb"] for r in default)})


if __name__ == "__main__":
    main()
