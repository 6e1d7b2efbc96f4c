"""Slow end-to-end checks on real data (minutes): ``bash scripts/test.sh -m slow``."""

import pytest

from conftest import requires_fmnist
from ddkd.cli import main
from ddkd.io.experts import ExpertsFile
from ddkd.io.synthset import load_synthset

pytestmark = [pytest.mark.slow, requires_fmnist]


def test_issue_smoke_command_then_synthesize(tmp_path):
    """The smoke command of the README (own 1-epoch teacher), then a short synthesis."""
    run = tmp_path / "run"
    assert main(["teach", "--subset", "512", "--teacher-epochs", "1", "--experts", "2",
                 "--expert-epochs", "2", "--out", str(run), "--no-progress"]) == 0
    with ExpertsFile(run / "experts.h5") as experts:
        assert len(experts) == 2 and experts.header.student["image_size"] == 28
    out = tmp_path / "set.h5"
    assert main(["synthesize", "--run", str(run), "--ipc", "1", "--iterations", "3",
                 "--syn-steps", "2", "--matched-epochs", "1", "--max-start-epoch", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert load_synthset(out).images.shape == (10, 1, 28, 28)
