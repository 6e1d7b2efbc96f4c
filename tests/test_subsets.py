"""MKDT's high-loss initialisation (``ddkd.subsets``) on a planted case."""

import torch

from ddkd.models import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec, flat_params, functional_forward
from ddkd.subsets import high_loss_indices, random_indices, select_subset


def _planted(offsets: dict[int, float], n: int = 10):
    """A tiny student whose targets are its own outputs (loss 0) but for the planted images,
    whose targets are moved by ``offsets[i]`` in every dimension (loss offsets[i]^2)."""
    torch.manual_seed(0)
    model = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=1, width=3, out_dim=2))
    spec, theta = ParamSpec.of(model), flat_params(model).detach()
    x = torch.randn(n, 1, 8, 8)
    with torch.no_grad():
        z = functional_forward(model, spec, theta, x).clone()
    for i, offset in offsets.items():
        z[i] += offset
    return model, spec, theta, x, z


def test_high_loss_picks_the_planted_images_highest_first():
    model, spec, theta, x, z = _planted({7: 3.0, 2: 2.0, 5: 1.0})
    picked = high_loss_indices(model, spec, [theta, theta], x, z, 3)
    assert picked.tolist() == [7, 2, 5]  # topk(largest=False) would pick zero-loss images
    assert high_loss_indices(model, spec, [theta], x, z, 1).tolist() == [7]


def test_high_loss_averages_the_loss_over_the_experts():
    """Two experts, the planted one and an all-zero network (output 0, so each image's loss is
    the mean square of its target): the ranking is that of the two losses' mean."""
    model, spec, theta, x, z = _planted({7: 3.0, 2: 2.0, 5: 1.0})
    zero = torch.zeros_like(theta)
    with torch.no_grad():
        planted = (functional_forward(model, spec, theta, x) - z).pow(2).mean(1)
    mean = (planted.double() + z.double().pow(2).mean(1)) / 2
    assert high_loss_indices(model, spec, [theta, zero], x, z, 4).tolist() == \
        mean.topk(4).indices.tolist()


def test_subsets_are_seeded_and_distinct():
    assert torch.equal(select_subset(50, 10, 3), select_subset(50, 10, 3))
    assert not torch.equal(select_subset(50, 10, 3), select_subset(50, 10, 4))
    assert select_subset(50, None, 3).tolist() == list(range(50))
    picked = random_indices(20, 8, torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 8
