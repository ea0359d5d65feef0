"""Shared pieces of the generated text recipes (counting, selective-copy, flip-flop).

Each text task is a generator ``make(rng) -> (tokens, answers)``: a list of token strings and,
for every position, the answer class due there or IGNORE_INDEX. :class:`GeneratedTokenDataset`
turns such a generator into a map-style dataset whose item ``i`` is drawn from its own random
stream, seeded by ``(data.seed, split name, i)``. So the data is the same for every model seed
and every data order, every split is independent of the others, and nothing needs storing.

Clean evaluation splits (``data.dedup``, on by default): a generator can repeat itself (with the
authors' counting weights, 32,000 training programs hold only 17,152 distinct ones, and half of
a val split drawn like training repeats a training program), and an evaluation item that was
trained on measures memorisation. :func:`separate_from_training` therefore rebuilds every
evaluation split from the draws whose tokens hash to no training item: item ``i`` is the i-th
such draw of the split's stream, at most ``DRAW_BUDGET`` x size draws (then a UserError), so
the splits stay deterministic from the seed. Every recipe reports the overlap it then recounts
(``info["train_overlap"]``, split -> items also in training), shown by `cope data` and logged
by `cope train`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from recipes.base import (
    IGNORE_INDEX,
    Config,
    DataBundle,
    Recipe,
    Split,
    UserError,
    encoder_config,
    pad_collate,
)

PAD = "<pad>"  # index 0, the value pad_collate fills inputs with
Example = tuple[list[str], list[int]]  # tokens, answer class per position (IGNORE_INDEX: none)
Generator = Callable[[random.Random], Example]

# Draws an evaluation split may make per item it keeps, when it skips training items.
DRAW_BUDGET = 20


class Vocabulary:
    """Token strings <-> ids, with the padding token at id 0."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = [PAD, *tokens]
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"duplicate tokens in vocabulary: {self.tokens}")
        self.ids = {token: index for index, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of token strings (KeyError on an unknown token: a generator bug)."""
        return [self.ids[token] for token in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Token strings of ids."""
        return [self.tokens[int(index)] for index in ids]


def example_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one example: a string seed hashes the same in every process."""
    return random.Random(f"{seed}:{split}:{index}")


def token_digest(tokens: Sequence[str]) -> bytes:
    """A 16-byte hash of an item's tokens: what de-duplication compares (answers follow)."""
    return hashlib.blake2b("\x1f".join(tokens).encode(), digest_size=16).digest()


class GeneratedTokenDataset(Dataset):
    """``size`` examples of a generator, item ``i`` drawn from ``example_rng(seed, split, i)``.

    After :meth:`exclude`, item ``i`` is instead the i-th draw whose tokens are not excluded.
    Items are ``{"inputs": (T,) long token ids, "targets": (T,) long answer classes}``.
    Evaluation splits are small and read every evaluation, so they are cached once generated.
    """

    def __init__(
        self,
        make: Generator,
        vocabulary: Vocabulary,
        *,
        size: int,
        seed: int,
        split: str,
        cache: bool = True,
    ) -> None:
        if size < 1:
            raise UserError(f"the {split} split needs at least one example, got size {size}")
        self.make = make
        self.vocabulary = vocabulary
        self.size = size
        self.seed = seed
        self.split = split
        self.cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None
        self.draws: Sequence[int] = range(size)  # the stream index of each item

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> Example:
        """The raw (tokens, answers) of item ``index``, for tests and plots."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.make(example_rng(self.seed, self.split, self.draws[index]))

    def digests(self) -> set[bytes]:
        """The token digest of every item."""
        return {token_digest(self.example(index)[0]) for index in range(self.size)}

    def exclude(self, digests: set[bytes] | frozenset[bytes]) -> None:
        """Keep only draws whose tokens are not in ``digests``: the first ``size`` of them.

        Raises a UserError when ``DRAW_BUDGET`` x size draws do not give ``size`` such items.
        """
        budget = DRAW_BUDGET * self.size
        draws: list[int] = []
        for draw in range(budget):
            tokens, _ = self.make(example_rng(self.seed, self.split, draw))
            if token_digest(tokens) not in digests:
                draws.append(draw)
                if len(draws) == self.size:
                    break
        if len(draws) < self.size:
            raise UserError(
                f"the {self.split} split needs {self.size} items that are not training items, "
                f"but {budget} draws gave only {len(draws)}: the task has too few distinct "
                "items for these sizes; lower data.eval_size or data.train_size"
            )
        self.draws = draws
        if self.cache is not None:
            self.cache.clear()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        tokens, answers = self.example(index)
        item = {
            "inputs": torch.tensor(self.vocabulary.encode(tokens), dtype=torch.long),
            "targets": torch.tensor(answers, dtype=torch.long),
        }
        if self.cache is not None:
            self.cache[index] = item
        return item


# Training digests per data configuration, so a comparison's runs hash the training set once.
_TRAINING_DIGESTS: dict[str, frozenset[bytes]] = {}
_TRAINING_DIGESTS_KEPT = 4


def training_digests(recipe: str, config: Config, train: GeneratedTokenDataset) -> frozenset[bytes]:
    """Digests of every training item, cached per process by recipe and ``data.*`` options."""
    data_options = {key: value for key, value in config.items() if key.startswith("data.")}
    key = json.dumps([recipe, data_options], sort_keys=True, default=str)
    if key not in _TRAINING_DIGESTS:
        if len(_TRAINING_DIGESTS) >= _TRAINING_DIGESTS_KEPT:
            _TRAINING_DIGESTS.pop(next(iter(_TRAINING_DIGESTS)))
        _TRAINING_DIGESTS[key] = frozenset(train.digests())
    return _TRAINING_DIGESTS[key]


def separate_from_training(
    recipe: str, config: Config, train: GeneratedTokenDataset, splits: dict[str, Split]
) -> dict[str, int]:
    """Drop training items from every evaluation split (``data.dedup``); the overlap recounted.

    Returns split name -> number of its items whose tokens also occur in training (0 for
    every split when ``data.dedup`` is on).
    """
    training = training_digests(recipe, config, train)
    if option(config, "data.dedup", bool):
        for split in splits.values():
            split.dataset.exclude(training)
    return {
        name: sum(
            token_digest(split.dataset.example(index)[0]) in training
            for index in range(len(split.dataset))
        )
        for name, split in splits.items()
    }


def answer_positions(answers: Sequence[int]) -> list[int]:
    """Indices of the positions where an answer is due."""
    return [index for index, answer in enumerate(answers) if answer != IGNORE_INDEX]


def option(config: Config, key: str, kind: type, default: Any = None) -> Any:
    """``config[key]`` converted to ``kind`` (values from ``--set`` may arrive as strings)."""
    value = config.get(key, default)
    if value is None:
        raise UserError(f"option {key} is not set")
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"option {key} must be a {kind.__name__}, got {value!r}") from None


def check_range(key_low: str, low: int, key_high: str, high: int, minimum: int = 1) -> None:
    """Raise a UserError unless ``minimum <= low <= high``."""
    if low < minimum or high < low:
        raise UserError(
            f"options {key_low}={low} and {key_high}={high} must satisfy "
            f"{minimum} <= {key_low} <= {key_high}"
        )


def check_probability(key: str, value: float) -> None:
    """Raise a UserError unless ``0 <= value <= 1``."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"option {key} must lie in [0, 1], got {value}")


def build_token_model(config: Config, info: dict[str, Any]) -> nn.Module:
    """A causal (or not, as configured) TokenClassifier over the task's vocabulary.

    Fails with a UserError when the data's longest sequence exceeds ``model.max_len``: learned
    absolute positions and the default CoPE cap are sized from it; and for CoPE's rise gate,
    which reads input features that token ids do not have.
    """
    from encoders.frontends import TokenFrontend
    from encoders.transformer import TokenClassifier

    encoder = encoder_config(config)
    if encoder.pe.startswith("cope") and encoder.cope_gate == "rise":
        raise UserError(
            "model.cope_gate=rise reads the input features (audio frames, video pixels) and "
            "text tokens have none; use qk, onset, token or change"
        )
    longest = int(info["max_len"])
    if longest > encoder.max_len:
        raise UserError(
            f"the longest sequence of the data has {longest} tokens but model.max_len is "
            f"{encoder.max_len}; raise it with --set model.max_len={longest}"
        )
    frontend = TokenFrontend(int(info["vocab_size"]), encoder.dim)
    return TokenClassifier(frontend, encoder, int(info["num_classes"]))


def token_signal(item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """What ``cope positions`` draws beside a text example: its tokens as labels."""
    tokens = info["vocabulary"]
    return {"kind": "tokens", "labels": [tokens[int(index)] for index in item["inputs"]]}


# Presets shared by the text tasks. "small" is the prototype's (docs/tasks.md), which trains on
# 2 CPUs in minutes; "paper" is the CoPE paper's as the authors' run script trains it (run.sh in
# facebookresearch/RAM projects/cope: 4 layers x 256, 4 heads, post-norm, batch 64, Adam at
# 7e-5, --drop 0.1, which their code applies to the residual branches and the attention weights
# alike, and no --cope-nodiv, so their code divides CoPE's position logits by sqrt(d)).
SMALL_MODEL: Config = {
    "model.dim": 64,
    "model.depth": 2,
    "model.heads": 4,
    "model.mlp_dim": 256,
    "model.dropout": 0.0,
    "model.norm": "pre",
}
SMALL_TRAIN: Config = {
    "train.steps": 1000,
    "train.batch_size": 32,
    "train.lr": 1e-3,
    "train.optimizer": "adamw",
    "train.weight_decay": 0.01,
    "train.warmup_steps": 50,
    "train.schedule": "cosine",
    "train.grad_clip": 1.0,
    "train.eval_every": 250,
    "train.eval_batch_size": 50,
}
PAPER_MODEL: Config = {
    "model.dim": 256,
    "model.depth": 4,
    "model.heads": 4,
    "model.mlp_dim": 1024,
    "model.dropout": 0.1,
    "model.attn_dropout": 0.1,
    "model.cope_scale_logits": True,
    "model.norm": "post",
}
PAPER_TRAIN: Config = {
    "train.batch_size": 64,
    "train.lr": 7e-5,
    "train.optimizer": "adam",
    "train.weight_decay": 0.0,
    "train.warmup_steps": 0,
    "train.schedule": "constant",
    "train.grad_clip": 0.0,
    "train.eval_every": 1000,
    "train.eval_batch_size": 32,
}
TEXT_DEFAULTS: Config = {
    "model.pe": "cope",
    "model.causal": True,
    "train.patience": 0,
    "data.seed": 0,
    "data.dedup": True,  # evaluation splits hold no training item (separate_from_training)
}


class GeneratedTextTask(Recipe):
    """A generated token task (counting, selective-copy, flip-flop): error per answer, a token
    model with an answer head on every position, and evaluation items kept out of training."""

    modality = "text"
    data_source = "generated"
    metric = "error"
    default_preset = "small"

    def text_bundle(
        self, config: Config, train: GeneratedTokenDataset, splits: dict[str, Split], info: dict
    ) -> DataBundle:
        """The bundle, after replacing every evaluation item that also occurs in training
        (``info["train_overlap"]`` says how many remain: 0 with data.dedup)."""
        info["train_overlap"] = separate_from_training(self.name, config, train, splits)
        return DataBundle(train=train, splits=splits, collate=pad_collate, info=info)

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        """Token embeddings, a causal encoder, and an answer head on every position."""
        return build_token_model(config, info)

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """The sequence's tokens, for the contextual-position heatmap."""
        return token_signal(item, info)


class SparseDenseTask(GeneratedTextTask):
    """A generated token task evaluated as the paper does: ``val`` and ``test`` from the training
    distribution, then a sparse and a dense variant of it (flip-flop, selective-copy).

    Subclasses build the data with :meth:`sparse_dense_bundle`, naming the setting each split
    source draws from (``test``, ``sparse``, ``dense``) and how a setting makes a dataset.
    """

    def split_names(self) -> list[str]:
        """Evaluation splits: in distribution, then the OOD ones."""
        return ["val", "test", "sparse", "dense"]

    def sparse_dense_bundle(
        self,
        config: Config,
        dataset: Callable[[str, int, Any], GeneratedTokenDataset],
        settings: dict[str, Any],
        describe: Callable[[Any], str],
        info: dict[str, Any],
    ) -> DataBundle:
        """Train (on the ``test`` setting), val, test, sparse and dense."""
        eval_size = option(config, "data.eval_size", int)

        def split(name: str, source: str, ood: bool) -> Split:
            setting = settings[source]
            return Split(dataset(name, eval_size, setting), ood=ood, description=describe(setting))

        splits = {
            "val": split("val", "test", False),
            "test": split("test", "test", False),
            "sparse": split("sparse", "sparse", True),
            "dense": split("dense", "dense", True),
        }
        train = dataset("train", option(config, "data.train_size", int), settings["test"])
        return self.text_bundle(config, train, splits, info)
