import pytest
import torch

from ddkd.data import Normalization
from ddkd.models import ResNet, ResNetConfig
from ddkd.ssl_training import (
    SSL_METHODS,
    SSLModel,
    SSLSchedule,
    SSLTrainer,
    lr_at,
    recalibrate_batchnorm,
)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", SSL_METHODS)
def test_ssl_loss_decreases_for_a_few_steps(method, precision):
    torch.manual_seed(0)
    backbone = ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4))
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    model = SSLModel(backbone, 32, method, proj_dim=32, amp_dtype=amp_dtype)
    view_a, view_b = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    view_b = view_a + 0.3 * view_b  # two "views" of the same images
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    losses = []
    for _ in range(8):
        loss = model.loss(view_a, view_b, progress=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32
                                                for p in model.parameters())
    if amp_dtype is not None:  # the forward really ran in bfloat16
        torch.manual_seed(0)
        exact = SSLModel(ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4)), 32,
                         method, proj_dim=32)
        model.load_state_dict(exact.state_dict())
        got, ref = model.loss(view_a, view_b, 0.0).item(), exact.loss(view_a, view_b, 0.0).item()
        assert got != ref and got == pytest.approx(ref, rel=5e-2)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.01


def _trainer(seed=0, epochs=2):
    torch.manual_seed(123)  # the module init; the training itself draws from `seed`
    net = ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4))
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    norm = Normalization.fit(images)
    trainer = SSLTrainer(net, 32, "barlowtwins", SSLSchedule(epochs, 8, 0.05, 5e-4), norm,
                             (1, 8, 8), torch.device("cpu"), seed, proj_dim=16)
    return trainer, images


def test_resumed_teacher_training_equals_uninterrupted():
    straight, images = _trainer()
    straight.train_epoch(images)
    straight.train_epoch(images)

    first, _ = _trainer()
    first.train_epoch(images)
    state = first.state_dict()
    resumed, _ = _trainer()
    torch.manual_seed(999)  # the global RNG state must not matter
    resumed.load_state_dict(state)
    resumed.train_epoch(images)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_losses_read_back_in_chunks_are_every_steps_loss_in_order(monkeypatch):
    # 20 steps an epoch: one full chunk of 16 and a partial one; reading every step (as before
    # the chunks, a host sync per step on a GPU) reports the same losses.
    import ddkd.ssl_training as ssl

    images = torch.randint(0, 256, (160, 1, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    reported = {}
    for every in (1, ssl._READ_EVERY):
        monkeypatch.setattr(ssl, "_READ_EVERY", every)
        trainer, _ = _trainer()
        seen = []
        mean = trainer.train_epoch(images, on_step=lambda i, v, seen=seen: seen.append((i, v)))
        reported[every] = seen, mean
    seen, mean = reported[ssl._READ_EVERY]
    assert [i for i, _ in seen] == list(range(20))
    assert reported[1] == (seen, mean) and mean == pytest.approx(sum(v for _, v in seen) / 20)


def test_nan_loss_stops_with_a_clear_error():
    trainer, images = _trainer()
    images = images.clone()
    trainer.normalize = Normalization((0.0,), (0.0,))  # division by zero -> NaN inputs
    from ddkd.errors import TrainingError

    with pytest.raises(TrainingError, match="teacher SSL loss became nan"):
        trainer.train_epoch(images)


def test_a_nan_in_the_middle_of_a_chunk_names_its_step():
    from ddkd.errors import TrainingError

    trainer, _ = _trainer()
    images = torch.randint(0, 256, (160, 1, 8, 8), dtype=torch.uint8)  # 20 steps an epoch
    real, calls = trainer.step_model, []

    def step_model(view_a, view_b, progress):
        calls.append(1)
        loss = real(view_a, view_b, progress)
        return loss * float("nan") if len(calls) == 5 else loss

    trainer.step_model = step_model
    with pytest.raises(TrainingError, match="became nan at epoch 1, step 5;"):
        trainer.train_epoch(images)


def test_recalibrate_batchnorm_uses_clean_statistics():
    net = ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4))
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    norm = Normalization((0.0,), (0.1,))  # inputs of mean ~5, far from the init stats
    recalibrate_batchnorm(net, images, norm, torch.device("cpu"))
    x = norm(images)
    expected = x.mean()  # conv1 has no bias: bn1's input mean is conv1's output mean
    out = net.conv1(x).mean(dim=(0, 2, 3))
    assert torch.allclose(net.bn1.running_mean, out, atol=1e-4)
    assert net.bn1.momentum == 0.1 and expected > 1
