"""Run a model bundle on a video with the Python API and receive the payloads over TCP.

    python examples/run_pipeline.py                       # the bundled demo model and stream
    python examples/run_pipeline.py --model B.zip --source video.mp4 --frames 50

A receiver thread listens on loopback; the pipeline's payloads go through
``keepbits.runtime.net.TcpSink``; the receiver decodes them to PNGs in ``--out``.
"""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

from keepbits.cli.demo import DEMO_BUNDLE, DEMO_STREAM
from keepbits.codec import decode
from keepbits.runtime import Pipeline, open_source
from keepbits.runtime.net import TcpSink, receive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_BUNDLE))
    p.add_argument("--source", default=str(DEMO_STREAM))
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("received"))
    args = p.parse_args()

    pipe = Pipeline.from_bundle(args.model, codec="webp", quality=85)
    ready, stats = threading.Event(), {}
    rx = threading.Thread(target=lambda: stats.update(receive("127.0.0.1", 0, args.out, once=True, ready=ready, idle_timeout=10)))
    rx.start()
    ready.wait(10)
    sink = TcpSink("127.0.0.1", ready.port)
    with open_source(args.source) as src:
        for frame in src:
            if frame.index >= args.frames:
                break
            r = pipe(frame.image)
            _, mask, meta = decode(r.payload)
            print(f"frame {frame.index:3d}: {r.label} ({r.score:.2f}), kept {100 * r.kept_fraction:4.1f}% of pixels, "
                  f"{len(r.payload)} B, {meta.kept_blocks}/{meta.total_blocks} blocks, model {r.timings['model']:.1f} ms")
            sink.send(r.payload)
    sink.close()
    rx.join(15)
    print(f"receiver: {stats}")


if __name__ == "__main__":
    main()
