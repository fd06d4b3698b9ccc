"""NICE evaluation: equal-budget binary masks, binary vs soft ẑ, payload bytes, BackSelect ranks, image coding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keepbits.data import ImageDataset
from keepbits.errors import InputError
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


def test_equal_budget_masks_keep_the_binary_nice_count_per_image():
    from keepbits.training.nice_eval import equal_budget_masks

    gen = torch.Generator().manual_seed(0)
    z_hat = torch.rand(5, 1, 6, 7, generator=gen) ** 2  # soft: mean ẑ differs from the fraction above 0.5
    scores = {"saliency": torch.rand(5, 6, 7, generator=gen), "random": torch.rand(5, 6, 7, generator=gen)}
    masks = equal_budget_masks(z_hat, scores)
    counts = (z_hat > 0.5).flatten(1).sum(1)
    assert torch.equal(masks["nice"], (z_hat > 0.5).float())
    for name, mask in masks.items():
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and torch.equal(mask.flatten(1).sum(1), counts.float()), name
    for i in range(5):  # the top-k of a score map: every kept score beats every dropped one
        kept = scores["saliency"][i][masks["saliency"][i, 0] > 0]
        dropped = scores["saliency"][i][masks["saliency"][i, 0] == 0]
        assert kept.min() > dropped.max()
    with pytest.raises(InputError, match="N×H×W"):
        equal_budget_masks(z_hat, {"bad": torch.rand(5, 7, 6)})


def test_benchmark_scores_nice_with_the_binary_mask_and_reports_the_soft_one_apart():
    """ẑ = 0.4 on the one pixel the classifier reads: the soft x̃ keeps 40 % of it (read right),
    the binary mask ẑ > 0.5 drops it (the budget the baselines get), and so does the payload."""
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization
    from keepbits.training.nice_eval import benchmark_nice

    z = torch.zeros(4, 4)
    z[0, 0], z[3, 3], z[3, 2] = 0.4, 1.0, 1.0
    log_alpha = torch.full((4, 4), -10.0)  # ẑ = 0
    log_alpha[z == 1.0] = 10.0
    log_alpha[0, 0] = (2 / 3) * math.log(0.5 / 0.7)  # ẑ = σ(log α/β)·1.2 − 0.1 = 0.4 (Eq. 11, β = 2/3)

    class FixedMask(torch.nn.Module):
        def forward(self, x):
            return log_alpha.expand(len(x), 1, 4, 4)

    class CornerReader(torch.nn.Module):  # class 1 iff pixel (0, 0) is brighter than a quarter of full scale
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x[:, 0, 0, 0] - 0.25], 1)

    images = np.zeros((2, 4, 4, 1), np.uint8)
    images[0, 0, 0] = 255
    ds = ImageDataset(images, np.array([1, 0]), ["dark", "bright"])
    ckpt = Checkpoint(kind="classifier", models={"classifier": ModelEntry.of("lenet5", {}, torch.nn.Linear(1, 1))}, input_shape=[1, 4, 4],
                      normalization=Normalization([0.0], [1.0]), class_names=["dark", "bright"])
    result = benchmark_nice(FixedMask(), CornerReader(), ckpt, ds, [4], qualities=[50])
    row = result["per_block_size"][0]
    assert result["kept_fraction"] == pytest.approx(2 / 16) and result["mean_mask"] == pytest.approx(2.4 / 16, abs=1e-4)
    assert result["original"]["accuracy"] == 1.0
    assert row["nice_soft"]["accuracy"] == 1.0 and row["nice"]["accuracy"] == 0.5
    assert [(p["codec"], p["quality"]) for p in row["nice"]["payloads"]] == [("png", None), ("jpeg", 50)]  # no WebP for grey
    lossless = row["nice"]["payloads"][0]
    assert lossless["accuracy"] == 0.5 and lossless["bytes_per_image"] > 0
    assert {"random", "saliency_topk"} <= set(row) and "sis_backselect" not in row
    rows = benchmark_nice(FixedMask(), CornerReader(), ckpt, ds, [4, 2], qualities=[50], coded_block_sizes=[4])["per_block_size"]
    assert [len(r["nice"]["payloads"]) for r in rows] == [2, 1] and [len(r["nice"]["codecs"]) for r in rows] == [3, 1]  # b = 2: PNG only
