"""Faults and bad input (issue 20): each ends in one line on stderr and exit code 2, with the
words that name the file, member or option; a full disk loses nothing; the step size's trust
region keeps one large meta-gradient from ending a run. See docs/faults.md."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_TEACH, write_imagefolder
from ddkd.cli import main
from ddkd.errors import FileFormatError
from ddkd.io.synthset import SynthSet, load_synthset, save_synthset
from ddkd.synth.matching import MetaGradient

SYN = ["--ipc", "2", "--iterations", "4", "--syn-steps", "2", "--matched-epochs", "1",
       "--max-start-epoch", "1", "--batch-syn", "3", "--lr-img", "10", "--no-progress"]
SHIPPED_SET = Path(__file__).resolve().parent.parent / "synth_sets" / \
    "fashion-mnist_ipc10_default.h5"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny teach run (seconds) and its image folder, shared by the module (read-only)."""
    root = tmp_path_factory.mktemp("faults")
    folder = write_imagefolder(root / "data")
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run),
                 *TINY_TEACH]) == 0
    return {"folder": folder, "run": run}


@dataclass
class Ctx:
    made: dict[str, Path]
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def dataset(self) -> str:
        return f"imagefolder:{self.made['folder']}"

    def copy_run(self) -> Path:
        copy = self.tmp / "run-copy"
        shutil.copytree(self.made["run"], copy)
        return copy

    def synth(self, run: Path, out: Path | None = None, *extra: str) -> list[str]:
        return ["synthesize", "--run", str(run), "--out", str(out or self.tmp / "s.h5"), *SYN,
                *extra]

    def no_work(self, module, name: str) -> None:
        """Make ``module.name`` (the first piece of real work) fail the test if reached."""
        def reached(*args, **kwargs):
            raise AssertionError(f"{name} ran: the fault was not caught before any work")

        self.monkeypatch.setattr(module, name, reached)

    def locked(self, name: str) -> Path:
        """A folder nothing can be created in (chmod; as root, mkstemp refuses it too)."""
        folder = self.tmp / name
        folder.mkdir()
        folder.chmod(0o555)
        if os.geteuid() == 0:  # root writes through permissions: refuse like a read-only mount
            original = tempfile.mkstemp

            def mkstemp(*args, **kwargs):
                if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
                return original(*args, **kwargs)

            self.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return folder


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(n: int = 4, d: int = 32) -> SynthSet:
    gen = torch.Generator().manual_seed(0)
    return SynthSet(
        images=torch.randn(n, 1, 8, 8, generator=gen), targets=torch.randn(n, d, generator=gen),
        lr=0.05, mean=torch.tensor([0.3], dtype=torch.float64),
        std=torch.tensor([0.2], dtype=torch.float64), objective="mse",
        provenance={"source_dataset": "x"}, config={"ipc": 2}, init_indices=torch.arange(n),
        history={"loss": np.ones(3, np.float32), "lr": np.ones(3, np.float32)},
    )


def _mutated_set(ctx: Ctx, edit: Callable[[h5py.File], None]) -> Path:
    path = ctx.tmp / "set.h5"
    save_synthset(path, _set())
    with h5py.File(path, "a") as fh:
        edit(fh)
    return path


def _inspect(path: Path, ctx: Ctx) -> list[str]:
    return ["inspect", str(path), "--png", str(ctx.tmp / "grid.png")]


def _replace(name: str, value) -> Callable[[h5py.File], None]:
    def edit(fh: h5py.File) -> None:
        del fh[name]
        fh[name] = value

    return edit


# --- the cases: each sets up a fault and returns (argv, words the message must hold) --------


def config_stage_only(ctx: Ctx):
    run = ctx.copy_run()
    (run / "config.json").write_text('{"stage": "teach"}')
    return ctx.synth(run), ["config.json", "lacks the teach configuration"]


def config_list(ctx: Ctx):
    run = ctx.copy_run()
    (run / "config.json").write_text("[1, 2]")
    return ctx.synth(run), ["config.json", "JSON list"]


def config_not_json(ctx: Ctx):
    run = ctx.copy_run()
    (run / "config.json").write_text('{"stage": ')
    return ctx.synth(run), ["config.json", "damaged"]


def config_dataset_number(ctx: Ctx):
    run = ctx.copy_run()
    _edit_json(run / "config.json", lambda r: {**r, "config": {
        **r["config"], "data": {**r["config"]["data"], "dataset": 123}}})
    return ctx.synth(run), ["config.json", "data.dataset '123' is unknown"]


def config_num_experts_word(ctx: Ctx):
    run = ctx.copy_run()
    _edit_json(run / "config.json", lambda r: {**r, "config": {
        **r["config"], "experts": {**r["config"]["experts"], "num_experts": "two"}}})
    return ctx.synth(run), ["config.json", "experts.num_experts = 'two' is not a valid int"]


def environment_empty(ctx: Ctx):
    run = ctx.copy_run()
    (run / "environment.json").write_text("{}")
    return ctx.synth(run), ["environment.json", "inputs.train_checksum"]


def teach_resume_config_list(ctx: Ctx):
    run = ctx.copy_run()
    (run / "summary.json").unlink()
    (run / "config.json").write_text("[1, 2]")
    return (["teach", "--dataset", ctx.dataset, "--out", str(run), *TINY_TEACH, "--resume"],
            ["--resume", "config.json", "JSON list"])


def run_is_a_file(ctx: Ctx):
    file = ctx.tmp / "run.txt"
    file.write_text("x")
    return ctx.synth(file), ["--run", "run.txt is a file"]


def teach_out_under_a_file(ctx: Ctx):
    from ddkd.teach import runner

    ctx.no_work(runner, "load_dataset")
    (ctx.tmp / "file").write_text("x")
    return (["teach", "--dataset", ctx.dataset, "--out", str(ctx.tmp / "file" / "run"),
             *TINY_TEACH], ["--out", "file is a file, not a directory"])


def teach_out_unwritable(ctx: Ctx):
    from ddkd.teach import runner

    ctx.no_work(runner, "load_dataset")
    return (["teach", "--dataset", ctx.dataset, "--out", str(ctx.locked("ro") / "run"),
             *TINY_TEACH], ["--out", "cannot be written", "ro"])


def synth_out_under_a_file(ctx: Ctx):
    from ddkd.synth import runner

    ctx.no_work(runner, "open_run")
    (ctx.tmp / "file").write_text("x")
    return (ctx.synth(ctx.made["run"], ctx.tmp / "file" / "s.h5"),
            ["--out", "file is a file, not a directory"])


def synth_out_unwritable(ctx: Ctx):
    from ddkd.synth import runner

    ctx.no_work(runner, "open_run")
    return (ctx.synth(ctx.made["run"], ctx.locked("ro") / "s.h5"),
            ["--out", "cannot be written", "ro"])


def synth_out_is_a_directory(ctx: Ctx):
    from ddkd.synth import runner

    ctx.no_work(runner, "open_run")
    (ctx.tmp / "dir.h5").mkdir()
    return ctx.synth(ctx.made["run"], ctx.tmp / "dir.h5"), ["--out", "dir.h5 is a directory"]


def inspect_png_under_a_file(ctx: Ctx):
    import ddkd.io.synthset

    path = ctx.tmp / "set.h5"
    save_synthset(path, _set())
    ctx.no_work(ddkd.io.synthset, "load_synthset")
    (ctx.tmp / "file").write_text("x")
    return (["inspect", str(path), "--png", str(ctx.tmp / "file" / "g.png")],
            ["--png", "file is a file, not a directory"])


def inspect_png_unwritable(ctx: Ctx):
    import ddkd.io.synthset

    path = ctx.tmp / "set.h5"
    save_synthset(path, _set())
    ctx.no_work(ddkd.io.synthset, "load_synthset")
    return (["inspect", str(path), "--png", str(ctx.locked("ro") / "g.png")],
            ["--png", "cannot be written"])


def _inject_full_disk(ctx: Ctx, name: str) -> None:
    """The writer fails half-way through the temp file of ``name``, as on a full disk."""
    import ddkd.io.atomic as atomic

    original = atomic._write_all

    def write_all(fh, data):
        if Path(fh.name).name.startswith(f".{name}."):
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fh, data)

    ctx.monkeypatch.setattr(atomic, "_write_all", write_all)


def synth_disk_full_in_final_write(ctx: Ctx):
    _inject_full_disk(ctx, "s.h5")
    return ctx.synth(ctx.made["run"]), ["the disk is full", "s.h5", "--resume"]


def teach_disk_full_in_an_expert(ctx: Ctx):
    import ddkd.io.experts as experts

    original = h5py.File

    def file(name, mode="r", *args, **kwargs):  # HDF5 straight to disk: the OS error h5py gives
        if mode == "w" and ".expert_0001.h5." in str(name):
            raise OSError(errno.ENOSPC, "Unable to create file (No space left on device)")
        return original(name, mode, *args, **kwargs)

    ctx.monkeypatch.setattr(experts.h5py, "File", file)
    return (["teach", "--dataset", ctx.dataset, "--out", str(ctx.tmp / "run"), *TINY_TEACH],
            ["the disk is full", "expert_0001.h5", "--resume"])


def checkpoint_random_bytes(ctx: Ctx):
    path = ctx.tmp / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    return (["teach", "--dataset", ctx.dataset, "--teacher-checkpoint", str(path), "--out",
             str(ctx.tmp / "run")], ["random.pt is not a PyTorch checkpoint", "state dict",
                                     "!weights_only"])


def checkpoint_pickled_module(ctx: Ctx):
    path = ctx.tmp / "module.pt"
    torch.save(torch.nn.Linear(2, 3), path)
    return (["teach", "--dataset", ctx.dataset, "--teacher-checkpoint", str(path), "--out",
             str(ctx.tmp / "run")], ["module.pt holds pickled Python objects",
                                     "torch.nn.modules.linear.Linear", "state_dict()",
                                     "!\x1b", "!two options"])


def experts_with_nan(ctx: Ctx):
    run = ctx.copy_run()
    with h5py.File(run / "experts.h5", "a") as fh:
        fh["experts/0001"][1, 5] = np.nan
    return ctx.synth(run), ["experts.h5", "expert 1", "at epoch 1", "!--lr-img"]


def resume_with_a_changed_option(ctx: Ctx):
    from ddkd.synth import runner

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr(runner, "meta_gradient", interrupt)
    assert main(ctx.synth(ctx.made["run"])) == 130
    ctx.monkeypatch.undo()
    return (ctx.synth(ctx.made["run"], None, "--resume", "--lr-img", "5", "--batch-syn", "2"),
            ["lr_img: run has 10.0, now 5.0", "batch_syn: run has 3, now 2"])


def set_negative_expert_epochs(ctx: Ctx):
    return (["teach", "--dataset", ctx.dataset, "--out", str(ctx.tmp / "run"),
             "--set", "experts.epochs=-3"], ["experts.epochs must be > 0, got -3",
                                             "!--expert-epochs"])


def flag_negative_expert_epochs(ctx: Ctx):
    return (["teach", "--dataset", ctx.dataset, "--out", str(ctx.tmp / "run"),
             "--expert-epochs", "-3"], ["--expert-epochs must be > 0, got -3"])


def set_zero_syn_steps(ctx: Ctx):
    argv = ["synthesize", "--run", str(ctx.made["run"]), "--out", str(ctx.tmp / "s.h5"),
            "--ipc", "2", "--no-progress", "--set", "syn_steps=0"]
    return argv, ["syn_steps must be >= 1", "!--syn-steps"]


def flag_zero_syn_steps(ctx: Ctx):
    return ctx.synth(ctx.made["run"], None, "--syn-steps", "0"), ["--syn-steps must be >= 1"]


def version_string(ctx: Ctx):
    path = _mutated_set(ctx, lambda fh: fh.attrs.__setitem__("format_version", "1"))
    return _inspect(path, ctx), ["format_version is the string '1'", "the integer 1"]


def version_float(ctx: Ctx):
    path = _mutated_set(ctx, lambda fh: fh.attrs.__setitem__("format_version", 1.0))
    return _inspect(path, ctx), ["format_version is the float 1.0", "the integer 1"]


def version_word(ctx: Ctx):
    path = _mutated_set(ctx, lambda fh: fh.attrs.__setitem__("format_version", "abc"))
    return _inspect(path, ctx), ["format_version is the string 'abc'"]


def version_missing(ctx: Ctx):
    path = _mutated_set(ctx, lambda fh: fh.attrs.__delitem__("format_version"))
    return _inspect(path, ctx), ["lacks the attribute format_version", "!-1"]


def objective_state_of_wrong_length(ctx: Ctx):
    def edit(fh):
        fh["objective/mean"] = np.zeros(7, np.float32)
        fh["objective/std"] = np.ones(7, np.float32)

    path = _mutated_set(ctx, edit)
    return _inspect(path, ctx), ["/objective (mean (7,), std (7,))", "dimension 7",
                                 "/targets has 32"]


def history_of_different_lengths(ctx: Ctx):
    path = _mutated_set(ctx, _replace("history/lr", np.ones(5, np.float32)))
    return _inspect(path, ctx), ["/history/loss 3", "/history/lr 5", "one entry per iteration"]


def channels_last_images(ctx: Ctx):
    path = _mutated_set(ctx, _replace("images", np.zeros((4, 8, 8, 1), np.float32)))
    return _inspect(path, ctx), ["/images (4, 8, 8, 1)", "channels-last", "(n, C, H, W)"]


def provenance_not_json(ctx: Ctx):
    path = _mutated_set(ctx, lambda fh: fh.attrs.__setitem__("provenance", "{not json"))
    return _inspect(path, ctx), ["the attribute provenance is not JSON", "JSON object"]


CASES = [config_stage_only, config_list, config_not_json, config_dataset_number,
         config_num_experts_word, environment_empty, teach_resume_config_list, run_is_a_file,
         teach_out_under_a_file, teach_out_unwritable, synth_out_under_a_file,
         synth_out_unwritable, synth_out_is_a_directory, inspect_png_under_a_file,
         inspect_png_unwritable, synth_disk_full_in_final_write, teach_disk_full_in_an_expert,
         checkpoint_random_bytes, checkpoint_pickled_module, experts_with_nan,
         resume_with_a_changed_option, set_negative_expert_epochs, flag_negative_expert_epochs,
         set_zero_syn_steps, flag_zero_syn_steps, version_string, version_float, version_word,
         version_missing,
         objective_state_of_wrong_length, history_of_different_lengths, channels_last_images,
         provenance_not_json]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_fault_is_one_clear_line(case, made, tmp_path, monkeypatch, capsys):
    argv, words = case(Ctx(made, tmp_path, monkeypatch))
    capsys.readouterr()
    try:
        assert main(argv) == 2
    finally:
        for folder in tmp_path.iterdir():  # let pytest clean up the locked folders
            if folder.is_dir():
                folder.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ddkd {argv[0]}: error: ") and "Traceback" not in err, err
    for word in words:
        if word.startswith("!"):  # not in the message; the temporary paths may hold anything
            assert word[1:] not in err.replace(str(tmp_path.parent), "TMP"), err
        else:
            assert word in err, err
    assert not list(tmp_path.rglob(".*.tmp")), "a failed write left its temp file"


# --- non-finite sets: refused by load_synthset, reported by inspect --------------------------


@pytest.mark.parametrize(("member", "where"), [("images", "/images holds 1 non-finite"),
                                               ("targets", "/targets holds 1 non-finite")])
def test_non_finite_set_is_refused_naming_the_member(tmp_path, member, where):
    path = tmp_path / "nan.h5"
    save_synthset(path, _set())
    with h5py.File(path, "a") as fh:
        fh[member][(2, 0, 4, 4) if member == "images" else (2, 0)] = np.nan
    with pytest.raises(FileFormatError, match=f"nan.h5: {where}.*the first in .* 2;"):
        load_synthset(path)
    s = load_synthset(path, finite=False)  # readable on purpose, for inspection
    assert torch.isnan(getattr(s, member)).sum() == 1


def test_inspect_warns_on_a_non_finite_set(tmp_path, capsys, caplog):
    path = tmp_path / "nan.h5"
    save_synthset(path, _set())
    with h5py.File(path, "a") as fh:
        fh["images"][1, 0, 3, 3] = np.inf
    assert main(["inspect", str(path), "--png", str(tmp_path / "g.png")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("nan.h5" in w and "/images holds 1 non-finite values" in w and "image 1" in w
               for w in warnings), warnings
    assert (tmp_path / "g.png").stat().st_size > 0


def test_the_shipped_set_passes_every_check():
    s = load_synthset(SHIPPED_SET)
    assert len(s) == 100 and s.objective_state["mean"].shape == (128,)


# --- a full disk: nothing lost, --resume gives the uninterrupted set --------------------------


def test_resume_after_a_full_disk_in_the_final_write_equals_the_uninterrupted_run(
        made, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    ctx = Ctx(made, tmp_path, monkeypatch)
    straight = tmp_path / "straight.h5"
    assert main(ctx.synth(made["run"], straight)) == 0
    out = tmp_path / "s.h5"
    _inject_full_disk(ctx, "s.h5")
    assert main(ctx.synth(made["run"], out)) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".s.h5.*.tmp"))
    saved = torch.load(tmp_path / "s.h5.partial" / "checkpoint.pt", weights_only=True)
    assert saved["iteration"] == 4  # the finished state: a resume only writes the set
    monkeypatch.undo()
    caplog.clear()
    assert main(ctx.synth(made["run"], out, "--resume")) == 0
    assert any("at iteration 4" in r.getMessage() for r in caplog.records)
    a, b = load_synthset(straight), load_synthset(out)
    for name in ("images", "targets", "init_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.lr == b.lr
    assert all(np.array_equal(a.history[k], b.history[k]) for k in ("loss", "lr"))
    assert not (tmp_path / "s.h5.partial").exists()


# --- housekeeping: the temp files of killed writes go when a run resumes or is replaced -------


def test_stale_temp_files_are_removed_on_resume_and_overwrite(made, tmp_path, monkeypatch):
    from ddkd.synth import runner

    ctx = Ctx(made, tmp_path, monkeypatch)
    out = tmp_path / "s.h5"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "meta_gradient", interrupt)
    assert main(ctx.synth(made["run"], out)) == 130
    monkeypatch.undo()
    ours = [tmp_path / ".s.h5.k3j_x9q2.tmp",
            tmp_path / "s.h5.partial" / ".checkpoint.pt.abcdefgh.tmp"]
    theirs = [tmp_path / ".other.h5.abcdefgh.tmp", tmp_path / "notes.tmp",
              tmp_path / ".s.h5.backup"]
    for path in ours + theirs:
        path.write_text("partial")
    assert main(ctx.synth(made["run"], out, "--resume")) == 0
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)

    ours[0].write_text("partial")
    assert main(ctx.synth(made["run"], out, "--overwrite")) == 0
    assert not ours[0].exists() and all(p.exists() for p in theirs)

    run = ctx.copy_run()
    (run / "summary.json").unlink()
    stale = [run / ".experts.h5.zz00zz00.tmp", run / ".summary.json.abc_defg.tmp"]
    for path in stale:
        path.write_text("partial")
    assert main(["teach", "--dataset", ctx.dataset, "--out", str(run), *TINY_TEACH,
                 "--resume"]) == 0
    assert not any(p.exists() for p in stale) and (run / "summary.json").is_file()


# --- the step size: a trust region on log(alpha) --------------------------------------------


def _state(bound: float):
    from ddkd.config import SynthConfig
    from ddkd.synth.runner import _State

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 3, generator=gen)
    return _State(x, y, 0.1, SynthConfig(ipc=1, max_log_lr_step=bound))


def test_trust_region_bounds_a_spike_and_is_inert_below_the_bound():
    gx, gy = torch.ones(4, 1, 8, 8), torch.ones(4, 3)
    spiked = _state(0.1)
    assert spiked.step(gx, gy, torch.tensor(1e9))  # unbounded: log(alpha) -= 1e6
    assert spiked.log_step == pytest.approx(-1e6, rel=1e-3)  # what SGD asked for
    assert float(spiked.log_alpha.detach()) == pytest.approx(math.log(0.1) - 0.1, abs=1e-6)
    # the kept velocity is the bounded step: with no gradient, momentum 0.5 moves half of it
    assert not spiked.step(gx, gy, torch.tensor(0.0))
    assert spiked.log_step == pytest.approx(-0.05, rel=1e-4)
    unbounded = _state(math.inf)
    assert not unbounded.step(gx, gy, torch.tensor(1e9))
    assert float(unbounded.alpha) == 0.0  # what ended the run of issue 20

    # below the bound the update is plain SGD's, bit for bit (the default set stays the same)
    a, b = _state(0.1), _state(math.inf)
    for g in (0.3, -2.0, 5.0):
        assert not a.step(gx, gy, torch.tensor(g)) and not b.step(gx, gy, torch.tensor(g))
    assert torch.equal(a.log_alpha, b.log_alpha) and torch.equal(a.x, b.x)
    assert torch.equal(a.opt_alpha.state_dict()["state"][0]["momentum_buffer"],
                       b.opt_alpha.state_dict()["state"][0]["momentum_buffer"])


def test_the_embedded_default_never_reaches_the_bound():
    """The shipped default set's step size moved by |d log alpha| 2.9e-4 (median), 1.5e-3
    (99th percentile), 3.5e-3 (largest) per iteration: 28x below the default bound, so
    the bound never acts on it and the default set stays the same."""
    from ddkd.config import SynthConfig

    s = load_synthset(SHIPPED_SET)
    lr = np.concatenate([[s.config["lr_init"] or 0.1], s.history["lr"].astype(np.float64)])
    steps = np.abs(np.diff(np.log(lr)))
    assert len(steps) == 250 and steps.max() < SynthConfig().max_log_lr_step / 20


def test_mkdt_inner_steps_on_the_tiny_run_complete(made, tmp_path, capsys):
    """Issue 20's run: MKDT's N = 40 on a tiny run; its first meta-gradients ask for changes
    of log(alpha) of 0.3-1.4 per iteration, the bound keeps them at 0.1."""
    out = tmp_path / "n40.h5"
    assert main(["synthesize", "--run", str(made["run"]), "--out", str(out), "--ipc", "2",
                 "--syn-steps", "40", "--lr-img", "1", "--matched-epochs", "1",
                 "--max-start-epoch", "1", "--iterations", "2", "--no-progress"]) == 0
    s = load_synthset(out)
    assert s.lr == pytest.approx(0.1 * math.exp(-0.2), rel=1e-4)  # bounded twice, downwards


def test_the_guard_still_stops_a_step_size_that_leaves_its_band(made, tmp_path, capsys,
                                                                monkeypatch):
    """A sustained drift (a meta-gradient that always asks for a smaller alpha, bounded to
    -0.1 in log each time) crosses the factor-100 band after ceil(log(100) / 0.1) = 47
    iterations, and the guard ends the run there."""
    from ddkd.synth import runner

    def drift(model, spec, segment, x, y, alpha, *args, **kwargs):
        return MetaGradient(torch.tensor(1.0), torch.zeros_like(x), torch.zeros_like(y),
                                   torch.tensor(1e6))

    monkeypatch.setattr(runner, "meta_gradient", drift)
    argv = ["synthesize", "--run", str(made["run"]), "--out", str(tmp_path / "drift.h5"), *SYN,
            "--iterations", "60"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the step size collapsed to" in err and "at iteration 47" in err, err
