"""Recipes: loading the bundled files, type checks, overrides, and the TOML round trip."""

from __future__ import annotations

import pytest

from groupclip.training.recipe import (
    RecipeError,
    apply_overrides,
    bundled_recipes,
    load_recipe,
    parse_value,
    recipe_from_dict,
    recipe_to_toml,
)
from groupclip.training.tasks import known_tasks


def test_bundled_recipes_load_and_name_known_tasks():
    names = bundled_recipes()
    assert {"default", "fashion-mnist-cnn", "rotten-tomatoes-minilm", "shakespeare-gpt"} <= set(names)
    assert {"fashion-mnist-scatternet", "rotten-tomatoes-probe", "rotten-tomatoes-minilm-full"} <= set(names)
    assert "rotten-tomatoes-minilm-lora" in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.task in known_tasks()


def test_fashion_recipe_is_tramer_boneh():
    recipe = load_recipe("fashion-mnist-cnn")
    assert (recipe.privacy.epsilon, recipe.privacy.delta) == (3.0, 1e-5)
    assert recipe.schedule.batch_size == 2048 and recipe.schedule.epochs == 40
    assert recipe.optimizer.lr == 4.0 and recipe.optimizer.momentum == 0.9
    assert recipe.clipping.max_grad_norm == 0.1 and recipe.clipping.grouping == "all-layer"


def test_overrides_parse_toml_literals_and_strings():
    recipe = apply_overrides(
        load_recipe("fashion-mnist-cnn"),
        ["clipping.grouping=layer-wise", "privacy.epsilon=8", "clipping.adaptive=true", "model.width=2", "run.seed=3"],
    )
    assert recipe.clipping.grouping == "layer-wise" and recipe.privacy.epsilon == 8.0
    assert recipe.clipping.adaptive is True and recipe.model["width"] == 2 and recipe.run.seed == 3
    assert apply_overrides(recipe, ["clipping.grouping=4"]).clipping.grouping == 4
    assert parse_value("1e-5") == 1e-5 and parse_value("abadi") == "abadi" and parse_value("[1, 2]") == [1, 2]


def test_round_trip_through_toml(tmp_path):
    recipe = apply_overrides(load_recipe("default"), {"privacy.noise_multiplier": None, "privacy.epsilon": 2.0})
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(str(path)) == recipe


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("clipping.groupng=layer-wise", "has no field 'groupng'"),
        ("clipping.max_grad_norm=big", r"clipping.max_grad_norm = 'big' should be of type float"),
        ("privacy.private=3", "should be of type bool"),
        ("nosection.x=1", "expected section.field"),
        ("grouping", "expected section.field=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(RecipeError, match=match):
        apply_overrides(load_recipe("default"), [override])


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(RecipeError, match="not a bundled recipe"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ntask = "image-classification"\n[clipping]\nthreshold = 1\n')
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['threshold'\] in \[clipping\]"):
        load_recipe(str(bad))
    bad.write_text("name = [\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="needs a string 'task'"):
        recipe_from_dict({"name": "x"})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['optimiser'\]"):
        recipe_from_dict({"name": "x", "task": "t", "optimiser": {}})
