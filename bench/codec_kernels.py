"""The native library's codec kernels, one at a time, on the runtime's real frames and masks.

    OMP_NUM_THREADS=1 python bench/codec_kernels.py --data ../shared/data \
        --bundle src/keepbits/assets/lite0_nice_bundle.zip
    # a control with another build of the library (e.g. an earlier commit's):
    KEEPBITS_NATIVE_LIB=/path/to/libkeepbits_ort.so python bench/codec_kernels.py ... --tag _other

On ``--frames`` frames of ``videos/bottle-detection.mp4`` brought to the bundle's model size by its
own preprocessing, with the bundle's own hard masks: ``keepbits_block_means`` (at b = 4 and 8),
``keepbits_kept_blocks`` and ``keepbits_mosaic`` (at the bundle's b), called directly through
``ctypes`` on preallocated buffers (no Python work inside the timed loop besides the call), and
:func:`keepbits.codec.encode` of each frame at the pipeline's default settings. Each figure is the
smallest over ``--repeats`` passes of the mean microseconds per frame (process CPU time, one
thread): interference from other processes only ever adds time, so the minimum is the least noisy
estimate on a shared machine. Writes ``bench/results/codec_kernels{--tag}.json``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, parse_args_with_data, video_frames, write_result  # noqa: E402

from keepbits import native  # noqa: E402
from keepbits.codec import encode, payload  # noqa: E402
from keepbits.runtime import Pipeline  # noqa: E402


def fastest(run: Callable[[int], object], items: int, repeats: int) -> float:
    """Least mean process-CPU microseconds per item of ``run(i)`` over ``repeats`` passes."""
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for i in range(items):
            run(i)
        best = min(best, (time.process_time() - start) * 1e6 / items)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "videos/")
    p.add_argument("--bundle", type=Path, required=True, help="deployment bundle whose masks and block size are used")
    p.add_argument("--frames", type=int, default=60, help="frames of the video (default: 60)")
    p.add_argument("--repeats", type=int, default=20, help="passes per figure; the fastest counts (default: 20)")
    p.add_argument("--tag", default="", help="suffix of the result file")
    args = parse_args_with_data(p)
    library = native.library_path()
    kernels = {name: native.c_function(name) for name in ("keepbits_block_means", "keepbits_kept_blocks", "keepbits_mosaic")}
    if library is None or None in kernels.values():
        p.error("the native library is not built (native/build.sh) or lacks the codec kernels")
    pipe = Pipeline.from_bundle(args.bundle, backend="onnxruntime", threads=1, compress=False)
    frames = video_frames(args.data / "videos" / "bottle-detection.mp4", args.frames)
    results = [pipe.predict([f])[0] for f in frames]
    h, w, c, b = pipe.height, pipe.width, pipe.channels, pipe.block
    images = [np.ascontiguousarray(r.image) for r in results]
    keeps = [np.ascontiguousarray(r.mask > r.threshold).view(np.uint8) for r in results]
    grids = [payload._grid_means(x, b) for x in images]
    kept = [payload._kept_blocks(k.view(bool), b).view(np.uint8) for k in keeps]
    counts = [int(k.sum()) for k in kept]
    mosaics = [np.zeros(payload._mosaic_shape(max(k, 1), b, b, c), np.uint8) for k in counts]
    cols = [math.ceil(math.sqrt(max(k, 1))) for k in counts]
    means = {s: np.empty((-(-h // s), -(-w // s), c), np.uint8) for s in (4, 8)}
    flags = np.empty((-(-h // b), -(-w // b)), np.uint8)
    block_means, kept_blocks, mosaic = (kernels[k] for k in ("keepbits_block_means", "keepbits_kept_blocks", "keepbits_mosaic"))
    # the buffers' addresses, taken once: the timed loops hold only the calls
    image_at, keep_at, grid_at, kept_at, mosaic_at = ([a.ctypes.data for a in arrays] for arrays in (images, keeps, grids, kept, mosaics))
    means_at, flags_at = {s: a.ctypes.data for s, a in means.items()}, flags.ctypes.data
    n, repeats = len(results), args.repeats
    micros = {f"block_means_b{s}": fastest(lambda i, s=s: block_means(image_at[i], h, w, c, s, means_at[s]), n, repeats) for s in (4, 8)}
    micros[f"kept_blocks_b{b}"] = fastest(lambda i: kept_blocks(keep_at[i], h, w, b, flags_at), n, repeats)
    micros[f"mosaic_b{b}"] = fastest(lambda i: mosaic(image_at[i], keep_at[i], grid_at[i], kept_at[i], h, w, c, b, b, cols[i], mosaic_at[i]),
                                     n, repeats)
    micros["encode"] = fastest(lambda i: encode(results[i].image, results[i].frame_record()), n, repeats)
    payload_bytes = float(np.mean([len(encode(r.image, r.frame_record())) for r in results]))
    print(", ".join(f"{k} {v:.1f} µs" for k, v in micros.items()), flush=True)
    print(write_result(f"codec_kernels{args.tag}", {
        "bundle": str(args.bundle), "native_library": str(library), "video": "bottle-detection.mp4", "frames": n,
        "repeats": repeats, "model_size": [h, w, c], "block": b, "kept_fraction_mean": float(np.mean([r.kept_fraction for r in results])),
        "kept_tiles_mean": float(np.mean(counts)), "payload_bytes_mean": payload_bytes,
        "microseconds_per_frame": micros,
        "definition": "fastest of --repeats passes of the mean process-CPU microseconds per frame (one thread)",
    }))


if __name__ == "__main__":
    main()
