"""The KD objectives: documented properties of each target transform, and their losses."""

import json

import pytest
import torch

from conftest import TINY_TEACH
from ddkd.cli import main
from ddkd.config import ExpertConfig
from ddkd.errors import ConfigError
from ddkd.io.experts import ExpertsFile
from ddkd.io.run import load_objective_state
from ddkd.io.synthset import load_synthset
from ddkd.objectives import OBJECTIVES, build_objective, restore_objective
from ddkd.objectives.kdep import pts

D = 16


def _features(n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # anisotropic, off-centre, clustered: like real features, unlike white noise
    centres = torch.randn(5, D, generator=gen) * 3
    z = centres[torch.arange(n) % 5] + torch.randn(n, D, generator=gen) * torch.linspace(2, .1, D)
    return z + 4.0


def _fitted(name):
    obj = build_objective(name, D)
    obj.fit(_features(), torch.Generator().manual_seed(1))
    if name == "skd":  # its block stages' normalisers come from teacher maps (tests below)
        obj.fit_stages([1, 3], [4, 2], [torch.randn(3), torch.randn(5)],
                       [torch.rand(3) + 0.5, torch.rand(5) + 0.5])
    return obj


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="objective 'kl' is unknown; valid: mse, kdep, tcs, ssld"):
        build_objective("kl", D)


def test_kdep_targets_are_centred_rotated_and_squashed():
    obj = _fitted("kdep")
    z = _features()
    u = obj.rotate(z)
    assert u.mean(0).abs().max() < 1e-3  # centred
    cov = u.T @ u / len(u)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 1e-3 * cov.diag().max()  # principal axes: decorrelated
    assert torch.all(cov.diag()[:-1] >= cov.diag()[1:] - 1e-4)  # by decreasing variance
    torch.testing.assert_close(obj.directions.T @ obj.directions, torch.eye(D), atol=1e-5,
                               rtol=0)  # a rotation
    t = obj.targets(z)
    assert abs(t.pow(2).mean().sqrt().item() - 1) < 1e-3  # recalibrated T: unit RMS


def test_mse_standardize_z_scores_each_dimension_and_round_trips():
    z = _features()
    raw = build_objective("mse", D)
    raw.fit(z, torch.Generator().manual_seed(1))
    assert raw.state_dict() == {} and torch.equal(raw.targets(z), z)  # MKDT: the raw features
    obj = build_objective("mse", D, standardize=True)
    obj.fit(z, torch.Generator().manual_seed(1))
    t = obj.targets(z)
    torch.testing.assert_close(t.mean(0), torch.zeros(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(0), torch.ones(D), atol=1e-5, rtol=0)
    # the saved state alone says which variant it is (a synthetic set restores it by name)
    again = restore_objective("mse", obj.state_dict(), target_dim=D)
    assert again.standardize and torch.equal(again.targets(z[:7]), obj.targets(z[:7]))
    assert not restore_objective("mse", {}, target_dim=D).standardize
    # a constant teacher dimension (a dead unit) is not divided by zero
    z[:, 3] = 1.5
    obj.fit(z, torch.Generator())
    assert torch.isfinite(obj.targets(z)).all() and obj.targets(z)[:, 3].abs().max() == 0


def test_unknown_target_norm_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="experts.target_norm 'zscore' is unknown; valid: "
                                          "none, standardize"):
        ExpertConfig(target_norm="zscore")


def test_teach_warns_when_the_experts_learned_only_the_targets_mean(caplog):
    from ddkd.teach.runner import _expert_fit

    z = _features() * 0.01  # a tiny teacher scale, like the shipped teacher's
    obj = build_objective("mse", D)
    variance = (z - z.mean(0)).pow(2).mean().item()
    with caplog.at_level("WARNING", logger="ddkd.teach.runner"):
        fit = _expert_fit(obj, z, [variance, variance], ExpertConfig())
    assert fit == pytest.approx(0, abs=1e-4)
    assert "explain only 0.0% of the targets' variance" in caplog.text
    assert "experts.target_norm=standardize" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddkd.teach.runner"):
        assert _expert_fit(obj, z, [0.4 * variance], ExpertConfig()) == pytest.approx(0.6)
    assert caplog.text == ""
    assert _expert_fit(_fitted("ssld"), z, [0.1], ExpertConfig()) is None  # not a regression
    kdep = _fitted("kdep")  # 3 x MSE on unit-RMS targets: the mean's loss is 3 x their variance
    assert _expert_fit(kdep, _features(), [0.3 * 3], ExpertConfig()) == pytest.approx(0.7, abs=0.01)


def test_skd_global_stage_standardises_like_mse():
    z = _features()
    obj = build_objective("skd", D, standardize=True)
    obj.fit(z, torch.Generator())
    obj.fit_stages([1], [2], [torch.zeros(3)], [torch.ones(3)])
    mse = build_objective("mse", D, standardize=True)
    mse.fit(z, torch.Generator())
    assert torch.equal(obj.targets(z), mse.targets(z))
    again = restore_objective("skd", obj.state_dict(), target_dim=D)
    assert {"mean", "std", "stage_source"} <= set(obj.state_dict())
    assert torch.equal(again.targets(z), obj.targets(z))
    assert not restore_objective("skd", _fitted("skd").state_dict(), target_dim=D).standardize


def test_pts_is_odd_and_monotone():
    u = torch.linspace(-5, 5, 101)
    v = pts(u, 0.1)
    torch.testing.assert_close(pts(-u, 0.1), -v)
    assert torch.all(v[1:] > v[:-1])


def test_tcs_hash_bits_are_balanced_on_the_fitting_data():
    obj = _fitted("tcs")
    bits = obj.hash_logits(_features()) > 0
    assert bits.shape[1] == 32 * D
    share = bits.float().mean(0)
    assert share.min() >= 0.49 and share.max() <= 0.51
    assert 1 <= obj.student_dim < D  # 95% of the variance needs fewer than D directions


def test_ssld_targets_are_informative_distributions():
    obj = _fitted("ssld")
    p = torch.softmax(obj.targets(_features()), dim=1)
    torch.testing.assert_close(p.sum(1), torch.ones(len(p)))
    uniform = torch.log(torch.tensor(float(p.shape[1])))
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
    assert entropy < 0.8 * uniform  # far from uniform at tau = 0.1
    assert torch.allclose(obj.anchors.norm(dim=1), torch.ones(len(obj.anchors)))


def _perfect_output(obj, z):
    """What a perfect student outputs: the coordinates/features the target encodes."""
    if obj.name == "kdep":
        return obj.targets(z)
    if obj.name == "tcs":
        return (z - obj.mean) @ obj.basis  # exact when f_t lies in the kept subspace
    return z


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_loss_is_minimal_at_a_perfect_student_and_decreases_under_training(name):
    obj = _fitted(name)
    z = _features(64, seed=3)
    if name == "tcs":  # put the targets inside the coordinate system, where f_hat can reach
        z = obj.reconstruct((z - obj.mean) @ obj.basis)
    target = obj.targets(z)
    perfect = _perfect_output(obj, z)
    floor = obj.loss(perfect, target)
    if name == "tcs":  # the hash term has no zero: its floor is the teacher's own value
        bits = (obj.hash_logits(z) > 0).float()
        own = torch.nn.functional.binary_cross_entropy_with_logits(obj.hash_logits(z), bits)
        torch.testing.assert_close(floor, obj.beta * own)
    else:
        assert floor.abs() < 1e-5
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=gen)
    head = torch.nn.Linear(8, obj.student_dim)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = obj.loss(head(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and losses[-1] > floor.item() - 1e-6


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_fitted_state_round_trips(name):
    obj = _fitted(name)
    again = build_objective(name, D)
    again.load_state_dict(obj.state_dict())
    z = _features(32, seed=5)
    assert torch.equal(again.targets(z), obj.targets(z))
    assert again.student_dim == obj.student_dim
    if name == "skd":
        maps = torch.randn(2, 5, 4, 4)
        assert torch.equal(again.stage_targets(1, maps), obj.stage_targets(1, maps))


# --- through the stages: teach -> synthesize -> evaluate, for every objective -----------------


@pytest.mark.parametrize("variant", [*OBJECTIVES, "mse-raw"])
def test_every_objective_runs_through_the_pipeline(variant, tiny_folder, tmp_path):
    run, synth = tmp_path / "run", tmp_path / "set.h5"
    name = variant.split("-")[0]
    # the default recipe standardises mse's targets (an option the others ignore); mse-raw:
    # MKDT's raw teacher features
    norm = "none" if variant == "mse-raw" else "standardize"
    # kdep's pre-ReLU student side needs student.width <= the teacher's 32 dimensions
    assert main(["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(run),
                 *TINY_TEACH, "--objective", name, "--set", "experts.anchors=6",
                 "--set", f"experts.target_norm={norm}"]) == 0
    saved_name, state = load_objective_state(run / "targets.h5")
    assert saved_name == name
    if name == "mse":
        assert set(state) == ({"mean", "std"} if norm == "standardize" else set())
    else:  # skd's global stage standardises like mse; the others ignore the option
        assert state and ("std" in state) == (name == "skd")
    with ExpertsFile(run / "experts.h5") as experts:
        assert experts.header.objective == name
        assert experts.header.student["output"] == ("prenorm" if name == "kdep" else "linear")
        start = experts.snapshot(1, 0)
    if name == "skd":  # the trajectory starts where the block stages left the student
        from ddkd.models import ConvNetConfig
        from ddkd.models.functional import flat_params
        from ddkd.teach.experts import init_student

        fresh = init_student(ConvNetConfig(**experts.header.student), 3, 1)
        head = fresh.head.weight.numel() + fresh.head.bias.numel()  # the last parameters
        fresh = flat_params(fresh)
        assert not torch.equal(start[:-head], fresh[:-head])
        assert torch.equal(start[-head:], fresh[-head:])  # the head is not in any block stage
        stages = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        stages = [r for r in stages if r["phase"] == "expert-stage"]
        assert {(r["expert"], r["stage"]) for r in stages} == {(k, s) for k in (0, 1)
                                                               for s in (1, 2)}
    assert main(["synthesize", "--run", str(run), "--out", str(synth), "--ipc", "1",
                 "--iterations", "2", "--syn-steps", "2", "--matched-epochs", "1",
                 "--max-start-epoch", "1", "--no-progress"]) == 0
    loaded = load_synthset(synth)
    assert loaded.objective == name
    assert state.keys() == loaded.objective_state.keys()
    assert all(torch.equal(state[k], loaded.objective_state[k]) for k in state)
    out = tmp_path / "eval"
    assert main(["evaluate", str(synth), "--baselines", "none,random,high-loss", "--fractions",
                 "0.5", "--seeds", "1", "--epochs", "2", "--probe", "knn", "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--objective", "kdep", "--set", "student.width=64"],
         "kdep: the student's pre-ReLU output has at least student.width = 64"),
        (["--objective", "ssld"], "ssld: experts.anchors = 100 k-means anchors need"),
        (["--objective", "kl"], "--objective 'kl' is unknown; valid: mse, kdep, tcs, ssld"),
    ],
)
def test_impossible_objective_settings_are_refused(tiny_folder, tmp_path, capsys, extra, match):
    argv = ["teach", "--dataset", f"imagefolder:{tiny_folder}", "--out", str(tmp_path / "r"),
            *TINY_TEACH, *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- skd: the block stages -------------------------------------------------------------------


def _skd_setup(norm="instancenorm"):
    from ddkd.models import ConvNet, ConvNetConfig, ResNet, ResNetConfig
    from ddkd.teach.stagewise import fit_skd_stages

    torch.manual_seed(0)
    teacher = ResNet(ResNetConfig(in_channels=1, depth=10, base_width=4)).eval()
    x = torch.randn(48, 1, 16, 16)
    sc = ConvNetConfig(in_channels=1, image_size=16, depth=3, width=8, norm=norm,
                       out_dim=teacher.config.feature_dim)
    obj = build_objective("skd", teacher.config.feature_dim)
    fit_skd_stages(obj, teacher, sc, x, batch_size=20)
    return teacher, x, sc, obj, ConvNet


def test_skd_regresses_the_teacher_stage_of_the_same_downsampling():
    from ddkd.objectives.skd import plan_stages

    assert plan_stages([14, 7, 3], [28, 14, 7, 4]) == [1, 2, 3]
    assert plan_stages([16, 8, 4, 2], [32, 16, 8, 4]) == [1, 2, 3, 3]
    assert plan_stages([8], [4, 4, 2, 1]) == [1]  # larger than every map: the largest, deepest
    _, _, _, obj, _ = _skd_setup()
    assert obj.stage_source.tolist() == [1, 2, 3] and obj.stage_size.tolist() == [8, 4, 2]


def test_skd_stage_targets_are_channel_standardised():
    from ddkd.teach.stagewise import stage_targets

    teacher, x, _, obj, _ = _skd_setup()
    for s in range(obj.num_stages):
        t = stage_targets(obj, s, teacher, x, batch_size=7)
        assert t.shape[1:] == (4 * 2 ** int(obj.stage_source[s]), obj.stage_size[s],
                               obj.stage_size[s])
        torch.testing.assert_close(t.mean((0, 2, 3)), torch.zeros(t.shape[1]), atol=1e-4,
                                   rtol=0)
        live = t.std((0, 2, 3)) > 0  # a channel that ReLU keeps at zero stays zero
        std = t.transpose(0, 1).flatten(1).std(1, correction=0)
        torch.testing.assert_close(std[live], torch.ones(int(live.sum())), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_skd_stage_changes_only_the_active_block_and_lowers_its_loss(norm):
    from ddkd.config import ExpertConfig
    from ddkd.teach.experts import init_student
    from ddkd.teach.stagewise import stage_targets, train_stage

    teacher, x, sc, obj, _ = _skd_setup(norm)
    ec = ExpertConfig(batch_size=16, stage_epochs=4, lr=0.05, objective="skd")
    for s in range(obj.num_stages):
        student = init_student(sc, 0, 0)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        losses = train_stage(student, s, stage_targets(obj, s, teacher, x), x, ec, 0, 0)
        active = {f"body.{4 * s + i}." for i in range(4)}
        for name, value in student.state_dict().items():
            moved = not torch.equal(value, before[name])
            assert moved == any(name.startswith(a) for a in active) or "num_batches" in name, (
                s, name)
        assert losses[-1] < losses[0]
        again = init_student(sc, 0, 0)
        assert train_stage(again, s, stage_targets(obj, s, teacher, x), x, ec, 0, 0) == losses


def test_skd_needs_a_teacher_with_stages():
    from ddkd.objectives.skd import teacher_stage_modules

    with pytest.raises(ConfigError, match="skd needs a teacher with the stages layer1"):
        teacher_stage_modules(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
