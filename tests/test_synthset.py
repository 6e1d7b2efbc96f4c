"""The ddkd-synthset HDF5 format: bit-exact round trip, clear refusals."""

import h5py
import numpy as np
import pytest
import torch

from conftest import requires_fmnist
from ddkd.errors import FileFormatError
from ddkd.io.synthset import SynthSet, load_synthset, save_synthset


def _set(n=5, c=1, size=8, d=3):
    gen = torch.Generator().manual_seed(0)
    return SynthSet(
        images=torch.randn(n, c, size, size, generator=gen),
        targets=torch.randn(n, d, generator=gen),
        lr=0.0123456789,
        mean=torch.tensor([0.25] * c, dtype=torch.float64),
        std=torch.tensor([0.5] * c, dtype=torch.float64),
        objective="mse",
        provenance={"source_dataset": "x", "seed": 3},
        config={"ipc": 1},
        init_indices=torch.arange(n) * 7,
        history={"loss": np.array([0.9, 0.8], dtype=np.float32)},
    )


def test_round_trip_is_bit_exact(tmp_path):
    s = _set()
    save_synthset(tmp_path / "s.h5", s)
    r = load_synthset(tmp_path / "s.h5")
    assert torch.equal(r.images, s.images) and torch.equal(r.targets, s.targets)
    assert r.lr == s.lr and torch.equal(r.mean, s.mean) and torch.equal(r.std, s.std)
    assert torch.equal(r.init_indices, s.init_indices)
    assert r.provenance == s.provenance and r.config == s.config and r.objective == "mse"
    assert np.array_equal(r.history["loss"], s.history["loss"])
    x, y = r.dataset()[2]
    assert torch.equal(x, s.images[2]) and torch.equal(y, s.targets[2])
    assert torch.allclose(r.pixels(), (s.images * 0.5 + 0.25).clamp(0, 1))


def test_readable_with_h5py_alone(tmp_path):
    save_synthset(tmp_path / "s.h5", _set())
    with h5py.File(tmp_path / "s.h5") as fh:
        assert fh.attrs["format"] == "ddkd-synthset" and fh.attrs["format_version"] == 1
        assert fh["images"].shape == (5, 1, 8, 8) and fh["targets"].shape == (5, 3)


def test_foreign_truncated_newer_and_misshaped_files_are_refused(tmp_path):
    save_synthset(tmp_path / "s.h5", _set())
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(FileFormatError, match="not a readable HDF5 file|damaged"):
        load_synthset(tmp_path / "t.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FileFormatError, match="not a readable HDF5 file"):
        load_synthset(tmp_path / "text.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as fh:
        fh["images"] = np.zeros((1, 1, 2, 2))
    with pytest.raises(FileFormatError, match="not a ddkd synthetic set"):
        load_synthset(tmp_path / "foreign.h5")

    def mutate(name, fn):
        path = tmp_path / name
        path.write_bytes(data)
        with h5py.File(path, "a") as fh:
            fn(fh)
        return path

    newer = mutate("newer.h5", lambda fh: fh.attrs.__setitem__("format_version", 3))
    with pytest.raises(FileFormatError, match="version 3; this ddkd reads up to version 2"):
        load_synthset(newer)
    missing = mutate("missing.h5", lambda fh: fh.__delitem__("targets"))
    with pytest.raises(FileFormatError, match="lacks the field 'targets'"):
        load_synthset(missing)

    def misshape(fh):
        del fh["targets"]
        fh["targets"] = np.zeros((4, 3), dtype=np.float32)

    with pytest.raises(FileFormatError, match=r"targets must be \(n=5, D\)"):
        load_synthset(mutate("shape.h5", misshape))
    with pytest.raises(FileFormatError, match="does not exist"):
        load_synthset(tmp_path / "nope.h5")


def test_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    import ddkd.io.synthset as mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    s = _set()
    s.history = {"loss": object()}  # np.asarray(object) -> fails mid-write
    monkeypatch.setattr(mod.np, "asarray", boom)
    with pytest.raises(RuntimeError):
        save_synthset(tmp_path / "s.h5", s)
    assert list(tmp_path.iterdir()) == []


@requires_fmnist
def test_provenance_names_the_shipped_teacher(tmp_path):
    """A set made from the shipped teacher records it truly: its SSL method and epochs from
    the teacher's own metadata, the checksum of the shipped file (not the configuration's
    training defaults, not the run's re-saved copy)."""
    import json as _json

    from ddkd.cli import main
    from ddkd.io.synthset import load_synthset
    from ddkd.runtime import sha256_file
    from ddkd.teach.sources import shipped_teacher_path

    run, out = tmp_path / "run", tmp_path / "set.h5"
    assert main(["teach", "--subset", "64", "--experts", "1", "--expert-epochs", "1",
                 "--set", "student.width=8", "--set", "experts.compile=off", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["synthesize", "--run", str(run), "--ipc", "1", "--iterations", "1",
                 "--syn-steps", "1", "--matched-epochs", "1", "--max-start-epoch", "1",
                 "--batch-syn", "10", "--out", str(out), "--no-progress"]) == 0
    teacher = load_synthset(out).provenance["teacher"]
    asset = shipped_teacher_path("fashion-mnist")
    shipped = _json.loads(asset.with_suffix(".json").read_text())
    assert teacher["source"] == "shipped"
    assert (teacher["ssl"], teacher["epochs"]) == (shipped["ssl"], shipped["epochs"])
    assert teacher["file"] == asset.name
    assert teacher["checksum"] == sha256_file(asset) == shipped["sha256"]
    assert load_synthset(out).provenance["teacher_checksum"] == teacher["checksum"]
