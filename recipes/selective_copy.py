"""`selective-copy`: copy the coloured tokens in order, ignoring the blanks.

The selective copying task of Gu & Dao (2023), as used by the CoPE paper (Sec. 5.1). A context
of ``data.num_tokens`` coloured tokens scattered at random among a random number of blanks,
a separator, then the coloured tokens again, in order::

    c3 . . c0 . c3 . . . c5 . | c3 c0 c3 c5

As a causal language model (teacher forcing), the answer due at the separator is the first
coloured token and the answer due at the k-th copied token is the (k+1)-th: the target at each
output position is the colour (class = colour index) of the next coloured token of the context;
every context position is IGNORE_INDEX. The last coloured token is predicted and not fed back.

Copying the k-th output means finding the k-th non-blank token of the context: a position that
counts only coloured tokens does this at any density of blanks, a token index does not.
Splits: ``val``/``test`` as training; OOD ``sparse`` (many more blanks) and ``dense`` (fewer).
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
    check_range,
    option,
)
from recipes.base import (
    IGNORE_INDEX,
    Config,
    DataBundle,
    UserError,
    register_recipe,
)

BLANK = "."
SEPARATOR = "|"
MAX_COLORS = 64


def color_token(color: int) -> str:
    """The token of colour ``color`` (which is also its answer class)."""
    return f"c{color}"


def vocabulary(num_colors: int) -> Vocabulary:
    """Blank, separator and ``num_colors`` colours."""
    return Vocabulary([BLANK, SEPARATOR, *(color_token(color) for color in range(num_colors))])


def generate_copy(
    rng: random.Random, *, num_tokens: int, num_colors: int, min_blanks: int, max_blanks: int
) -> tuple[list[str], list[int]]:
    """One context + separator + copy, with the next colour as the answer at every output."""
    colors = [rng.randrange(num_colors) for _ in range(num_tokens)]
    blanks = rng.randint(min_blanks, max_blanks)
    # Choose which slots of the context hold the coloured tokens; the others are blanks.
    colored_slots = sorted(rng.sample(range(num_tokens + blanks), num_tokens))
    context = [BLANK] * (num_tokens + blanks)
    for slot, color in zip(colored_slots, colors, strict=True):
        context[slot] = color_token(color)
    copy = [color_token(color) for color in colors[:-1]]
    tokens = [*context, SEPARATOR, *copy]
    answers = [IGNORE_INDEX] * len(context) + colors
    return tokens, answers


def longest_sequence(num_tokens: int, max_blanks: int) -> int:
    """Tokens of the longest example: context, separator and all but the last colour."""
    return 2 * num_tokens + max_blanks


SMALL: Config = {
    **SMALL_MODEL,
    **SMALL_TRAIN,
    "model.npos": 32,
    "model.max_len": longest_sequence(8, 192),
    "data.train_size": 32000,
    "data.eval_size": 1000,
    "data.num_tokens": 8,
    "data.num_colors": 8,
    "data.min_blanks": 16,
    "data.max_blanks": 48,
    "data.sparse_min_blanks": 128,
    "data.sparse_max_blanks": 192,
    "data.dense_min_blanks": 0,
    "data.dense_max_blanks": 8,
}

PAPER: Config = {
    **PAPER_MODEL,
    **PAPER_TRAIN,
    "model.npos": longest_sequence(16, 1024) + 1,  # max length + 1, as the paper
    "model.max_len": longest_sequence(16, 1024),
    "train.steps": 15625,
    "data.train_size": 10000,
    "data.eval_size": 1000,
    "data.num_tokens": 16,
    "data.num_colors": 16,
    "data.min_blanks": 128,
    "data.max_blanks": 256,
    "data.sparse_min_blanks": 768,
    "data.sparse_max_blanks": 1024,
    "data.dense_min_blanks": 0,
    "data.dense_max_blanks": 32,
}


@register_recipe
class SelectiveCopy(SparseDenseTask):
    """Copy the coloured tokens of a context in order, skipping the blanks between them."""

    name = "selective-copy"
    task = "the coloured tokens of the context, in order, ignoring blanks (per-token error)"
    defaults: Config = {**TEXT_DEFAULTS, **SMALL}
    presets: dict[str, Config] = {"small": SMALL, "paper": PAPER}

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Generated copy problems: deterministic from data.seed, independent per split."""
        seed = option(config, "data.seed", int)
        num_tokens = option(config, "data.num_tokens", int)
        num_colors = option(config, "data.num_colors", int)
        if num_tokens < 1:
            raise UserError(f"data.num_tokens must be at least 1, got {num_tokens}")
        if not 2 <= num_colors <= MAX_COLORS:
            raise UserError(f"data.num_colors must be 2 to {MAX_COLORS}, got {num_colors}")
        ranges: dict[str, tuple[int, int]] = {}
        for split, prefix in (
            ("test", "data."),
            ("sparse", "data.sparse_"),
            ("dense", "data.dense_"),
        ):
            low = option(config, f"{prefix}min_blanks", int)
            high = option(config, f"{prefix}max_blanks", int)
            check_range(f"{prefix}min_blanks", low, f"{prefix}max_blanks", high, minimum=0)
            ranges[split] = (low, high)
        words = vocabulary(num_colors)

        def dataset(split: str, size: int, blanks: tuple[int, int]) -> GeneratedTokenDataset:
            def make(rng: random.Random) -> tuple[list[str], list[int]]:
                return generate_copy(
                    rng,
                    num_tokens=num_tokens,
                    num_colors=num_colors,
                    min_blanks=blanks[0],
                    max_blanks=blanks[1],
                )

            return GeneratedTokenDataset(
                make, words, size=size, seed=seed, split=split, cache=split != "train"
            )

        info = {
            "vocab_size": len(words),
            "vocabulary": words.tokens,
            "num_classes": num_colors,
            "max_len": longest_sequence(num_tokens, max(high for _, high in ranges.values())),
            "answer_names": [color_token(color) for color in range(num_colors)],
        }
        return self.sparse_dense_bundle(
            config,
            dataset,
            ranges,
            lambda blanks: f"{num_tokens} coloured tokens among {blanks[0]}-{blanks[1]} blanks",
            info,
        )
