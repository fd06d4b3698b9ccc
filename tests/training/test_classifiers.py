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


@pytest.mark.parametrize("name, size", [("lenet5", 28), ("resnet18", 32), ("resnet20", 32), ("resnet20_large", 64), ("vgg16_bn", 32), ("nf_wrn16_2", 32),
                                        ("convnet3", 28), ("resnet20_scan", 96)])
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


def test_scanning_resnet_is_resnet20_on_one_window_and_takes_its_weights():
    torch.manual_seed(0)
    plain, scan = registry.build("resnet20").eval(), registry.build("resnet20_scan").eval()
    scan.load_state_dict(plain.state_dict())  # same parameter names and shapes
    x = torch.randn(3, 3, 64, 64)  # ½ resolution → 32×32 → one 8×8 window of features
    with torch.no_grad():
        assert torch.allclose(scan(x), plain(torch.nn.functional.avg_pool2d(x, 2)), atol=1e-5)
        # a larger image: each class scores its best window of the per-position score map
        big = torch.randn(1, 3, 128, 160)
        features = scan.layer3(scan.layer2(scan.layer1(scan.stem(torch.nn.functional.avg_pool2d(big, 2)))))
        windows = [scan.fc(features[:, :, i : i + 8, j : j + 8].mean((2, 3))) for i in range(9) for j in range(13)]
        assert torch.allclose(scan(big), torch.stack(windows).amax(0), atol=1e-5)


def test_convnet3_has_zhao_layout():
    net = registry.build("convnet3", in_channels=1, num_classes=10, image_size=(28, 28))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 128), (128, 128), (128, 128)]
    assert net.fc.in_features == 128 * 3 * 3
