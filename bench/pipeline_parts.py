"""What the explain and compress stages of a deployment bundle cost, part by part, at one thread
(issue 19: the pipeline / classifier-only target).

    OMP_NUM_THREADS=1 python bench/pipeline_parts.py --data ../shared/data \
        --bundles src/keepbits/assets/lite0_nice_bundle.zip runs/bundles_taps/lite0_taps_b8_t0.3_lr1e-3/float32.zip

Per bundle, on ``--frames`` frames of ``videos/bottle-detection.mp4`` brought to the model size by
the bundle's own preprocessing, all in one process with one-thread ONNX Runtime sessions:

* graph: the bundle's graph (logits + mask) against the same graph cut to image → logits
  (``onnx.utils.extract_model``), one frame per call; the difference is what the mask generator
  and the gate add;
* encode: :func:`keepbits.codec.encode` of each frame with the bundle's own mask (the pipeline's
  default codec settings), with the native library's helpers (the one-call lossless blocks path,
  ``keepbits_blocks_scanlines``, and the foreground helpers ``keepbits_kept_blocks``,
  ``keepbits_mosaic``) and with the numpy path they replace (same bytes, checked); and, native,
  at the lossy settings of :data:`LOSSY_SETTINGS` (blocks with WebP means as the demo sent until
  2026-12-06, mixed: x̃ as one image, WebP also at libwebp method 2), with their bytes per frame.

Measures alternate in ``--rounds`` rounds (order rotated); each figure is the median over rounds
of the mean milliseconds per frame (process CPU time: one thread, so it is also the wall time
without the other processes' noise). Writes ``bench/results/pipeline_parts{--tag}.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, parse_args_with_data, video_frames, write_result  # noqa: E402
from runtime_throughput import classifier_only_graph  # noqa: E402

from keepbits.codec import encode, payload  # noqa: E402
from keepbits.runtime import Pipeline  # noqa: E402


#: Lossy codec settings measured besides the default (lossless PNG blocks, raw means).
LOSSY_SETTINGS = {
    "blocks_webp75_webp_means": {"mode": "blocks", "codec": "webp", "quality": 75, "background": "webp"},
    "mixed_webp75": {"mode": "mixed", "codec": "webp", "quality": 75},
    "mixed_webp75_method2": {"mode": "mixed", "codec": "webp", "quality": 75, "webp_method": 2},
    "mixed_jpeg75": {"mode": "mixed", "codec": "jpeg", "quality": 75},
}


def cpu_ms_per_item(run: Callable[[], int]) -> float:
    """Process CPU milliseconds per item of one ``run()`` (which returns how many items it did)."""
    started = time.process_time()
    items = run()
    return (time.process_time() - started) * 1e3 / items


def measure(bundle: Path, frames: list[np.ndarray], rounds: int, work: Path) -> dict:
    """The module docstring's measures for one bundle (``work``: a scratch folder of its own)."""
    from keepbits import native

    pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=1)
    classifier_only = native.make_session(classifier_only_graph(bundle, work / "logits.onnx"), threads=1)
    feeds = [pipe._feed(pipe.prepare([f]).batch) for f in frames]
    name = pipe.manifest.input_name
    results = pipe.predict(frames)
    records = [(r.image, r.frame_record()) for r in results]
    native_bytes = [encode(image, record, timestamp=0.0) for image, record in records]
    fast = {"_native_foreground": payload._native_foreground, "_native_blocks": payload._native_blocks}

    def use_native(on: bool) -> None:
        for attr, function in fast.items():
            setattr(payload, attr, function if on else (lambda: None))

    def graph(session, outputs):
        def run():
            for feed in feeds:
                session.run(outputs, {name: feed})
            return len(feeds)
        return run

    def encode_all(native_path: bool):
        def run():
            use_native(native_path)
            try:
                for image, record in records:
                    encode(image, record)
            finally:
                use_native(True)
            return len(records)
        return run

    def encode_with(options: dict):
        def run():
            for image, record in records:
                encode(image, record, **options)
            return len(records)
        return run

    use_native(False)
    try:
        numpy_bytes = [encode(image, record, timestamp=0.0) for image, record in records]
    finally:
        use_native(True)
    measures = {"graph_ms": graph(pipe.session, ["logits", pipe.manifest.output_names[1]]),
                "classifier_only_ms": graph(classifier_only, ["logits"]),
                "encode_native_ms": encode_all(True), "encode_numpy_ms": encode_all(False),
                **{f"encode_{key}_ms": encode_with(options) for key, options in LOSSY_SETTINGS.items()}}
    for run in measures.values():
        run()  # warm-up
    rows = []
    names = list(measures)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rows.append({key: cpu_ms_per_item(measures[key]) for key in order})
    med = {key: statistics.median(row[key] for row in rows) for key in names}
    return {
        "bundle": str(bundle), "generator": pipe.manifest.generator, "block": pipe.block,
        "native_library": native.library_path() is not None,
        "kept_fraction_mean": float(np.mean([(r.mask > pipe.threshold).mean() for r in results])),
        "payload_bytes_mean": float(np.mean([len(b) for b in native_bytes])),
        "native_and_numpy_payloads_identical": native_bytes == numpy_bytes,
        "median": med, "generator_and_gate_ms": med["graph_ms"] - med["classifier_only_ms"],
        "generator_and_gate_share_of_classifier": (med["graph_ms"] - med["classifier_only_ms"]) / med["classifier_only_ms"],
        "encode_native_over_numpy": med["encode_native_ms"] / med["encode_numpy_ms"],
        "lossy_settings": {key: {**options, "bytes_per_frame": float(np.mean([len(encode(i, r, **options)) for i, r in records])),
                                 "encode_ms": med[f"encode_{key}_ms"]} for key, options in LOSSY_SETTINGS.items()},
        "rounds": rows,
        **({"warning": "the graph timed faster than the classifier alone: load on the cores moved the two timings more than "
                       "the generator costs, so generator_and_gate_ms measures nothing here (see context.load_average)"}
           if med["graph_ms"] < med["classifier_only_ms"] else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "videos/")
    p.add_argument("--bundles", type=Path, nargs="+", required=True, help="deployment bundles (folders or .zip)")
    p.add_argument("--frames", type=int, default=60, help="frames of the video per measure (default: 60)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, order rotated (default: 5)")
    p.add_argument("--tag", default="", help="suffix of the result file (e.g. a control run with another native library)")
    args = parse_args_with_data(p)
    video = args.data / "videos" / "bottle-detection.mp4"
    if not video.is_file():
        p.error(f"no video at {video}")
    missing = [str(b) for b in args.bundles if not b.exists()]
    if missing:
        p.error(f"bundles not found: {', '.join(missing)}")
    frames = video_frames(video, args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = []
        for i, bundle in enumerate(args.bundles):
            (Path(tmp) / str(i)).mkdir()
            bundles.append(measure(bundle, frames, args.rounds, Path(tmp) / str(i)))
    for b in bundles:
        m = b["median"]
        if "warning" in b:
            print(f"warning: {b['bundle']}: {b['warning']}", file=sys.stderr)
        print(f"{b['bundle']}: graph {m['graph_ms']:.2f} vs classifier only {m['classifier_only_ms']:.2f} ms "
              f"(+{b['generator_and_gate_ms']:.2f}); encode {m['encode_native_ms']:.3f} (native) vs {m['encode_numpy_ms']:.3f} ms (numpy); "
              + "; ".join(f"{key} {v['encode_ms']:.3f} ms {v['bytes_per_frame']:.0f} B" for key, v in b["lossy_settings"].items()))
    print(write_result(f"pipeline_parts{args.tag}", {"video": video.name, "frames": len(frames), "threads": 1, "bundles": bundles}))


if __name__ == "__main__":
    main()
