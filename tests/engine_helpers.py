"""Tiny recipes registered for the engine and CLI tests, so they need no other recipe.

``tiny-majority``: is the majority of a 0/1 sequence a one? (sequence classification, with an
OOD split of longer sequences). ``tiny-echo``: repeat each token (token classification with
-100 at the padding). Both use a small self-contained model, so these tests do not depend on
encoders.transformer; ``model.pe`` is recorded but only needs to be a valid name.
``tiny-majority-tf`` is tiny-majority with the real encoder (heatmaps); ``tiny-questions-tf``
adds named questions and event onsets to it (per-question accuracy, event alignment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from recipes.base import DataBundle, Recipe, Split, UserError, pad_collate, register_recipe


class ListDataset(Dataset):
    """Items held in a list."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def majority_items(count: int, min_len: int, max_len: int, seed: int) -> list[dict[str, Any]]:
    """Odd-length 0/1 sequences labelled 1 when ones are the majority (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator)) | 1
        tokens = torch.randint(0, 2, (length,), generator=generator)
        items.append({"inputs": tokens, "targets": int(tokens.sum() * 2 > length)})
    return items


class PooledClassifier(nn.Module):
    """Embedding, a small MLP with dropout on each token, mean over real tokens, a linear head."""

    def __init__(self, vocab: int, dim: int, classes: int, dropout: float, per_token: bool):
        super().__init__()
        self.per_token = per_token
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(dim, classes)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        hidden = self.mix(self.embed(inputs))
        if self.per_token:
            return self.head(hidden)
        keep = (
            torch.ones_like(inputs, dtype=hidden.dtype)
            if padding_mask is None
            else (~padding_mask).to(hidden.dtype)
        )
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return self.head(pooled)


@register_recipe
class TinyMajority(Recipe):
    """Majority vote over a 0/1 sequence: a task a few dozen CPU steps can learn."""

    name = "tiny-majority"
    modality = "text"
    task = "is the majority of the tokens a one"
    data_source = "generated"
    metric = "accuracy"
    defaults = {
        "data.train_size": 256,
        "data.eval_size": 64,
        "data.min_len": 5,
        "data.max_len": 11,
        "model.dim": 16,
        "model.dropout": 0.1,
        "train.steps": 30,
        "train.batch_size": 16,
        "train.eval_every": 10,
        "train.warmup_steps": 5,
        "train.lr": 0.01,
        "train.log_every": 5,
    }
    presets = {"tiny": {"model.dim": 8}, "wide": {"model.dim": 32, "train.lr": 0.003}}

    def build_data(self, config: dict[str, Any], data_dir: Path | None, download: bool):
        if config["data.min_len"] > config["data.max_len"]:
            raise UserError("data.min_len must not exceed data.max_len")
        seed, low, high = config["data.seed"], config["data.min_len"], config["data.max_len"]
        eval_size = config["data.eval_size"]
        return DataBundle(
            train=ListDataset(majority_items(config["data.train_size"], low, high, seed)),
            splits={
                "val": Split(ListDataset(majority_items(eval_size, low, high, seed + 1))),
                "test": Split(ListDataset(majority_items(eval_size, low, high, seed + 2))),
                "long": Split(
                    ListDataset(majority_items(eval_size, 2 * high, 3 * high, seed + 3)),
                    ood=True,
                    description="two to three times longer",
                ),
            },
            collate=pad_collate,
            info={"num_classes": 2, "vocab_size": 2},
        )

    def build_model(self, config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
        return PooledClassifier(
            info["vocab_size"], config["model.dim"], 2, config["model.dropout"], per_token=False
        )

    def split_names(self) -> list[str]:
        return ["val", "test", "long"]

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "tokens", "labels": [str(int(t)) for t in item["inputs"]]}


@register_recipe
class TinyEcho(Recipe):
    """Repeat every token: per-token targets, padded with -100."""

    name = "tiny-echo"
    modality = "text"
    task = "repeat each token"
    data_source = "generated"
    metric = "error"
    defaults = {
        "data.train_size": 128,
        "model.dim": 16,
        "train.steps": 10,
        "train.batch_size": 8,
        "train.eval_every": 5,
        "train.log_every": 5,
    }

    def build_data(self, config: dict[str, Any], data_dir: Path | None, download: bool):
        def items(count: int, seed: int) -> ListDataset:
            generator = torch.Generator().manual_seed(seed)
            result = []
            for _ in range(count):
                length = int(torch.randint(3, 9, (1,), generator=generator))
                tokens = torch.randint(0, 5, (length,), generator=generator)
                result.append({"inputs": tokens, "targets": tokens.clone()})
            return ListDataset(result)

        seed = config["data.seed"]
        return DataBundle(
            train=items(config["data.train_size"], seed),
            splits={"val": Split(items(32, seed + 1)), "test": Split(items(32, seed + 2))},
            collate=pad_collate,
            info={"vocab_size": 5},
        )

    def build_model(self, config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
        return PooledClassifier(5, config["model.dim"], 5, 0.0, per_token=True)


@register_recipe
class TinyMajorityTransformer(TinyMajority):
    """tiny-majority with the real encoder (TokenFrontend + SequenceClassifier), for heatmaps."""

    name = "tiny-majority-tf"
    defaults = {
        **TinyMajority.defaults,
        "model.depth": 1,
        "model.heads": 2,
        "model.mlp_dim": 32,
        "model.max_len": 40,
        "model.dropout": 0.0,
        "train.steps": 6,
        "train.eval_every": 3,
    }
    presets = {}

    def build_model(self, config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
        from encoders.frontends import TokenFrontend
        from encoders.transformer import SequenceClassifier
        from recipes.base import encoder_config

        encoder = encoder_config(config)
        return SequenceClassifier(TokenFrontend(info["vocab_size"], encoder.dim), encoder, 2)


@register_recipe
class TinyQuestions(TinyMajorityTransformer):
    """tiny-majority-tf whose items each ask one of three named questions (the model ignores
    them) and whose example signal marks onsets: per-question accuracy and event alignment."""

    name = "tiny-questions-tf"

    def build_data(self, config: dict[str, Any], data_dir: Path | None, download: bool):
        bundle = super().build_data(config, data_dir, download)
        for dataset in (bundle.train, *(split.dataset for split in bundle.splits.values())):
            for index, item in enumerate(dataset.items):
                item["question"] = index % 3
        return bundle

    def question_of(self, item: dict[str, Any], config: dict[str, Any]) -> str | None:
        return "count" if item["question"] == 2 else f"bit n={item['question'] + 1}"

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        labels = [str(int(t)) for t in item["inputs"]]
        return {"kind": "tokens", "labels": labels, "onsets": [0, 2]}
