"""Parity across backends: the running accumulator, tolerance checks, bundles run different ways."""
from __future__ import annotations

import numpy as np
import pytest

from keepbits import native
from keepbits.cli.demo import DEMO_BUNDLE
from keepbits.errors import InputError
from keepbits.runtime.parity import Parity, Tolerances, bundle_pipeline, check, compare_outputs, compare_pipelines


def test_batches_accumulate_to_the_one_shot_numbers():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(6, 4)), rng.random((6, 1, 5, 5)), rng.integers(0, 256, (6, 5, 5, 3)).astype(np.float32)]
    got = [ref[0] + rng.normal(scale=0.01, size=ref[0].shape), np.clip(ref[1] + rng.normal(scale=0.2, size=ref[1].shape), 0, 1),
           ref[2] + rng.integers(-3, 4, ref[2].shape)]
    names = ("logits", "mask", "mixed")
    whole = compare_outputs(ref, got, 255.0, names, threshold=0.5)
    parity = Parity(names, 255.0, 0.5)
    for part in (slice(0, 2), slice(2, 3), slice(3, 6)):
        parity.add([a[part] for a in ref], [a[part] for a in got])
    batched = parity.report()
    assert batched == pytest.approx(whole)
    assert whole["logits_max_abs"] == pytest.approx(np.abs(got[0] - ref[0]).max())
    assert whole["mask_mean_abs"] == pytest.approx(np.abs(got[1] - ref[1]).mean())
    assert whole["mixed_max_abs"] == pytest.approx(np.abs(got[2] - ref[2]).max() / 255.0)
    assert whole["argmax_agree"] == pytest.approx(np.mean(ref[0].argmax(1) == got[0].argmax(1)))
    assert whole["mask_agree"] == pytest.approx(np.mean((ref[1] > 0.5) == (got[1] > 0.5)))
    with pytest.raises(InputError, match="shape"):
        Parity(["logits"]).add([np.zeros((2, 3))], [np.zeros((2, 4))])


def test_tolerances_pass_and_fail_and_none_skips():
    report = {"logits_max_abs": 2e-3, "mask_max_abs": 0.0, "argmax_agree": 1.0, "mask_agree": 0.99}
    rows = {r["name"]: r["passed"] for r in check(report, Tolerances())}
    assert rows == {"logits_max_abs": False, "mask_max_abs": True, "argmax_agree": True, "mask_agree": False}
    assert [r["name"] for r in check(report, Tolerances(logits_atol=None, min_mask_agree=None))] == ["mask_max_abs", "argmax_agree"]


def test_one_bundle_run_three_ways_agrees_and_missing_backends_are_clear():
    images = [np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8) for i in range(5)]
    reference = bundle_pipeline(DEMO_BUNDLE, "functions")
    candidates = {"auto": bundle_pipeline(DEMO_BUNDLE)}
    if native.available():
        candidates["native"] = bundle_pipeline(DEMO_BUNDLE, "native")
    else:
        with pytest.raises(InputError, match="native keepbits kernels"):
            bundle_pipeline(DEMO_BUNDLE, "native")
    report = compare_pipelines(reference, candidates, images, Tolerances(), batch_size=2)
    assert report["passed"] and report["images"] == 5
    for row in report["comparisons"]:
        assert row["outputs"] == ["logits", "mask"] and row["metrics"]["argmax_agree"] == 1.0  # the demo bundle leaves x̃ out
        assert row["metrics"]["logits_max_abs"] <= 1e-3 and row["metrics"]["mask_agree"] >= 0.999
    impossible = compare_pipelines(reference, candidates, images, Tolerances(min_mask_agree=1.5))
    assert not impossible["passed"] and not any(r["passed"] for r in impossible["comparisons"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="CUDAExecutionProvider"):
            bundle_pipeline(DEMO_BUNDLE, "cuda")
    with pytest.raises(InputError, match="unknown backend"):
        bundle_pipeline(DEMO_BUNDLE, "vulkan")


def test_models_of_different_inputs_are_refused(tmp_path):
    from keepbits.runtime.synthetic import toy_bundle

    other = bundle_pipeline(toy_bundle(tmp_path / "toy", size=16))
    with pytest.raises(InputError, match="not the same model"):
        compare_pipelines(bundle_pipeline(DEMO_BUNDLE), {"toy": other}, [np.zeros((8, 8, 3), np.uint8)], Tolerances())


def test_non_finite_outputs_fail_even_where_both_sides_agree():
    """NaN on both sides compared as a difference of 0 (Python's max drops NaN) and passed."""
    ref = [np.array([[np.nan, 1.0], [0.5, 0.2]]), np.full((2, 1, 2, 2), 0.7)]
    got = [ref[0].copy(), np.where(np.arange(8).reshape(2, 1, 2, 2) == 3, np.inf, 0.7)]
    report = compare_outputs(ref, got, names=("logits", "mask"))
    assert (report["logits_non_finite"], report["mask_non_finite"]) == (1, 1)
    assert report["logits_max_abs"] == 0.0 and report["mask_max_abs"] == 0.0  # over the values finite in both
    rows = {r["name"]: r["passed"] for r in check(report, Tolerances(logits_atol=None, mask_atol=None))}
    assert rows["logits_non_finite"] is False and rows["mask_non_finite"] is False
    clean = compare_outputs([ref[0][1:]], [ref[0][1:]], names=("logits",))
    assert {r["name"]: r["passed"] for r in check(clean, Tolerances())} == {"logits_max_abs": True, "logits_non_finite": True,
                                                                            "argmax_agree": True}
