"""Predefined views with per-view learned targets (after Boost-SSD, Yu et al. ICLR 2025).

- the views are exact pixel permutations in the stated directions, and refuse what the image
  shape does not allow;
- the meta-gradient through the views agrees with finite differences (float64), in both
  memory modes, and reaches every image through every view;
- per-view targets round-trip through the file bit-exactly (format version 2); a set without
  views is still version 1, and the shipped version-1 set loads unchanged;
- pre-training on a viewed set sees every (image, view) pair with its own target;
- end to end: ``ddkd synthesize --views`` starts each view's target from the teacher's target
  of the viewed real image, and bad input ends in one line and exit code 2 before any work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_TEACH, directional_derivatives, make_tiny_run_and_set, write_imagefolder
from ddkd.cli import main
from ddkd.data.views import GROUPS, VIEWS, apply_view, check_views_fit, expand_views, parse_views
from ddkd.errors import ConfigError, FileFormatError
from ddkd.io.synthset import SynthSet, load_synthset, save_synthset
from ddkd.models import ConvNet, ConvNetConfig
from ddkd.models.functional import ParamSpec, flat_params
from ddkd.synth.matching import (
    Segment,
    matching_loss,
    meta_gradient,
    meta_gradient_constant_memory,
    sample_batches,
    unroll,
)
from ddkd.synth.views import initial_view_targets, viewed_pairs, with_views

SHIPPED = Path(__file__).resolve().parent.parent / "synth_sets" / \
    "fashion-mnist_ipc10_default.h5"
THREE = ("identity", "hflip", "rot90")


# --- the views -------------------------------------------------------------------------------


def test_views_are_the_stated_permutations():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    assert apply_view(x, "hflip")[0, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert apply_view(x, "vflip")[0, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert apply_view(x, "rot180")[0, 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    # counter-clockwise as displayed: the top row becomes the left column, read bottom-up
    assert apply_view(x, "rot90")[0, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert apply_view(x, "rot270")[0, 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    square = torch.randn(2, 3, 4, 4)
    for name in VIEWS:  # a permutation of the pixels of each image and channel
        out = apply_view(square, name)
        assert torch.equal(out.flatten(2).sort(-1).values, square.flatten(2).sort(-1).values)
    assert torch.equal(apply_view(apply_view(square, "rot90"), "rot270"), square)
    assert torch.equal(apply_view(square.to(torch.uint8), "hflip"),
                       apply_view(square, "hflip").to(torch.uint8))


def test_expand_views_is_image_major():
    x = torch.randn(3, 1, 4, 4)
    pairs = expand_views(x, THREE)
    assert pairs.shape == (9, 1, 4, 4)
    for i in range(3):
        for v, name in enumerate(THREE):
            assert torch.equal(pairs[i * 3 + v], apply_view(x[i], name))


def test_parse_views_names_groups_and_refusals():
    assert parse_views("none") == () and parse_views("") == ()
    assert parse_views("rot4") == GROUPS["rot4"] == ("identity", "rot90", "rot180", "rot270")
    assert parse_views("flip2") == ("identity", "hflip")
    assert parse_views(" identity, rot180 ") == ("identity", "rot180")
    with pytest.raises(ConfigError, match=r"--views 'identity,rot45': unknown view 'rot45'; "
                                          r"expected a comma list of identity, hflip"):
        parse_views("identity,rot45")
    with pytest.raises(ConfigError, match="names 'hflip' twice"):
        parse_views("hflip,identity,hflip")
    check_views_fit(("identity", "hflip", "vflip", "rot180"), (1, 6, 8))  # no axis swap
    with pytest.raises(ConfigError, match=r"rot90 needs square images, but the images are 6x8"):
        check_views_fit(GROUPS["rot4"], (1, 6, 8))


# --- the meta-gradient through the views ------------------------------------------------------


def _problem(steps=3, n=3, views=THREE, batch=4, seed=0):
    torch.manual_seed(seed)
    model = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=1, width=3,
                                  out_dim=2)).double()
    spec = ParamSpec.of(model)
    theta_start = flat_params(model)
    theta_target = theta_start + 0.05 * torch.randn_like(theta_start)
    gen = torch.Generator().manual_seed(seed)
    batches = sample_batches(n * len(views), steps, batch, gen)  # over (image, view) pairs
    segment = Segment(0, 0, theta_start, theta_target, batches)
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    y = torch.randn(n, len(views), 2, dtype=torch.float64)
    alpha = torch.tensor(0.1, dtype=torch.float64)
    return model, spec, segment, x, y, alpha


def _viewed_loss(model, spec, segment, x, y, alpha, views=THREE) -> float:
    """The matching loss of the viewed set, computed from explicitly viewed images."""
    pairs_x = torch.stack([apply_view(x[i], v) for i in range(len(x)) for v in views])
    pairs_y = torch.stack([y[i, k] for i in range(len(x)) for k in range(len(views))])
    theta = unroll(model, spec, segment.theta_start, pairs_x, pairs_y, alpha, segment.batches,
                   create_graph=False)
    return matching_loss(theta.detach(), segment.theta_start, segment.theta_target).item()


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
@pytest.mark.parametrize("which", ["x", "y", "alpha"])
def test_viewed_meta_gradient_matches_finite_differences(which, memory):
    model, spec, segment, x, y, alpha = _problem()
    compute = with_views(meta_gradient if memory == "unrolled"
                         else meta_gradient_constant_memory, THREE)
    mg = compute(model, spec, segment, x, y, alpha)
    assert mg.grad_x.shape == x.shape and mg.grad_y.shape == y.shape
    analytic, numeric = directional_derivatives(
        lambda **a: _viewed_loss(model, spec, segment, **a), {"x": x, "y": y, "alpha": alpha},
        mg, which)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert mg.loss.item() == pytest.approx(_viewed_loss(model, spec, segment, x, y, alpha))


def test_constant_memory_equals_unrolled_with_views():
    model, spec, segment, x, y, alpha = _problem(steps=4)
    ref = with_views(meta_gradient, THREE)(model, spec, segment, x, y, alpha)
    got = with_views(meta_gradient_constant_memory, THREE)(model, spec, segment, x, y, alpha)
    for a, b in ((got.grad_x, ref.grad_x), (got.grad_y, ref.grad_y),
                 (got.grad_alpha, ref.grad_alpha)):
        assert ((a - b).norm() / b.norm()).item() < 1e-6


def test_each_image_gets_the_gradient_of_every_view_it_is_seen_under():
    """One inner step on all pairs: an image's gradient is the sum over its views of the pair
    gradient mapped back through the view (the inverse permutation)."""
    model, spec, segment, x, y, alpha = _problem(steps=1, batch=256)
    pairs_x, pairs_y = viewed_pairs(x, y, THREE)
    plain = meta_gradient(model, spec, segment, pairs_x, pairs_y, alpha)
    inverse = {"identity": "identity", "hflip": "hflip", "rot90": "rot270"}
    per_pair = plain.grad_x.view(3, len(THREE), 1, 8, 8)
    expected = sum(apply_view(per_pair[:, v], inverse[name]) for v, name in enumerate(THREE))
    got = with_views(meta_gradient, THREE)(model, spec, segment, x, y, alpha)
    torch.testing.assert_close(got.grad_x, expected, rtol=1e-12, atol=1e-15)
    for v in range(len(THREE)):  # every view contributes something to every image
        assert per_pair[:, v].flatten(1).norm(dim=1).min() > 0
    torch.testing.assert_close(got.grad_y, plain.grad_y.view(3, len(THREE), 2))


def test_copy_init_gives_every_view_the_real_target():
    z = torch.randn(4, 5)
    y = initial_view_targets(("identity", "hflip"), "copy", z)
    assert y.shape == (4, 2, 5) and torch.equal(y[:, 0], z) and torch.equal(y[:, 1], z)


# --- the file -------------------------------------------------------------------------------


def _viewed_set(n=3, views=THREE, d=5, size=4, seed=0) -> SynthSet:
    gen = torch.Generator().manual_seed(seed)
    return SynthSet(images=torch.randn(n, 1, size, size, generator=gen),
                    targets=torch.randn(n, len(views), d, generator=gen), lr=0.05,
                    mean=torch.tensor([0.5], dtype=torch.float64),
                    std=torch.tensor([0.25], dtype=torch.float64), objective="mse",
                    provenance={"views": list(views)}, config={"views": ",".join(views)},
                    init_indices=torch.arange(n), history={"loss": [1.0], "lr": [0.05]},
                    views=views)


def test_per_view_targets_round_trip_bit_exactly(tmp_path):
    s = _viewed_set()
    s.targets[0, 1, 0] = float(np.nextafter(np.float32(1), np.float32(2)))  # needs every bit
    path = tmp_path / "viewed.h5"
    save_synthset(path, s)
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 2 and f.attrs["views"] == "identity,hflip,rot90"
        assert f["targets"].shape == (3, 3, 5) and f["targets"].dtype == np.float32
    back = load_synthset(path)
    assert back.views == THREE
    assert torch.equal(back.targets, s.targets) and torch.equal(back.images, s.images)
    x, y = back.pairs()
    assert x.shape == (9, 1, 4, 4) and y.shape == (9, 5)
    assert torch.equal(y[1 * 3 + 2], s.targets[1, 2])
    assert torch.equal(x[1 * 3 + 2], torch.rot90(s.images[1], 1, (-2, -1)))
    assert len(back.dataset()) == 9 and len(back) == 3


def test_a_set_without_views_is_written_as_version_1(tmp_path):
    plain = dataclasses.replace(_viewed_set(), targets=torch.randn(3, 5), views=())
    path = tmp_path / "plain.h5"
    save_synthset(path, plain)
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1 and "views" not in f.attrs


def test_the_shipped_version_1_set_loads_unchanged():
    s = load_synthset(SHIPPED)
    with h5py.File(SHIPPED) as f:
        assert f.attrs["format_version"] == 1
        stored = torch.from_numpy(f["targets"][()])
    assert s.views == () and s.targets.shape == (100, 128) and torch.equal(s.targets, stored)
    x, y = s.pairs()
    assert x is s.images and y is s.targets


@pytest.mark.parametrize("edit, words", [
    (lambda f: f.attrs.__delitem__("views"), ["version 2 but lacks the attribute views"]),
    (lambda f: f.attrs.__setitem__("views", "identity,shear"), ["unknown view 'shear'"]),
    (lambda f: f.attrs.__setitem__("views", "identity,hflip"),
     ["needs targets (n=3, V=2, D)", "got (3, 3, 5)"]),
    (lambda f: f.attrs.__setitem__("format_version", 3), ["version 3", "reads up to version 2"]),
])
def test_a_damaged_version_2_file_is_refused_by_name(tmp_path, edit, words):
    path = tmp_path / "viewed.h5"
    save_synthset(path, _viewed_set())
    with h5py.File(path, "a") as f:
        edit(f)
    with pytest.raises(FileFormatError) as err:
        load_synthset(path)
    for word in words:
        assert word in str(err.value)


def test_select_views_and_expanded():
    s = _viewed_set()
    some = s.select_views(("rot90", "identity"))
    assert some.views == ("rot90", "identity")
    assert torch.equal(some.targets[:, 0], s.targets[:, 2])
    flat = s.expanded()
    assert flat.views == () and flat.images.shape == (9, 1, 4, 4)
    assert flat.init_indices.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ConfigError, match="no targets for the view 'vflip'"):
        s.select_views(("vflip",))
    with pytest.raises(ConfigError, match="has no per-view targets"):
        load_synthset(SHIPPED).select_views(("identity",))


# --- pre-training -----------------------------------------------------------------------------


def test_pretraining_on_a_viewed_set_sees_every_pair_with_its_target():
    from ddkd.eval.pretrain import pretrain
    from ddkd.eval.runner import _set_method

    s = _viewed_set(n=5, views=("identity", "hflip", "vflip", "rot180"), size=8)
    method = _set_method("viewed.h5", s)
    assert method.images.shape == (20, 1, 8, 8) and method.targets.shape == (20, 5)
    seen_x, seen_y = [], []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ConvNet(ConvNetConfig(in_channels=1, image_size=8, depth=1, width=2,
                                             out_dim=5))

        def forward(self, x):
            seen_x.append(x.detach().clone())
            return self.net(x)

    def loss(out, target):
        seen_y.append(target.detach().clone())
        return torch.nn.functional.mse_loss(out, target)

    pretrain(Recording(), method.images, method.targets, lr=0.01, seed=0, epochs=1,
             batch_size=6, loss_fn=loss)
    assert [len(b) for b in seen_x] == [6, 6, 6, 2]  # 20 pairs: one epoch is 4 steps, not 1
    xs, ys = torch.cat(seen_x), torch.cat(seen_y)
    found = set()
    for xr, yr in zip(xs, ys, strict=True):
        for i in range(5):
            for v, name in enumerate(s.views):
                if torch.equal(xr, apply_view(s.images[i], name)) and \
                        torch.equal(yr, s.targets[i, v]):
                    found.add((i, v))
    assert found == {(i, v) for i in range(5) for v in range(4)}


# --- end to end and bad input ------------------------------------------------------------------

SYN = ["--ipc", "2", "--iterations", "2", "--syn-steps", "2", "--expert-epochs", "1",
       "--max-start-epoch", "1", "--batch-syn", "5", "--lr-img", "10", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views")
    folder = write_imagefolder(root / "data")
    run = root / "run"
    assert main(["teach", "--dataset", f"imagefolder:{folder}", "--out", str(run),
                 *TINY_TEACH]) == 0
    return run


def test_synthesize_with_views_writes_per_view_targets_from_the_teacher(tiny_run, tmp_path,
                                                                        capsys):
    from ddkd.io.run import open_run
    from ddkd.synth.views import load_run_teacher, teacher_view_targets

    out = tmp_path / "viewed.h5"
    # no learning: the set keeps its initial targets, which can then be checked
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(out), *SYN,
                 "--views", "identity,hflip,rot90", "--lr-img", "0", "--lr-targets", "0"]) == 0
    s = load_synthset(out)
    assert s.views == THREE and s.targets.shape == (4, 3, 32)
    assert s.provenance["views"] == list(THREE) and s.config["views"] == "identity,hflip,rot90"
    opened = open_run(tiny_run)
    objective = opened.objective  # fitted, as synthesize uses it
    position = [int((opened.indices == i).nonzero()) for i in s.init_indices.tolist()]
    z_real = objective.targets(opened.targets)[position]
    assert torch.equal(s.targets[:, 0], z_real)  # identity: the run's own targets, bit for bit
    normalize = opened.normalization
    teacher = load_run_teacher(opened.run.teacher)
    for v, name in enumerate(THREE[1:], start=1):
        expected = teacher_view_targets(teacher, opened.images[position], normalize, objective,
                                        name, torch.device("cpu"))
        torch.testing.assert_close(s.targets[:, v], expected)
        assert not torch.allclose(s.targets[:, v], z_real)  # a view is not its image
    capsys.readouterr()
    assert main(["inspect", str(out), "--png", str(tmp_path / "grid.png")]) == 0
    printed = capsys.readouterr().out
    assert "views       identity,hflip,rot90: every image under 3 views" in printed
    assert "12 (image, view) pairs" in printed


def test_synthesize_with_views_learns_images_and_every_views_target(tiny_run, tmp_path):
    out = tmp_path / "viewed.h5"
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(out), *SYN,
                 "--views", "flip2", "--set", "view_init=copy", "--memory", "constant"]) == 0
    s = load_synthset(out)
    assert s.views == ("identity", "hflip") and s.provenance["view_init"] == "copy"
    # started equal (copy); matching moved each view's target its own way
    assert not torch.equal(s.targets[:, 0], s.targets[:, 1])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_unknown_view_is_refused_before_the_run_is_read(tmp_path, capsys, monkeypatch):
    import ddkd.synth.runner as runner

    monkeypatch.setattr(runner, "open_run", lambda *a: pytest.fail("the run was read"))
    code = main(["synthesize", "--run", str(tmp_path / "no-run"), "--out",
                 str(tmp_path / "s.h5"), *SYN, "--views", "identity,rot45"])
    assert code == 2
    line = _one_line(capsys)
    assert "--views 'identity,rot45': unknown view 'rot45'" in line and "rot4" in line


def test_a_rotation_of_non_square_images_is_refused_before_any_work(tiny_run, tmp_path,
                                                                    capsys, monkeypatch):
    import ddkd.synth.runner as runner

    real = runner.open_run

    def non_square(root):  # a run whose images are 8x6 (ddkd's ConvNet runs are all square)
        opened = real(root)
        return dataclasses.replace(opened, images=opened.images[..., :6])

    monkeypatch.setattr(runner, "open_run", non_square)
    monkeypatch.setattr(runner, "high_loss_indices", lambda *a: pytest.fail("work began"))
    code = main(["synthesize", "--run", str(tiny_run), "--out", str(tmp_path / "s.h5"), *SYN,
                 "--views", "rot4"])
    assert code == 2
    line = _one_line(capsys)
    assert "--views identity,rot90,rot180,rot270: rot90 needs square images" in line
    assert "are 8x6" in line
    assert not (tmp_path / "s.h5.partial").exists()


def test_a_viewed_file_of_non_square_images_is_refused(tmp_path, capsys):
    s = _viewed_set(views=("identity", "hflip"))
    path = tmp_path / "viewed.h5"
    save_synthset(path, dataclasses.replace(s, images=torch.randn(3, 1, 4, 6)))
    with h5py.File(path, "a") as f:
        f.attrs["views"] = "identity,rot90"
    assert main(["inspect", str(path), "--png", str(tmp_path / "g.png")]) == 2
    assert "rot90 needs square images" in _one_line(capsys)


def test_per_view_targets_asked_of_a_set_without_views(tmp_path, capsys, monkeypatch):
    import ddkd.eval.runner as runner

    monkeypatch.setattr(runner, "_job_rows", lambda *a: pytest.fail("work began"))
    code = main(["evaluate", str(SHIPPED), "--views", "identity", "--baselines", "",
                 "--out", str(tmp_path / "eval"), "--no-progress"])
    assert code == 2
    line = _one_line(capsys)
    assert "--views identity:" in line and "has no per-view targets" in line
    assert "fashion-mnist_ipc10_default.h5" in line


def test_a_view_the_set_does_not_store_is_refused(tmp_path, capsys, monkeypatch):
    import ddkd.eval.runner as runner

    path = tmp_path / "viewed.h5"
    save_synthset(path, _viewed_set())
    monkeypatch.setattr(runner, "_job_rows", lambda *a: pytest.fail("work began"))
    code = main(["evaluate", str(path), "--views", "identity,vflip", "--baselines", "",
                 "--out", str(tmp_path / "eval"), "--no-progress", "--downstream", "x"])
    assert code == 2
    assert "no targets for the view 'vflip'; it stores identity,hflip,rot90" in _one_line(capsys)


def test_random_views_baseline_is_the_random_subset_under_the_sets_views(tiny_run, tmp_path):
    """The viewed set's control: the same images as random + KD of that seed, each under
    every view with the teacher's target of the viewed image (the identity view: the run's)."""
    from ddkd.config import EvalConfig
    from ddkd.eval.runner import prepare
    from ddkd.io.run import open_run
    from ddkd.synth.views import load_run_teacher, teacher_view_targets

    out = tmp_path / "viewed.h5"
    assert main(["synthesize", "--run", str(tiny_run), "--out", str(out), *SYN,
                 "--views", "identity,hflip,rot90"]) == 0
    plan = prepare([str(out)], str(tiny_run), EvalConfig(seeds=1, fractions=(0.5,)),
                   torch.device("cpu"))
    by_name = {m.baseline: m for m in plan.methods}
    assert "random-views" in by_name  # in the default baselines of a viewed set
    random, viewed = by_name["random"], by_name["random-views"]
    assert viewed.name == "random subset + KD, 3 views (n=4)"
    x_plain, z_plain = random.data(seed=0)
    x_pairs, z_pairs = viewed.data(seed=0)
    assert x_pairs.shape == (12, *x_plain.shape[1:]) and z_pairs.shape == (12, z_plain.shape[1])
    opened = open_run(tiny_run)
    teacher = load_run_teacher(opened.run.teacher)
    chosen = [int(torch.nonzero((random.images == x).flatten(1).all(1))[0]) for x in x_plain]
    for v, name in enumerate(THREE):
        assert torch.equal(x_pairs[v::3], apply_view(x_plain, name))
        if name == "identity":
            assert torch.equal(z_pairs[v::3], z_plain)
        else:
            expected = teacher_view_targets(teacher, opened.images[chosen],
                                            opened.normalization, opened.objective, name,
                                            torch.device("cpu"))
            torch.testing.assert_close(z_pairs[v::3], expected)


def test_random_views_without_a_viewed_set_is_refused_before_any_work(tmp_path,
                                                                      capsys,
                                                                      monkeypatch):
    import ddkd.eval.runner as runner

    _, _, plain = make_tiny_run_and_set(tmp_path)
    from ddkd.config import EvalConfig

    plan = runner.prepare([str(plain)], None, EvalConfig(seeds=1, fractions=(0.5,)),
                          torch.device("cpu"))
    assert "random-views" not in plan.record["baselines"]  # not a plain set's default
    monkeypatch.setattr(runner, "_job_rows", lambda *a: pytest.fail("work began"))
    code = main(["evaluate", str(plain), "--baselines", "none,random-views",
                 "--out", str(tmp_path / "eval"), "--no-progress"])
    assert code == 2
    line = _one_line(capsys)
    assert "--baselines random-views" in line and "none of the sets has views" in line
