"""The meta-gradient of trajectory matching, checked against finite differences (float64)."""

import pytest
import torch
from torch import nn

from conftest import directional_derivatives
from ddkd.models import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec, flat_params
from ddkd.synth.augment import DSA
from ddkd.synth.matching import (
    Segment,
    matching_loss,
    meta_gradient,
    sample_batches,
    unroll,
)


def _problem(steps=3, n=6, batch=4, seed=0):
    torch.manual_seed(seed)
    model = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=1, width=3, out_dim=2))
    model = model.double()
    spec = ParamSpec.of(model)
    theta_start = flat_params(model)
    theta_target = theta_start + 0.05 * torch.randn_like(theta_start)
    gen = torch.Generator().manual_seed(seed)
    segment = Segment(0, 0, theta_start, theta_target, sample_batches(n, steps, batch, gen))
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    alpha = torch.tensor(0.1, dtype=torch.float64)
    return model, spec, segment, x, y, alpha


def _loss(model, spec, segment, x, y, alpha, augment=None):
    theta = unroll(model, spec, segment.theta_start, x, y, alpha, segment.batches,
                   augment=augment, create_graph=False)
    return matching_loss(theta.detach(), segment.theta_start, segment.theta_target).item()


@pytest.mark.parametrize("augment", ["none", "dsa"])
@pytest.mark.parametrize("which", ["x", "y", "alpha"])
def test_meta_gradient_matches_finite_differences(which, augment):
    model, spec, segment, x, y, alpha = _problem()
    dsa = DSA(seed=0)
    aug = (lambda images, step: dsa(images, 0, step)) if augment == "dsa" else None
    mg = meta_gradient(model, spec, segment, x, y, alpha, augment=aug)
    analytic, numeric = directional_derivatives(
        lambda **a: _loss(model, spec, segment, **a, augment=aug),
        {"x": x, "y": y, "alpha": alpha}, mg, which)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert mg.loss.item() == pytest.approx(_loss(model, spec, segment, x, y, alpha, aug))


def test_one_step_has_the_closed_form_of_linear_regression():
    # Student f(x) = W x (no bias); L = mean((W X - Y)^2) over batch and outputs:
    # grad_W = 2 / (B * D) (W X - Y)^T X, so theta_1 = W - alpha * grad_W.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False)).double()
    spec = ParamSpec.of(model)
    w = flat_params(model)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    theta_1 = unroll(model, spec, w, x, y, alpha, [torch.arange(5)])
    W, X = w.view(3, 4), x.view(5, 4)
    grad = 2.0 / (5 * 3) * (X @ W.T - y).T @ X
    assert torch.allclose(theta_1, (W - alpha * grad).reshape(-1), atol=1e-12)


def test_matching_loss_is_one_at_the_start_and_zero_at_the_target():
    a, b = torch.randn(10), torch.randn(10)
    assert matching_loss(a, a, b).item() == pytest.approx(1.0)
    assert matching_loss(b, a, b).item() == 0.0


def test_sample_batches_follow_the_published_chunking():
    gen = torch.Generator().manual_seed(0)
    batches = sample_batches(10, 5, 4, gen)
    assert [len(b) for b in batches] == [2, 4, 4, 2, 4]  # last chunk first, then redraw
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert all(len(b) == 3 for b in sample_batches(3, 4, 256, gen))


@pytest.mark.parametrize("augment", ["none", "dsa"])
@pytest.mark.parametrize("steps", [1, 4])
def test_constant_memory_gradient_equals_the_unrolled_one(augment, steps):
    from ddkd.synth.matching import meta_gradient_constant_memory

    model, spec, segment, x, y, alpha = _problem(steps=steps, n=6, batch=4)
    dsa = DSA(seed=0)
    aug = (lambda images, step: dsa(images, 0, step)) if augment == "dsa" else None
    ref = meta_gradient(model, spec, segment, x, y, alpha, augment=aug)
    got = meta_gradient_constant_memory(model, spec, segment, x, y, alpha, augment=aug)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    assert rel(got.grad_x, ref.grad_x) < 1e-5
    assert rel(got.grad_y, ref.grad_y) < 1e-5
    assert rel(got.grad_alpha, ref.grad_alpha) < 1e-5


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
def test_bf16_autocast_meta_gradient_points_where_float32_does(memory):
    """--precision bf16: the inner forward runs in bfloat16, so the meta-gradient differs from
    float32's (proof that autocast is on) but keeps its direction."""
    from ddkd.synth.matching import meta_gradient_constant_memory

    torch.manual_seed(0)
    model = ConvNet(ConvNetConfig(in_channels=1, image_size=16, depth=2, width=16, out_dim=8))
    spec = ParamSpec.of(model)
    theta_start = flat_params(model)
    segment = Segment(0, 0, theta_start, theta_start + 0.02 * torch.randn_like(theta_start),
                      sample_batches(12, 4, 6, torch.Generator().manual_seed(0)))
    x, y, alpha = torch.randn(12, 1, 16, 16), torch.randn(12, 8), torch.tensor(0.1)
    ref = meta_gradient(model, spec, segment, x, y, alpha)
    compute = meta_gradient if memory == "unrolled" else meta_gradient_constant_memory
    got = compute(model, spec, segment, x, y, alpha, amp_dtype=torch.bfloat16)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    assert not torch.equal(got.grad_x, ref.grad_x)
    assert cos(got.grad_x, ref.grad_x) > 0.99
    assert cos(got.grad_y, ref.grad_y) > 0.99
    assert got.grad_alpha.item() == pytest.approx(ref.grad_alpha.item(), rel=5e-2)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)


def test_meta_gradient_equals_the_published_loop_of_bench_reference():
    """bench/reference.py re-implements MTT/MKDT's distill.py (a flat re-parametrised ConvNet,
    the graph of all N steps kept): on a tiny shape ddkd's meta-gradient, unrolled or
    recomputed at constant memory, gives its loss and its image gradient."""
    import sys
    from pathlib import Path

    from ddkd.synth.matching import meta_gradient_constant_memory

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from reference import FlatConvNet, matching_iteration_reference
    finally:
        sys.path.pop(0)
    config = ConvNetConfig(in_channels=1, image_size=8, depth=2, width=4, out_dim=3)
    model, reference = ConvNet(config), FlatConvNet(1, 8, 2, 4, 3)
    spec = ParamSpec.of(model)
    assert list(spec.shapes) == reference.shapes  # one flat layout
    gen = torch.Generator().manual_seed(0)
    theta_start = reference.init(gen)
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    y = torch.randn(6, 3, generator=gen)
    alpha = torch.tensor(0.1)
    batches = sample_batches(6, 3, 4, gen)
    segment = Segment(0, 0, theta_start, theta_target, batches)
    loss, grad_x = matching_iteration_reference(reference, theta_start, theta_target, x, y,
                                                alpha, list(batches))
    for compute in (meta_gradient, meta_gradient_constant_memory):
        mg = compute(model, spec, segment, x, y, alpha)
        assert float(mg.loss) == pytest.approx(loss, rel=1e-5)
        assert torch.allclose(mg.grad_x, grad_x, rtol=1e-4, atol=1e-7), compute.__name__
