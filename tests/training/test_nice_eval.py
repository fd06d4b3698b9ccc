"""NICE evaluation: BackSelect ranks, the benchmark's image coding (the codec's one encoder)."""
from __future__ import annotations

import numpy as np
import torch

from keepbits.data import ImageDataset
from keepbits.training.data import TensorImages
from keepbits.training.nice_eval import backselect_ranks, code_images, to_uint8


def test_backselect_ranks_put_the_sufficient_pixels_last():
    class CornerReader(torch.nn.Module):  # class 0's logit is pixel (0, 0); every other pixel is ignored
        def forward(self, x):
            return torch.stack([3 * x[:, 0, 0, 0], torch.zeros(len(x))], 1)

    ds = ImageDataset(np.full((2, 4, 5, 1), 255, np.uint8), np.zeros(2, np.int64), ["a", "b"])
    ranks = backselect_ranks(CornerReader(), TensorImages(ds, [0.0], [1.0]), k=3)
    assert ranks.shape == (2, 4, 5)
    assert sorted(ranks[0].flatten().tolist()) == list(range(20))
    assert (ranks[:, 0, 0] == 19).all()  # masking the one pixel the model reads is always left to the end


def test_code_images_png_is_exact_lossy_is_close_and_sizes_are_per_image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:20]
    smooth = np.stack([np.stack([xx * 12 + 5 * i, yy * 14, (xx + yy) * 6], -1) for i in range(3)]).astype(np.uint8)
    sizes, decoded = code_images(smooth, "png")
    assert sizes.shape == (3,) and (sizes > 0).all() and np.array_equal(decoded, smooth)
    for fmt in ("jpeg", "webp"):
        low, _ = code_images(smooth, fmt, 10)
        high, decoded = code_images(smooth, fmt, 95)
        assert decoded.shape == smooth.shape and (low < high).all()
        assert np.abs(decoded.astype(int) - smooth).mean() < 3
    grey = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    assert code_images(grey, "webp", 90)[1].shape == grey.shape  # WebP stores grey as RGB; decoded back to one channel


def test_to_uint8_inverts_the_normalisation():
    images = np.random.default_rng(1).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    data = TensorImages(ImageDataset(images, np.zeros(2, np.int64), ["a"]), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x, _ = next(data.batches(2))
    assert np.array_equal(to_uint8(x, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]), images)
