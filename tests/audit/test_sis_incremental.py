"""Exact BackSelect on the traced graph: incremental vs plain vs a float64 loop on random models
of every supported shape family, float32 screening with float64 decisions, ONNX models."""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from keepbits.audit import TorchAdapter, backselect, backselect_batch, find_sis  # noqa: E402
from keepbits.audit import sis as sis_module  # noqa: E402
from keepbits.audit._sis_incremental import BOX, DELTA, DENSE, GraphScreen  # noqa: E402
from keepbits.errors import InputError  # noqa: E402

SHAPE = (2, 9, 8)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Residual(nn.Module):
    """Residual blocks (identity and strided 1×1 shortcuts), in-place functional ReLUs, GAP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.a1, self.a2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.short = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.a2(F.relu(self.a1(x)))
        out += x
        x = F.relu(out, inplace=True)
        x = F.relu(self.b2(F.relu(self.b1(x))) + self.short(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    """Two branches (3×3 and 1×1) concatenated on channels, max pool, flatten, linear head."""

    def __init__(self):
        super().__init__()
        self.c3, self.c1 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 1)
        self.fc1, self.fc2 = nn.Linear(5 * 4 * 4, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([torch.tanh(self.c3(x)), self.c1(x).sigmoid()], dim=1)
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(x.reshape(x.shape[0], -1))))


class Functional(nn.Module):
    """Reference-code spellings: F.conv2d on parameters, torch.relu_, ceil-mode max pool,
    x.view(x.size(0), -1), F.linear, a constant scale."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(3, 4 * 3 * 3))

    def forward(self, x):
        x = torch.relu_(F.conv2d(x, self.w1, self.b1, padding=1)) * 0.5
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = x.view(x.size(0), -1)
        return F.linear(x, self.w2)


class StridedDilatedGrouped(nn.Module):
    """Dilated and strided convolutions, grouped and depthwise convolutions, average pooling
    with padding, LeakyReLU / ELU, and a global average pool spelled as x.mean([2, 3])."""

    def __init__(self):
        super().__init__()
        self.d = nn.Conv2d(2, 4, 3, padding=2, dilation=2)
        self.g = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.leaky_relu(self.d(x), 0.1)
        x = F.elu(self.dw(self.g(x)))
        return self.fc(self.pool(x).mean([2, 3]))


class GlobalPool(nn.Module):
    """Convolutions, then a global average pool as a module: the change becomes a change of the pooled vector."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU6())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.features(x))


class Unsupported(nn.Module):
    """A node the evaluator does not know (torch.roll) after the first convolution: dense from there."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 7 * 6, 3)

    def forward(self, x):
        x = torch.roll(F.relu(self.c1(x)), 1, dims=3)
        return self.fc(F.relu(self.c2(x)).flatten(1))


FAMILIES = {"residual": Residual, "concat": Concat, "functional": Functional, "strided-dilated-grouped": StridedDilatedGrouped,
            "global-pool": GlobalPool, "unsupported-node": Unsupported}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = FAMILIES[name]()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)  # confident, input-sensitive outputs
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(seed: int, n: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)
    x[:, :, 3:5, 2:4] = 0.0  # pixels already at the mask value: exact ties
    return x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_graph_screen_matches_dense_model_after_masking(family):
    """The float32 screen equals dense float32 forward passes for every candidate, also after
    pixels were masked (cached changes invalidated where a masked pixel reaches them)."""
    net = make(family)
    screen = GraphScreen(net, SHAPE)
    kinds = {p.kind for p in screen.plan.values()}
    assert BOX in kinds and screen.local_nodes > 0
    if family == "unsupported-node":
        assert DENSE in kinds and not screen.cacheable
    if family in ("global-pool", "concat", "functional"):
        assert DELTA in kinds and screen.cacheable  # a linear layer / global pool turns boxes into cached changes
    x = images(1, 2).astype(np.float64)
    screen.reset(x, np.zeros(SHAPE[0]))
    d = SHAPE[1] * SHAPE[2]
    rng = np.random.default_rng(2)
    for _ in range(4):
        img, pix = np.repeat([0, 1], d), np.tile(np.arange(d), 2)
        trials = x[img].copy()
        trials[np.arange(len(img)), :, pix // SHAPE[2], pix % SHAPE[2]] = 0.0
        with torch.no_grad():
            want = net(torch.as_tensor(trials, dtype=torch.float32)).double().numpy()
        assert np.allclose(screen.logits(img, pix), want, rtol=1e-4, atol=1e-4)
        masked = rng.integers(0, d, 2)
        screen.mask(np.array([0, 1]), masked)
        x[[0, 1], :, masked // SHAPE[2], masked % SHAPE[2]] = 0.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_incremental_and_plain_equal_float64_loop(family, float64_backselect):
    net = make(family)
    model = TorchAdapter(net, SHAPE)
    for seed in range(2):
        x = images(seed)[0]
        fast = backselect(model, x, method="incremental")
        plain = backselect(model, x, target=fast.target, method="plain")
        order, scores = float64_backselect(make(family), x, fast.target)
        assert fast.method == "incremental" and plain.method == "plain"
        assert np.array_equal(fast.order, order) and np.array_equal(plain.order, order)
        assert np.allclose(fast.scores, scores, rtol=1e-10, atol=1e-13)
        assert np.allclose(plain.scores, scores, rtol=1e-10, atol=1e-13)
        for tau in (0.5, 0.9):
            want = find_sis(type(fast)(order, scores, fast.target, fast.shape), tau)
            got = find_sis(fast, tau)
            assert (want is None and got is None) or np.array_equal(want, got)


def test_images_in_lockstep_equal_one_by_one():
    net = make("residual")
    model = TorchAdapter(net, SHAPE)
    xs = images(3, 3)
    masked = [[0, 5], [], [70]]
    batch = backselect_batch(model, xs, target=[0, 1, 2], method="incremental", initially_masked=masked)
    for x, t, m, res in zip(xs, [0, 1, 2], masked, batch):
        alone = backselect(model, x, t, method="incremental", initially_masked=m)
        assert np.array_equal(res.order, alone.order) and np.allclose(res.scores, alone.scores, rtol=1e-12)
        assert res.initially_masked.tolist() == sorted(m) and len(res.order) == SHAPE[1] * SHAPE[2] - len(m)


def test_float32_near_ties_are_decided_in_float64(float64_backselect):
    """Two pixels whose masking changes the margin by amounts 2e-6 apart on logits near 100:
    below float32 resolution there (ulp 7.6e-6), so a float32 argmax takes the lower index;
    the winner set is re-scored in float64 and the higher pixel (larger margin) wins."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 1.0 + 2e-6, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))
        net[1].bias.copy_(torch.tensor([100.0, 0.0]))
    x = np.array([[[-1.0, -1.0], [1.0, 1.0]]], np.float32)  # masking pixel 1 raises the margin 2e-6 more than pixel 0
    with torch.no_grad():
        z32 = net(torch.tensor([[[[0.0, -1.0], [1.0, 1.0]]], [[[-1.0, 0.0], [1.0, 1.0]]]]))
    assert z32[0, 0] == z32[1, 0]  # float32 cannot tell the two candidates apart
    for method in ("plain", "incremental"):
        res = backselect(TorchAdapter(net, (1, 2, 2)), x, target=0, method=method)
        assert res.order[0] == 1, method
        assert np.array_equal(res.order, float64_backselect(net, x, 0)[0])


def test_missed_error_bound_reruns(monkeypatch, caplog, float64_backselect):
    """With no calibration and no floor the bound starts at 0; the float64 check of the chosen
    path finds a winner outside it, and the run is repeated with a bound that covers it."""
    monkeypatch.setattr(sis_module, "CALIBRATION", 0)
    monkeypatch.setattr(sis_module, "SCREEN_FLOOR", 0.0)
    monkeypatch.setattr(sis_module, "SCREEN_SAFETY", 1.0)
    net = make("concat")
    x = images(5)[0]
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        res = backselect(TorchAdapter(net, SHAPE), x, method="plain", batch_size=16)
    assert "missed its error bound" in caplog.text
    assert np.array_equal(res.order, float64_backselect(make("concat"), x, res.target)[0])


def test_device_argument_and_auto_choice():
    net = make("residual")
    model = TorchAdapter(net, SHAPE)
    x = images(6)[0]
    a = backselect(model, x, method="auto", device="cpu")
    b = backselect(model, x, method="auto", device=torch.device("cpu"))
    assert np.array_equal(a.order, b.order) and a.method in ("incremental", "plain")
    screen, exact, used = sis_module._evaluators(model, "incremental", None, "cpu")
    assert screen.device.type == "cpu" and exact.device.type == "cpu" and used == "incremental"
    assert next(exact.net.parameters()).dtype == torch.float64
    with pytest.raises(InputError):
        backselect(model, x, method="fast")
    with pytest.raises(InputError):
        backselect_batch(model, images(0, 2), initially_masked=[[1]])


def test_onnx_plain_path_equals_torch(tmp_path, float64_backselect):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from keepbits.audit import load_model

    net = make("residual")
    path = tmp_path / "residual.onnx"
    torch.onnx.export(net, (torch.zeros(1, *SHAPE),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    onnx_model = load_model(path, input_shape=SHAPE, threads=1)
    screen, exact, used = sis_module._evaluators(onnx_model, "plain", None, None)
    assert used == "plain" and hasattr(exact, "inner")  # ONNX Runtime screen, float64 re-scoring by the graph's torch twin
    xs = images(7, 2)
    got = backselect_batch(onnx_model, xs, method="plain")
    want = backselect_batch(TorchAdapter(net, SHAPE), xs, [r.target for r in got], method="auto")
    for g, w, x in zip(got, want, xs):
        assert g.method == "plain"
        assert np.array_equal(g.order, w.order)
        assert np.array_equal(g.order, float64_backselect(make("residual"), x, g.target)[0])
        assert np.allclose(g.scores, w.scores, rtol=1e-4, atol=1e-6)  # ONNX scores: float32 logits unless re-scored


class _ThroughNumpy(nn.Module):
    """A model ONNX cannot capture: its forward leaves torch (a trace would freeze the values)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(SHAPE[0], 4, 3, padding=1), nn.Linear(4 * SHAPE[1] * SHAPE[2], 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(torch.from_numpy(h.detach().cpu().numpy()).to(x.dtype))


def test_plain_screen_in_onnx_runtime_equals_float64_loop(monkeypatch, float64_backselect):
    """On the CPU the plain screen may be an ONNX Runtime export of the torch model (taken where it
    is faster; forced here): same orders and scores as the float64 loop. A model whose export
    does not reproduce it keeps the torch screen."""
    from keepbits.audit._sis_onnx import OnnxScreen, module_screen

    monkeypatch.setattr(sis_module, "ORT_TRIAL_SECONDS", -1.0)
    monkeypatch.setattr(sis_module, "_cpu_seconds", lambda screen, shape, candidates=256: 0.0 if isinstance(screen, OnnxScreen) else 1.0)
    for family in ("residual", "strided-dilated-grouped", "global-pool", "concat"):
        net = make(family)
        model = TorchAdapter(net, SHAPE)
        assert isinstance(sis_module._evaluators(model, "plain", None, None)[0], OnnxScreen)
        x = images(0)[0]
        plain = backselect(model, x, method="plain")
        order, scores = float64_backselect(make(family), x, plain.target)
        assert plain.method == "plain" and np.array_equal(plain.order, order), family
        assert np.allclose(plain.scores, scores, rtol=1e-10, atol=1e-13)
    frozen = _ThroughNumpy().eval()
    screen, why = module_screen(frozen, SHAPE)
    assert screen is None and why
    assert not isinstance(sis_module._evaluators(TorchAdapter(frozen, SHAPE), "plain", None, None)[0], OnnxScreen)
