"""How small can x̃ get at the kept shares masks reach on real images (issue 19, section 7)?

The byte target (≤ 1 pt top-1 loss at ≥ 2× fewer bytes than the best whole-frame JPEG/WebP) needs
x̃ = x⊙z + avgpool_b(x)⊙(1−z) to code in at most half the whole frame's bytes. This bench measures
that ratio as a function of the kept share, on the 200 *validation* ImageNet sample images (class
index % 5 == 1; the evaluation split is not touched), with the model images of a bundle
(EfficientNet-Lite0, its resize policy):

* ``nice``: the bundle generator's own hard mask (ẑ > threshold), whatever share it keeps;
* ``random``: seeded random masks of b×b cells keeping each of ``--shares`` (scattered cells: a
  costly layout);
* ``centre``: the b×b cells nearest the image centre, each of ``--shares`` (one compact region: a
  cheap layout, and the prior that ImageNet objects sit in the middle);

each x̃ coded as payload mode ``mixed`` (:func:`keepbits.codec.encode`: one WebP / JPEG image + the
mask bits) at each ``--qualities``, decoded and classified again by the bundle, against the whole
frame at the same codec and quality. Reported per row: mean bytes, bytes over the whole frame's,
top-1 and agreement with the full-image prediction.

    OMP_NUM_THREADS=2 python bench/real_world_ceiling.py --data ../shared/data \\
        --bundle runs/bundles_shipped/lite0_nice_b4_t0.5_shipped/float32.zip
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, parse_args_with_data, write_result  # noqa: E402
from real_world import predictions, split_images  # noqa: E402

from keepbits.codec import decode, encode  # noqa: E402
from keepbits.codec.images import decode_image, encode_image  # noqa: E402
from keepbits.runtime import Pipeline  # noqa: E402


def random_cells(shape: tuple[int, int], block: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """An H×W boolean mask of whole b×b cells, ``round(share × cells)`` of them, drawn at random."""
    h, w = shape
    rows, cols = -(-h // block), -(-w // block)
    cells = np.zeros(rows * cols, bool)
    cells[rng.choice(rows * cols, int(round(share * rows * cols)), replace=False)] = True
    return np.kron(cells.reshape(rows, cols), np.ones((block, block), bool))[:h, :w]


def centre_cells(shape: tuple[int, int], block: int, share: float) -> np.ndarray:
    """An H×W boolean mask of the ``round(share × cells)`` b×b cells whose centres lie nearest the
    image centre (ties by cell index)."""
    h, w = shape
    rows, cols = -(-h // block), -(-w // block)
    y, x = np.mgrid[:rows, :cols]
    distance = np.hypot((y + 0.5) * block - h / 2, (x + 0.5) * block - w / 2).ravel()
    cells = np.zeros(rows * cols, bool)
    cells[np.argsort(distance, kind="stable")[: int(round(share * rows * cols))]] = True
    return np.kron(cells.reshape(rows, cols), np.ones((block, block), bool))[:h, :w]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "imagenet_samples/")
    p.add_argument("--bundle", type=Path, required=True, help="a NICE deployment bundle (.zip or folder)")
    p.add_argument("--codec", choices=["webp", "jpeg"], default="webp")
    p.add_argument("--qualities", type=int, nargs="+", default=[75, 90])
    p.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--seed", type=int, default=0, help="seed of the random cell masks")
    p.add_argument("--tag", default="", help="suffix of the result file")
    args = parse_args_with_data(p)
    started = time.time()
    pipe = Pipeline.from_bundle(args.bundle, backend="onnxruntime")
    images, labels = split_images(args.data, 1)
    results = [r for i in range(0, len(images), 25) for r in pipe.predict(images[i:i + 25])]
    frames = [r.image for r in results]
    full = np.array([r.label_index for r in results])
    block, threshold = pipe.block, pipe.threshold
    rng = np.random.default_rng(args.seed)
    masks = {"nice": [r.mask > threshold for r in results]}
    for share in args.shares:
        masks[f"random {share:g}"] = [random_cells(f.shape[:2], block, share, rng) for f in frames]
        masks[f"centre {share:g}"] = [centre_cells(f.shape[:2], block, share) for f in frames]

    def scored(decoded: list[np.ndarray], sizes: list[int]) -> dict:
        predicted = predictions(pipe, decoded, fitted=True)
        return {"bytes_per_image": float(np.mean(sizes)), "accuracy": float(np.mean(predicted == labels)),
                "agreement": float(np.mean(predicted == full))}

    rows, whole = [], {}
    for q in args.qualities:
        coded = [encode_image(f, args.codec, q) for f in frames]
        whole[q] = scored([decode_image(c, args.codec, shape=f.shape) for c, f in zip(coded, frames)], [len(c) for c in coded])
        rows.append({"series": "whole frame", "quality": q, "kept_fraction": 1.0, **whole[q], "bytes_over_whole_frame": 1.0})
        print(f"whole frame q{q}: {whole[q]}", file=sys.stderr)
        for name, keep in masks.items():
            payloads = [encode(f, k, block=block, mode="mixed", codec=args.codec, quality=q) for f, k in zip(frames, keep)]
            row = scored([decode(b)[0] for b in payloads], [len(b) for b in payloads])
            row = {"series": name, "quality": q, "kept_fraction": float(np.mean([k.mean() for k in keep])), **row,
                   "bytes_over_whole_frame": row["bytes_per_image"] / whole[q]["bytes_per_image"]}
            rows.append(row)
            print(f"  {name}: {row}", file=sys.stderr)
    print(write_result(f"real_world_ceiling{args.tag}", {
        "bundle": str(args.bundle), "images": f"{len(images)} ImageNet sample images, class index % 5 == 1 (validation split)",
        "block": block, "threshold": threshold, "codec": args.codec, "payload_mode": "mixed (x̃ as one image + the mask bits)",
        "full_image_accuracy": float(np.mean(full == labels)), "rows": rows, "wall_time_s": round(time.time() - started, 1),
    }))


if __name__ == "__main__":
    main()
