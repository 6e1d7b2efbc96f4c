"""``ddkd teach`` end to end on a tiny image folder (seconds), plus its bad inputs."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_TEACH as TINY
from conftest import write_imagefolder
from ddkd.cli import main
from ddkd.io.experts import ExpertsFile
from ddkd.io.run import load_targets
from ddkd.io.weights import load_weights
from ddkd.models import ResNet, ResNetConfig


def teach(folder, out, *extra):
    return main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(out), *TINY,
                 *extra])


def test_teach_end_to_end_writes_a_complete_run(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert teach(tiny_folder, out) == 0
    printed = capsys.readouterr().out
    assert "kNN" in printed and "random-init" in printed and "raw pixels" in printed
    for name in ("config.json", "environment.json", "teacher.h5", "targets.h5", "experts.h5",
                 "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "experts.partial").exists() and not (out / "checkpoints").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "teach" and config["config"]["experts"]["num_experts"] == 2
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and len(env["inputs"]["train_checksum"]) == 64
    assert env["device"] == "cpu" and "tf32" not in env  # --device auto, resolved
    targets, indices, _ = load_targets(out / "targets.h5")
    assert targets.shape == (24, 32) and indices.tolist() == list(range(24))
    state, kind, arch, meta = load_weights(out / "teacher.h5")
    assert kind == "resnet" and arch["base_width"] == 4
    assert set(meta["knn"]) >= {"teacher", "random_init", "raw_pixels"}
    with ExpertsFile(out / "experts.h5") as experts:
        assert len(experts) == 2 and experts.header.epochs == 2
        assert experts.header.student["out_dim"] == 32
    lines = (out / "metrics.jsonl").read_text().splitlines()
    phases = [json.loads(line)["phase"] for line in lines]
    assert phases.count("teacher") == 1 and phases.count("expert") == 4


def test_same_seed_same_run(tiny_folder, tmp_path):
    teach(tiny_folder, tmp_path / "a")
    teach(tiny_folder, tmp_path / "b")
    with h5py.File(tmp_path / "a" / "experts.h5") as a, \
            h5py.File(tmp_path / "b" / "experts.h5") as b:
        assert np.array_equal(a["experts/0001"][()], b["experts/0001"][()])


def _experts(path):
    with ExpertsFile(path) as experts:
        return [experts.trajectory(k) for k in range(len(experts))]


def test_experts_per_batch_gives_the_same_experts(tiny_folder, tmp_path):
    teach(tiny_folder, tmp_path / "one")
    assert teach(tiny_folder, tmp_path / "grouped", "--experts", "3",
                 "--experts-per-batch", "2") == 0
    one, grouped = _experts(tmp_path / "one" / "experts.h5"), \
        _experts(tmp_path / "grouped" / "experts.h5")
    assert len(grouped) == 3  # a group of two, then one alone
    for a, b in zip(one, grouped[:2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "grouped" / "config.json").read_text())
    assert config["config"]["experts"]["per_batch"] == 2


def test_bf16_experts_are_recorded_and_follow_the_float32_ones(tiny_folder, tmp_path):
    # skd: the block stages and the recorded global stage both run under bfloat16 autocast
    assert teach(tiny_folder, tmp_path / "f", "--objective", "skd") == 0
    assert teach(tiny_folder, tmp_path / "b", "--objective", "skd",
                 "--set", "experts.precision=bf16") == 0
    setup = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()
             if '"experts-setup"' in line]
    assert setup and setup[0]["precision"] == "bf16"
    for f, b in zip(_experts(tmp_path / "f" / "experts.h5"),
                    _experts(tmp_path / "b" / "experts.h5"), strict=True):
        assert b.dtype == torch.float32 and not torch.equal(f[0], b[0])  # stages ran in bf16
        assert torch.nn.functional.cosine_similarity(b[-1] - f[0], f[-1] - f[0], dim=0) > 0.95


def test_bf16_teacher_training_is_recorded_and_really_in_bf16(tiny_folder, tmp_path):
    assert teach(tiny_folder, tmp_path / "f", "--experts", "0") == 0
    assert teach(tiny_folder, tmp_path / "b", "--experts", "0",
                 "--set", "teacher.precision=bf16") == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["config"]["teacher"]["precision"] == "bf16"
    f, _, _, _ = load_weights(tmp_path / "f" / "teacher.h5")
    b, _, _, _ = load_weights(tmp_path / "b" / "teacher.h5")
    assert all(b[name].dtype == f[name].dtype for name in f)
    assert any(not torch.equal(b[name], f[name]) for name in f)


def test_resume_equals_uninterrupted(tiny_folder, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert teach(tiny_folder, straight, "--teacher-epochs", "2") == 0

    # Interrupt once in the middle of teacher training, once between two experts.
    from ddkd import ssl_training
    from ddkd.teach import runner

    original_epoch = ssl_training.SSLTrainer.train_epoch
    calls = {"epochs": 0, "experts": 0}

    def interrupted_epoch(self, *args, **kwargs):
        calls["epochs"] += 1
        if calls["epochs"] == 2:
            raise KeyboardInterrupt
        return original_epoch(self, *args, **kwargs)

    monkeypatch.setattr(ssl_training.SSLTrainer, "train_epoch", interrupted_epoch)
    resumed = tmp_path / "resumed"
    assert teach(tiny_folder, resumed, "--teacher-epochs", "2") == 130
    assert not (resumed / "teacher.h5").exists() and not (resumed / "summary.json").exists()
    monkeypatch.setattr(ssl_training.SSLTrainer, "train_epoch", original_epoch)

    original_expert = runner.train_experts

    def interrupted_expert(*args, **kwargs):
        calls["experts"] += 1
        if calls["experts"] == 2:
            raise KeyboardInterrupt
        return original_expert(*args, **kwargs)

    monkeypatch.setattr(runner, "train_experts", interrupted_expert)
    assert teach(tiny_folder, resumed, "--teacher-epochs", "2", "--resume") == 130
    assert (resumed / "teacher.h5").exists() and not (resumed / "experts.h5").exists()
    assert len(list((resumed / "experts.partial").glob("expert_*.h5"))) == 1
    monkeypatch.setattr(runner, "train_experts", original_expert)
    assert teach(tiny_folder, resumed, "--teacher-epochs", "2", "--resume") == 0

    a, _, _, _ = load_weights(straight / "teacher.h5")
    b, _, _, _ = load_weights(resumed / "teacher.h5")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ta, tb in zip(_experts(straight / "experts.h5"), _experts(resumed / "experts.h5"),
                      strict=True):
        assert torch.equal(ta, tb)


def test_skd_run_interrupted_in_its_block_stages_resumes_to_the_same_experts(
        tiny_folder, tmp_path, monkeypatch):
    from ddkd.teach import runner

    straight = tmp_path / "straight"
    assert teach(tiny_folder, straight, "--objective", "skd") == 0
    original = runner.stagewise_students
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # in expert 1's block stages
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "stagewise_students", interrupted)
    resumed = tmp_path / "resumed"
    assert teach(tiny_folder, resumed, "--objective", "skd") == 130
    assert len(list((resumed / "experts.partial").glob("expert_*.h5"))) == 1
    monkeypatch.setattr(runner, "stagewise_students", original)
    assert teach(tiny_folder, resumed, "--objective", "skd", "--resume") == 0
    for ta, tb in zip(_experts(straight / "experts.h5"), _experts(resumed / "experts.h5"),
                      strict=True):
        assert torch.equal(ta, tb)


def test_teacher_checkpoint_from_a_run_and_as_state_dict(tiny_folder, tmp_path):
    first = tmp_path / "first"
    teach(tiny_folder, first)
    shared = ["--dataset", f"imagefolder:{tiny_folder}", "--experts", "1", "--expert-epochs",
              "1", "--set", "student.depth=2", "--set", "student.width=8", "--set",
              "teacher.knn_k=3", "--no-progress"]
    assert main(["teach", *shared, "--teacher-checkpoint", str(first / "teacher.h5"),
                 "--out", str(tmp_path / "h5")]) == 0
    z_first, _, _ = load_targets(first / "targets.h5")
    z_h5, _, _ = load_targets(tmp_path / "h5" / "targets.h5")
    assert torch.equal(z_first, z_h5)

    state, _, _, _ = load_weights(first / "teacher.h5")
    pt = tmp_path / "teacher.pt"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, pt)
    assert main(["teach", *shared, "--teacher-checkpoint", str(pt), "--set",
                 "teacher.base_width=4", "--out", str(tmp_path / "pt")]) == 0


def test_teacher_from_a_factory(tiny_folder, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "myteacher.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    import importlib

    module = importlib.import_module("myteacher")
    torch.save(module.build().state_dict(), tmp_path / "w.pt")
    assert main(["teach", "--dataset", f"imagefolder:{tiny_folder}", "--teacher-checkpoint",
                 str(tmp_path / "w.pt"), "--set", "teacher.factory=myteacher:build",
                 "--experts", "1", "--expert-epochs", "1", "--set", "student.depth=2",
                 "--set", "student.width=8", "--set", "teacher.knn_k=3", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    targets, _, _ = load_targets(tmp_path / "run" / "targets.h5")
    assert targets.shape == (24, 6)


# --- bad input: one clear line, exit code 2, nothing written ------------------------------------


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddkd teach: error:") and len(err.splitlines()) == 1, err
    assert match in err, err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--dataset", "imagenet"], "--dataset 'imagenet' is unknown; valid: fashion-mnist"),
        (["--ssl", "dino"], "--ssl 'dino' is unknown; valid: barlowtwins"),
        (["--subset", "0"], "--subset must be >= 1"),
        (["--subset", "1000"], "--subset 1000 is larger than the dataset (24 training images)"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent"], "not present under"),
        (["--set", "experts.lr=1e9"], "KD loss became"),
        (["--set", "experts.bogus=1"], "unknown setting 'experts.bogus'"),
        (["--teacher-checkpoint", "x.pt"], "cannot be combined with --train-teacher"),
        (["--set", "student.depth=4"], "student.depth 4 halves 8x8 images to nothing"),
        (["--set", "experts.momentum=-1"], "experts.momentum must be in [0, 1)"),
        (["--experts-per-batch", "-1"], "--experts-per-batch must be >= 0"),
        (["--experts-per-batch", "2", "--set", "experts.precision=bf16"],
         "trains one student at a time (vmap does not apply autocast)"),
        (["--set", "experts.lr=1e9", "--experts-per-batch", "2"], "KD loss became"),
    ],
)
def test_bad_input(tiny_folder, tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    argv = ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(out), *TINY, *extra]
    _fails(capsys, argv, match)
    if "KD loss" not in match:
        assert not out.exists()  # rejected before anything was written


def test_bad_teacher_checkpoints(tiny_folder, tmp_path, capsys):
    base = ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--no-progress"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    _fails(capsys, [*base, "--teacher-checkpoint", str(garbage), "--out", str(tmp_path / "a")],
           "is not a PyTorch checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save(ResNet(ResNetConfig(in_channels=1, base_width=8)).state_dict(), wrong)
    _fails(capsys, [*base, "--teacher-checkpoint", str(wrong), "--set", "teacher.base_width=4",
                    "--out", str(tmp_path / "b")], "does not fit the teacher")
    rgb = tmp_path / "rgb.pt"
    torch.save(ResNet(ResNetConfig(in_channels=3, base_width=4)).state_dict(), rgb)
    _fails(capsys, [*base, "--teacher-checkpoint", str(rgb), "--set", "teacher.base_width=4",
                    "--out", str(tmp_path / "c")], "does not fit the teacher")
    _fails(capsys, [*base, "--teacher-checkpoint", str(tmp_path / "missing.pt"),
                    "--out", str(tmp_path / "d")], "does not exist")
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out",
                    str(tmp_path / "e")], "ships no teacher for dataset")


def test_existing_run_and_changed_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert teach(tiny_folder, out) == 0
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(out),
                    *TINY], "already exists; pass --resume")
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(out),
                    *TINY, "--resume", "--seed", "4"], "seed: run has 3, now 4")
    assert teach(tiny_folder, out, "--overwrite") == 0
    # A resume whose inputs changed (other images under the same name) is refused.
    interrupted = tmp_path / "interrupted"
    assert teach(tiny_folder, interrupted) == 0
    (interrupted / "summary.json").unlink()
    write_imagefolder(tiny_folder, seed=5)
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out",
                    str(interrupted), *TINY, "--resume"], "the inputs differ from those of the run")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out",
                    str(stranger), *TINY, "--overwrite"], "refusing to delete")
    assert (stranger / "precious.txt").exists()


def test_run_of_an_older_version_resumes_when_new_settings_keep_their_defaults(
        tiny_folder, tmp_path, capsys):
    """A setting added after a run started is absent from its config.json: at its default the
    run resumes (and its record is completed); at another value the difference is named."""
    out = tmp_path / "run"
    assert teach(tiny_folder, out) == 0
    (out / "summary.json").unlink()
    record = json.loads((out / "config.json").read_text())
    del record["config"]["experts"]["anchors"]
    (out / "config.json").write_text(json.dumps(record))
    _fails(capsys, ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(out),
                    *TINY, "--resume", "--set", "experts.anchors=7"],
           "experts.anchors: run has None, now 7")
    assert teach(tiny_folder, out, "--resume") == 0
    assert json.loads((out / "config.json").read_text())["config"]["experts"]["anchors"] == 100


def test_allocator_tuning_changes_no_result(tiny_folder, tmp_path):
    import os

    runs = {}
    for setting in ("default", "ddkd"):
        out = tmp_path / setting
        env = {**os.environ, "DDKD_MALLOC": setting}
        subprocess.run([sys.executable, "-m", "ddkd.cli", "teach", "--dataset",
                        f"imagefolder:{tiny_folder}", "--out", str(out), *TINY], env=env,
                       check=True, capture_output=True)
        record = json.loads((out / "environment.json").read_text())
        assert record["malloc_tuned"] is (setting == "ddkd")
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        runs[setting] = _experts(out / "experts.h5")
    for a, b in zip(runs["default"], runs["ddkd"], strict=True):
        assert torch.equal(a, b)


def test_console_script_help_is_fast_and_lists_the_contract():
    # Fast because the command line imports no stage, nor torch, before a command runs: a
    # measure that does not depend on the machine's load, unlike a time limit.
    probe = ("import sys, ddkd.cli\n"
             "ddkd.cli.build_parser().format_help()\n"
             "heavy = sorted(m for m in ('torch', 'numpy', 'h5py', 'lightly', 'kornia') "
             "if m in sys.modules)\n"
             "print(','.join(heavy))\n")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert heavy == "", f"--help imports {heavy}"
    out = subprocess.run([sys.executable, "-m", "ddkd.cli", "teach", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--recipe", "--set", "--dataset", "--data-root", "--subset", "--ssl",
                 "--train-teacher", "--teacher-epochs", "--teacher-checkpoint", "--experts",
                 "--expert-epochs", "--seed", "--device", "--out", "--resume"):
        assert flag in out
