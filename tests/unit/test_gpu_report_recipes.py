"""The GPU session's quality recipes (bench/gpu_report.py): each one a model the trainer accepts, before device time
is spent on it."""

import re
from pathlib import Path

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
    for wrong in ("residual + no such thing", "residual@", "residual@one", "no such thing@1"):
        with pytest.raises(SystemExit):
            gpu_report.recipe_options([wrong])


def test_a_recipe_named_with_a_seed_trains_with_that_seed_only():
    (name, plain), (same, seeded) = gpu_report.recipe_options(["residual", "residual@2"])
    assert name == same == "residual" and "seed" not in plain and seeded == {**plain, "seed": 2}
    assert "seed" not in dict(gpu_report.QUALITY_RECIPES)["residual"]  # the table itself unchanged


def test_the_gpu_session_names_recipes_that_exist_on_the_data_they_need():
    """A misspelt recipe in bench/gpu_session.sh would stop a whole part of a 15-minute GPU lease."""
    script = (Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh").read_text()
    named = dict(re.findall(r'^(dubai|kampala)_recipes="([^"]+)"$', script, flags=re.M))
    assert set(named) == {"dubai", "kampala"}
    for dataset, names in named.items():
        recipes = gpu_report.recipe_options(names.split(","))  # SystemExit on an unknown name
        assert len(recipes) == len(names.split(",")) >= 2
        if dataset == "kampala":  # the overlapping crops are Dubai's: gpu_report refuses them for Kampala
            assert all(gpu_report.recipe_settings(recipe, 32, 4)[0] == "grid" for _, recipe in recipes)
