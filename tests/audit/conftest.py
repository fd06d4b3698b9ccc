"""Fixtures of the audit tests: keepbits bundles around torch classifiers."""
import pytest


@pytest.fixture
def pixel_bundle():
    """``(net, (C, H, W), mean, std, folder, archive=False) → (bundle, graph)``: ``net`` exported
    as a keepbits bundle graph does it (uint8 N×H×W×C in, normalisation inside; ``graph`` is that
    torch module) and written as a bundle folder (``archive``: a ``.zip``) with class names a, b, c."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from keepbits.bundle import Manifest, write_bundle

    class Pixels(nn.Module):
        def __init__(self, net, mean, std):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x):
            return self.net((x.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0 - self.mean) / self.std)

    def write(net, shape, mean, std, folder, archive=False):
        c, h, w = shape
        graph = Pixels(net, mean, std).eval()
        onnx_path = folder / "model.onnx"
        torch.onnx.export(graph, (torch.zeros(1, h, w, c, dtype=torch.uint8),), str(onnx_path), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "n"}}, dynamo=False)
        manifest = Manifest(input_shape=list(shape), input_dtype="uint8", input_layout="NHWC", mean=mean, std=std,
                            class_names=["a", "b", "c"], block_size=1, mask_threshold=0.5, generator="none", classifier="test")
        return write_bundle(folder / ("bundle.zip" if archive else "bundle"), manifest, {"model.onnx": onnx_path}), graph

    return write
