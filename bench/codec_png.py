"""PNG settings for payload sections: time and bytes per image on real content.

    python bench/codec_png.py --data ../shared/data --repeats 5

Compares the codec's default (``png_level=None``: :func:`keepbits.codec.png.encode_png`, Paeth
filter + run-length deflate, with zlib-ng and with the standard library's zlib, with the native
library's filter and with the OpenCV one used without it) with OpenCV's
encoder at the same filter and strategy (the default before), zlib level 4 after Paeth (the
default before that), level 1 after Paeth, and level 6 with OpenCV's adaptive filters, on:
letterboxed 224×224 frames of ``videos/bottle-detection.mp4`` (what the runtime encodes),
foreground mosaics of those frames under a disc mask (kept blocks only, ``docs/codec.md``),
Kodak photographs, a 256×256 grid of CIFAR-10 test images, a 224×224 grid of MNIST digits
(grey), the bundled demo clip's frames (640×360) and a periodic synthetic pattern (long-range
repeats). One thread; times are medians over ``--repeats`` passes. Writes
``bench/results/codec_png.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, median_seconds_per_item, parse_args_with_data, video_frames, write_result  # noqa: E402

from keepbits.codec import deflate, payload, png  # noqa: E402
from keepbits.data import load_dataset  # noqa: E402
from keepbits.runtime import Pipeline  # noqa: E402
from keepbits.runtime.synthetic import toy_bundle  # noqa: E402

PAETH = [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
SETTINGS = {
    "default (keepbits PNG writer: Paeth + RLE deflate, zlib-ng)": None,  # the codec's own writer
    "default writer with the standard library's zlib": "stdlib",
    "default writer, OpenCV filter (no native library)": "opencv_filter",
    "OpenCV, Paeth + zlib RLE (previous default)": [cv2.IMWRITE_PNG_COMPRESSION, 1, *PAETH,
                                                     cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE],
    "zlib level 4 + Paeth (the default before that)": [cv2.IMWRITE_PNG_COMPRESSION, 4, *PAETH],
    "zlib level 1 + Paeth": [cv2.IMWRITE_PNG_COMPRESSION, 1, *PAETH],
    "zlib level 6, adaptive filters (png_level=6)": [cv2.IMWRITE_PNG_COMPRESSION, 6],
}


def image_sets(data: Path, work: Path) -> dict[str, list[np.ndarray]]:
    """RGB (or grey) uint8 images per content kind."""
    pipe = Pipeline.from_bundle(toy_bundle(work / "toy", size=224))  # only its letterbox is used
    letterboxed = [pipe.prepare([f]).batch[0] for f in video_frames(data / "videos" / "bottle-detection.mp4", 10, 20)]
    yy, xx = np.mgrid[:224, :224]
    disc = (yy - 112) ** 2 + (xx - 100) ** 2 < 60 ** 2
    mosaics = []
    for img in letterboxed:
        grid, kept = payload._grid_means(img, 8), payload._kept_blocks(disc, 8)
        mosaics.append(payload._mosaic(img, disc, grid, kept, int(kept.sum()), 8, 8))
    kodak = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((data / "kodak").glob("*.png"))[:8]]
    cifar = load_dataset(data / "cifar10", "test").sample(64).x
    mnist = load_dataset(data / "mnist", "test").sample(64).x[..., 0]
    yy, xx = np.mgrid[:128, :128].astype(np.float32)
    periodic = np.clip(np.stack([128 + 60 * np.sin(xx / 9), 128 + 60 * np.cos(yy / 13), (xx + yy) / 2], -1), 0, 255)
    demo = Path(payload.__file__).resolve().parents[1] / "assets" / "bottle_clip.mp4"
    return {
        "camera frames, letterboxed 224x224 (bottle-detection.mp4)": letterboxed,
        "foreground mosaics of those frames (disc mask, b = 8)": mosaics,
        "Kodak photographs 768x512": kodak,
        "CIFAR-10 test images, 8x8 grid (256x256)": [cifar.reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)],
        "MNIST test digits, 8x8 grid (224x224, grey)": [mnist.reshape(8, 8, 28, 28).transpose(0, 2, 1, 3).reshape(224, 224)],
        "the bundled demo clip's frames 640x360": video_frames(demo, 10, 5),
        "periodic synthetic pattern 128x128": [periodic.astype(np.uint8)],
    }


def encode(img: np.ndarray, params: list[int] | str | None) -> bytes:
    if params is None:
        return payload._encode_image(img[..., None] if img.ndim == 2 else img, payload.CODEC_PNG, 0, {"png_level": None, "webp_method": None})
    if params == "stdlib":
        fast, deflate._impl = deflate._impl, zlib
        try:
            return png.encode_png(img)
        finally:
            deflate._impl = fast
    if params == "opencv_filter":
        native_filter, png._native_filter = png._native_filter, lambda: None
        try:
            return png.encode_png(img)
        finally:
            png._native_filter = native_filter
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    return cv2.imencode(".png", bgr, params)[1].tobytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "videos/, kodak/, cifar10/ and mnist/")
    p.add_argument("--repeats", type=int, default=5)
    args = parse_args_with_data(p)
    cv2.setNumThreads(1)
    import tempfile

    sets = image_sets(args.data, Path(tempfile.mkdtemp(prefix="kb-png-")))
    rows = []
    for kind, images in sets.items():
        for name, params in SETTINGS.items():
            sizes = [len(encode(img, params)) for img in images]
            ms = 1e3 * median_seconds_per_item(lambda img: encode(img, params), images, args.repeats)
            rows.append({"content": kind, "setting": name, "images": len(images), "bytes_mean": statistics.mean(sizes),
                         "ms_per_image_median": ms})
            print(f"{kind:58s} {name:46s} {rows[-1]['bytes_mean']:10.0f} B {rows[-1]['ms_per_image_median']:7.3f} ms", flush=True)
    print(write_result("codec_png", {"rows": rows, "repeats": args.repeats, "threads": 1, "deflate": deflate.name(),
                                     "native_filter": png._native_filter() is not None}))


if __name__ == "__main__":
    main()
