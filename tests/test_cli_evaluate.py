"""``ddkd evaluate`` end to end on a tiny run and set."""

import importlib.util
import json

import pytest

from conftest import TINY_TEACH as TEACH
from conftest import write_imagefolder
from ddkd.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = write_imagefolder(root / "data", n_per_class=20)
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run), *TEACH]) == 0
    synth = root / "set.h5"
    assert main(["synthesize", "--run", str(run), "--out", str(synth), "--ipc", "2",
                 "--iterations", "2", "--syn-steps", "2", "--expert-epochs", "1",
                 "--max-start-epoch", "1", "--no-progress"]) == 0
    return folder, run, synth


def test_evaluate_writes_all_outputs(tiny, tmp_path, capsys):
    folder, run, synth = tiny
    out = tmp_path / "eval"
    assert main(["evaluate", str(synth), "--baselines", "none,random,teacher", "--fractions",
                 "0.1,0.5", "--seeds", "2", "--epochs", "2", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| method | arch |" in printed and "no pre-training" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 4 * 2 * 2  # methods x seeds x fractions
    assert {r["arch"] for r in results["rows"] if "teacher" in r["method"]} == {"teacher"}
    assert {r["labels"] for r in results["rows"]} == {4, 20}  # 2 classes x 20 images
    assert all(0 <= r["accuracy"] <= 1 for r in results["rows"])
    assert (out / "results.csv").read_text().startswith("method,")
    assert "teacher (ceiling)" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--baselines", "magic"], "unknown ['magic']; valid: none, random, full, teacher"),
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
