"""Build the demo's training data and its sample stream: real MNIST digits moving over
real photographs (Kodak). Training frames use MNIST-train digits on kodim01–20; the test
split and the shipped stream use MNIST-test digits on the held-out kodim21–24.

    python examples/run_make_demo_data.py --data ../shared/data --out demo-data \
        --stream demo_stream.mp4

Writes ``OUT/train.npz`` and ``OUT/test.npz`` (``x`` N×size×size×3 RGB at the model size,
``y``, ``class_names``) for ``keepbits train classifier/nice``, and the stream video
(frames at ``--stream-size``, letterboxed to the model size by the runtime).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from keepbits.runtime.synthetic import moving_digits


def photos(folder: Path, names: range) -> list[np.ndarray]:
    return [cv2.imread(str(folder / f"kodim{i:02d}.png"))[:, :, ::-1] for i in names]


def shrink(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with mnist/ and kodak/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stream", type=Path, help="also write the sample stream video here")
    p.add_argument("--size", type=int, default=32, help="model input size")
    p.add_argument("--stream-size", type=int, default=96)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--stream-frames", type=int, default=240)
    p.add_argument("--fps", type=float, default=24.0)
    args = p.parse_args()

    mnist_train, mnist_test = (np.load(args.data / "mnist" / f"{s}.npz") for s in ("train", "test"))
    train_photos, test_photos = photos(args.data / "kodak", range(1, 21)), photos(args.data / "kodak", range(21, 25))
    names = np.array([str(i) for i in range(10)])
    args.out.mkdir(parents=True, exist_ok=True)
    for split, mnist, pics, n, seed in (("train", mnist_train, train_photos, args.train, 1), ("test", mnist_test, test_photos, args.test, 2)):
        x, y = moving_digits(mnist["x"][..., 0], mnist["y"], pics, n_frames=n, size=args.stream_size, scene_length=1, seed=seed)
        np.savez_compressed(args.out / f"{split}.npz", x=shrink(x, args.size), y=y, class_names=names)
        print(f"{split}: {n} frames, classes {np.bincount(y, minlength=10).tolist()}")
    if args.stream:
        x, y = moving_digits(mnist_test["x"][..., 0], mnist_test["y"], test_photos, n_frames=args.stream_frames,
                             size=args.stream_size, scene_length=30, seed=3)
        args.stream.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(args.stream), cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (args.stream_size,) * 2)
        for frame in x:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
        writer.release()
        print(f"stream: {args.stream} ({args.stream.stat().st_size} bytes), labels {y[::30].tolist()}")


if __name__ == "__main__":
    main()
