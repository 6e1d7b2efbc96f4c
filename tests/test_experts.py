import h5py
import numpy as np
import pytest
import torch

from ddkd.config import ExpertConfig
from ddkd.errors import ConfigError, FileFormatError, TrainingError
from ddkd.io.experts import ExpertsFile, ExpertsHeader, assemble_experts, write_expert_shard
from ddkd.models import ConvNetConfig
from ddkd.models.functional import ParamSpec
from ddkd.teach.experts import (
    StudentLoss,
    compile_available,
    init_student,
    resolve_compile,
    train_expert,
    train_experts,
)

CFG = ConvNetConfig(in_channels=1, image_size=8, depth=2, width=8, out_dim=4)


def _data(n=40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    z = x.flatten(1)[:, :4] * 2 + 0.5  # a learnable target
    return x, z


def test_expert_learns_and_records_every_epoch():
    x, z = _data()
    ec = ExpertConfig(num_experts=1, epochs=4, batch_size=8, lr=0.05)
    trajectory, losses = train_expert(CFG, ec, x, z, seed=0, k=0)
    n_params = ParamSpec.of(init_student(CFG, 0, 0)).numel
    assert trajectory.shape == (5, n_params) and trajectory.dtype == torch.float32
    assert losses[-1] < losses[0]
    assert not torch.equal(trajectory[0], trajectory[1])


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
def test_batched_experts_equal_one_by_one(norm):
    # Each student of a group keeps its own init and data order; the last batch is partial.
    cfg = ConvNetConfig(in_channels=1, image_size=8, depth=2, width=8, out_dim=4, norm=norm)
    x, z = _data(n=44)
    ec = ExpertConfig(num_experts=3, epochs=3, batch_size=8, lr=0.05)
    alone = [train_expert(cfg, ec, x, z, seed=2, k=k) for k in (0, 2, 1)]
    seen = []
    group = train_experts(cfg, ec, x, z, seed=2, ks=[0, 2, 1],
                          on_epoch=lambda e, losses: seen.append((e, len(losses))))
    assert seen == [(0, 3), (1, 3), (2, 3)]
    for (a, loss_a), (b, loss_b) in zip(alone, group, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert np.allclose(loss_a, loss_b, rtol=1e-4)
    assert not torch.allclose(group[0][0][-1], group[1][0][-1])  # distinct students


def test_experts_are_reproducible_and_independent():
    x, z = _data()
    ec = ExpertConfig(num_experts=2, epochs=2, batch_size=8)
    a, _ = train_expert(CFG, ec, x, z, seed=1, k=1)
    torch.manual_seed(42)  # global RNG state must not matter
    b, _ = train_expert(CFG, ec, x, z, seed=1, k=1)
    c, _ = train_expert(CFG, ec, x, z, seed=1, k=0)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0])  # different experts start from different inits


@pytest.mark.skipif(not compile_available(torch.device("cpu")),
                    reason="torch.compile needs a C++ compiler (g++), and none is installed")
def test_compiled_experts_match_eager_and_reproduce_themselves():
    # 44 images in batches of 8: two batch shapes, so two graphs; one StudentLoss serves all.
    x, z = _data(n=44)
    ec = ExpertConfig(num_experts=2, epochs=2, batch_size=8, lr=0.05)
    from torch._dynamo.utils import counters

    compiled = StudentLoss(CFG, compile=True)
    eager = [train_expert(CFG, ec, x, z, seed=4, k=k) for k in (0, 1)]
    counters.clear()
    first = [train_expert(CFG, ec, x, z, seed=4, k=k, loss=compiled) for k in (0, 1)]
    again = train_expert(CFG, ec, x, z, seed=4, k=1, loss=compiled)
    assert counters["stats"]["unique_graphs"] == 2  # compiled once per batch shape, not per expert
    for (a, loss_a), (b, loss_b) in zip(eager, first, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        assert np.allclose(loss_a, loss_b, rtol=1e-4)
    assert torch.equal(again[0], first[1][0])
    batched = train_experts(CFG, ec, x, z, seed=4, ks=[0, 1], loss=compiled)
    torch.testing.assert_close(batched[1][0], eager[1][0], rtol=1e-4, atol=1e-5)


def test_compile_settings_are_checked(monkeypatch):
    import ddkd.teach.experts as experts

    assert resolve_compile("off", torch.device("cpu")) is False
    monkeypatch.setattr(experts.shutil, "which", lambda _name: None)
    assert resolve_compile("auto", torch.device("cpu")) is False
    with pytest.raises(ConfigError, match="experts.compile = on needs a C\\+\\+ compiler"):
        resolve_compile("on", torch.device("cpu"))
    with pytest.raises(ConfigError, match="experts.compile 'yes'; valid: auto, on, off"):
        ExpertConfig(compile="yes")


def test_a_broken_compiler_gets_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from ddkd.config import ExpertConfig\n"
        "from ddkd.errors import TrainingError\n"
        "from ddkd.models import ConvNetConfig\n"
        "from ddkd.teach.experts import StudentLoss, train_expert\n"
        "cfg = ConvNetConfig(in_channels=1, image_size=8, depth=2, width=8, out_dim=4)\n"
        "x, z = torch.randn(16, 1, 8, 8), torch.randn(16, 4)\n"
        "try:\n"
        "    train_expert(cfg, ExpertConfig(num_experts=1, epochs=1, batch_size=8), x, z, 0, 0,\n"
        "                 loss=StudentLoss(cfg, compile=True))\n"
        "except TrainingError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "torch.compile of the experts' training step failed" in out
    assert "set experts.compile=off" in out


def test_a_compile_failure_in_the_backward_gets_the_same_clear_error():
    # A compiled step's backward graph is compiled at its first backward call.
    class FailsBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            raise torch._dynamo.exc.TorchDynamoException("the backward graph did not compile")

    loss = FailsBackward.apply(torch.ones(3, requires_grad=True)).sum()
    with pytest.raises(TrainingError, match="did not compile.*set experts.compile=off"):
        StudentLoss(CFG).backward(loss)


def test_diverging_expert_raises():
    x, z = _data()
    ec = ExpertConfig(num_experts=1, epochs=2, batch_size=8, lr=1e8)
    with pytest.raises(TrainingError, match="expert 0: KD loss became"):
        train_expert(CFG, ec, x, z, seed=0, k=0)


def _write_experts(tmp_path, k=2, epochs=2, dtype="float32"):
    x, z = _data()
    ec = ExpertConfig(num_experts=k, epochs=epochs, batch_size=8, dtype=dtype)
    shards = tmp_path / "shards"
    trajectories = []
    for i in range(k):
        t, losses = train_expert(CFG, ec, x, z, seed=0, k=i)
        write_expert_shard(shards / f"expert_{i:04d}.h5", t, losses, seed=0, dtype=dtype)
        trajectories.append(t)
    spec = ParamSpec.of(init_student(CFG, 0, 0))
    header = ExpertsHeader(k, epochs, spec.numel, dtype, {"image_size": 8}, spec, {}, "mse", 0)
    path = tmp_path / "experts.h5"
    assemble_experts(path, shards, header)
    return path, trajectories, spec


def test_experts_file_round_trip_is_exact(tmp_path):
    path, trajectories, spec = _write_experts(tmp_path)
    assert not (tmp_path / "shards").exists()
    with ExpertsFile(path) as experts:
        assert len(experts) == 2 and experts.header.param_spec == spec
        for k, t in enumerate(trajectories):
            assert torch.equal(experts.trajectory(k), t)
            assert torch.equal(experts.snapshot(k, 1), t[1])
    with h5py.File(path) as fh:  # readable without ddkd: one row per chunk
        assert fh["experts/0001"].chunks == (1, spec.numel)


def test_float16_storage_reads_back_as_float32(tmp_path):
    path, trajectories, _ = _write_experts(tmp_path, k=1, dtype="float16")
    with ExpertsFile(path) as experts:
        snap = experts.snapshot(0, 2)
    assert snap.dtype == torch.float32
    assert torch.allclose(snap, trajectories[0][2], rtol=1e-3, atol=1e-4)


def test_foreign_and_truncated_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh.create_dataset("x", data=np.zeros(3))
    with pytest.raises(FileFormatError, match="not a ddkd experts file"):
        ExpertsFile(foreign)
    path, _, _ = _write_experts(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError):
        ExpertsFile(truncated)
    with h5py.File(path, "a") as fh:
        del fh["experts/0001"]
    with pytest.raises(FileFormatError, match="lacks expert 1"):
        ExpertsFile(path)


def test_bf16_experts_follow_the_float32_trajectory_closely():
    """experts.precision = bf16: the forward runs under bfloat16 autocast (so the trajectory is
    not the float32 one), parameters stay float32, and training still follows the same path."""
    x, z = _data()
    ec = ExpertConfig(num_experts=1, epochs=3, batch_size=8, lr=0.05)
    fp32, losses32 = train_expert(CFG, ec, x, z, seed=0, k=0)
    bf16, losses16 = train_expert(CFG, ec, x, z, seed=0, k=0,
                                  loss=StudentLoss(CFG, amp_dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32 and torch.equal(bf16[0], fp32[0])
    assert not torch.equal(bf16[-1], fp32[-1])
    moved32, moved16 = fp32[-1] - fp32[0], bf16[-1] - bf16[0]
    assert torch.nn.functional.cosine_similarity(moved16, moved32, dim=0) > 0.99
    assert losses16[-1] < losses16[0]
    assert np.allclose(losses16, losses32, rtol=5e-2)


def test_unknown_precision_lists_the_valid_ones():
    from ddkd.config import SynthConfig

    with pytest.raises(ConfigError, match="experts.precision 'fp16' is unknown; valid: fp32, bf16"):
        ExpertConfig(precision="fp16")
    with pytest.raises(ConfigError, match="precision 'half' is unknown; valid: fp32, bf16"):
        SynthConfig(ipc=1, precision="half")
