import pytest
import torch

from keepbits import registry


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_lenet5_matches_nice_table_1():
    net = registry.build("lenet5", in_channels=1, num_classes=10, image_size=(28, 28))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert [(l.in_features, l.out_features) for l in linears] == [(800, 500), (500, 10)]
    assert _params(net) == 431_080


def test_resnet20_size():
    assert 0.26e6 < _params(registry.build("resnet20")) < 0.29e6


@pytest.mark.parametrize("name, size", [("lenet5", 28), ("resnet18", 32), ("resnet20", 32), ("resnet20_large", 64), ("vgg16_bn", 32), ("nf_wrn16_2", 32)])
def test_forward_and_backward(name, size):
    net = registry.build(name, in_channels=3, num_classes=7, image_size=(size, size))
    x = torch.randn(2, 3, size, size)
    out = net(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_nf_wrn_has_no_normalisation_layers_and_keeps_signal_scale():
    net = registry.build("nf_wrn16_2")
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in net.modules())
    torch.manual_seed(0)
    features = net.blocks(net.stem(torch.randn(16, 3, 32, 32)))
    assert 0.3 < features.std().item() < 3.0  # scaled weight standardisation keeps activations O(1)
