"""CID (Ma, Zhang et al., ICML 2022): calibration, sanity properties, concentration, errors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from keepbits.audit.cid import (  # noqa: E402
    GAUSS_ENTROPY,
    CIDConfig,
    CIDExplainer,
    LayerTap,
    box_mask,
    concentration,
    default_layers,
)
from keepbits.errors import InputError  # noqa: E402


class CropConv(nn.Module):
    """A conv that only sees the right half of its input (the left half is cropped away)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        keep = torch.ones_like(x)
        keep[..., :, : x.shape[-1] // 2] = 0
        return self.conv(x * keep)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 12 * 12, 5),
    )


def explain(net, layers, x, **cfg):
    cfg.setdefault("max_steps", 200)
    return CIDExplainer(net, layers=layers, input_shape=tuple(x.shape[1:]), config=CIDConfig(**cfg)).explain(x, batch_size=16)


def test_identity_layer_keeps_cid_low_and_matches_the_linear_optimum():
    # identity: J = I, so the optimum of Eq. 3 under Eq. 4 is σ_i = √β everywhere
    torch.manual_seed(1)
    res = explain(nn.Sequential(nn.Identity()), ["0"], torch.randn(2, 1, 12, 12))
    for r in res:
        assert r.reached.all()
        assert abs(r.mean[0] - (0.5 * math.log(r.beta) + GAUSS_ENTROPY)) < 0.05
        assert r.saturated[0] == 0.0


def test_ignored_region_gets_higher_cid_than_the_seen_region():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Identity(), CropConv(), nn.ReLU())
    (r,) = explain(net, ["0", "1"], torch.randn(1, 1, 12, 12))
    identity, crop = r.entropy
    assert r.reached.all()
    assert crop[:, :6].mean() > crop[:, 6:].mean() + 5.0  # the cropped half is discarded (σ at its cap)
    assert r.saturated[1] == pytest.approx(0.5)
    assert r.cid[0] < r.cid[1]
    assert identity.std() < 0.2  # identity: flat, low map


def test_lambda_search_reaches_beta_within_ten_percent():
    torch.manual_seed(3)
    x = torch.randn(1, 1, 12, 12)
    for beta in (1.5e-4, 1e-2):
        for r in explain(small_net(), ["0", "1", "3"], x, beta=beta):
            assert np.all(np.abs(r.ratio / beta - 1) < 0.1), r.ratio / beta
            assert r.reached.all() and np.all(r.steps <= 200)
            assert np.all(r.delta_f2_change < 0.05)


def test_rescaling_invariance_of_cid_while_gradient_saliency_changes():
    # §3.4: conv1 (layer L) weights and bias × 1/4, conv2 (L+1) weights × 4: the ReLU is
    # positively homogeneous, so layers ≥ L+1 compute exactly the same function
    net = small_net()
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight /= 4
        scaled[0].bias /= 4
        scaled[2].weight *= 4
    torch.manual_seed(4)
    x = torch.randn(1, 1, 12, 12)
    layers = ["1", "2", "5"]  # L (after its ReLU), L+1, logits
    a, b = explain(net, layers, x, max_steps=120), explain(scaled, layers, x, max_steps=120)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(rb.mean, ra.mean, atol=0.02)
        np.testing.assert_allclose(rb.ratio, ra.ratio, rtol=0.02)
        np.testing.assert_allclose(rb.delta_f2[0], ra.delta_f2[0] / 16, rtol=1e-3)  # raw sensitivity of L is rescaled

    def saliency(model):
        tap = LayerTap(model, ["1"])
        feats = {}
        handle = model[1].register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
        logits = model(x)
        handle.remove()
        tap.remove()
        (g,) = torch.autograd.grad(logits[:, 0].sum(), feats["f"])
        return g.norm().item()

    assert saliency(scaled) == pytest.approx(4 * saliency(net), rel=1e-3)


def test_block_shares_sigma_over_cells():
    torch.manual_seed(5)
    (r,) = explain(small_net(), ["3"], torch.randn(1, 1, 12, 12), block=4, max_steps=60, min_steps=20)
    cells = r.entropy[0].reshape(3, 4, 3, 4)
    assert np.allclose(cells, cells[:, :1, :, :1])


def test_progress_shows_maps_and_steps_and_changes_no_map(capsys):
    """A CID fit of a large model takes minutes per map batch: ``progress`` shows the maps done,
    the step and how many maps are still fitting, and leaves the maps as they are."""
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    config = CIDConfig(max_steps=30, min_steps=10)
    quiet, shown = (CIDExplainer(small_net(), layers=["1", "3"], input_shape=(1, 12, 12), config=config, progress=p).explain(x)
                    for p in (False, True))
    err = capsys.readouterr().err
    assert "CID maps" in err and "0/2" in err and "step 1/30, 2 fitting" in err  # postfixes redraw; counts only every 0.1 s
    assert np.array_equal(quiet[0].entropy, shown[0].entropy)


def test_layer_tap_is_not_fooled_by_inplace_ops_and_default_layers():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    out = LayerTap(net, ["0", "2"])(torch.randn(6, 3))
    assert (out["0"] < 0).any()  # captured before the in-place ReLU
    assert default_layers(small_net()) == ["0", "2", "5"]


def test_concentration_and_boxes():
    ent = np.zeros((6, 6))
    ent[:, :3] = 2.0
    assert concentration(ent, (3, 0, 6, 6)) == 2.0
    assert concentration(ent, box_mask((0, 0, 3, 6), (6, 6))) == -2.0
    with pytest.raises(InputError):
        concentration(ent, (0, 0, 6, 6))
    with pytest.raises(InputError):
        box_mask((5, 5, 5, 9), (6, 6))


def test_clear_errors():
    net = small_net()
    with pytest.raises(InputError, match="unknown layer"):
        CIDExplainer(net, layers=["nope"], input_shape=(1, 12, 12)).explain(torch.zeros(1, 1, 12, 12))
    with pytest.raises(InputError, match="invalid CID settings"):
        CIDConfig(beta=-1).check()
    with pytest.raises(InputError, match="block"):
        explain(net, ["0"], torch.zeros(1, 1, 12, 12), block=5)
    const = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 2))
    with torch.no_grad():
        const[0].weight.zero_()
    with pytest.raises(InputError, match="do not depend on the input"):
        explain(const, ["0"], torch.zeros(1, 1, 12, 12))


def test_load_boxes_csv_and_json(tmp_path):
    from keepbits.audit.cid import load_boxes

    (tmp_path / "b.csv").write_text("index,x0,y0,x1,y1\n0,1,2,5,6\n")
    (tmp_path / "b.json").write_text('[{"index": 2, "box": [0, 0, 3, 3]}]')
    (tmp_path / "bad.json").write_text('{"1": [4, 0, 3, 3]}')
    assert load_boxes(tmp_path / "b.csv") == {0: (1.0, 2.0, 5.0, 6.0)}
    assert load_boxes(tmp_path / "b.json") == {2: (0.0, 0.0, 3.0, 3.0)}
    with pytest.raises(InputError, match="x1 > x0"):
        load_boxes(tmp_path / "bad.json")


def test_report_of_one_image_has_no_spread_over_images(tmp_path):
    from keepbits.audit.cid_report import cid_report, layerwise_cid

    run = layerwise_cid(small_net(), torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(1)), ["1"],
                        CIDConfig(max_steps=20, min_steps=5), input_shape=(1, 12, 12), name="one")
    page = cid_report([run], tmp_path)[0].read_text()
    row = page[page.index("<td>1</td>"):].split("</tr>")[0]  # the layer's row
    assert "1 image, 1 layer" in page and row.split("</td>")[2] == "<td>–"  # CID/pixel, then no ± over one image
