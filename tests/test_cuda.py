"""The CUDA paths: what only a GPU shows (issue 7). Skipped where no GPU is visible (here and
in CI); a GPU session runs them with ``bash bench/gpu_check.sh``, which also runs the
benchmark on the GPU.

Convolutions on a GPU run in TF32 by default (``torch.backends.cudnn.allow_tf32``; MTT's and
MKDT's code keep that default). The equality checks turn it off, so that what they compare
is batching, recomputation or the device, not TF32's rounding.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import TINY_TEACH, write_imagefolder
from ddkd.cli import main
from ddkd.config import ExpertConfig
from ddkd.models import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec, flat_params
from ddkd.synth.augment import DSA
from ddkd.synth.matching import (
    Segment,
    meta_gradient,
    meta_gradient_constant_memory,
    sample_batches,
)
from ddkd.teach.experts import StudentLoss, compile_available, train_expert, train_experts

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU is visible; a GPU session runs these with bash bench/gpu_check.sh")

CUDA = torch.device("cuda")
CFG = ConvNetConfig(in_channels=1, image_size=8, depth=2, width=8, out_dim=4)


@pytest.fixture
def no_tf32():
    """Full float32 arithmetic and deterministic cuDNN algorithms, for the equality checks."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    before = flags[0].allow_tf32, flags[1].allow_tf32, flags[0].deterministic
    flags[0].allow_tf32 = flags[1].allow_tf32 = False
    flags[0].deterministic = True
    yield
    flags[0].allow_tf32, flags[1].allow_tf32, flags[0].deterministic = before


def _data(n=44, device=CUDA):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    z = x.flatten(1)[:, :4] * 2 + 0.5  # a learnable target
    return x.to(device), z.to(device)


def test_experts_on_the_gpu_equal_the_cpu_ones_alone_and_batched(no_tf32):
    x, z = _data()
    ec = ExpertConfig(num_experts=3, epochs=3, batch_size=8, lr=0.05)
    cpu = [train_expert(CFG, ec, x.cpu(), z.cpu(), seed=2, k=k) for k in (0, 2, 1)]
    alone = [train_expert(CFG, ec, x, z, seed=2, k=k) for k in (0, 2, 1)]
    group = train_experts(CFG, ec, x, z, seed=2, ks=[0, 2, 1])
    for (c, loss_c), (a, loss_a), (b, loss_b) in zip(cpu, alone, group, strict=True):
        assert a.device.type == "cpu" and b.device.type == "cpu"  # trajectories come back
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
        assert np.allclose(loss_a, loss_c, rtol=1e-4) and np.allclose(loss_b, loss_c, rtol=1e-4)


def _problem(steps, device, dtype=torch.float64, n=6, batch=4):
    torch.manual_seed(0)
    model = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=2, width=4, out_dim=3))
    model = model.to(device, dtype)
    spec = ParamSpec.of(model)
    theta = flat_params(model)
    gen = torch.Generator().manual_seed(0)
    target = theta + 0.05 * torch.randn(theta.shape, generator=gen, dtype=dtype).to(device)
    batches = tuple(b.to(device) for b in sample_batches(n, steps, batch, gen))
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype).to(device)
    y = torch.randn(n, 3, generator=gen, dtype=dtype).to(device)
    return model, spec, Segment(0, 0, theta, target, batches), x, y, torch.tensor(
        0.1, dtype=dtype, device=device)


def _rel(a, b):
    return ((a.cpu() - b.cpu()).norm() / b.cpu().norm()).item()


@pytest.mark.parametrize("augment", ["none", "dsa"])
def test_meta_gradient_on_the_gpu_equals_the_cpu_one_in_float64(augment):
    dsa = DSA(seed=0)
    aug = (lambda images, step: dsa(images, 0, step)) if augment == "dsa" else None
    cpu = meta_gradient(*_problem(4, torch.device("cpu")), augment=aug)
    for compute in (meta_gradient, meta_gradient_constant_memory):
        got = compute(*_problem(4, CUDA), augment=aug)
        assert got.grad_x.device.type == "cuda"
        assert got.loss.item() == pytest.approx(cpu.loss.item(), rel=1e-10)
        for name in ("grad_x", "grad_y", "grad_alpha"):
            assert _rel(getattr(got, name), getattr(cpu, name)) < 1e-8, (compute.__name__, name)


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
def test_bf16_meta_gradient_on_the_gpu_points_where_float32_does(memory, no_tf32):
    model, spec, segment, x, y, alpha = _problem(4, CUDA, torch.float32, n=12, batch=6)
    ref = meta_gradient(model, spec, segment, x, y, alpha)
    compute = meta_gradient if memory == "unrolled" else meta_gradient_constant_memory
    got = compute(model, spec, segment, x, y, alpha, amp_dtype=torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity
    assert not torch.equal(got.grad_x, ref.grad_x)  # autocast is on
    assert cos(got.grad_x.flatten(), ref.grad_x.flatten(), dim=0) > 0.99
    assert cos(got.grad_y.flatten(), ref.grad_y.flatten(), dim=0) > 0.99
    assert got.grad_alpha.item() == pytest.approx(ref.grad_alpha.item(), rel=5e-2)


def test_knn_probe_takes_gpu_features():
    from ddkd.probes import knn_accuracy

    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels, truth = torch.randint(3, (50,), generator=gen), torch.randint(3, (20,), generator=gen)
    cpu = knn_accuracy(bank, labels, queries, truth, num_classes=3, k=5)
    assert knn_accuracy(bank.cuda(), labels, queries.cuda(), truth, num_classes=3, k=5) == cpu


def _syncs(run) -> int:
    """How many synchronising CUDA calls ``run()`` makes (``torch.cuda`` sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_expert_training_syncs_once_per_epoch_not_per_step():
    """Issue 7 point 4: no host-device synchronisation inside the inner loop. Three times the
    steps must not add a single sync (the per-epoch ones: the order's upload, the loss read
    back, the snapshot)."""
    ec = ExpertConfig(num_experts=2, epochs=1, batch_size=8, lr=0.05)
    counts = {}
    for n in (16, 48):
        x, z = _data(n)
        train_expert(CFG, ec, x, z, seed=0, k=0)  # warm-up: cuDNN's first calls
        train_experts(CFG, ec, x, z, seed=0, ks=[0, 1])
        counts[n] = (_syncs(lambda x=x, z=z: train_expert(CFG, ec, x, z, seed=0, k=0)),
                     _syncs(lambda x=x, z=z: train_experts(CFG, ec, x, z, seed=0, ks=[0, 1])))
    assert counts[16] == counts[48], counts
    assert min(counts[16]) > 0  # the per-epoch syncs are seen: the counter works


def test_the_sync_counter_sees_a_sync():
    assert _syncs(lambda: torch.ones(1, device=CUDA).item()) >= 1
    assert _syncs(lambda: torch.ones(1, device=CUDA) * 2) == 0


def test_teacher_training_reads_its_losses_once_per_chunk_of_steps():
    import ddkd.ssl_training as ssl
    from ddkd.data import Normalization
    from ddkd.models import ResNet, ResNetConfig

    def syncs(steps: int) -> int:
        torch.manual_seed(0)
        net = ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4))
        images = torch.randint(0, 256, (8 * steps, 1, 8, 8), dtype=torch.uint8)
        trainer = ssl.SSLTrainer(net, 32, "barlowtwins", ssl.SSLSchedule(2, 8, 0.05, 5e-4),
                                 Normalization.fit(images), (1, 8, 8), CUDA, 0, proj_dim=16)
        trainer.train_epoch(images)  # warm-up
        return _syncs(lambda: trainer.train_epoch(images))

    # 16 and 48 steps: one read of the losses and three; nothing else per step
    assert ssl._READ_EVERY == 16 and syncs(48) - syncs(16) == 2


def test_library_draws_leave_the_gpu_rng_alone():
    from ddkd.teach.experts import init_student

    before = torch.cuda.get_rng_state()
    init_student(CFG, 0, 0)
    DSA(seed=0)(torch.randn(2, 1, 8, 8, device=CUDA), 0, 0)
    assert torch.equal(torch.cuda.get_rng_state(), before)


@pytest.mark.parametrize("augment", ["none", "dsa"])
def test_matching_syncs_do_not_grow_with_the_inner_steps(augment):
    dsa = DSA(seed=0)
    aug = (lambda images, step: dsa(images, 0, step)) if augment == "dsa" else None
    counts = {}
    for steps in (1, 4):
        problem = _problem(steps, CUDA, torch.float32)
        for compute in (meta_gradient, meta_gradient_constant_memory):
            compute(*problem, augment=aug)  # warm-up
            counts[steps, compute.__name__] = _syncs(
                lambda c=compute, p=problem: c(*p, augment=aug))
    for name in ("meta_gradient", "meta_gradient_constant_memory"):
        assert counts[1, name] == counts[4, name], counts


# the defaults; then the options with their own device code: ZCA whitening, DSA, constant
# memory, bf16 matching and the baselines that train or select on the device
OPTIONS = {
    "defaults": ([], [], ["none", "random"]),
    "options": (["--set", "data.zca=true"],
                ["--zca", "--augment", "dsa", "--memory", "constant", "--precision", "bf16"],
                ["high-loss", "full", "teacher"]),
}


@pytest.mark.parametrize("which", list(OPTIONS))
def test_teach_synthesize_evaluate_on_the_gpu(which, tmp_path):
    teach, synthesize, baselines = OPTIONS[which]
    folder = write_imagefolder(tmp_path / "data", n_per_class=20)
    run, synth, ev = tmp_path / "run", tmp_path / "set.h5", tmp_path / "eval"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run),
                 "--device", "cuda", *TINY_TEACH, *teach]) == 0
    assert main(["synthesize", "--run", str(run), "--out", str(synth), "--ipc", "2",
                 "--iterations", "3", "--syn-steps", "2", "--matched-epochs", "1",
                 "--max-start-epoch", "1", "--device", "cuda", "--no-progress", *synthesize]) == 0
    assert main(["evaluate", str(synth), "--baselines", ",".join(baselines), "--fractions",
                 "0.5", "--seeds", "1", "--epochs", "2", "--device", "cuda", "--out", str(ev),
                 "--no-progress"]) == 0
    env = json.loads((run / "environment.json").read_text())
    assert env["device"] == "cuda" and env["gpu"] in env["gpus"]
    assert set(env["tf32"]) == {"convolutions", "matmul"}
    rows = json.loads((ev / "results.json").read_text())["rows"]
    assert len(rows) == len(baselines) + 1 and all(0 <= r["accuracy"] <= 1 for r in rows)


# last: its cold Triton compile takes the longest
@pytest.mark.skipif(not compile_available(CUDA), reason="torch.compile on CUDA needs Triton")
def test_compiled_experts_on_the_gpu_follow_the_eager_ones(no_tf32):
    x, z = _data()
    ec = ExpertConfig(num_experts=2, epochs=2, batch_size=8, lr=0.05)
    compiled = StudentLoss(CFG, compile=True)
    eager = [train_expert(CFG, ec, x, z, seed=4, k=k) for k in (0, 1)]
    got = [train_expert(CFG, ec, x, z, seed=4, k=k, loss=compiled) for k in (0, 1)]
    for (a, _), (b, _) in zip(eager, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    batched = train_experts(CFG, ec, x, z, seed=4, ks=[0, 1], loss=compiled)
    torch.testing.assert_close(batched[1][0], eager[1][0], rtol=1e-4, atol=1e-5)
