"""What every recipe declares, and the registry that resolves recipe names.

A recipe is a small class: its default options (a flat dict of dotted keys), presets, how to
build its data (train split, validation split, test and named OOD splits) and its model. The
engine (:mod:`recipes.engine`) trains and evaluates any recipe the same way.

Batches are dicts of tensors:
  ``inputs``        model input: token ids (B, T), features (B, T, F) or clips (B, T, C, H, W)
  ``padding_mask``  optional (B, T) bool, True marks padding (after the frontend's subsampling
                    the model derives its own mask)
  ``targets``       (B,) class ids for sequence tasks, or (B, T) with -100 where no answer is due
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from recipes.errors import UserError

IGNORE_INDEX = -100
Config = dict[str, Any]


class UnreadableFile(Exception):
    """A file given for prediction that cannot be read or does not fit the trained model."""


@dataclass
class Split:
    """One evaluation split: its data and whether it is out of distribution."""

    dataset: Dataset
    ood: bool = False
    description: str = ""


@dataclass
class DataBundle:
    """Everything the engine needs from a recipe's data.

    ``splits`` holds at least ``val`` (early stopping, model selection) and ``test``; OOD splits
    are further entries with ``ood=True``. ``info`` carries what the model needs from the data
    (for example ``num_classes``, ``vocab_size``, ``feature_dim``, ``max_len``).
    """

    train: Dataset
    splits: dict[str, Split]
    collate: Callable[[list[Any]], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # unreadable items dropped while building the data
    skipped_files: list[str] = field(default_factory=list)  # their names, where files


class Recipe:
    """Base class of recipes; subclasses set the class attributes and the two builders."""

    name: str = ""
    modality: str = ""  # "text", "audio", "video", "features"
    task: str = ""  # one line: what is predicted
    data_source: str = ""  # "generated", "download", "folder"
    metric: str = "accuracy"  # what the tables report: "accuracy" or "error" (1 - accuracy, %)
    defaults: Config = {}
    presets: dict[str, Config] = {}
    default_preset: str | None = None
    file_suffixes: tuple[str, ...] = ()  # files ``cope predict`` reads; () = cannot predict

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Build (or load and cache) the datasets for a resolved config."""
        raise NotImplementedError

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        """Build the model: frontend + encoder + head, position encoding from ``model.pe``.

        Its ``forward(inputs, padding_mask=None)`` returns logits (B, classes) for sequence
        tasks or (B, T, classes) for token tasks.
        """
        raise NotImplementedError

    def read_file(self, path: Path, config: Config, info: dict[str, Any]) -> Any:
        """Model inputs of one file, decoded and featurised exactly as the training items were.

        ``info`` is the training data's info as the checkpoint keeps it (class names, feature
        statistics). Raises :class:`UnreadableFile` for a file that cannot be used.
        """
        raise UserError(
            f"recipe {self.name!r} cannot predict from files: its data is {self.data_source}, "
            "not read from files"
        )

    def download(self, data_dir: Path) -> Path:
        """Fetch the recipe's dataset into ``data_dir`` (``--download``, ``cope data``)."""
        raise UserError(f"recipe {self.name!r} has nothing to download")

    def export(self, root: Path, layout: str) -> Path:
        """Write the recipe's data under ``root`` as a folder tree in ``layout`` (``cope data``)."""
        raise UserError(f"recipe {self.name!r} cannot write a {layout!r} layout")

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        """What ``cope positions`` draws beside the heatmaps for one dataset item, or None.

        Keys: ``kind`` ("spectrogram": ``image`` (features, frames); "frames": ``image``
        (frames, H, W); "tokens": ``labels`` list of str), ``tokens_per_frame`` (model tokens per
        frame of ``image``, e.g. 0.5 when two frames are stacked), ``onsets`` (token indices
        where true events start, when known).
        """
        return None

    def question_of(self, item: dict[str, Any], config: Config) -> str | None:
        """The question a dataset item asks, named for reports ("word n=1", "count"), or None.

        Recipes whose examples each ask one of several questions (the question enters as a
        token) override this; their reports then break accuracy down per question. The default:
        the recipe asks no questions.
        """
        return None

    @property
    def asks_questions(self) -> bool:
        """Whether the recipe names its examples' questions (overrides :meth:`question_of`)."""
        return type(self).question_of is not Recipe.question_of

    @property
    def may_know_events(self) -> bool:
        """Whether :meth:`example_signal` is overridden, so examples may carry event onsets."""
        return type(self).example_signal is not Recipe.example_signal

    def split_names(self) -> list[str]:
        """Names of the evaluation splits, for ``cope recipes``."""
        return ["val", "test"]


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe resolvable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    RECIPES[cls.name] = cls
    return cls


def _load_all() -> None:
    from recipes import catalog  # noqa: F401  (imports every recipe module, filling RECIPES)


def list_recipes(pattern: str = "*") -> list[str]:
    """Registered recipe names matching a shell-style wildcard, sorted."""
    _load_all()
    return sorted(name for name in RECIPES if fnmatch.fnmatch(name, pattern))


def get_recipe(name: str) -> Recipe:
    """An instance of the named recipe; an unknown name lists the known ones."""
    _load_all()
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
    return RECIPES[name]()


def pad_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items, padding variable-length ``inputs`` along time (dim 0) with zeros.

    Adds ``padding_mask`` (B, T), True at padding, when lengths differ; (T,)-shaped ``targets``
    are padded with IGNORE_INDEX. Other tensor fields of equal shape are stacked as they are.
    """
    import torch

    lengths = [item["inputs"].shape[0] for item in items]
    longest = max(lengths)
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = torch.as_tensor(values)
            continue
        if key == "inputs" or (key == "targets" and values[0].dim() >= 1):
            fill = 0 if key == "inputs" else IGNORE_INDEX
            padded = values[0].new_full((len(values), longest, *values[0].shape[1:]), fill)
            for row, value in enumerate(values):
                padded[row, : value.shape[0]] = value
            batch[key] = padded
        else:
            batch[key] = torch.stack(values)
    if len(set(lengths)) > 1:
        positions = torch.arange(longest)[None, :]
        batch["padding_mask"] = positions >= torch.as_tensor(lengths)[:, None]
    return batch


def encoder_config(config: Config) -> Any:
    """The :class:`encoders.transformer.EncoderConfig` described by a config's ``model.*`` keys."""
    import dataclasses

    from encoders.transformer import EncoderConfig

    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    values = {
        key.removeprefix("model."): value
        for key, value in config.items()
        if key.startswith("model.")
    }
    return EncoderConfig(**{key: value for key, value in values.items() if key in names})
