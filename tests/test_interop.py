"""``ddkd import`` / ``ddkd export`` (issue 22): the published codes' layouts, written here by
the tests themselves at tiny shapes, in and out of ddkd's set format."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_TEACH, write_imagefolder
from ddkd.cli import main
from ddkd.data.transforms import ZCA
from ddkd.interop.safetensors import load_file, save_file
from ddkd.io.experts import ExpertsFile
from ddkd.io.synthset import SynthSet, load_synthset, save_synthset
from ddkd.objectives import OBJECTIVES, restore_objective
from ddkd.runtime import sha256_file

N, C, S, D = 6, 3, 8, 16  # images, channels, side, target width
NORM = "0.5,0.4,0.3/0.25,0.2,0.3"


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_mkdt(folder: Path, its=(1, 100), lr: bool = True) -> Path:
    """MKDT's distill.py: images_{it}.pt, labels_{it}.pt (representations), synlr_{it}.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    for it in its:
        torch.save(_rand(N, C, S, S, seed=it), folder / f"images_{it}.pt")
        torch.save(_rand(N, D, seed=it + 1), folder / f"labels_{it}.pt")
        if lr:
            # saved as syn_lr.cpu() of a leaf that requires grad, as distill.py does
            torch.save(torch.tensor(0.05 + it / 1000, requires_grad=True), folder /
                       f"synlr_{it}.pt")
    return folder


def write_mtt(folder: Path, soft: bool = False, lr: float | None = None) -> Path:
    """MTT's distill.py (int64 labels, no lr file) or DATM's (logits, lr_best.pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_rand(N, C, S, S, seed=7), folder / "images_best.pt")
    labels = _rand(N, 10, seed=8) if soft else torch.tensor([0, 0, 1, 1, 2, 2])
    torch.save(labels, folder / "labels_best.pt")
    if lr is not None:
        torch.save(torch.tensor(lr), folder / "lr_best.pt")
    return folder


def write_krr_st(folder: Path, suffix: str = "", labels: bool = False) -> Path:
    """KRR-ST's train.py (x_syn.pt, y_syn.pt); its shared baselines hold class labels."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_rand(N, C, S, S, seed=9), folder / f"x_syn{suffix}.pt")
    y = torch.tensor([0, 1, 2, 0, 1, 2]) if labels else _rand(N, D, seed=10)
    torch.save(y, folder / f"y_syn{suffix}.pt")
    return folder


def _import(*argv: str) -> int:
    return main(["import", *argv])


def _fails(capsys, argv: list[str], match: str, command: str = "import") -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"ddkd {command}: error:") and len(err.splitlines()) == 1, err
    assert match in err, err
    return err


# --- each published layout imports ---------------------------------------------------------

def test_mkdt_layout_imports_the_last_iteration_with_its_step_size(tmp_path, capsys):
    folder = write_mkdt(tmp_path / "mkdt")
    out = tmp_path / "set.h5"
    assert _import("mkdt", str(folder), "--out", str(out), "--dataset", "cifar10") == 0
    assert "iterations 1, 100; importing 100" in capsys.readouterr().out
    s = load_synthset(out)
    assert torch.equal(s.images, torch.load(folder / "images_100.pt"))
    assert torch.equal(s.targets, torch.load(folder / "labels_100.pt"))
    assert s.lr == float(torch.tensor(0.05 + 100 / 1000))
    assert s.objective == "mse" and s.objective_state == {}
    # MKDT's get_dataset values for CIFAR-10 (src/mkdt/utils.py)
    assert s.mean.tolist() == [0.4914, 0.4822, 0.4465] and s.std.tolist() == [0.2023, 0.1994,
                                                                              0.2010]
    imported = s.provenance["imported"]
    assert imported["format"] == "mkdt" and imported["iteration"] == "100"
    assert {f["role"]: f["sha256"] for f in imported["files"]} == {
        "images": sha256_file(folder / "images_100.pt"),
        "targets": sha256_file(folder / "labels_100.pt"),
        "lr": sha256_file(folder / "synlr_100.pt")}
    assert s.provenance["source_dataset"] == "cifar10" and (s.init_indices == -1).all()
    # another iteration on request, and the three files named one by one
    assert _import("mkdt", str(folder), "--out", str(tmp_path / "it1.h5"), "--iteration", "1",
                   "--normalization", NORM) == 0
    assert load_synthset(tmp_path / "it1.h5").lr == float(torch.tensor(0.051))
    named = [str(folder / f"{p}_1.pt") for p in ("images", "labels", "synlr")]
    assert _import("mkdt", *named, "--out", str(tmp_path / "named.h5"), "--normalization",
                   NORM) == 0
    assert torch.equal(load_synthset(tmp_path / "named.h5").images,
                       load_synthset(tmp_path / "it1.h5").images)


def test_mtt_set_keeps_its_class_labels_and_needs_a_step_size(tmp_path, capsys):
    folder = write_mtt(tmp_path / "mtt")
    out = tmp_path / "mtt.h5"
    _fails(capsys, ["import", "mtt", str(folder), "--out", str(out), "--dataset", "cifar100"],
           "MTT's distill.py never saves it")
    assert not out.exists()
    assert _import("mtt", str(folder), "--out", str(out), "--dataset", "cifar100",
                   "--lr", "0.01") == 0
    s = load_synthset(out)
    # one-hot rows of CIFAR-100's 100 classes, kept as labels (objective "labels")
    assert s.objective == "labels" and s.targets.shape == (N, 100)
    assert s.targets.argmax(1).tolist() == [0, 0, 1, 1, 2, 2] and s.targets.sum(1).eq(1).all()
    assert s.lr == 0.01 and s.provenance["imported"]["lr_source"] == "--lr"
    assert s.provenance["imported"]["targets"] == "class-labels"
    assert s.mean.tolist() == [0.4914, 0.4822, 0.4465]  # sic: MTT normalises CIFAR-100 so


def test_datm_soft_labels_stay_logits(tmp_path):
    folder = write_mtt(tmp_path / "datm", soft=True, lr=0.02)
    out = tmp_path / "datm.h5"
    assert _import("datm", str(folder), "--out", str(out), "--dataset", "cifar10") == 0
    s = load_synthset(out)
    assert s.objective == "soft-labels"
    assert torch.equal(s.targets, torch.load(folder / "labels_best.pt"))
    assert s.lr == float(torch.tensor(0.02))
    # the loss is DATM's SoftCrossEntropy: sum(-log_softmax(out) * softmax(target)) / batch
    objective = restore_objective(s.objective, s.objective_state, s.targets.shape[1])
    out_logits = _rand(N, 10, seed=3)
    datm = (-torch.log_softmax(out_logits, 1) * torch.softmax(s.targets, 1)).sum() / N
    assert torch.allclose(objective.loss(out_logits, s.targets), datm)


@pytest.mark.parametrize("suffix", ["", "_final"])
def test_krr_st_layout_takes_its_stated_default_step_size(tmp_path, suffix):
    folder = write_krr_st(tmp_path / "krr", suffix)
    out = tmp_path / "krr.h5"
    assert _import("krr-st", str(folder), "--out", str(out), "--dataset", "cifar100") == 0
    s = load_synthset(out)
    assert s.objective == "mse" and s.targets.shape == (N, D)
    assert s.lr == 0.1 and "--pre_lr" in s.provenance["imported"]["lr_source"]
    # KRR-ST's 32-pixel MEAN/STD for CIFAR-100 (data/augmentation.py)
    assert s.std.tolist() == [0.2673, 0.2564, 0.2762]


def test_krr_st_class_labels_are_labels(tmp_path):
    folder = write_krr_st(tmp_path / "dm", labels=True)
    out = tmp_path / "dm.h5"
    assert _import("krr-st", str(folder), "--out", str(out), "--normalization", NORM,
                   "--lr", "0.03") == 0
    s = load_synthset(out)
    assert s.objective == "labels" and s.targets.shape == (N, 3) and s.lr == 0.03


def test_zca_set_refits_the_codes_whitening(tmp_path):
    data = write_imagefolder(tmp_path / "data", channels=3, n_per_class=6)
    folder = write_mtt(tmp_path / "mtt_zca", lr=0.01)
    out = tmp_path / "zca.h5"
    assert _import("mtt", str(folder), "--out", str(out), "--zca", "--dataset",
                   f"imagefolder:{data}") == 0
    s = load_synthset(out)
    assert s.zca is not None and s.mean.tolist() == [0.0] * 3 and s.std.tolist() == [1.0] * 3
    from ddkd.data import load_dataset

    expected = ZCA.fit(load_dataset(f"imagefolder:{data}").images.float() / 255, eps=0.1)
    assert torch.allclose(s.zca.matrix, expected.matrix)


def test_imported_sets_evaluate_beside_each_other(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "data", channels=3, n_per_class=6)
    dataset = f"imagefolder:{data}"
    mkdt, mtt = tmp_path / "mkdt.h5", tmp_path / "mtt.h5"
    assert _import("mkdt", str(write_mkdt(tmp_path / "m", its=(5,))), "--out", str(mkdt),
                   "--dataset", dataset, "--normalization", NORM) == 0
    assert _import("mtt", str(write_mtt(tmp_path / "t")), "--out", str(mtt), "--dataset",
                   dataset, "--normalization", NORM, "--lr", "0.01") == 0
    capsys.readouterr()
    assert main(["evaluate", str(mkdt), str(mtt), "--baselines", "none", "--epochs", "1",
                 "--seeds", "1", "--fractions", "0.5", "--no-progress",
                 "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"mkdt", "mtt", "no pre-training"}
    by = {r["method"]: r for r in rows}
    assert by["mtt"]["lr"] == 0.01 and by["mkdt"]["lr"] == float(torch.tensor(0.055))
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_label_objectives_cannot_train_experts():
    assert "labels" not in OBJECTIVES and "soft-labels" not in OBJECTIVES
    from ddkd.config import ExpertConfig
    from ddkd.errors import ConfigError

    with pytest.raises(ConfigError, match="objective 'labels' is unknown"):
        ExpertConfig(objective="labels")


# --- export, and back ---------------------------------------------------------------------

def _full_set(path: Path) -> Path:
    """A set with every optional part: objective state, history, ZCA, odd float values."""
    d = C * S * S
    x = _rand(40, d, seed=4)
    zca = ZCA.fit(x.view(40, C, S, S))
    s = SynthSet(
        images=_rand(N, C, S, S, seed=5), targets=_rand(N, D, seed=6), lr=0.0123456789012345,
        mean=torch.tensor([0.1, 0.2, 1 / 3], dtype=torch.float64),
        std=torch.tensor([0.3, 0.25, 2 / 7], dtype=torch.float64), objective="mse",
        provenance={"source_dataset": "cifar10", "run": "/nowhere", "iterations": 3},
        config={"ipc": 2, "lr_img": 1000.0},
        init_indices=torch.tensor([5, 3, 9, 1, 0, 7]),
        objective_state={"mean": _rand(D, seed=11), "std": _rand(D, seed=12).abs() + 0.1},
        history={"loss": np.array([3.0, 2.0, 1.5], dtype=np.float32),
                 "lr": np.array([0.01, 0.011, 0.012], dtype=np.float32)},
        zca=zca,
    )
    save_synthset(path, s)
    return path


def _assert_same(a: SynthSet, b: SynthSet) -> None:
    for name in ("images", "targets", "mean", "std", "init_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.lr == b.lr and a.objective == b.objective and a.config == b.config
    assert a.objective_state.keys() == b.objective_state.keys()
    assert all(torch.equal(a.objective_state[k], b.objective_state[k]) for k in a.objective_state)
    assert a.history.keys() == b.history.keys()
    assert all(np.array_equal(a.history[k], b.history[k]) for k in a.history)
    assert (a.zca is None) == (b.zca is None)
    if a.zca is not None:
        assert a.zca.eps == b.zca.eps
        assert all(torch.equal(t, b.zca.tensors()[k]) for k, t in a.zca.tensors().items())


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_lossless_exports_round_trip_bit_exactly(tmp_path, fmt):
    source = _full_set(tmp_path / "set.h5")
    out = tmp_path / f"copy.{fmt}"
    assert main(["export", str(source), "--format", fmt, "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["lr"] == 0.0123456789012345 and sidecar["targets"] == "representations"
    assert sidecar["exported_from"]["sha256"] == sha256_file(source)
    back = tmp_path / "back.h5"
    assert _import(fmt, str(out), "--out", str(back)) == 0
    a, b = load_synthset(source), load_synthset(back)
    _assert_same(a, b)
    assert {k: v for k, v in b.provenance.items() if k != "read_from"} == a.provenance
    assert b.provenance["read_from"]["files"][0]["sha256"] == sha256_file(out)


def test_safetensors_file_follows_the_published_format(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.asarray(2.5),
              "c": np.array([1, -2], dtype=">i8"), "empty": np.zeros((0, 4), np.float64)}
    path = tmp_path / "x.safetensors"
    save_file(path, arrays, {"note": "hi"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"note": "hi"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["c"]["dtype"] == "I64" and header["b"]["shape"] == []
    assert raw[8 + n + header["c"]["data_offsets"][0]:][:8] == struct.pack("<q", 1)
    back, meta = load_file(path)
    assert meta == {"note": "hi"} and back["b"].shape == ()
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    try:  # the reference implementation, where it is installed (not a ddkd dependency)
        from safetensors.numpy import load_file as reference
    except ImportError:
        return
    assert all(np.array_equal(reference(str(path))[k], arrays[k]) for k in arrays)


def test_pt_trio_round_trips_through_the_published_layouts(tmp_path):
    source = tmp_path / "set.h5"
    s = load_synthset(_full_set(tmp_path / "zca.h5"))
    s.zca, s.lr = None, float(torch.tensor(0.0123))  # the codes hold the step size as float32
    save_synthset(source, s)
    out = tmp_path / "pt"
    assert main(["export", str(source), "--format", "pt", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images_3.pt", "labels_3.pt",
                                                     "metadata.json", "synlr_3.pt"]
    meta = json.loads((out / "metadata.json").read_text())
    # the sidecar says how to read the trio back: the normalisation is only there
    argv = meta["reimport"].replace("SET.h5", str(tmp_path / "back.h5")).split()[1:]
    assert main(argv) == 0
    b = load_synthset(tmp_path / "back.h5")
    for name in ("images", "targets", "mean", "std"):
        assert torch.equal(getattr(s, name), getattr(b, name)), name
    assert b.lr == s.lr and b.objective == "mse"

    # a supervised set goes out as MTT's trio (what DD-Ranking reads) and comes back the same
    labelled = tmp_path / "labels.h5"
    assert _import("mtt", str(write_mtt(tmp_path / "mtt", lr=0.02)), "--out", str(labelled),
                   "--normalization", NORM) == 0
    assert main(["export", str(labelled), "--format", "pt", "--out", str(tmp_path / "pt2")]) == 0
    assert torch.load(tmp_path / "pt2" / "labels_best.pt").dtype == torch.int64
    assert _import("mtt", str(tmp_path / "pt2"), "--out", str(tmp_path / "again.h5"),
                   "--normalization", NORM) == 0
    a, b = load_synthset(labelled), load_synthset(tmp_path / "again.h5")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.lr == b.lr and b.objective == "labels"


def test_png_folder_is_clipped_quantised_and_says_so(tmp_path):
    from PIL import Image

    source = _full_set(tmp_path / "set.h5")
    out = tmp_path / "png"
    assert main(["export", str(source), "--format", "png-folder", "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert "clipped to [0, 1]" in meta["pixels"] and "quantised to 8 bits" in meta["pixels"]
    s = load_synthset(source)
    pixels = s.pixels()  # un-whitened, de-normalised, clamped
    first = np.asarray(Image.open(out / "images" / "00000.png"), dtype=np.float64) / 255
    assert len(list((out / "images").iterdir())) == N
    assert np.abs(first - pixels[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(np.load(out / "targets.npy"), s.targets.numpy())
    # an existing output is kept unless --overwrite
    assert main(["export", str(source), "--format", "png-folder", "--out", str(out)]) == 2
    assert main(["export", str(source), "--format", "png-folder", "--out", str(out),
                 "--overwrite"]) == 0


# --- bad input: one line, exit code 2, nothing written -------------------------------------

class _Payload:
    """A pickle that creates a file when it is loaded: the proof that its code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, capsys):
    folder = write_mtt(tmp_path / "evil", lr=0.01)
    marker = tmp_path / "code-ran"
    torch.save({"images": _Payload(marker)}, folder / "images_best.pt")
    out = tmp_path / "set.h5"
    err = _fails(capsys, ["import", "mtt", str(folder), "--out", str(out), "--normalization",
                          NORM], "refused: reading it needs pickled code")
    assert "weights_only=True" in err and "io.open" in err  # the function it would call
    assert not marker.exists() and not out.exists()
    torch.save([_Payload(marker)], tmp_path / "replay_buffer_0.pt")
    _fails(capsys, ["import", "replay-buffer", str(tmp_path / "replay_buffer_0.pt"), "--run",
                    str(tmp_path)], "is not a complete ddkd teach run")  # the run is checked first
    assert not marker.exists()


@pytest.mark.parametrize(("case", "match"), [
    ("other-layout", "they are files of the mtt layout: use `ddkd import mtt`"),
    ("other-layout-named", "is not a file of the mkdt layout"),
    ("mtt-on-mkdt", "is the step size of the mkdt layout, not mtt's"),
    ("rank", "holds a 3-d float32 tensor (6, 8, 8); the mkdt layout has (n, C, H, W)"),
    ("target-rank", "holds a 1-d float32 tensor (6,); the mkdt layout has (n, D) float"),
    ("count", "holds 5 targets but the images file 6 images"),
    ("missing-lr", "no synlr_100.pt beside images_100.pt"),
    ("not-a-tensor", "holds a dict, not a tensor"),
    ("truncated", "is not a readable PyTorch file"),
    ("no-normalization", "no --dataset: mkdt's code has no per-dataset normalisation"),
    ("bad-lr-file", "holds the step size -0.5"),
])
def test_bad_sets_are_refused_with_one_line(tmp_path, capsys, case, match):
    folder = write_mkdt(tmp_path / "in", its=(100,))
    paths = [str(folder)]
    extra = ["--normalization", NORM]
    fmt = "mkdt"
    if case == "other-layout":
        folder = write_mtt(tmp_path / "mtt", lr=0.1)
        paths = [str(folder)]
    elif case == "other-layout-named":
        paths = [str(write_mtt(tmp_path / "mtt", lr=0.1) / "images_best.pt")]
    elif case == "mtt-on-mkdt":
        fmt = "mtt"
    elif case == "rank":
        torch.save(_rand(N, S, S), folder / "images_100.pt")
    elif case == "target-rank":
        torch.save(_rand(N), folder / "labels_100.pt")
    elif case == "count":
        torch.save(_rand(N - 1, D), folder / "labels_100.pt")
    elif case == "missing-lr":
        (folder / "synlr_100.pt").unlink()
    elif case == "not-a-tensor":
        torch.save({"x": _rand(N, C, S, S)}, folder / "images_100.pt")
    elif case == "truncated":
        data = (folder / "images_100.pt").read_bytes()
        (folder / "images_100.pt").write_bytes(data[: len(data) // 2])
    elif case == "no-normalization":
        extra = []
    elif case == "bad-lr-file":
        torch.save(torch.tensor(-0.5), folder / "synlr_100.pt")
    out = tmp_path / "set.h5"
    _fails(capsys, ["import", fmt, *paths, "--out", str(out), *extra], match)
    assert not out.exists() and not list(tmp_path.glob(".set.h5.*"))


# --- replay buffers ------------------------------------------------------------------------

class _PublishedConvNet(nn.Module):
    """The parameter layout of MTT/MKDT's ``networks.ConvNet`` (``features`` Sequential of
    conv, GroupNorm-as-instance-norm, ReLU, AvgPool per block; then ``classifier``), written
    here for the test: a buffer recorded from it is what their buffer.py saves."""

    def __init__(self, channels: int, width: int, depth: int, out: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        for d in range(depth):
            layers += [nn.Conv2d(channels if d == 0 else width, width, 3, padding=1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2, 2)]
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, out)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def write_replay_buffer(path: Path, experts: int = 2, epochs: int = 3, out: int = 32,
                        width: int = 8, depth: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    trajectories = []
    for _ in range(experts):
        net = _PublishedConvNet(C, width, depth, out, S)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(12, C, S, S), torch.randn(12, out)
        # clone: on the CPU, buffer.py's p.detach().cpu() would alias the live parameters
        timestamps = [[p.detach().clone() for p in net.parameters()]]
        for _ in range(epochs):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            timestamps.append([p.detach().clone() for p in net.parameters()])
        trajectories.append(timestamps)
    torch.save(trajectories, path)
    return path


@pytest.fixture(scope="module")
def experts_free_run(tmp_path_factory) -> Path:
    """A tiny 3-channel teach run with a teacher and targets (dimension 32) but no experts."""
    root = tmp_path_factory.mktemp("interop-run")
    folder = write_imagefolder(root / "data", channels=3)
    teach = list(TINY_TEACH)
    teach[teach.index("--experts") + 1] = "0"
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run), *teach]) == 0
    return run


def test_replay_buffer_imports_and_synthesize_runs_on_it(experts_free_run, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(experts_free_run, run)
    buffers = [write_replay_buffer(tmp_path / f"replay_buffer_{n}.pt", seed=n) for n in (0, 1)]
    assert _import("replay-buffer", *map(str, buffers), "--run", str(run),
                   "--normalization", "run") == 0
    assert "4 experts x 3 epochs" in capsys.readouterr().out
    with ExpertsFile(run / "experts.h5") as experts:
        assert len(experts) == 4 and experts.header.epochs == 3
        assert experts.header.experts_config["lr"] == 0.1  # MKDT's buffer.py default
        first = torch.load(buffers[0])[0]
        for e in (0, 3):
            flat = torch.cat([p.reshape(-1) for p in first[e]])
            assert torch.equal(experts.snapshot(0, e), flat)
        files = experts.header.experts_config["imported"]["files"]
        assert [f["sha256"] for f in files] == [sha256_file(b) for b in buffers]
    out = tmp_path / "set.h5"
    assert main(["synthesize", "--run", str(run), "--out", str(out), "--ipc", "2",
                 "--iterations", "2", "--syn-steps", "2", "--matched-epochs", "1",
                 "--max-start-epoch", "2", "--batch-syn", "3", "--lr-img", "10",
                 "--no-progress"]) == 0
    s = load_synthset(out)
    assert s.images.shape == (4, C, S, S) and s.provenance["num_experts"] == 4
    # the run now has experts: a second import needs --overwrite
    _fails(capsys, ["import", "replay-buffer", str(buffers[0]), "--run", str(run),
                    "--normalization", "run"], "already has experts")


@pytest.mark.parametrize(("case", "match"), [
    ("classifier", "parameter head.weight is (10, 32) in the buffer but (32, 32) in the run's "
                   "student"),
    ("depth", "holds 14 parameter tensors (1728 numbers); the run's student"),
    ("width", "parameter body.0.weight is (4, 3, 3, 3) in the buffer"),
    ("not-a-buffer", "not a list of experts: not an MTT replay buffer"),
    ("lengths", "has 2 epochs, the first expert 3"),
    ("aliased", "snapshots 0 and 1 are identical"),
    ("normalization", "but --run"),
    ("published-normalization", "mkdt's code has no per-dataset normalisation"),
])
def test_mismatched_replay_buffers_are_refused(experts_free_run, tmp_path, capsys, case, match):
    path = tmp_path / "replay_buffer_0.pt"
    norm = ["--normalization", "run"]
    if case == "classifier":
        write_replay_buffer(path, out=10)
    elif case == "depth":
        write_replay_buffer(path, depth=3)
    elif case == "width":
        write_replay_buffer(path, width=4)
    elif case == "not-a-buffer":
        torch.save(_rand(2, 3), path)
    elif case == "lengths":
        a = torch.load(write_replay_buffer(path))
        b = torch.load(write_replay_buffer(path, epochs=2))
        torch.save(a + b, path)
    elif case == "aliased":
        buffer = torch.load(write_replay_buffer(path))
        buffer[0][1] = buffer[0][0]
        torch.save(buffer, path)
    elif case == "normalization":
        write_replay_buffer(path)
        norm = ["--normalization", NORM]
    else:
        write_replay_buffer(path)
        norm = []
    _fails(capsys, ["import", "replay-buffer", str(path), "--run", str(experts_free_run),
                    *norm], match)
    assert not (experts_free_run / "experts.h5").exists()
    assert not (experts_free_run / "experts.import-partial").exists()
