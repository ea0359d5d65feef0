"""Config resolution: layer order, type checks, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest

from recipes.base import UserError, get_recipe
from recipes.engine.config import (
    ENGINE_DEFAULTS,
    load_recipe_file,
    parse_set_option,
    resolve_config,
)


def test_layers_apply_in_order_defaults_recipe_preset_file_cli_set() -> None:
    recipe = get_recipe("tiny-majority")
    # engine default batch 32 < recipe 16; recipe dim 16 < preset 32 < file 24 < cli < set
    config = resolve_config(
        recipe,
        preset="wide",
        file_options={"model.dim": 24, "train.lr": 0.5, "train.steps": 7},
        cli_options={"train.steps": 9, "model.pe": "rope"},
        set_options={"train.steps": 11},
    )
    assert ENGINE_DEFAULTS["train.batch_size"] == 32 and config["train.batch_size"] == 16
    assert config["model.dim"] == 24  # file beats preset (32) and recipe (16)
    assert config["train.lr"] == 0.5  # file beats preset (0.003)
    assert config["train.steps"] == 11  # --set beats the cli option and the file
    assert config["model.pe"] == "rope"
    assert config["train.optimizer"] == "adamw"  # untouched engine default


def test_preset_overrides_recipe_defaults() -> None:
    config = resolve_config(get_recipe("tiny-majority"), preset="wide")
    assert config["model.dim"] == 32 and config["train.lr"] == 0.003


def test_cli_options_of_none_leave_lower_layers_alone() -> None:
    config = resolve_config(get_recipe("tiny-majority"), cli_options={"train.steps": None})
    assert config["train.steps"] == 30


def test_unknown_key_names_the_key_and_suggests_the_close_one() -> None:
    with pytest.raises(UserError, match=r"unknown option 'train\.lrr'.*did you mean 'train\.lr'"):
        resolve_config(get_recipe("tiny-majority"), set_options={"train.lrr": 1.0})


def test_unknown_key_lists_valid_keys_of_its_section() -> None:
    with pytest.raises(UserError, match=r"data\.train_size") as error:
        resolve_config(get_recipe("tiny-majority"), file_options={"data.nope": 1})
    assert "train.lr" not in str(error.value)  # only the data.* keys are listed


def test_wrong_type_names_key_and_expected_type() -> None:
    with pytest.raises(UserError, match=r"train\.steps must be an integer, got 'many'"):
        resolve_config(get_recipe("tiny-majority"), file_options={"train.steps": "many"})
    with pytest.raises(UserError, match=r"model\.causal must be true/false"):
        resolve_config(get_recipe("tiny-majority"), set_options={"model.causal": 1})


def test_integers_are_accepted_where_numbers_are_due() -> None:
    config = resolve_config(get_recipe("tiny-majority"), set_options={"train.lr": 1})
    assert config["train.lr"] == 1.0 and isinstance(config["train.lr"], float)


def test_bad_choice_and_negative_values_are_user_errors() -> None:
    recipe = get_recipe("tiny-majority")
    with pytest.raises(UserError, match="train.optimizer must be one of adamw, adam"):
        resolve_config(recipe, set_options={"train.optimizer": "sgd"})
    with pytest.raises(UserError, match="train.lr must not be negative"):
        resolve_config(recipe, set_options={"train.lr": -1.0})


def test_unknown_preset_lists_the_recipes_presets() -> None:
    with pytest.raises(UserError, match="no preset 'huge'; presets: tiny, wide"):
        resolve_config(get_recipe("tiny-majority"), preset="huge")


def test_unknown_position_encoding_lists_valid_names() -> None:
    with pytest.raises(UserError, match=r"unknown position encoding 'copee'.*cope\+rope"):
        resolve_config(get_recipe("tiny-majority"), cli_options={"model.pe": "copee"})


def test_set_values_are_read_as_toml_or_as_text() -> None:
    assert parse_set_option("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_set_option("model.causal=true") == ("model.causal", True)
    assert parse_set_option("model.grid=[2, 8, 8]") == ("model.grid", [2, 8, 8])
    assert parse_set_option("model.norm=post") == ("model.norm", "post")
    assert parse_set_option("model.npos=none") == ("model.npos", None)
    with pytest.raises(UserError, match="key=value"):
        parse_set_option("train.lr")


def test_set_of_a_number_for_a_text_option_means_the_text() -> None:
    # `--set model.norm=7` reaches the choice check as the text "7", not as a type crash
    with pytest.raises(UserError, match="model.norm must be one of pre, post, got '7'"):
        resolve_config(get_recipe("tiny-majority"), set_options={"model.norm": 7})
    with pytest.raises(UserError, match="recipe file: model.norm must be a string"):
        resolve_config(get_recipe("tiny-majority"), file_options={"model.norm": 7})


def test_nullable_keys_accept_none_and_their_type_only() -> None:
    recipe = get_recipe("tiny-majority")
    assert resolve_config(recipe, set_options={"model.npos": 16})["model.npos"] == 16
    assert resolve_config(recipe, set_options={"model.npos": None})["model.npos"] is None
    with pytest.raises(UserError, match="model.npos must be an integer"):
        resolve_config(recipe, set_options={"model.npos": "many"})


def test_recipe_file_flattens_tables_and_separates_meta_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'recipe = "tiny-majority"\npreset = "tiny"\n"data.min_len" = 3\n[train]\nlr = 0.02\n'
    )
    options, meta = load_recipe_file(path)
    assert meta == {"recipe": "tiny-majority", "preset": "tiny"}
    assert options == {"data.min_len": 3, "train.lr": 0.02}


def test_malformed_toml_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train\nlr = ")
    with pytest.raises(UserError, match="bad.toml is not valid TOML"):
        load_recipe_file(path)


def test_missing_recipe_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        load_recipe_file(tmp_path / "absent.toml")


def test_encoder_options_are_checked_before_training() -> None:
    with pytest.raises(UserError, match="model options: dim 30 is not divisible by heads 4"):
        resolve_config(get_recipe("tiny-majority"), set_options={"model.dim": 30})
