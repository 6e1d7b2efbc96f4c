import pytest
import torch

from ddkd.models import ConvNet, ConvNetConfig, ResNet, ResNetConfig
from ddkd.models.functional import ParamSpec, flat_params, functional_forward


@pytest.mark.parametrize(
    ("size", "channels", "depth", "feature_dim"),
    [(32, 3, 3, 128 * 16), (28, 1, 3, 128 * 9), (64, 3, 4, 128 * 16), (8, 1, 2, 128 * 4)],
)
def test_convnet_feature_dims(size, channels, depth, feature_dim):
    cfg = ConvNetConfig(in_channels=channels, image_size=size, depth=depth, out_dim=7)
    net = ConvNet(cfg)
    x = torch.randn(2, channels, size, size)
    assert cfg.feature_dim == feature_dim
    assert net.features(x).shape == (2, feature_dim)
    assert net(x).shape == (2, 7)


def test_convnet_uses_instance_norm():
    net = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=1, width=4, out_dim=2))
    norm = net.body[1]
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == 4


@pytest.mark.parametrize("depth", [10, 18])
def test_resnet_cifar_stem(depth):
    net = ResNet(ResNetConfig(in_channels=1, depth=depth, base_width=4))
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_flat_params_round_trip_and_functional_forward():
    net = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=2, width=4, out_dim=3))
    spec = ParamSpec.of(net)
    flat = flat_params(net)
    assert flat.shape == (spec.numel,) == (sum(p.numel() for p in net.parameters()),)
    assert torch.equal(spec.flatten(spec.unflatten(flat)), flat)
    assert ParamSpec.from_json(spec.to_json()) == spec
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(functional_forward(net, spec, flat, x), net(x))
    moved = functional_forward(net, spec, flat + 1.0, x)
    assert not torch.allclose(moved, net(x))


def test_kdep_student_side_depends_on_the_input_under_instance_norm():
    # One pooled cell per channel (width x 1 x 1 = out_dim): after instance norm every channel's
    # spatial mean is the norm's bias, so "prerelu" is the same for every input; "prenorm", the
    # convolution's signed output, is what kdep's students regress.
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    config = dict(in_channels=1, image_size=16, depth=2, width=8, out_dim=8)
    degenerate = ConvNet(ConvNetConfig(**config, output="prerelu"))
    out = degenerate(x)
    torch.testing.assert_close(out, out[:1].expand_as(out), atol=1e-5, rtol=0)
    net = ConvNet(ConvNetConfig(**config, output="prenorm"))
    net.load_state_dict(degenerate.state_dict())
    out = net(x)
    assert out.shape == (4, 8) and (out - out[:1]).abs().max() > 1e-2
    assert (out < 0).any() and (out > 0).any()  # signed
    conv = net.body[:-3](x)  # the last block's convolution, pooled to one cell per channel
    torch.testing.assert_close(out, conv.mean((2, 3)))
    with pytest.raises(ValueError, match="expected linear, prenorm or prerelu"):
        ConvNet(ConvNetConfig(**{**config, "output": "relu"}))
