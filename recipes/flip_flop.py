"""`flip-flop`: flip-flop language modelling (Liu et al. 2023), as in the CoPE paper (Sec. 5.1).

A sequence of ``data.length`` instructions, each followed by a bit::

    w 1 i 0 i 1 r 1 w 0 i 1 i 1 r 0 ...

``w b`` writes b, ``i b`` is to be ignored, ``r b`` reads: b is the last written bit. The first
instruction is a write and the last a read (so every sequence asks at least once); the others
are ``i`` with probability ``p_ignore`` and ``w`` or ``r`` with (1 - p_ignore)/2 each. Written
and ignored bits are uniform.

As a causal language model, the only deterministic next tokens are the bits after ``r``: the
target at every ``r`` is that bit (class 0 or 1), every other position is IGNORE_INDEX (Liu et
al. likewise score only the read bits). The error is per read (token-level), not per sequence.
Splits: train/val/test with p_ignore 0.8; OOD ``sparse`` (0.98: reads far from their write)
and ``dense`` (0.1: many writes and reads).
"""

from __future__ import annotations

import random
from pathlib import Path

from recipes._text import (
    PAPER_MODEL,
    PAPER_TRAIN,
    SMALL_MODEL,
    SMALL_TRAIN,
    TEXT_DEFAULTS,
    GeneratedTokenDataset,
    SparseDenseTask,
    Vocabulary,
    check_probability,
    option,
)
from recipes.base import (
    IGNORE_INDEX,
    Config,
    DataBundle,
    UserError,
    register_recipe,
)

WRITE, IGNORE, READ = "w", "i", "r"
BITS = ("0", "1")
VOCABULARY = Vocabulary([WRITE, IGNORE, READ, *BITS])
NUM_CLASSES = 2


def generate_flip_flop(
    rng: random.Random, *, length: int, p_ignore: float
) -> tuple[list[str], list[int]]:
    """One flip-flop sequence of ``length`` instruction-bit pairs, answers at the reads."""
    tokens: list[str] = []
    answers: list[int] = []
    memory = 0
    for step in range(length):
        if step == 0:
            instruction = WRITE
        elif step == length - 1:
            instruction = READ
        elif rng.random() < p_ignore:
            instruction = IGNORE
        else:
            instruction = rng.choice((WRITE, READ))
        if instruction == READ:
            bit = memory
            answers += [bit, IGNORE_INDEX]
        else:
            bit = rng.randrange(2)
            answers += [IGNORE_INDEX, IGNORE_INDEX]
            if instruction == WRITE:
                memory = bit
        tokens += [instruction, BITS[bit]]
    return tokens, answers


SMALL: Config = {
    **SMALL_MODEL,
    **SMALL_TRAIN,
    "model.npos": 32,
    "model.max_len": 2 * 32,
    "data.train_size": 32000,
    "data.eval_size": 1000,
    "data.length": 32,  # 64 tokens: short enough for a 3 x 3 comparison on 2 CPUs
    "data.p_ignore": 0.8,
    "data.sparse_p_ignore": 0.98,
    "data.dense_p_ignore": 0.1,
}

PAPER: Config = {
    **PAPER_MODEL,
    **PAPER_TRAIN,
    "model.npos": 2 * 256 + 1,  # max length + 1, as the paper
    "model.max_len": 2 * 256,
    "train.steps": 15625,
    "data.train_size": 10000,
    "data.eval_size": 1000,
    "data.length": 256,  # Liu et al.'s T = 512 tokens
    "data.p_ignore": 0.8,
    "data.sparse_p_ignore": 0.98,
    "data.dense_p_ignore": 0.1,
}


@register_recipe
class FlipFlop(SparseDenseTask):
    """Recall the last written bit at every read, ignoring the ignore instructions."""

    name = "flip-flop"
    task = "the last written bit at each read of a write/ignore/read sequence (per-read error)"
    defaults: Config = {**TEXT_DEFAULTS, **SMALL}
    presets: dict[str, Config] = {"small": SMALL, "paper": PAPER}

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Generated sequences: deterministic from data.seed, independent per split."""
        seed = option(config, "data.seed", int)
        length = option(config, "data.length", int)
        if length < 2:
            raise UserError(f"data.length must be at least 2 instructions, got {length}")
        ignore: dict[str, float] = {}
        for split_name, key in (
            ("test", "data.p_ignore"),
            ("sparse", "data.sparse_p_ignore"),
            ("dense", "data.dense_p_ignore"),
        ):
            ignore[split_name] = option(config, key, float)
            check_probability(key, ignore[split_name])

        def dataset(split: str, size: int, p_ignore: float) -> GeneratedTokenDataset:
            def make(rng: random.Random) -> tuple[list[str], list[int]]:
                return generate_flip_flop(rng, length=length, p_ignore=p_ignore)

            return GeneratedTokenDataset(
                make, VOCABULARY, size=size, seed=seed, split=split, cache=split != "train"
            )

        info = {
            "vocab_size": len(VOCABULARY),
            "vocabulary": VOCABULARY.tokens,
            "num_classes": NUM_CLASSES,
            "max_len": 2 * length,
            "answer_names": list(BITS),
        }
        return self.sparse_dense_bundle(
            config,
            dataset,
            ignore,
            lambda p_ignore: f"{length} instructions, p_ignore {p_ignore:g}",
            info,
        )
