"""Specification of the `flip-flop` recipe: read answers, ignore rates, model."""

from __future__ import annotations

import pytest
import torch

from recipes.base import IGNORE_INDEX, UserError, get_recipe, pad_collate


def small_config(**overrides: object) -> dict:
    """The recipe's defaults with small splits, so tests stay fast."""
    recipe = get_recipe("flip-flop")
    config = {**recipe.defaults, "data.train_size": 64, "data.eval_size": 200}
    config.update(overrides)
    return config


def rederive(tokens: list[str]) -> tuple[list[str], list[int]]:
    """From the tokens alone: the instructions, and the answer due at each position (the last
    written bit at every read, nothing elsewhere). Checks each read's bit is that answer."""
    assert len(tokens) % 2 == 0
    instructions, bits = tokens[0::2], tokens[1::2]
    assert set(instructions) <= {"w", "i", "r"} and set(bits) <= {"0", "1"}
    expected: list[int] = []
    memory = None
    for instruction, bit in zip(instructions, bits, strict=True):
        if instruction == "r":
            assert memory is not None, "a read before any write"
            assert int(bit) == memory, "the bit after a read is the last written bit"
            expected += [memory, IGNORE_INDEX]
        else:
            if instruction == "w":
                memory = int(bit)
            expected += [IGNORE_INDEX, IGNORE_INDEX]
    return instructions, expected


def test_read_answers_are_the_last_written_bit_recomputed_independently() -> None:
    config = small_config()
    bundle = get_recipe("flip-flop").build_data(config, None, False)
    for split in ("test", "sparse", "dense"):
        dataset = bundle.splits[split].dataset
        for index in range(len(dataset)):
            tokens, answers = dataset.example(index)
            instructions, expected = rederive(tokens)
            assert len(instructions) == config["data.length"]
            assert instructions[0] == "w" and instructions[-1] == "r"
            assert answers == expected
            assert dataset[index]["targets"].tolist() == expected


@pytest.mark.parametrize(
    ("split", "key"),
    [
        ("test", "data.p_ignore"),
        ("sparse", "data.sparse_p_ignore"),
        ("dense", "data.dense_p_ignore"),
    ],
)
def test_share_of_ignore_instructions_matches_the_split(split: str, key: str) -> None:
    config = small_config()
    bundle = get_recipe("flip-flop").build_data(config, None, False)
    dataset = bundle.splits[split].dataset
    ignores = total = 0
    for index in range(len(dataset)):
        instructions = dataset.example(index)[0][0::2][1:-1]  # first and last are fixed
        ignores += instructions.count("i")
        total += len(instructions)
    assert abs(ignores / total - config[key]) < 0.02
    assert bundle.splits[split].ood == (split != "test")


def test_sparse_reads_are_further_from_their_write_than_dense_reads() -> None:
    bundle = get_recipe("flip-flop").build_data(small_config(), None, False)

    def mean_distance(split: str) -> float:
        dataset = bundle.splits[split].dataset
        distances = []
        for index in range(len(dataset)):
            instructions = dataset.example(index)[0][0::2]
            last_write = 0
            for step, instruction in enumerate(instructions):
                if instruction == "w":
                    last_write = step
                elif instruction == "r":
                    distances.append(step - last_write)
        return sum(distances) / len(distances)

    assert mean_distance("sparse") > mean_distance("test") > mean_distance("dense")


def test_same_data_seed_same_sequences_other_seed_other_sequences() -> None:
    recipe = get_recipe("flip-flop")
    first = recipe.build_data(small_config(), None, False)
    again = recipe.build_data(small_config(**{"train.seed": 5}), None, False)
    other = recipe.build_data(small_config(**{"data.seed": 9}), None, False)
    for split in ("test", "sparse", "dense"):
        a, b, c = (bundle.splits[split].dataset for bundle in (first, again, other))
        assert all(torch.equal(a[i]["inputs"], b[i]["inputs"]) for i in range(20))
        assert not any(torch.equal(a[i]["inputs"], c[i]["inputs"]) for i in range(20))


def test_ignore_probability_outside_zero_one_is_a_user_error() -> None:
    with pytest.raises(UserError, match="p_ignore"):
        get_recipe("flip-flop").build_data(small_config(**{"data.p_ignore": 1.5}), None, False)


@pytest.mark.parametrize("pe", ["cope", "rope"])
def test_model_gives_two_bit_logits_per_token(pe: str) -> None:
    recipe = get_recipe("flip-flop")
    config = small_config(**{"model.pe": pe})
    bundle = recipe.build_data(config, None, False)
    model = recipe.build_model(config, bundle.info)
    batch = pad_collate([bundle.splits["dense"].dataset[i] for i in range(2)])
    logits = model(batch["inputs"], batch.get("padding_mask"))
    assert logits.shape == (*batch["inputs"].shape, 2)
    assert torch.isfinite(logits).all()
