from pathlib import Path

import pytest
import torch

from ddkd.cli import RECIPES, stage_values
from ddkd.config import (
    EvalConfig,
    ExpertConfig,
    SynthConfig,
    TeachConfig,
    build_config,
    load_recipe,
    merge,
    parse_overrides,
)
from ddkd.errors import ConfigError


def test_defaults_are_mkdt():
    c = TeachConfig()
    assert (c.experts.num_experts, c.experts.epochs, c.experts.lr) == (100, 20, 0.1)
    assert (c.experts.momentum, c.experts.weight_decay, c.experts.batch_size) == (0.9, 1e-4, 256)
    assert (c.student.depth, c.student.width, c.student.norm) == (3, 128, "instancenorm")
    assert c.teacher.ssl == "barlowtwins"


def test_overrides_are_coerced_by_field_type():
    c = build_config(TeachConfig, parse_overrides(
        ["experts.lr=0.05", "experts.num_experts=3", "data.subset=none", "seed=7"]))
    assert c.experts.lr == 0.05 and c.experts.num_experts == 3
    assert c.data.subset is None and c.seed == 7


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="experts.lrr.*valid here:.*lr"):
        build_config(TeachConfig, parse_overrides(["experts.lrr=1"]))


def test_bad_value_names_the_setting():
    with pytest.raises(ConfigError, match="experts.num_experts = 'many'"):
        build_config(TeachConfig, parse_overrides(["experts.num_experts=many"]))
    with pytest.raises(ConfigError, match="experts.num_experts must be >= 0"):
        ExpertConfig(num_experts=-1)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["experts.lr"])


def test_unknown_ssl_and_dataset_list_valid_ones():
    with pytest.raises(ConfigError, match="barlowtwins, simclr, byol, vicreg"):
        build_config(TeachConfig, {"teacher": {"ssl": "dino"}})
    with pytest.raises(ConfigError, match="valid: fashion-mnist, mnist"):
        build_config(TeachConfig, {"data": {"dataset": "imagenet"}})


def _check_recipe(recipe: Path) -> None:
    """Every stage table of ``recipe`` builds its configuration, and its [synthesize] table
    matches only epochs its [teach] experts record (what synthesize refuses at run time)."""
    teach = build_config(TeachConfig, stage_values(recipe, "teach"))
    values = stage_values(recipe, "synthesize")
    if values:
        synth = build_config(SynthConfig, values)
        last = synth.max_start_epoch - 1 + synth.expert_epochs
        if teach.experts.num_experts and last > teach.experts.epochs:
            raise ConfigError(f"{recipe.name}: synthesize needs epoch {last}, the experts "
                              f"record {teach.experts.epochs}")
    build_config(EvalConfig, stage_values(recipe, "evaluate"))


SHIPPED_RECIPES = sorted(RECIPES.glob("*.toml"))


def test_the_shipped_recipes_are_there():
    # (a parametrised test over an empty folder would pass by running nothing)
    assert {"fashion-mnist", "fashion-mnist-full", "cifar10-paper"} <= {
        p.stem for p in SHIPPED_RECIPES}


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(recipe: Path):
    _check_recipe(recipe)


@pytest.mark.parametrize(("text", "match"), [
    ("[teach]\nseed = 0\n[teach.experts]\nepochs = 3\n[synthesize]\nmax_start_epoch = 3\n",
     "synthesize needs epoch 4, the experts record 3"),
    ("[teach]\n[teach.experts]\nlr = 'fast'\n", "experts.lr = 'fast' is not a valid float"),
    ("[teach]\n[synthesize]\nsyn_step = 3\n", "unknown setting 'syn_step'"),
    ("[teach]\n[evaluate]\nprobe = 'svm'\n", "probe 'svm' is unknown"),
    ("[teach]\n[evaluation]\n", "unknown top-level tables"),
])
def test_the_recipe_check_catches_a_broken_recipe(tmp_path, text, match):
    recipe = tmp_path / "broken.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        _check_recipe(recipe)


def test_evaluate_settings_from_a_recipe_and_set():
    values = merge({"archs": ["convnet", "resnet10"], "fractions": [0.5]},
                   parse_overrides(["baselines=none,random", "pretrain_steps=20,10,20"]))
    config = build_config(EvalConfig, values)
    assert config.archs == ("convnet", "resnet10") and config.fractions == (0.5,)
    assert config.baselines == ("none", "random") and config.pretrain_steps == (10, 20)
    assert build_config(EvalConfig, {"baselines": ""}).baselines == ()  # none at all
    assert build_config(EvalConfig, {}).baselines is None  # the default set
    with pytest.raises(ConfigError, match="--arch 'vit' is unknown"):
        build_config(EvalConfig, {"archs": ["vit"]}, flags={"archs": "--arch"})


def test_recipe_then_set_then_flags(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[experts]\nlr = 0.2\nepochs = 3\n")
    values = merge(merge(load_recipe(recipe), parse_overrides(["experts.lr=0.3"])),
                   {"experts": {"epochs": 4}})
    c = build_config(TeachConfig, values)
    assert c.experts.lr == 0.3 and c.experts.epochs == 4


def test_invalid_toml_is_named(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[experts\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_recipe(recipe)



# --- the layers: config.py at the bottom, the registries above it built from its names -------


def test_config_imports_nothing_above_it():
    import ast
    from pathlib import Path

    import ddkd.config

    tree = ast.parse(Path(ddkd.config.__file__).read_text())
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert {m for m in imported if m.startswith("ddkd")} == {"ddkd.errors"}


def test_every_registry_holds_exactly_the_names_config_validates():
    from ddkd import config
    from ddkd.data.datasets import DATASETS
    from ddkd.eval.pretrain import ARCHS
    from ddkd.eval.runner import _BASELINE_BUILDERS
    from ddkd.models import MODEL_NAMES
    from ddkd.objectives import OBJECTIVES
    from ddkd.ssl_training import SSLModel

    assert tuple(DATASETS) == config.DATASET_NAMES[:-1]
    assert config.DATASET_NAMES[-1] == "imagefolder:PATH"
    assert tuple(OBJECTIVES) == config.OBJECTIVE_NAMES
    assert tuple(_BASELINE_BUILDERS) == config.BASELINES
    assert set(config.TEACHER_ARCHS) | set(ARCHS) <= set(MODEL_NAMES)
    for method in config.SSL_METHODS:  # lightly builds each one
        assert SSLModel(torch.nn.Flatten(), 4, method, 8).head is not None


def test_no_module_imports_the_package_for_its_version():
    """ddkd/__init__.py and the writers that record the version (io/synthset.py, ...) imported
    each other; the version now lives in the leaf ddkd/version.py."""
    import ast

    import ddkd

    offenders = []
    for path in Path(ddkd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            bare = isinstance(node, ast.Import) and any(a.name == "ddkd" for a in node.names)
            named = (isinstance(node, ast.ImportFrom) and node.module == "ddkd"
                     and any(a.name == "__version__" for a in node.names))
            if bare or named:
                offenders.append(path.name)
    assert offenders == []
