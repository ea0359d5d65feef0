"""Specification of the `selective-copy` recipe: copy targets, blank densities, model."""

from __future__ import annotations

import pytest
import torch

from recipes.base import IGNORE_INDEX, UserError, get_recipe, pad_collate
from recipes.selective_copy import BLANK, SEPARATOR


def small_config(**overrides: object) -> dict:
    """The recipe's defaults with small splits, so tests stay fast."""
    recipe = get_recipe("selective-copy")
    config = {**recipe.defaults, "data.train_size": 64, "data.eval_size": 100}
    config.update(overrides)
    return config


def rederive(tokens: list[str]) -> tuple[list[str], int, list[int]]:
    """From the tokens alone: the coloured tokens of the context, its blanks, and the answers
    a perfect copier gives (class = colour number) at the separator and each copied token."""
    separator = tokens.index(SEPARATOR)
    context, copy = tokens[:separator], tokens[separator + 1 :]
    colored = [token for token in context if token != BLANK]
    assert copy == colored[:-1], "the tokens after the separator are the coloured ones, in order"
    expected = [IGNORE_INDEX] * separator + [int(token.removeprefix("c")) for token in colored]
    return colored, len(context) - len(colored), expected


def test_targets_are_the_coloured_tokens_in_order_recomputed_from_the_context() -> None:
    config = small_config()
    bundle = get_recipe("selective-copy").build_data(config, None, False)
    for split in ("test", "sparse", "dense"):
        dataset = bundle.splits[split].dataset
        for index in range(len(dataset)):
            tokens, answers = dataset.example(index)
            colored, _, expected = rederive(tokens)
            assert len(colored) == config["data.num_tokens"]
            assert answers == expected
            assert dataset[index]["targets"].tolist() == expected
            assert len(tokens) <= bundle.info["max_len"]


def test_sparse_split_has_more_blanks_and_dense_split_fewer_than_training() -> None:
    config = small_config()
    bundle = get_recipe("selective-copy").build_data(config, None, False)

    def blanks(split: str) -> list[int]:
        dataset = bundle.splits[split].dataset
        return [rederive(dataset.example(i)[0])[1] for i in range(len(dataset))]

    test, sparse, dense = blanks("test"), blanks("sparse"), blanks("dense")
    assert config["data.min_blanks"] <= min(test) and max(test) <= config["data.max_blanks"]
    assert min(sparse) > max(test)
    assert max(dense) < min(test)
    assert len(set(test)) > 5, "the number of blanks varies within a split"
    assert bundle.splits["sparse"].ood and bundle.splits["dense"].ood


def test_coloured_tokens_sit_at_varying_places() -> None:
    bundle = get_recipe("selective-copy").build_data(small_config(), None, False)
    dataset = bundle.splits["test"].dataset
    first_places = {
        dataset.example(i)[0].index(next(t for t in dataset.example(i)[0] if t != BLANK))
        for i in range(50)
    }
    assert len(first_places) > 3


def test_same_data_seed_same_problems_other_seed_other_problems() -> None:
    recipe = get_recipe("selective-copy")
    first = recipe.build_data(small_config(), None, False)
    again = recipe.build_data(small_config(**{"train.seed": 3}), None, False)
    other = recipe.build_data(small_config(**{"data.seed": 2}), None, False)
    for split in ("test", "sparse", "dense"):
        a, b, c = (bundle.splits[split].dataset for bundle in (first, again, other))
        assert all(torch.equal(a[i]["inputs"], b[i]["inputs"]) for i in range(20))
        assert not any(torch.equal(a[i]["inputs"], c[i]["inputs"]) for i in range(20))


def test_inverted_blank_range_is_a_user_error() -> None:
    config = small_config(**{"data.min_blanks": 30, "data.max_blanks": 10})
    with pytest.raises(UserError, match="min_blanks"):
        get_recipe("selective-copy").build_data(config, None, False)


@pytest.mark.parametrize("pe", ["cope", "rel"])
def test_model_gives_one_colour_distribution_per_token(pe: str) -> None:
    recipe = get_recipe("selective-copy")
    config = small_config(**{"model.pe": pe})
    bundle = recipe.build_data(config, None, False)
    model = recipe.build_model(config, bundle.info)
    batch = pad_collate([bundle.splits["sparse"].dataset[i] for i in range(3)])
    logits = model(batch["inputs"], batch.get("padding_mask"))
    assert logits.shape == (*batch["inputs"].shape, config["data.num_colors"])
    assert torch.isfinite(logits).all()
