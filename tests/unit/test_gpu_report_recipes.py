"""The GPU session's quality recipes (bench/gpu_report.py): each one a model the trainer accepts, before device time
is spent on it."""

import pytest

from bench import gpu_report
from trainer.config import TrainConfig

URL = "postgresql://postgres@127.0.0.1:5432/unused"


@pytest.mark.parametrize("name", [name for name, _ in gpu_report.QUALITY_RECIPES])
def test_every_recipe_is_a_valid_training_configuration(name):
    [(_, recipe)] = gpu_report.recipe_options([name])
    data, base, depth, options = gpu_report.recipe_settings(recipe, 32, 4)
    assert data in ("grid", "overlap")
    config = TrainConfig(database_url=URL, steps=3000, batch_size=32, base_filters=base, depth=depth, **options)
    assert config.residual is recipe["residual"]


def test_width_and_depth_recipes_change_the_model_of_the_run():
    recipes = dict(gpu_report.QUALITY_RECIPES)
    assert gpu_report.recipe_settings(recipes["residual + overlapping crops"], 32, 4)[:3] == ("overlap", 32, 4)
    assert gpu_report.recipe_settings(recipes["residual + overlapping crops + depth 5"], 32, 4)[:3] == (
        "overlap", 32, 5)
    assert gpu_report.recipe_settings(recipes["residual + base 64"], 32, 4)[:3] == ("grid", 64, 4)
    # the toy sizes of --quick: one level deeper than the run's depth 2
    assert gpu_report.recipe_settings(recipes["residual + overlapping crops + depth 5"], 4, 2)[1:3] == (4, 3)


def test_the_default_recipes_exist_and_the_unknown_ones_are_refused():
    assert [name for name, _ in gpu_report.recipe_options(None)] == list(gpu_report.DEFAULT_RECIPES)
    with pytest.raises(SystemExit):
        gpu_report.recipe_options(["residual + no such thing"])
