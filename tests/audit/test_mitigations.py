import pytest
import torch

from keepbits.audit._mitigations import InputDropout


@pytest.mark.parametrize("keep,samples", [(0.8, 2), (0.8, 4), (0.5, 3)])
def test_evaluation_masks_hide_no_position_from_every_mask(keep, samples):
    """Independent masks dropped 4 % of the positions in both of two masks at keep 0.8, the same
    positions in every image: the stratified masks keep each position in at least one, at the
    keep rate, and are the same on every call (f deterministic)."""
    dropout = InputDropout(torch.nn.Identity(), keep, samples, seed=3)
    masks = dropout.evaluation_masks(64, 64)
    assert masks.shape == (samples, 1, 64, 64)
    assert masks.sum(0).min() >= 1
    assert masks.mean().item() == pytest.approx(keep, abs=0.02)
    assert torch.equal(masks, dropout.evaluation_masks(64, 64))
    x = torch.randn(5, 3, 64, 64)
    assert torch.equal(dropout.eval()(x), dropout(x))
    assert torch.allclose(dropout(x), x * masks.mean(0))  # the identity net: the mean over the masks


def test_one_evaluation_mask_drops_at_the_keep_rate():
    """"Kept in at least one mask" would make a single mask keep everything: one mask drops at 1 − keep."""
    assert InputDropout(torch.nn.Identity(), 0.8, 1).evaluation_masks(64, 64).mean().item() == pytest.approx(0.8, abs=0.02)
