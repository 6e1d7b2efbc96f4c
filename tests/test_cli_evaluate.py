"""``ddkd evaluate`` end to end on a tiny run and set."""

import importlib.util
import json

import pytest
import torch

from conftest import TINY_TEACH as TEACH
from conftest import make_tiny_run_and_set
from ddkd.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run_and_set(tmp_path_factory.mktemp("eval"))


def test_evaluate_writes_all_outputs(tiny, tmp_path, capsys):
    folder, run, synth = tiny
    out = tmp_path / "eval"
    assert main(["evaluate", str(synth), "--baselines",
                 "none,random,high-loss,ssl-random,full,teacher", "--fractions", "0.1,0.5",
                 "--seeds", "2", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| method | arch |" in printed and "no pre-training" in printed
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]}
    assert len(methods) == 7
    assert any(m.startswith("random subset + SSL (") for m in methods)
    assert len(results["rows"]) == 7 * 2 * 2  # methods x seeds x fractions
    assert {r["arch"] for r in results["rows"] if "teacher" in r["method"]} == {"teacher"}
    assert {r["labels"] for r in results["rows"]} == {4, 20}  # 2 classes x 20 images
    assert all(0 <= r["accuracy"] <= 1 for r in results["rows"])
    assert (out / "results.csv").read_text().startswith("method,")
    report = (out / "results.md").read_text()
    assert "teacher (ceiling)" in report
    assert "| minus random subset + KD (n=4), paired by seed |" in report
    assert "| minus no pre-training, paired by seed |" in report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_high_loss_baseline_is_the_sets_high_loss_start(tiny):
    # Reused from a set initialised high-loss from the same experts, or recomputed: one subset.
    from ddkd.eval.baseline_data import from_run
    from ddkd.eval.runner import _baselines
    from ddkd.io.run import open_run
    from ddkd.io.synthset import load_synthset

    _, run, synth = tiny
    loaded = load_synthset(synth)
    assert loaded.provenance["init"] == "high-loss"
    shape = tuple(loaded.images.shape[1:])
    cpu = torch.device("cpu")
    source = from_run(run)
    (reused,) = _baselines(["high-loss"], source, len(loaded), shape, [loaded], cpu)
    (computed,) = _baselines(["high-loss"], source, len(loaded), shape, [], cpu)
    assert torch.equal(reused.images, computed.images)
    opened = open_run(run)
    position = {int(i): p for p, i in enumerate(opened.indices.tolist())}
    first = [position[int(i)] for i in loaded.init_indices]
    # in the objective's target space (the default recipe standardises the teacher features)
    assert reused.objective.standardize
    assert torch.equal(reused.objective.targets(opened.targets[first]), reused.targets)


def test_sgd_and_knn_probes_run_end_to_end(tiny, tmp_path):
    _, _, synth = tiny
    for probe in ("sgd", "knn"):
        out = tmp_path / probe
        assert main(["evaluate", str(synth), "--baselines", "", "--fractions", "0.5",
                     "--seeds", "1", "--epochs", "1", "--probe", probe, "--out", str(out),
                     "--no-progress"]) == 0
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert [r["probe"] for r in rows] == [probe]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--baselines", "magic"],
         "unknown ['magic']; valid: none, random, random-views, high-loss, ssl-random, full, "
         "teacher"),
        (["--fractions", "0.01"], "leaves 0.20 labels for class 0"),
        (["--probe", "svm"], "--probe 'svm' is unknown"),
        (["--downstream", "cifar10-samples"], "ddkd does not resize or convert channels"),
        (["--arch", "vit"], "--arch 'vit' is unknown"),
    ],
)
def test_bad_input(tiny, tmp_path, capsys, extra, match):
    _, _, synth = tiny
    if "cifar10-samples" in extra and importlib.util.find_spec("foolbox") is None:
        pytest.skip("the CIFAR samples are not installed (pip install --no-deps foolbox==3.3.4)")
    argv = ["evaluate", str(synth), "--epochs", "1", "--seeds", "1", "--out",
            str(tmp_path / "e"), "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddkd evaluate: error:") and match in err, err


def test_a_shared_set_without_its_run_is_compared_with_no_pre_training(tiny, tmp_path, capsys,
                                                                         caplog):
    folder, _, _ = tiny
    run, synth = tmp_path / "run", tmp_path / "set.h5"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run), *TEACH]) == 0
    assert main(["synthesize", "--run", str(run), "--out", str(synth), "--ipc", "1",
                 "--iterations", "1", "--syn-steps", "1", "--matched-epochs", "1",
                 "--max-start-epoch", "1", "--no-progress"]) == 0
    run.rename(tmp_path / "elsewhere")  # as on another machine: the set's run is not there
    capsys.readouterr()
    common = [str(synth), "--fractions", "0.5", "--seeds", "1", "--epochs", "1",
              "--no-progress", "--out", str(tmp_path / "e")]
    assert main(["evaluate", *common]) == 0
    assert "comparing with no pre-training only; pass --run" in caplog.text
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["rows"]
    assert sorted({r["method"] for r in rows}) == ["no pre-training", "set"]
    assert main(["evaluate", *common, "--baselines", "none,random"]) == 2
    assert "the baselines random need the teach run" in capsys.readouterr().err


def test_rows_do_not_depend_on_the_global_rng(tiny, tmp_path):
    # Every random choice (encoder init, SSL head, subsets, order) comes from the seed.
    _, _, synth = tiny
    accuracies = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        out = tmp_path / str(global_seed)
        assert main(["evaluate", str(synth), "--baselines", "random,ssl-random",
                     "--fractions", "0.5", "--seeds", "1", "--epochs", "2", "--probe", "knn",
                     "--out", str(out), "--no-progress"]) == 0
        rows = json.loads((out / "results.json").read_text())["rows"]
        accuracies.append([(r["method"], r["accuracy"], r["pretrain_final_loss"]) for r in rows])
    assert accuracies[0] == accuracies[1]
