"""The lossless background section of a blocks payload: raw (deflate level 6) or PNG?

    python bench/codec_background.py --data ../shared/data --repeats 5

A blocks payload carries the bh×bw×C grid of rounded block means (the paper's x_b) as its
background section. This measures, per content kind and block size, the bytes and the encode
time of that section with each lossless background codec of :func:`keepbits.codec.encode`:
``raw`` (the grid's bytes deflated at level 6) and ``png`` (keepbits' PNG writer: Paeth filter,
run-length deflate), and which is smaller per image. The images are model-size frames from
splits that are not test sets (the rule chosen from them must not be tuned on a test set):
ImageNet sample images of the training and validation splits (classes with index % 5 != 0,
center-crop 224 as EfficientNet-Lite0), letterboxed 224×224 frames of
``videos/bottle-detection.mp4``, CIFAR-10 and MNIST training images (a seeded, class-balanced
sample), and Kodak photographs at their own size (descriptive). One thread; times are medians
over ``--repeats`` passes. Writes ``bench/results/codec_background.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, median_seconds_per_item, parse_args_with_data, video_frames, write_result  # noqa: E402
from imagenet_splits import split_of  # noqa: E402

from keepbits.codec import payload  # noqa: E402
from keepbits.data import load_dataset, sample_indices  # noqa: E402
from keepbits.runtime import Pipeline  # noqa: E402
from keepbits.runtime.synthetic import toy_bundle  # noqa: E402

#: the lossless background codecs of keepbits.codec.encode
CODECS = ("raw", "png")


def fitted(frames: list[np.ndarray], work: Path, policy: str, crop_fraction: float = 1.0) -> list[np.ndarray]:
    """``frames`` brought to 224×224 by the runtime's own preprocessing (``policy``)."""
    pipe = Pipeline.from_bundle(toy_bundle(work / policy, size=224, resize_policy=policy, crop_fraction=crop_fraction))
    return [pipe.prepare([f]).batch[0] for f in frames]


def imagenet_frames(data: Path, count: int, work: Path) -> list[np.ndarray]:
    """``count`` ImageNet sample images outside the evaluation split (classes with index % 5 != 0,
    a seeded draw of classes, one image each), center-cropped to 224 as EfficientNet-Lite0's."""
    import json

    classes = json.loads((data / "imagenet_samples" / "classes.json").read_text())
    pool = [c for c in classes if split_of(int(c["index"])) != "eval"]
    chosen = [pool[i] for i in sorted(np.random.default_rng(0).choice(len(pool), count, replace=False))]
    frames = [cv2.cvtColor(cv2.imread(str(min((data / "imagenet_samples" / c["wnid"]).iterdir()))), cv2.COLOR_BGR2RGB)
              for c in chosen]
    return fitted(frames, work, "center-crop", 0.875)


def image_sets(data: Path, count: int, work: Path) -> dict[str, tuple[list[np.ndarray], tuple[int, ...]]]:
    """Content kind -> (uint8 images H×W×C, the block sizes measured on them)."""
    cifar, mnist = load_dataset(data / "cifar10", "train"), load_dataset(data / "mnist", "train")
    return {
        "ImageNet samples (train/val classes), center-crop 224": (imagenet_frames(data, count, work), (4, 8, 16)),
        "bottle-detection.mp4 frames, letterbox 224": (fitted(video_frames(data / "videos" / "bottle-detection.mp4", count, 5), work, "letterbox"), (4, 8, 16)),
        "CIFAR-10 training images 32x32": (list(cifar.x[sample_indices(cifar.y, count, seed=0)]), (2, 4)),
        "MNIST training images 28x28 (grey)": (list(mnist.x[sample_indices(mnist.y, count, seed=0)]), (2, 4)),
        "Kodak photographs 768x512": ([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((data / "kodak").glob("*.png"))], (8, 16)),
    }


def section(grid: np.ndarray, codec: str) -> bytes:
    """The background section's bytes as :func:`keepbits.codec.encode` writes them."""
    return payload._encode_section(grid, payload.BACKGROUND_CODECS[codec], 90, {"png_level": None, "webp_method": None})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "kodak/ and videos/")
    p.add_argument("--images", type=int, default=64, help="images per content kind (Kodak: all 24)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    args = parse_args_with_data(p)
    cv2.setNumThreads(1)
    import tempfile

    rows = []
    for kind, (images, blocks) in image_sets(args.data, args.images, Path(tempfile.mkdtemp(prefix="kb-bg-"))).items():
        for b in blocks:
            grids = [payload._grid_means(img if img.ndim == 3 else img[..., None], b) for img in images]
            sizes = {c: np.array([len(section(g, c)) for g in grids]) for c in CODECS}
            times = {c: 1e6 * median_seconds_per_item(lambda g: section(g, c), grids, args.repeats) for c in CODECS}
            rows.append({"content": kind, "block": b, "grid": list(grids[0].shape), "images": len(grids),
                         "bytes_mean": {c: float(sizes[c].mean()) for c in CODECS},
                         "us_per_image_median": times,
                         "png_smaller_share": float((sizes["png"] < sizes["raw"]).mean()),
                         "png_over_raw_bytes": float(sizes["png"].sum() / sizes["raw"].sum())})
            r = rows[-1]
            print(f"{kind:55s} b={b:2d} grid {str(r['grid']):13s} raw {r['bytes_mean']['raw']:8.0f} B {times['raw']:7.1f} us"
                  f"  png {r['bytes_mean']['png']:8.0f} B {times['png']:7.1f} us  png/raw {r['png_over_raw_bytes']:.3f}"
                  f"  png smaller on {100 * r['png_smaller_share']:.0f} %", flush=True)
    print(write_result("codec_background", {"rows": rows, "repeats": args.repeats, "threads": 1, "codecs": list(CODECS)}))


if __name__ == "__main__":
    main()
