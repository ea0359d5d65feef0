"""Specification of the `counting` recipe: programs, answers, splits, model."""

from __future__ import annotations

import random

import pytest
import torch

from recipes.base import IGNORE_INDEX, UserError, get_recipe, pad_collate
from recipes.counting import MAX_VALUE, VARIABLE_NAMES, generate_program


def small_config(**overrides: object) -> dict:
    """The recipe's defaults with small splits, so tests stay fast."""
    recipe = get_recipe("counting")
    config = {**recipe.defaults, "data.train_size": 64, "data.eval_size": 120}
    config.update(overrides)
    return config


def interpret(tokens: list[str]) -> tuple[list[list[str]], int]:
    """Run a program independently of the generator: its statements and the asked value.

    Fails on anything the task does not allow: unknown statements, an increment of an unset
    variable or past the cap of 10, a question about an unset variable.
    """
    assert tokens[-1] == "?", "a program ends with its question"
    asked = tokens[-2]
    body = tokens[:-2]
    assert body and body[-1] == ";", "every statement ends with ';'"
    statements: list[list[str]] = []
    current: list[str] = []
    for token in body:
        current.append(token)
        if token == ";":
            statements.append(current)
            current = []
    values: dict[str, int] = {}
    for statement in statements:
        if statement == ["pass", ";"]:
            continue
        name, *rest = statement
        assert name in VARIABLE_NAMES
        if rest == ["=", "0", ";"]:
            values[name] = 0
        elif rest == ["++", ";"]:
            assert name in values, "increment of a variable that was never set"
            values[name] += 1
            assert values[name] <= MAX_VALUE, "an increment past the cap was not turned to pass"
        else:
            raise AssertionError(f"not a statement of the task: {statement}")
    assert asked in values, "question about a variable that was never set"
    return statements, values[asked]


@pytest.mark.parametrize("num_vars", [1, 3, 5])
def test_answers_equal_the_value_an_independent_interpreter_computes(num_vars: int) -> None:
    bundle = get_recipe("counting").build_data(
        small_config(**{"data.num_vars": num_vars}), None, False
    )
    seen_names: set[str] = set()
    seen_values: set[int] = set()
    for split in ("test", "long", "more-pass"):
        dataset = bundle.splits[split].dataset
        for index in range(len(dataset)):
            tokens, answers = dataset.example(index)
            statements, value = interpret(tokens)
            assert answers[-1] == value
            assert all(answer == IGNORE_INDEX for answer in answers[:-1]), "loss on answer only"
            item = dataset[index]
            assert item["targets"][-1].item() == value
            assert item["inputs"].shape == item["targets"].shape
            seen_names.update(s[0] for s in statements if s[0] != "pass")
            seen_values.add(value)
    assert seen_names == set(VARIABLE_NAMES[:num_vars])
    assert len(seen_values) > 3, "answers should not be nearly constant"


def test_increment_past_ten_is_written_as_pass() -> None:
    rng = random.Random(3)
    tokens, answers = generate_program(
        rng,
        num_vars=1,
        min_statements=40,
        max_statements=40,
        set_weight=1e-6,
        pass_weight=0.0,
        increment_weight=1.0,
    )
    statements, value = interpret(tokens)
    assert value == MAX_VALUE == answers[-1]
    assert len(statements) == 40
    assert statements.count(["pass", ";"]) >= 40 - 1 - MAX_VALUE


def test_statement_counts_follow_the_split_ranges() -> None:
    config = small_config()
    bundle = get_recipe("counting").build_data(config, None, False)

    def counts(split: str) -> list[int]:
        dataset = bundle.splits[split].dataset
        return [len(interpret(dataset.example(i)[0])[0]) for i in range(len(dataset))]

    test, long = counts("test"), counts("long")
    assert config["data.min_statements"] <= min(test) and max(test) <= config["data.max_statements"]
    assert min(long) >= config["data.long_min_statements"] > max(test)
    assert max(long) <= config["data.long_max_statements"]
    assert bundle.splits["long"].ood and bundle.splits["more-pass"].ood
    assert not bundle.splits["test"].ood
    assert (
        max(len(bundle.splits["long"].dataset[i]["inputs"]) for i in range(120))
        <= (bundle.info["max_len"])
    )


def test_more_pass_split_keeps_the_work_and_adds_pass_statements() -> None:
    bundle = get_recipe("counting").build_data(small_config(), None, False)

    def profile(split: str) -> tuple[float, float]:
        dataset = bundle.splits[split].dataset
        passes = work = 0
        for index in range(len(dataset)):
            statements, _ = interpret(dataset.example(index)[0])
            passes += statements.count(["pass", ";"])
            work += len(statements) - statements.count(["pass", ";"])
        return passes / (passes + work), work / len(dataset)

    test_share, test_work = profile("test")
    more_share, more_work = profile("more-pass")
    assert more_share > test_share + 0.03
    assert abs(more_work - test_work) < 0.25 * test_work, "same assignments and increments"


def test_same_data_seed_gives_same_programs_and_other_seed_other_programs() -> None:
    recipe = get_recipe("counting")
    first = recipe.build_data(small_config(), None, False)
    again = recipe.build_data(small_config(**{"train.seed": 7, "seed": 7}), None, False)
    other = recipe.build_data(small_config(**{"data.seed": 1}), None, False)
    for split in ("val", "test", "long"):
        a, b, c = (bundle.splits[split].dataset for bundle in (first, again, other))
        assert all(torch.equal(a[i]["inputs"], b[i]["inputs"]) for i in range(20))
        assert sum(torch.equal(a[i]["inputs"], c[i]["inputs"]) for i in range(20)) < 3
    assert torch.equal(first.train[5]["inputs"], again.train[5]["inputs"])
    val, test = first.splits["val"].dataset, first.splits["test"].dataset
    assert sum(torch.equal(val[i]["inputs"], test[i]["inputs"]) for i in range(20)) < 3


def test_bad_number_of_variables_is_a_user_error() -> None:
    with pytest.raises(UserError, match="num_vars"):
        get_recipe("counting").build_data(small_config(**{"data.num_vars": 9}), None, False)


@pytest.mark.parametrize("pe", ["cope", "abs"])
def test_model_gives_eleven_answer_logits_per_token(pe: str) -> None:
    recipe = get_recipe("counting")
    config = small_config(**{"model.pe": pe})
    bundle = recipe.build_data(config, None, False)
    model = recipe.build_model(config, bundle.info)
    batch = pad_collate([bundle.splits["long"].dataset[i] for i in range(3)])
    logits = model(batch["inputs"], batch.get("padding_mask"))
    assert logits.shape == (*batch["inputs"].shape, 11)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    assert torch.isfinite(loss)


def test_too_short_max_len_is_a_user_error() -> None:
    recipe = get_recipe("counting")
    config = small_config(**{"model.max_len": 100})
    bundle = recipe.build_data(config, None, False)
    with pytest.raises(UserError, match="max_len"):
        recipe.build_model(config, bundle.info)
