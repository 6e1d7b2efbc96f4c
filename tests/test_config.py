from pathlib import Path

import pytest

from ddkd.cli import RECIPES, stage_values
from ddkd.config import (
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


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(recipe: Path):
    config = build_config(TeachConfig, stage_values(recipe, "teach"))
    assert isinstance(config, TeachConfig)
    synth = stage_values(recipe, "synthesize")
    if synth:
        assert isinstance(build_config(SynthConfig, synth), SynthConfig)


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

