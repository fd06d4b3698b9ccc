"""Synthetic content for the demo, examples and tests: MNIST digits moving over
photographs, and a toy bundle (no training, no torch) with the runtime's graph contract.

Example:
    >>> import numpy as np
    >>> from keepbits.runtime.synthetic import moving_digits
    >>> digits = np.zeros((2, 28, 28), np.uint8); digits[:, 8:20, 12:16] = 255
    >>> photos = np.full((1, 100, 120, 3), 80, np.uint8)
    >>> frames, labels = moving_digits(digits, np.array([1, 7]), photos, n_frames=6, size=48, scene_length=3)
    >>> frames.shape, len(set(labels[:3].tolist())), len(set(labels[3:].tolist()))
    ((6, 48, 48, 3), 1, 1)
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: Stroke colours of the digits (RGB): bright, saturated, distinct from most photos.
COLOURS = np.array([[255, 255, 255], [255, 220, 0], [0, 255, 255], [255, 64, 255], [64, 255, 64]], np.float32)


def composite(background: np.ndarray, digit: np.ndarray, xy: tuple[int, int], side: int, colour: np.ndarray) -> np.ndarray:
    """Paint ``digit`` (28×28 grey, ink = alpha) scaled to ``side`` at ``xy`` onto a copy of ``background``.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.synthetic import composite
        >>> out = composite(np.zeros((8, 8, 3), np.uint8), np.full((28, 28), 255, np.uint8), (2, 2), 4, np.array([255., 0, 0]))
        >>> out[3, 3].tolist(), out[0, 0].tolist()
        ([255, 0, 0], [0, 0, 0])
    """
    out = background.astype(np.float32)
    alpha = cv2.resize(digit, (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    x, y = xy
    region = out[y:y + side, x:x + side]
    a = alpha[: region.shape[0], : region.shape[1]]
    # A dark halo under the stroke keeps the digit readable on bright photos.
    region *= 1.0 - 0.6 * cv2.dilate(a, np.ones((3, 3), np.uint8))[..., None]
    region += a[..., None] * (colour - region)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def moving_digits(
    digits: np.ndarray,
    labels: np.ndarray,
    photos: np.ndarray | list[np.ndarray],
    *,
    n_frames: int,
    size: int = 96,
    scene_length: int = 30,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N×size×size×3 RGB) of one digit per scene drifting over a panning photo crop.

    Each scene of ``scene_length`` frames picks a digit (label = its class), a photo, a
    crop, a colour, a scale and two end points; the digit and the crop move linearly.
    """
    rng = np.random.default_rng(seed)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    out_labels = np.empty(n_frames, np.int64)
    for start in range(0, n_frames, scene_length):
        k = int(rng.integers(len(digits)))
        photo = photos[int(rng.integers(len(photos)))]
        ph, pw = photo.shape[:2]
        crop = int(rng.integers(size, max(size + 1, min(ph, pw) // 2)))
        c0 = rng.integers(0, [pw - crop + 1, ph - crop + 1])
        c1 = rng.integers(0, [pw - crop + 1, ph - crop + 1])
        side = int(rng.integers(size * 2 // 5, size * 3 // 4))
        p0, p1 = rng.integers(0, size - side + 1, 2), rng.integers(0, size - side + 1, 2)
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        for t in range(min(scene_length, n_frames - start)):
            f = t / max(1, scene_length - 1)
            cx, cy = np.rint(c0 + f * (c1 - c0)).astype(int)
            bg = cv2.resize(photo[cy:cy + crop, cx:cx + crop], (size, size), interpolation=cv2.INTER_AREA)
            xy = tuple(int(v) for v in np.rint(p0 + f * (p1 - p0)))
            frames[start + t] = composite(bg, digits[k], xy, side, colour)
            out_labels[start + t] = labels[k]
    return frames, out_labels


def toy_bundle(out: str | Path, *, size: int = 16, block: int = 4, channels: int = 3, resize_policy: str = "letterbox",
               crop_fraction: float = 1.0) -> Path:
    """Write a tiny bundle (no training) honouring the runtime's graph contract; frames reach
    ``size`` by ``resize_policy`` (``crop_fraction``: center-crop).

    Classes ``dark``/``bright`` by mean brightness; ẑ = clip((grey − 100)/20, 0, 1);
    ``mixed`` is the input. Input uint8 NHWC of any size. Returns ``out``.

    Example:
        >>> import tempfile
        >>> from keepbits.bundle import load_bundle
        >>> from keepbits.runtime.synthetic import toy_bundle
        >>> load_bundle(toy_bundle(tempfile.mkdtemp() + "/toy")).manifest.class_names
        ['dark', 'bright']
    """
    from onnx import TensorProto, helper

    from keepbits.bundle import Manifest, write_bundle

    def const(name: str, value: list, dtype: int = TensorProto.FLOAT):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(value)], value))

    nodes = [
        const("c_axes_c", [3], TensorProto.INT64), const("c_axes_all", [1, 2, 3], TensorProto.INT64),
        const("c_one", [1], TensorProto.INT64), const("c_mid", [100.0]), const("c_span", [20.0]),
        const("c_zero", [0.0]), const("c_unit", [1.0]), const("c_half", [128.0]), const("c_scale", [16.0]),
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "c_axes_c"], ["grey"], keepdims=1),
        helper.make_node("Transpose", ["grey"], ["grey_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["grey_nchw", "c_mid"], ["g1"]),
        helper.make_node("Div", ["g1", "c_span"], ["g2"]),
        helper.make_node("Clip", ["g2", "c_zero", "c_unit"], ["mask"]),
        helper.make_node("ReduceMean", ["x", "c_axes_all"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "c_half"], ["m1"]),
        helper.make_node("Div", ["m1", "c_scale"], ["m2"]),
        helper.make_node("Unsqueeze", ["m2", "c_one"], ["bright"]),
        helper.make_node("Neg", ["bright"], ["dark"]),
        helper.make_node("Concat", ["dark", "bright"], ["logits"], axis=1),
        helper.make_node("Identity", ["x"], ["mixed"]),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", channels])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"]),
         helper.make_tensor_value_info("mixed", TensorProto.FLOAT, ["N", "H", "W", channels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    manifest = Manifest(
        input_shape=[channels, size, size], input_dtype="uint8", input_layout="NHWC",
        mean=[0.0] * channels, std=[1.0] * channels, class_names=["dark", "bright"], block_size=block,
        mask_threshold=0.5, generator="toy", classifier="toy", resize_policy=resize_policy, crop_fraction=crop_fraction,
    )
    return write_bundle(out, manifest, {"model.onnx": model.SerializeToString()}, overwrite=True)
