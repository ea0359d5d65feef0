"""`counting`: the CoPE paper's counting task (Golovneva et al. 2024, Sec. 5.2).

A program of statements over 1, 3 or 5 variables, then a question about one variable::

    x = 0 ; pass ; x ++ ; pass ; pass ; y = 0 ; x ++ ; ... x ?

The answer is the variable's value at the end (0-10). Statements are drawn with the weights
of the authors' generator (``scripts/count_data_gen.py`` in facebookresearch/RAM): ``v = 0 ;``
1, ``pass ;`` 50, ``v ++ ;`` 7; an increment needs a variable that was set, and an increment
of a variable already at 10 is written as ``pass ;`` (values are capped at 10). A program in
which no variable was set is redrawn, length included, as in the authors' generator.

Answers: the model is a causal TokenClassifier with an 11-way head (one class per value), and
the only target of a program is at its last token, the ``?`` of the question ``v ?`` (the
position whose next token would be the answer); every other position is IGNORE_INDEX, so the
loss is on the answer only.

Splits: ``val`` and ``test`` as training; OOD ``long`` (longer programs) and ``more-pass``
(training-like programs with as many extra ``pass ;`` statements again inserted at random
places: the same assignments and increments, further apart). No evaluation program is a
training program (``data.dedup``, :func:`recipes._text.separate_from_training`): with these
weights about half of the programs drawn like training repeat one, so ``val``/``test`` are drawn
from the programs training did not see, which are longer and rarer on average.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from recipes._text import (
    PAPER_MODEL,
    PAPER_TRAIN,
    SMALL_MODEL,
    SMALL_TRAIN,
    TEXT_DEFAULTS,
    GeneratedTextTask,
    GeneratedTokenDataset,
    Vocabulary,
    check_range,
    option,
)
from recipes.base import (
    IGNORE_INDEX,
    Config,
    DataBundle,
    Split,
    UserError,
    register_recipe,
)

VARIABLE_NAMES = ("x", "y", "z", "u", "v")
MAX_VALUE = 10
NUM_CLASSES = MAX_VALUE + 1
STATEMENT_TOKENS = ("=", "0", ";", "pass", "++", "?")
VOCABULARY = Vocabulary([*VARIABLE_NAMES, *STATEMENT_TOKENS])
LONGEST_STATEMENT = 4  # "x = 0 ;"
QUESTION_TOKENS = 2  # "x ?"


def longest_program(max_statements: int) -> int:
    """Upper bound on the tokens of a program of ``max_statements`` statements and its question."""
    return LONGEST_STATEMENT * max_statements + QUESTION_TOKENS


def generate_program(
    rng: random.Random,
    *,
    num_vars: int,
    min_statements: int,
    max_statements: int,
    set_weight: float,
    pass_weight: float,
    increment_weight: float,
    extra_pass_factor: float = 0.0,
) -> tuple[list[str], list[int]]:
    """One program and question as tokens, with the answer class at the final ``?``.

    ``extra_pass_factor`` > 0 then inserts round(factor x statements) further ``pass ;``
    statements at random places: the same assignments and increments, further apart.
    """
    names = VARIABLE_NAMES[:num_vars]
    while True:
        values: dict[str, int] = {}
        statements: list[list[str]] = []
        for _ in range(rng.randint(min_statements, max_statements)):
            # Before any assignment an increment has no variable to act on: draw set or pass.
            if values:
                weights = (set_weight, pass_weight, increment_weight)
                op = rng.choices(("set", "pass", "inc"), weights)[0]
            else:
                op = rng.choices(("set", "pass"), (set_weight, pass_weight))[0]
            if op == "set":
                name = rng.choice(names)
                values[name] = 0
                statements.append([name, "=", "0", ";"])
            elif op == "inc":
                name = rng.choice(sorted(values))
                if values[name] >= MAX_VALUE:
                    statements.append(["pass", ";"])  # the cap: an increment past 10 is a pass
                else:
                    values[name] += 1
                    statements.append([name, "++", ";"])
            else:
                statements.append(["pass", ";"])
        if values:
            break
    for _ in range(round(extra_pass_factor * len(statements))):
        statements.insert(rng.randint(0, len(statements)), ["pass", ";"])
    asked = rng.choice(sorted(values))
    tokens = [token for statement in statements for token in statement] + [asked, "?"]
    answers = [IGNORE_INDEX] * (len(tokens) - 1) + [values[asked]]
    return tokens, answers


def _program_maker(config: Config, *, lengths: tuple[int, int], extra_pass_factor: float) -> Any:
    """A generator ``rng -> (tokens, answers)`` for one split."""
    num_vars = option(config, "data.num_vars", int)
    weights = {
        "set_weight": option(config, "data.set_weight", float),
        "pass_weight": option(config, "data.pass_weight", float),
        "increment_weight": option(config, "data.increment_weight", float),
    }

    def make(rng: random.Random) -> tuple[list[str], list[int]]:
        return generate_program(
            rng,
            num_vars=num_vars,
            min_statements=lengths[0],
            max_statements=lengths[1],
            extra_pass_factor=extra_pass_factor,
            **weights,
        )

    return make


SMALL: Config = {
    **SMALL_MODEL,
    **SMALL_TRAIN,
    "model.npos": 32,  # the prototype: npos 32 was as good as 259 in distribution
    "model.max_len": longest_program(64),
    "data.train_size": 32000,  # steps x batch: every training program is fresh
    "data.eval_size": 1000,
    # Half the prototype's 3-64 statements: CoPE's steps cost ~3x absolute PE's on CPU, and a
    # 3 x 3 comparison has to fit in minutes on 2 shared CPUs.
    "data.min_statements": 3,
    "data.max_statements": 32,
    "data.long_min_statements": 33,
    "data.long_max_statements": 64,
}

PAPER: Config = {
    **PAPER_MODEL,
    **PAPER_TRAIN,
    "model.npos": 513,  # the authors' block size 512, plus one
    "model.max_len": longest_program(1024),
    "train.steps": 15625,  # 100 epochs of 10k programs at batch 64
    "data.train_size": 10000,
    "data.eval_size": 1000,
    "data.min_statements": 3,
    "data.max_statements": 512,
    "data.long_min_statements": 513,
    "data.long_max_statements": 1024,
}


@register_recipe
class Counting(GeneratedTextTask):
    """Value of a variable after a program of `v = 0 ;`, `v ++ ;` and `pass ;` statements."""

    name = "counting"
    task = "value (0-10) of a variable after a program of assignments, increments and passes"
    defaults: Config = {
        **TEXT_DEFAULTS,
        "data.num_vars": 1,
        "data.set_weight": 1.0,
        "data.pass_weight": 50.0,
        "data.increment_weight": 7.0,
        "data.more_pass_factor": 1.0,
        **SMALL,
    }
    presets: dict[str, Config] = {"small": SMALL, "paper": PAPER}

    def split_names(self) -> list[str]:
        """Evaluation splits: in distribution, then the OOD ones."""
        return ["val", "test", "long", "more-pass"]

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Generated programs: deterministic from data.seed, independent per split."""
        num_vars = option(config, "data.num_vars", int)
        if not 1 <= num_vars <= len(VARIABLE_NAMES):
            raise UserError(f"data.num_vars must be 1 to {len(VARIABLE_NAMES)}, got {num_vars}")
        seed = option(config, "data.seed", int)
        shortest = option(config, "data.min_statements", int)
        longest = option(config, "data.max_statements", int)
        long_shortest = option(config, "data.long_min_statements", int)
        long_longest = option(config, "data.long_max_statements", int)
        check_range("data.min_statements", shortest, "data.max_statements", longest)
        check_range(
            "data.long_min_statements", long_shortest, "data.long_max_statements", long_longest
        )
        extra_passes = option(config, "data.more_pass_factor", float)
        weights = [
            option(config, f"data.{op}_weight", float) for op in ("set", "pass", "increment")
        ]
        if min(weights) < 0 or weights[0] == 0 or extra_passes < 0:
            raise UserError(
                "data.set_weight must be positive, data.pass_weight, data.increment_weight "
                "and data.more_pass_factor not negative"
            )
        train_size = option(config, "data.train_size", int)
        eval_size = option(config, "data.eval_size", int)

        def dataset(
            split: str, size: int, lengths: tuple[int, int], extra: float = 0.0
        ) -> GeneratedTokenDataset:
            make = _program_maker(config, lengths=lengths, extra_pass_factor=extra)
            # Training items are drawn once each (fresh programs): caching them buys nothing.
            return GeneratedTokenDataset(
                make, VOCABULARY, size=size, seed=seed, split=split, cache=split != "train"
            )

        lengths = (shortest, longest)
        described = f"{shortest}-{longest} statements"
        splits = {
            "val": Split(dataset("val", eval_size, lengths), description=described),
            "test": Split(dataset("test", eval_size, lengths), description=described),
            "long": Split(
                dataset("long", eval_size, (long_shortest, long_longest)),
                ood=True,
                description=f"{long_shortest}-{long_longest} statements",
            ),
            "more-pass": Split(
                dataset("more-pass", eval_size, lengths, extra_passes),
                ood=True,
                description=f"{described} plus {extra_passes:g}x as many extra pass statements",
            ),
        }
        most_statements = max(long_longest, round(longest * (1 + extra_passes)))
        info = {
            "vocab_size": len(VOCABULARY),
            "vocabulary": VOCABULARY.tokens,
            "num_classes": NUM_CLASSES,
            "max_len": longest_program(most_statements),
            "answer_names": [str(value) for value in range(NUM_CLASSES)],
        }
        return self.text_bundle(config, dataset("train", train_size, lengths), splits, info)


def majority_error(dataset: GeneratedTokenDataset) -> float:
    """Error (%) of always answering the split's most common value: the floor to beat."""
    answers = Counter()
    for index in range(len(dataset)):
        _, targets = dataset.example(index)
        answers.update(answer for answer in targets if answer != IGNORE_INDEX)
    return 100.0 * (1.0 - answers.most_common(1)[0][1] / sum(answers.values()))
