"""Generated text tasks: clean splits (no evaluation item is a training item) and presets."""

from __future__ import annotations

import pytest

from recipes.base import UserError, get_recipe

# Settings small enough that the generators repeat themselves often, so overlap is likely.
REPETITIVE: dict[str, dict] = {
    "counting": {"data.min_statements": 2, "data.max_statements": 8},
    "selective-copy": {
        "data.num_tokens": 3,
        "data.num_colors": 3,
        "data.min_blanks": 0,
        "data.max_blanks": 3,
        "data.sparse_min_blanks": 1,
        "data.sparse_max_blanks": 3,
        "data.dense_min_blanks": 0,
        "data.dense_max_blanks": 1,
    },
    "flip-flop": {"data.length": 6, "data.sparse_p_ignore": 0.9, "data.dense_p_ignore": 0.5},
}


def build(recipe: str, **overrides):
    config = {
        **get_recipe(recipe).defaults,
        **REPETITIVE[recipe],
        "data.train_size": 300,
        "data.eval_size": 20,
        **overrides,
    }
    return get_recipe(recipe).build_data(config, None, False)


def token_sets(bundle):
    train = {tuple(bundle.train.example(i)[0]) for i in range(len(bundle.train))}
    splits = {
        name: [tuple(split.dataset.example(i)[0]) for i in range(len(split.dataset))]
        for name, split in bundle.splits.items()
    }
    return train, splits


@pytest.mark.parametrize("recipe", sorted(REPETITIVE))
def test_no_evaluation_item_of_any_text_split_occurs_in_training(recipe):
    undeduplicated = build(recipe, **{"data.dedup": False})
    train, splits = token_sets(undeduplicated)
    overlap = {name: sum(item in train for item in items) for name, items in splits.items()}
    assert any(overlap.values()), "the setting should repeat training items without dedup"
    assert undeduplicated.info["train_overlap"] == overlap  # the reported overlap is right

    bundle = build(recipe)
    train, splits = token_sets(bundle)
    for name, items in splits.items():
        assert len(items) == 20
        assert not any(item in train for item in items), f"{recipe}/{name} repeats training"
    assert bundle.info["train_overlap"] == dict.fromkeys(bundle.splits, 0)


@pytest.mark.parametrize("recipe", sorted(REPETITIVE))
def test_deduplicated_splits_are_deterministic_from_the_seed(recipe):
    first, second = token_sets(build(recipe)), token_sets(build(recipe))
    assert first == second
    other_seed = token_sets(build(recipe, **{"data.seed": 1}))
    assert other_seed[1] != first[1]


def test_default_counting_splits_hold_no_training_program():
    config = {**get_recipe("counting").defaults, "data.train_size": 1000, "data.eval_size": 100}
    for num_vars in (1, 3):
        bundle = get_recipe("counting").build_data(
            {**config, "data.num_vars": num_vars}, None, False
        )
        assert bundle.info["train_overlap"] == dict.fromkeys(bundle.splits, 0)


def test_a_task_too_small_for_its_splits_fails_within_the_draw_budget():
    with pytest.raises(UserError, match="not training items"):
        build("counting", **{"data.min_statements": 1, "data.max_statements": 1})


@pytest.mark.parametrize("recipe", sorted(REPETITIVE))
def test_paper_presets_follow_the_authors_run_script(recipe):
    paper = get_recipe(recipe).presets["paper"]
    assert paper["model.attn_dropout"] == 0.1 and paper["model.dropout"] == 0.1
    assert paper["model.cope_scale_logits"] is True  # their code divides by sqrt(d)
    small = {**get_recipe(recipe).defaults, **get_recipe(recipe).presets["small"]}
    assert small.get("model.cope_scale_logits", False) is False  # the paper's formula
