"""SIS (Carter et al. 2019): exact BackSelect / FindSIS / SIScollection, incremental vs plain,
gradient SIS, ONNX models, the explainer."""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from keepbits.audit import SISExplainer, TorchAdapter, backselect, find_sis, gradient_backselect, sis_collection  # noqa: E402
from keepbits.errors import InputError  # noqa: E402

SHAPE = (2, 7, 6)
D = SHAPE[1] * SHAPE[2]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP barriers cost more than they save
    yield
    torch.set_num_threads(before)


def random_cnns():
    torch.manual_seed(0)
    for net in _cnns():
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(3.0)  # confident, input-sensitive outputs
        yield net.eval()


def _cnns():
    yield nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.BatchNorm2d(6), nn.ELU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3))
    yield nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AvgPool2d(2, padding=1), nn.Conv2d(4, 5, 2), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    yield nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(3 * 2 * 3, 3))


@pytest.mark.parametrize("arch", range(3))
def test_incremental_equals_plain(arch, float64_backselect):
    net = list(random_cnns())[arch].eval()
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
        x[:, 3:5, 2:4] = 0.0  # pixels already at the mask value: exact ties
        model = TorchAdapter(net, SHAPE)
        fast = backselect(model, x, method="incremental")
        order, scores = float64_backselect(list(random_cnns())[arch].eval(), x, fast.target)
        assert fast.method == "incremental"
        assert np.array_equal(fast.order, order)
        assert np.allclose(fast.scores, scores, rtol=1e-12, atol=1e-14)
        for tau in (0.2, 0.5, 0.9, 0.99):
            plain_sis = find_sis(type(fast)(order, scores, fast.target, fast.shape), tau)
            fast_sis = find_sis(fast, tau)
            assert (plain_sis is None and fast_sis is None) or np.array_equal(plain_sis, fast_sis)


@pytest.mark.parametrize("method", ["incremental", "plain"])
def test_backselect_ranks_saturated_confidences(method, float64_backselect):
    """A confident model: f rounds to 1.0 for every candidate (and log f to 0), yet BackSelect
    still masks first the pixel whose loss lowers the target's margin least, as exact math does."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).eval()
    with torch.no_grad():
        net[3].bias.copy_(torch.tensor([80.0, 0.0, 0.0]))  # margin ~80 nats: softmax saturates in float64
    x = np.random.default_rng(4).normal(size=(1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        full = torch.softmax(net.double()(torch.as_tensor(x[None], dtype=torch.float64)), 1)[0, 0].item()
    assert full == 1.0  # the confidence itself cannot rank the candidates
    res = backselect(TorchAdapter(net, (1, 6, 6)), x, target=0, method=method)
    order, _ = float64_backselect(net, x, 0)
    assert np.array_equal(res.order, order)
    assert res.order[:3].tolist() != [0, 1, 2]  # not the lowest indices of an all-way tie


def test_incremental_equals_plain_larger_image(float64_backselect):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = np.random.default_rng(7).normal(size=(1, 14, 14)).astype(np.float32)
    fast = backselect(TorchAdapter(net, (1, 14, 14)), x)
    order, scores = float64_backselect(net, x, fast.target)
    assert fast.method == "incremental" and np.array_equal(fast.order, order)


def test_find_sis_semantics_and_cached_cut():
    net = next(random_cnns()).eval()
    model = TorchAdapter(net, SHAPE)
    x = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    res = backselect(model, x)
    f_full, f_empty = res.scores[0], res.scores[-1]
    assert find_sis(res, min(1.0, f_full + 1e-6)) is None
    assert find_sis(res, f_empty).size == 0
    for tau in np.linspace(f_empty, f_full, 5)[1:]:
        sis = find_sis(res, tau)
        keep = np.zeros(D, bool)
        keep[sis] = True
        masked = np.where(keep.reshape(SHAPE[1:]), x, 0.0)[None]
        f = model.probabilities(masked)[0, res.target]
        assert f >= tau - 1e-6  # the cut needs no new evaluation, and holds when re-evaluated
        assert len(sis) == 0 or res.scores[len(res.order) - len(sis) + 1] < tau  # one pixel fewer is below τ


def test_sis_collection_disjoint_and_rest_below_threshold():
    net = next(random_cnns()).eval()
    model = TorchAdapter(net, SHAPE)
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    res = backselect(model, x)
    assert res.scores[0] > res.scores[-1] + 0.05
    tau = float(res.scores[-1] + 0.5 * (res.scores[0] - res.scores[-1]))
    found = sis_collection(model, x, tau)
    assert len(found) >= 1
    flat = np.concatenate(found)
    assert len(np.unique(flat)) == len(flat)
    rest = x.copy()
    rest[:, flat // SHAPE[2], flat % SHAPE[2]] = 0.0
    assert model.probabilities(rest[None])[0, res.target] < tau


def test_gradient_sis_batched_and_verified():
    net = next(random_cnns()).eval()
    model = TorchAdapter(net, SHAPE)
    xs = np.random.default_rng(2).normal(size=(5, *SHAPE)).astype(np.float32)
    batch = gradient_backselect(model, xs, k=4, batch_size=3)
    single = gradient_backselect(model, xs[1:2], k=4)
    assert np.array_equal(batch[1].order, single[0].order)
    for x, res in zip(xs, batch):
        assert sorted(res.order.tolist()) == list(range(D)) and np.isfinite(res.scores).sum() == -(-D // 4) + 1
        sis = find_sis(res, 0.5 * res.scores[0])
        keep = np.zeros(D, bool)
        keep[sis] = True
        f = model.probabilities(np.where(keep.reshape(SHAPE[1:]), x, 0.0)[None])[0, res.target]
        assert f >= 0.5 * res.scores[0] - 1e-6


def test_device_paths_on_the_cpu_match_and_leave_the_module_as_it_was():
    """``device=`` (what ``--device`` passes) on the CPU gives the default run's orders; the
    module is moved and put in eval mode for the run only (CUDA: tests/gpu, where a GPU is lent)."""
    from keepbits.audit.sis_orders import compute_orders
    from keepbits.training.distributed import on_device

    net = next(random_cnns())
    model = TorchAdapter(net, SHAPE)
    xs = np.random.default_rng(3).normal(size=(3, *SHAPE)).astype(np.float32)
    on_cpu = gradient_backselect(model, xs, k=5, device="cpu")
    default = gradient_backselect(model, xs, k=5)
    assert [r.order.tolist() for r in on_cpu] == [r.order.tolist() for r in default]
    exact = compute_orders(model, xs[:2], _tmp_folder(), "plain", progress=False, device="auto")
    assert [r.order.tolist() for r in exact] == [backselect(model, x, method="plain").order.tolist() for x in xs[:2]]
    net.train()
    with on_device(net, "cpu") as where:
        assert where.type == "cpu" and not net.training
    assert net.training and next(net.parameters()).device.type == "cpu"


def _tmp_folder():
    import tempfile

    return tempfile.mkdtemp()


def test_explainer_reports_unconfident_images_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    net = next(random_cnns()).eval()
    xs = np.random.default_rng(4).normal(size=(3, *SHAPE)).astype(np.float32)
    results = SISExplainer(net, threshold=0.999, input_shape=SHAPE).explain(xs)
    assert all(not r.confident and r.sis == [] for r in results)
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.zeros(1, *SHAPE),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    res = SISExplainer(str(path), threshold=0.4, method="plain").explain(xs[:1], target=0)[0]
    assert res.backselect.method == "plain" and len(res.backselect.order) == D
    assert backselect(str(path), xs[0], method="incremental").method == "incremental"  # through the graph's torch twin
    with pytest.raises(InputError):
        SISExplainer(net, threshold=1.5, input_shape=SHAPE)


def test_onnx_classifier_with_a_fixed_batch_of_one(tmp_path, caplog):
    """torch.onnx.export without dynamic axes fixes the batch at 1: the adapter feeds it one image
    at a time (three images were one ORT call and an InvalidArgument traceback)."""
    from keepbits.audit import load_model

    net = next(random_cnns()).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(net, (torch.zeros(1, *SHAPE),), str(path), input_names=["x"], output_names=["logits"], dynamo=False)
    xs = np.random.default_rng(5).normal(size=(3, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(xs)).double().numpy()
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        adapter = load_model(str(path))
    np.testing.assert_allclose(adapter.logits(xs), want, atol=1e-4)
    assert "no mean/std given or in its metadata; assumed mean 0, std 1" in caplog.text  # it was silent
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keepbits"):
        assert load_model(str(path), mean=[0.1, 0.2], std=[0.3, 0.3]).mean.tolist() == pytest.approx([0.1, 0.2])
    assert "assumed mean 0" not in caplog.text  # given in the call: nothing assumed
    res = SISExplainer(str(path), threshold=0.4, method="gradient", k=16).explain(xs[:2])
    assert len(res) == 2 and all(len(r.backselect.order) == D for r in res)


def test_explainer_takes_gradient_backselect_to_its_device(monkeypatch):
    from keepbits.audit import sis

    seen = []
    real = sis.gradient_backselect
    monkeypatch.setattr(sis, "gradient_backselect", lambda *a, **kw: seen.append(a[7] if len(a) > 7 else kw.get("device")) or real(*a, **kw))
    net = next(random_cnns()).eval()
    xs = np.random.default_rng(4).normal(size=(1, *SHAPE)).astype(np.float32)
    SISExplainer(net, threshold=0.5, method="gradient", k=8, device="cpu", input_shape=SHAPE).explain(xs)
    assert seen and set(seen) == {"cpu"}


def test_bundle_model_runs_with_onnxruntime(tmp_path, pixel_bundle):
    pytest.importorskip("onnxruntime")
    from keepbits.audit import load_model

    net = next(random_cnns()).eval()
    bundle, _ = pixel_bundle(net, SHAPE, [0.4, 0.5], [0.2, 0.25], tmp_path)
    model = load_model(bundle)
    images = np.random.default_rng(0).integers(0, 256, (4, 7, 6, 2), dtype=np.uint8)
    x = model.prepare(images)
    expected = TorchAdapter(net, SHAPE).probabilities(x)
    assert model.class_names == ["a", "b", "c"] and np.allclose(model.probabilities(x), expected, atol=1e-5)
    res = backselect(model, images[0], method="plain")
    assert res.method == "plain" and sorted(res.order.tolist()) == list(range(D))


def test_explainer_bad_inputs_are_input_errors():
    """Images of another channel count, an empty batch and a target past the classes were raw numpy
    errors (broadcast, zero-size reduction, IndexError)."""
    from keepbits.audit import FunctionAdapter

    explainer = SISExplainer(FunctionAdapter(lambda x: x.reshape(len(x), -1)[:, :3] * 4, input_shape=(2, 6, 6)), threshold=0.9)
    for inputs, target, message in [(np.zeros((1, 6, 6, 3), np.uint8), None, r"uint8 images must be N×6×6×2"),
                                    (np.zeros((0, 2, 6, 6), np.float32), None, "an empty batch"),
                                    (np.ones((1, 2, 6, 6), np.float32), 7, r"class index in 0..2, got 7"),
                                    (np.ones((1, 2, 6, 6), np.float32), 1.7, r"class indices\), got 1.7"),  # it became 1
                                    (np.ones((1, 2, 6, 6), np.float32), "a", r"class indices\), got 'a'")]:
        with pytest.raises(InputError, match=message):
            explainer.explain(inputs, target=target)


def test_every_backselect_entry_checks_its_target():
    """backselect, sis_collection and gradient_backselect took −1 as the last class, 5 of 2 classes as an
    IndexError, 0.7 as 0 and 2**64 − 1 as −1; SISExplainer alone checked."""
    from keepbits.audit import FunctionAdapter

    model = FunctionAdapter(lambda x: np.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1), input_shape=(1, 1, 3))
    x = np.array([[[-1.0, 2.0, 1.0]]], np.float32)
    for target in (-1, 5, 0.7, np.uint64(2**64 - 1)):
        for run in (lambda t: backselect(model, x, target=t), lambda t: sis_collection(model, x, 0.5, target=t)):
            with pytest.raises(InputError, match="target must be"):
                run(target)
    assert backselect(model, x, target=np.int32(1)).order.tolist() == [1, 2, 0]


def test_non_finite_inputs_and_scores_are_refused_not_looped_on():
    """NaN scores define no winner: BackSelect picked an already masked pixel again and never
    ended (a NaN input image, or a model that turns NaN on masked inputs)."""
    from keepbits.audit import FunctionAdapter

    x = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    plain = FunctionAdapter(lambda b: np.stack([b.reshape(len(b), -1).sum(1), -b.reshape(len(b), -1).sum(1)], 1), (1, 4, 4))
    with pytest.raises(InputError, match="NaN or inf"):
        SISExplainer(plain, threshold=0.5).explain(np.where(np.arange(16).reshape(1, 1, 4, 4) == 5, np.nan, x))

    def nan_once_masked(b: np.ndarray) -> np.ndarray:  # finite on the image, NaN once a pixel is set to the mask value 0
        s = b.reshape(len(b), -1)
        out = np.stack([s.sum(1), -s.sum(1)], 1)
        out[(s == 0).any(1)] = np.nan
        return out

    for method in ("plain", "auto"):
        with pytest.raises(InputError, match="score is NaN or infinite on 16 masked candidate"):
            backselect(FunctionAdapter(nan_once_masked, (1, 4, 4)), x[0], mask_value=0.0, method=method)


def test_gradient_backselect_refuses_non_finite_scores_instead_of_returning_nan_subsets():
    """It returned NaN scores and an SIS of every pixel (each NaN τ test failed)."""

    class NanOnceMasked(nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1)
            s = torch.where((x.flatten(1) == 0).any(1), torch.full_like(s, float("nan")), s)
            return torch.stack([s, -s], 1)

    adapter = TorchAdapter(NanOnceMasked().eval(), input_shape=(1, 4, 4), mean=[0.0], std=[1.0])
    x = np.random.default_rng(0).normal(size=(2, 1, 4, 4)).astype(np.float32)
    with pytest.raises(InputError, match=r"NaN or infinite on image\(s\) \[0, 1\] after 2 masked pixel"):
        gradient_backselect(adapter, x, k=2, mask_value=0.0)
