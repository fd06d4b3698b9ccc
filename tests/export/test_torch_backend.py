"""The torch backend runs a NICE checkpoint eagerly: same mask and class as the training code."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from keepbits import registry  # noqa: E402
from keepbits.errors import InputError  # noqa: E402
from keepbits.export import torch_pipeline  # noqa: E402
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint  # noqa: E402
from keepbits.training.nice import load_nice, mask_and_mix  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    gen_kw, cls_kw = {"in_channels": 3}, {"in_channels": 3, "num_classes": 4, "image_size": (28, 28)}
    generator, classifier = registry.build("nice_mnist", **gen_kw), registry.build("lenet5", **cls_kw)
    with torch.no_grad():
        generator.conv.bias.fill_(0.0)  # a mask that varies over the image
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "nice.pt", Checkpoint(
        kind="nice", input_shape=[3, 28, 28], normalization=Normalization([0.5] * 3, [0.25] * 3),
        class_names=["a", "b", "c", "d"], settings={"block_size": 4},
        models={"generator": ModelEntry.of("nice_mnist", gen_kw, generator), "classifier": ModelEntry.of("lenet5", cls_kw, classifier)},
        command="test",
    ))


def test_torch_backend_matches_the_training_reference(checkpoint):
    frames = [np.random.default_rng(i).integers(0, 256, (28, 28, 3), dtype=np.uint8) for i in range(3)]
    eager = torch_pipeline(checkpoint)
    assert eager.providers == ["torch"] and eager.class_names == ["a", "b", "c", "d"] and eager.block == 4
    generator, classifier, _ = load_nice(checkpoint)
    x = (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        z_hat, _ = mask_and_mix(generator, x, 4)
        probs = torch.softmax(classifier(x), 1).numpy()
    for i, r in enumerate(eager.process_batch(frames)):
        assert np.allclose(r.mask, z_hat[i, 0].numpy(), atol=1e-5) and 0 < r.kept_fraction < 1
        assert r.label_index == probs[i].argmax() and np.allclose(r.probabilities, probs[i], atol=1e-5)
        assert r.payload is not None


def test_torch_backend_needs_a_checkpoint(tmp_path):
    """A folder (bundle) is refused: the torch backend reads checkpoints; the runtime names where it lives."""
    with pytest.raises(InputError, match="checkpoint"):
        torch_pipeline(tmp_path)
    from keepbits.runtime import Pipeline

    with pytest.raises(InputError, match="torch_pipeline"):
        Pipeline.from_bundle(tmp_path, backend="torch")
