"""Data-parallel teach and synthesize: two real CPU processes (gloo, launched by Lightning
Fabric), compared with one process."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY_TEACH
from ddkd.cli import main
from ddkd.io.experts import ExpertsFile
from ddkd.io.run import load_targets
from ddkd.io.synthset import load_synthset
from ddkd.io.weights import load_weights

SYNTH = ["--ipc", "2", "--iterations", "3", "--syn-steps", "2", "--matched-epochs", "1",
         "--max-start-epoch", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import write_imagefolder

    root = tmp_path_factory.mktemp("dist")
    folder = write_imagefolder(root / "data", n_per_class=20)
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run),
                 *TINY_TEACH]) == 0
    return run


def test_segments_average_several_meta_gradients(tiny_run, tmp_path):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(one), *SYNTH]) == 0
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(two), *SYNTH,
                 "--segments", "2"]) == 0
    a, b = load_synthset(one), load_synthset(two)
    assert a.config["segments"] == 1 and b.config["segments"] == 2
    assert not torch.allclose(a.images, b.images)  # a second segment changes each update


def test_two_processes_equal_one_process_with_two_segments(tiny_run, tmp_path):
    single, parallel = tmp_path / "single.h5", tmp_path / "parallel.h5"
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(single), *SYNTH,
                 "--segments", "2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ddkd.cli", "synthesize", "--run", str(tiny_run), "--out",
         str(parallel), *SYNTH, "--devices", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_synthset(single), load_synthset(parallel)
    assert b.config["segments"] == 2 and b.provenance["processes"] == 2
    # Equal to float tolerance: the sum of the two meta-gradients is formed in another order,
    # and each process runs its convolutions on one thread (lr_img 1000 magnifies the rest).
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.targets, a.targets, rtol=1e-4, atol=1e-5)
    assert abs(b.lr - a.lr) < 1e-6


def test_segments_must_divide_among_processes(tiny_run, tmp_path, capsys):
    from ddkd.config import SynthConfig
    from ddkd.errors import ConfigError
    from ddkd.runtime import Ranks
    from ddkd.synth.runner import run_synthesize

    config = SynthConfig(ipc=2, iterations=1, syn_steps=2, expert_epochs=1, max_start_epoch=1,
                         segments=3)
    with pytest.raises(ConfigError, match="--segments 3 cannot be shared by 2 processes"):
        run_synthesize(config, tiny_run, tmp_path / "x.h5", torch.device("cpu"),
                       dist=Ranks(rank=0, world=2))


def test_two_processes_share_the_targets_and_the_experts(tiny_run, tmp_path):
    # The teacher of the tiny run, brought as a checkpoint (teach --devices trains none).
    common = [a for a in TINY_TEACH if a not in ("--train-teacher", "--teacher-epochs", "1")]
    common += ["--experts", "3", "--teacher-checkpoint", str(tiny_run / "teacher.h5"),
               "--dataset", f"imagefolder:{tiny_run.parent / 'data'}"]
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert main(["teach", "--out", str(single), *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ddkd.cli", "teach", "--out", str(parallel), *common,
         "--devices", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # each process computed the targets of every second image; gathered, they are the same
    torch.testing.assert_close(load_targets(parallel / "targets.h5")[0],
                               load_targets(single / "targets.h5")[0], rtol=1e-5, atol=1e-6)
    with ExpertsFile(single / "experts.h5") as a, ExpertsFile(parallel / "experts.h5") as b:
        assert len(a) == len(b) == 3
        for k in range(3):  # rank k % 2 trained expert k, from the same streams
            torch.testing.assert_close(b.trajectory(k), a.trajectory(k), rtol=1e-4, atol=1e-5)
    assert (parallel / "summary.json").is_file() and not (parallel / "experts.partial").exists()


@pytest.mark.parametrize("ssl", ["barlowtwins", "simclr"])
def test_two_processes_train_one_teacher(tiny_run, tmp_path, ssl):
    # DDP with lightly's gathered losses: the processes end with one set of weights (teach
    # checks it and fails otherwise), the run completes, and the teacher did learn.
    folder = tiny_run.parent / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "ddkd.cli", "teach", "--dataset", f"imagefolder:{folder}",
         "--out", str(out), *TINY_TEACH, "--teacher-epochs", "2", "--ssl", ssl,
         "--devices", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["phase"] == "teacher"]
    assert len(losses) == 2 and all(map(math.isfinite, losses))  # one line per epoch
    state, _, _, meta = load_weights(out / "teacher.h5")
    assert meta["ssl"] == ssl and (out / "summary.json").is_file()
    untrained = load_weights(tiny_run / "teacher.h5")[0]
    assert any(not torch.equal(state[k], untrained[k]) for k in state)


def test_two_processes_share_the_evaluation(tiny_run, tmp_path):
    synth = tmp_path / "set.h5"
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(synth), *SYNTH]) == 0
    args = [str(synth), "--baselines", "none,random", "--fractions", "0.25,0.5", "--seeds",
            "2", "--epochs", "2", "--probe", "knn", "--no-progress"]
    assert main(["evaluate", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ddkd.cli", "evaluate", *args, "--out", str(tmp_path / "two"),
         "--devices", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    key = ("method", "arch", "seed", "downstream", "fraction", "labels")
    assert [tuple(r[k] for k in key) for r in two] == [tuple(r[k] for k in key) for r in one]
    assert len(two) == 3 * 2 * 2  # every job once, none twice
    for a, b in zip(one, two, strict=True):  # float round-off cannot move a kNN vote far
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.05


def test_torchrun_launch_equals_the_fabric_launch(tiny_run, tmp_path):
    # torchrun starts both processes itself; Fabric joins its group instead of launching.
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for how in ("fabric", "torchrun"):
        outs[how] = tmp_path / f"{how}.h5"
        argv = ["synthesize", "--run", str(tiny_run), "--out", str(outs[how]), *SYNTH,
                "--devices", "2", "--device", "cpu"]
        launcher = ([torchrun, "--nproc-per-node", "2", "-m", "ddkd.cli", "--"]
                    if how == "torchrun" else [sys.executable, "-m", "ddkd.cli"])
        done = subprocess.run(launcher + argv, capture_output=True, text=True, timeout=300,
                              env=env, check=False, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_synthset(outs["fabric"]), load_synthset(outs["torchrun"])
    assert b.provenance["processes"] == 2
    torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-5)
