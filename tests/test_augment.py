import pytest
import torch

from ddkd.synth.augment import DSA, DSA_OPS, color


def test_dsa_replays_the_same_draw_and_varies_across_steps():
    dsa = DSA(seed=0)
    x = torch.randn(4, 3, 16, 16)
    outs = [dsa(x, 5, step) for step in range(12)]
    for step in range(12):
        torch.manual_seed(step)  # the global RNG must not matter
        assert torch.equal(dsa(x, 5, step), outs[step])
    assert len({dsa.draw(5, s, x.shape)[0] for s in range(40)}) == len(DSA_OPS)
    assert sum(not torch.equal(o, x) for o in outs) >= 6


@pytest.mark.parametrize("op", DSA_OPS)
def test_one_draw_is_shared_by_every_image(op):
    dsa = DSA(seed=1, ops=(op,))
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1).contiguous()
    for step in range(4):
        y = dsa(x, 0, step)
        assert y.shape == x.shape
        assert torch.allclose(y[0], y[1]) and torch.allclose(y[1], y[2])


@pytest.mark.parametrize("op", DSA_OPS)
def test_gradient_flows_to_the_images(op):
    dsa = DSA(seed=2, ops=(op,))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa(t, 0, 3), (x,), eps=1e-6, atol=1e-5)


def test_color_matches_dsa_formulas():
    x = torch.randn(2, 3, 4, 4)
    y = color(x, 0.0, 1.0, 1.0)
    assert torch.allclose(y, x, atol=1e-6)
    z = color(x, 0.3, 1.0, 1.0)
    assert torch.allclose(z, x + 0.3, atol=1e-6)
    grey = color(x, 0.0, 0.0, 1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1])


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown DSA operations"):
        DSA(0, ops=("zoom",))
