"""The pre-training budget curve (``ddkd.eval.budget``, ``evaluate --pretrain-steps``) and
evaluate's output folder: checked before work, finished encoders kept for a rerun."""

import json
import math
import time

import pytest

from conftest import make_tiny_run_and_set, requires_fmnist
from ddkd.cli import main
from ddkd.eval.budget import Worth, set_worths, worth_steps

# --- the worth interpolation on hand-made curves ------------------------------------------

CURVE = [(10, 0.80), (20, 0.84), (40, 0.86), (80, 0.90)]


def test_worth_between_two_budgets_is_log_interpolated():
    # 0.85 lies halfway (in accuracy) between 20 and 40 steps: sqrt(20 * 40) in log steps.
    w = worth_steps(CURVE, 0.85)
    assert w.relation == "within"
    assert w.steps == pytest.approx(math.sqrt(20 * 40))
    assert worth_steps(CURVE, 0.84) == Worth(20.0, "within")  # exactly on a budget


def test_worth_beats_every_budget_and_below_the_smallest():
    assert worth_steps(CURVE, 0.95) == Worth(80.0, "above")
    assert "beats every budget" in str(worth_steps(CURVE, 0.95))
    assert worth_steps(CURVE, 0.70) == Worth(10.0, "below")
    assert "below the smallest" in str(worth_steps(CURVE, 0.70))


def test_worth_reads_a_non_monotone_curve_at_its_first_crossing():
    curve = [(10, 0.80), (20, 0.90), (40, 0.85), (80, 0.95)]
    assert worth_steps(curve, 0.88).steps == pytest.approx(10 * 2 ** 0.8)


def _rows(set_accs, full_curve_by_seed, own=20):
    rows = []
    for seed, acc in enumerate(set_accs):
        rows.append({"method": "set", "baseline": None, "arch": "convnet", "seed": seed,
                     "downstream": "toy", "fraction": 0.1, "steps": own, "standard": True,
                     "budget": True, "accuracy": acc, "train_seconds": 1.0})
        for steps, a in full_curve_by_seed[seed]:
            rows.append({"method": "full", "baseline": "full", "arch": "convnet",
                         "seed": seed, "downstream": "toy", "fraction": 0.1, "steps": steps,
                         "standard": steps == 80, "budget": True, "accuracy": a,
                         "train_seconds": steps / 10})
    return rows


def test_set_worths_pairs_each_seed_with_its_own_curve():
    rows = _rows([0.85, 0.86], [CURVE, CURVE])
    (w,) = set_worths(rows, [0.1], ["toy"])
    assert w["own_steps"] == 20
    assert w["accuracy"] == pytest.approx(0.855)
    assert w["worth"].relation == "within"
    assert w["worth"].steps / w["own_steps"] > 1  # worth more than its own 20 steps
    assert [p.steps for p in w["per_seed"]] == pytest.approx([math.sqrt(800), 40.0])


# --- end to end through the CLI ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, run, synth = make_tiny_run_and_set(tmp_path_factory.mktemp("budget"))
    return run, synth


EVAL = ["--fractions", "0.5", "--seeds", "2", "--epochs", "2", "--no-progress"]


def test_budget_curve_writes_its_picture_and_numbers(tiny, tmp_path, capsys):
    run, synth = tiny
    out = tmp_path / "eval"
    assert main(["evaluate", str(synth), "--baselines", "none,random", "--pretrain-steps",
                 "1,3,6", "--out", str(out), *EVAL]) == 0
    printed = capsys.readouterr().out
    assert "Pre-training budget" in printed and "full-data KD steps to match" in printed
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())["rows"]
    full = [r for r in rows if r["baseline"] == "full"]
    assert full, "the budget curve adds the full-data KD baseline"
    # 40 images, batch 256: one step an epoch, so the standard recipe is 2 steps for every
    # method, and each method is probed at 1, 2, 3 and 6 steps.
    for method in ("set", "random", "full"):
        mine = [r for r in rows if (r["baseline"] or "set") == method]
        assert sorted({r["steps"] for r in mine}) == [1, 2, 3, 6], method
        assert {r["steps"] for r in mine if r["standard"]} == {2}
        assert all(r["train_seconds"] >= 0 for r in mine)
    # seconds grow with steps along one run
    seed0 = sorted((r["steps"], r["train_seconds"]) for r in full if r["seed"] == 0)
    assert [s for _, s in seed0] == sorted(s for _, s in seed0)
    report = (out / "results.md").read_text()
    assert "| set | convnet | imagefolder" in report or "| set |" in report
    assert "pre-training seconds" in report


def test_budget_curve_passes_through_the_standard_recipe(tiny, tmp_path):
    """The standard row of a budgeted run is the run without budgets: same steps, same
    data order, so the same encoder and accuracy, exactly."""
    run, synth = tiny
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    assert main(["evaluate", str(synth), "--baselines", "random", "--out", str(plain),
                 *EVAL]) == 0
    assert main(["evaluate", str(synth), "--baselines", "random", "--pretrain-steps", "1,5",
                 "--out", str(curved), *EVAL]) == 0

    def standard(folder):
        rows = json.loads((folder / "results.json").read_text())["rows"]
        return {(r["method"], r["seed"]): (r["accuracy"], r["pretrain_final_loss"])
                for r in rows if r["standard"] and r["baseline"] != "full"}

    assert standard(plain) == standard(curved)


def test_full_epochs_shortens_only_the_full_data_baseline(tiny, tmp_path):
    run, synth = tiny
    out = tmp_path / "eval"
    assert main(["evaluate", str(synth), "--baselines", "random", "--pretrain-steps", "1,3",
                 "--full-epochs", "4", "--out", str(out), *EVAL]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    # 40 images, one step an epoch: full KD's standard row is at 4 steps, the others' at 2.
    full = [r for r in rows if r["baseline"] == "full"]
    assert {r["steps"] for r in full if r["standard"]} == {4}
    assert all("4 epochs" in r["method"] for r in full)
    assert {r["steps"] for r in rows if r["standard"] and r["baseline"] != "full"} == {2}
    assert sorted({r["steps"] for r in full}) == [1, 3, 4]


@pytest.mark.parametrize("args", [["--full-epochs", "0"], ["--baselines", "random",
                                                           "--full-epochs", "2"]])
def test_bad_full_epochs_are_refused_before_work(tiny, tmp_path, capsys, args):
    _, synth = tiny
    assert main(["evaluate", str(synth), *args, "--out", str(tmp_path / "e"), *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert "--full-epochs" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("steps", ["0", "-3", "1.5", "abc", ","])
def test_bad_budgets_are_refused_before_work(tiny, tmp_path, capsys, steps):
    _, synth = tiny
    start = time.perf_counter()
    assert main(["evaluate", str(synth), f"--pretrain-steps={steps}", "--out",
                 str(tmp_path / "e"), *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert "--pretrain-steps" in err and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 5


def test_budget_curve_without_a_run_is_refused(tiny, tmp_path, capsys):
    _, synth = tiny
    import shutil

    lone = tmp_path / "lone.h5"  # its run is not given and not where its provenance says
    shutil.copy(synth, lone)
    from ddkd.io.synthset import load_synthset

    prov_run = load_synthset(lone).provenance["run"]
    moved = tmp_path / "moved-run"
    shutil.move(prov_run, moved)
    try:
        assert main(["evaluate", str(lone), "--pretrain-steps", "1,2", "--out",
                     str(tmp_path / "e"), *EVAL]) == 2
    finally:
        shutil.move(moved, prov_run)
    err = capsys.readouterr().err.strip()
    assert "full-data KD" in err and "--run" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unwritable_out_fails_within_seconds(tiny, tmp_path, capsys, kind):
    _, synth = tiny
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "eval"
    start = time.perf_counter()
    assert main(["evaluate", str(synth), "--out", str(out), *EVAL]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert "--out" in err and str(out) in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_a_rerun_redoes_no_finished_encoder(tiny, tmp_path, monkeypatch):
    _, synth = tiny
    out = tmp_path / "eval"
    args = ["evaluate", str(synth), "--baselines", "none,random", "--out", str(out), *EVAL]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())["rows"]

    import ddkd.eval.runner as runner

    def no_work(*_, **__):
        raise AssertionError("a finished encoder was trained again")

    monkeypatch.setattr(runner, "_job_rows", no_work)
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == first
    # Another recipe (here fewer pre-training epochs) changes what every job gives: it trains.
    with pytest.raises(AssertionError, match="trained again"):
        main([*args[:-len(EVAL)], "--fractions", "0.5", "--seeds", "2", "--epochs", "1",
              "--no-progress"])


def test_a_killed_evaluation_resumes_with_the_rows_it_finished(tiny, tmp_path, monkeypatch):
    _, synth = tiny
    out = tmp_path / "eval"
    args = ["evaluate", str(synth), "--baselines", "none,random", "--out", str(out), *EVAL]
    assert main(args) == 0
    uninterrupted = json.loads((out / "results.json").read_text())["rows"]
    journal = (out / "jobs.jsonl").read_text().splitlines()
    # As if killed in the middle of the fourth job's line: the header, three jobs, a stub.
    (out / "jobs.jsonl").write_text("\n".join(journal[:4]) + "\n" + journal[4][:20])
    (out / "results.json").unlink()
    import ddkd.eval.runner as runner

    calls = []
    real = runner._job_rows
    monkeypatch.setattr(runner, "_job_rows", lambda *a: calls.append(a[1].name) or real(*a))
    assert main(args) == 0
    assert len(calls) == len(journal) - 1 - 3  # only the unfinished jobs

    def untimed(rows):  # a redone job's seconds are measured anew
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    resumed = json.loads((out / "results.json").read_text())["rows"]
    assert untimed(resumed) == untimed(uninterrupted)


# --- a set made from the shipped teacher needs no run for its baselines --------------------

@requires_fmnist
def test_shipped_teacher_sets_evaluate_their_baselines_without_the_run(tmp_path, caplog):
    """The baselines rebuilt from the shipped teacher (the run's subset drawn again, the
    teacher's targets computed as teach does) are those of the run itself: same rows."""
    import shutil

    run, synth = tmp_path / "run", tmp_path / "set.h5"
    assert main(["teach", "--subset", "300", "--experts", "1", "--expert-epochs", "1",
                 "--set", "student.width=8", "--set", "experts.compile=off", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["synthesize", "--run", str(run), "--ipc", "2", "--iterations", "1",
                 "--syn-steps", "1", "--matched-epochs", "1", "--max-start-epoch", "1",
                 "--batch-syn", "20", "--out", str(synth), "--no-progress"]) == 0
    args = ["--baselines", "random,high-loss,full", "--fractions", "0.01",
            "--seeds", "1", "--epochs", "1", "--no-progress"]
    with_run = tmp_path / "with-run"
    assert main(["evaluate", str(synth), "--run", str(run), "--out", str(with_run), *args]) == 0
    shutil.rmtree(run)  # as after `pip install`: the set, but not the run that made it
    without = tmp_path / "without-run"
    with caplog.at_level("INFO"):
        assert main(["evaluate", str(synth), "--out", str(without), *args]) == 0
    assert "computing the shipped teacher's targets" in caplog.text

    def accuracies(folder):
        rows = json.loads((folder / "results.json").read_text())["rows"]
        return {(r["method"], r["seed"], r["fraction"]): r["accuracy"] for r in rows}

    assert accuracies(without) == accuracies(with_run)
    assert len(accuracies(without)) == 4  # the set and three baselines


def test_a_set_that_names_no_dataset_asks_for_downstream(tmp_path, capsys):
    import torch

    from ddkd.io.synthset import SynthSet, save_synthset

    path = tmp_path / "anon.h5"  # e.g. imported from another method's files without --dataset
    save_synthset(path, SynthSet(
        images=torch.zeros(4, 1, 8, 8), targets=torch.zeros(4, 3), lr=0.1,
        mean=torch.tensor([0.5], dtype=torch.float64),
        std=torch.tensor([0.5], dtype=torch.float64), objective="mse", provenance={},
        config={}, init_indices=torch.arange(4)))
    assert main(["evaluate", str(path), "--baselines", "", "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--downstream" in err and str(path) in err and len(err.splitlines()) == 1


def test_a_set_with_nan_images_is_refused_naming_the_member(tmp_path, capsys):
    import torch

    from ddkd.io.synthset import SynthSet, save_synthset

    path = tmp_path / "nan.h5"
    save_synthset(path, SynthSet(
        images=torch.zeros(4, 1, 8, 8), targets=torch.zeros(4, 3), lr=0.1,
        mean=torch.tensor([0.5], dtype=torch.float64),
        std=torch.tensor([0.5], dtype=torch.float64), objective="mse",
        provenance={"source_dataset": "fashion-mnist"}, config={},
        init_indices=torch.arange(4)))
    import h5py

    with h5py.File(path, "r+") as fh:  # damaged after it was written (ddkd refuses to write it)
        fh["images"][1, 0, 2, 2] = float("nan")
    assert main(["evaluate", str(path), "--baselines", "", "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "images" in err and len(err.splitlines()) == 1
    assert "non-finite" in err and "pre-training diverged" not in err


def test_more_seeds_reuse_the_seeds_already_done(tiny, tmp_path, monkeypatch):
    _, synth = tiny
    out = tmp_path / "eval"
    base = ["evaluate", str(synth), "--baselines", "none,random", "--out", str(out),
            "--fractions", "0.5", "--epochs", "2", "--no-progress"]
    assert main([*base, "--seeds", "1"]) == 0
    import ddkd.eval.runner as runner

    calls = []
    real = runner._job_rows
    monkeypatch.setattr(runner, "_job_rows",
                        lambda *a: calls.append((a[1].name, a[3])) or real(*a))
    assert main([*base, "--seeds", "2"]) == 0
    assert sorted(calls) == sorted([("set", 1), ("no pre-training", 1),
                                    ("random subset + KD (n=4)", 1)])
