"""`npy-folder`: classify sequences of precomputed features stored as .npy files.

Layout (any modality that is already features: sensors, EEG, embeddings, cached audio)::

    DATA_DIR/<class>/<item>.npy         arrays shaped (time, features), any real dtype
    DATA_DIR/validation_list.txt        optional, Speech Commands style: one
    DATA_DIR/testing_list.txt           "<class>/<item>.npy" per line

Listing and splits (the list files, or each class shuffled with ``data.seed`` and cut by
``data.val_fraction`` and ``data.test_fraction``) are :mod:`recipes.folders`', shared with the
other folder recipes. Bad items (unreadable, not 2-D, not a real number type, empty, NaN or
infinite, or with a feature count other than the majority's) are dropped from their split,
counted in ``DataBundle.skipped`` and reported in one log line.

OOD splits, chosen with ``data.ood_time_scales`` (e.g. "0.5,2"): the test items resampled in
time to that many times their frames (linear interpolation), ``time-x0.5``, ``time-x2``.

Features are standardised per feature with the training split's mean and deviation
(``data.normalize``); the model is a FeatureFrontend (``data.stack`` frames per token), a
bidirectional encoder and a SequenceClassifier.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from recipes import folders
from recipes.base import (
    Config,
    DataBundle,
    Recipe,
    Split,
    UnreadableFile,
    UserError,
    encoder_config,
    pad_collate,
    register_recipe,
)
from recipes.settings import defaults_of, settings_of

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArraySettings:
    """npy-folder's own ``data.*`` options."""

    stack: int = 1  # frames per token
    normalize: bool = True  # standardise each feature with the training split's statistics
    max_frames: int = 0  # > 0 keeps only the first max_frames frames of each item
    ood_time_scales: str = ""  # e.g. "0.5,2": OOD splits time-x0.5, time-x2 of the test items

    def __post_init__(self) -> None:
        if self.stack < 1:
            raise UserError(f"data.stack must be at least 1, got {self.stack}")
        self.time_scales()  # fail early on a malformed list

    def time_scales(self) -> list[float]:
        """The resampling factors of ``ood_time_scales`` (each > 0)."""
        try:
            scales = [float(part) for part in self.ood_time_scales.split(",") if part.strip()]
        except ValueError:
            scales = [0.0]
        if any(scale <= 0 for scale in scales):
            raise UserError(
                "data.ood_time_scales must be a comma-separated list of positive factors, "
                f"like '0.5,2', not {self.ood_time_scales!r}"
            )
        return scales


def resample_time(array: torch.Tensor, scale: float) -> torch.Tensor:
    """A (time, features) array at ``scale`` times as many frames, linearly interpolated.

    The same trajectory at another rate (scale 2: twice as slow): first and last frames and the
    feature values along the way are kept, only the number of frames changes.
    """
    frames = max(1, round(array.shape[0] * scale))
    resized = torch.nn.functional.interpolate(
        array.T[None], size=frames, mode="linear", align_corners=True
    )
    return resized[0].T.contiguous()


class FeatureDataset(Dataset):
    """In-memory (time, features) tensors with their class ids."""

    def __init__(self, arrays: list[torch.Tensor], labels: list[int], names: list[str]) -> None:
        self.arrays, self.labels, self.names = arrays, labels, names

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": self.arrays[index], "targets": self.labels[index]}


def read_features(path: Path) -> tuple[np.ndarray | None, str]:
    """The array of one file, or None and why it is not usable."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception:  # any unreadable or corrupt file is skipped, whatever numpy raises
        return None, "unreadable"
    if not isinstance(array, np.ndarray):
        return None, "unreadable"  # an .npz archive saved under a .npy name
    if array.ndim != 2:
        return None, "not (time, features)"
    if array.dtype.kind not in "fiu":
        return None, f"dtype {array.dtype}"
    if 0 in array.shape:
        return None, "empty"
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        return None, "NaN or infinite values"
    return array, ""


def read_usable(
    root: Path, relatives: list[str], max_frames: int
) -> tuple[dict[str, np.ndarray], Counter[str]]:
    """The usable arrays by relative path (cropped), and how many files failed for which reason.

    Arrays whose feature count is not the majority's are dropped too.
    """
    arrays: dict[str, np.ndarray] = {}
    reasons: Counter[str] = Counter()
    for relative in relatives:
        array, reason = read_features(root / relative)
        if array is None:
            reasons[reason] += 1
        else:
            arrays[relative] = array[:max_frames] if max_frames > 0 else array
    if not arrays:
        raise UserError(
            f"none of the .npy files under {root} holds a usable (time, features) array"
        )
    feature_dim = Counter(array.shape[1] for array in arrays.values()).most_common(1)[0][0]
    for key in [key for key, array in arrays.items() if array.shape[1] != feature_dim]:
        del arrays[key]
        reasons[f"not {feature_dim} features"] += 1
    skipped = sum(reasons.values())
    if skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        total = skipped + len(arrays)
        LOG.warning(
            "npy-folder: skipped %d of %d files under %s (%s)", skipped, total, root, detail
        )
    return arrays, reasons


def model_input(array: np.ndarray, mean: np.ndarray, std: np.ndarray, normalize: bool) -> Any:
    """A usable array as the model's float32 (time, features) input, standardised if set."""
    array = (array - mean) / std if normalize else array
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def feature_statistics(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and deviation over all training frames (deviation floored)."""
    frames = np.concatenate(arrays, axis=0).astype(np.float64)
    mean = frames.mean(axis=0)
    std = np.maximum(frames.std(axis=0), 1e-6)
    return mean.astype(np.float32), std.astype(np.float32)


@register_recipe
class NpyFolder(Recipe):
    """Sequence classification of .npy feature arrays in class sub-folders."""

    name = "npy-folder"
    modality = "features"
    task = "class of a (time, features) array, from its class sub-folder"
    data_source = "folder"
    metric = "accuracy"
    defaults: Config = {
        "model.causal": False,
        "model.pooling": "cls",
        **folders.FOLDER_DEFAULTS,
        **defaults_of(ArraySettings),
    }
    presets: dict[str, Config] = {}
    default_preset = None
    file_suffixes = (".npy",)

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Read, check and split the folder; standardise with training statistics."""
        root = folders.folder_root(data_dir, self.name, ".npy")
        split_settings = folders.SplitSettings.from_config(config)
        settings = settings_of(ArraySettings, config)
        classes = folders.find_class_files(root, (".npy",), "npy")
        assignment = folders.assign_splits(root, classes, split_settings)
        relatives = [relative for files in classes.values() for relative in files]
        arrays, reasons = read_usable(root, relatives, settings.max_frames)
        usable = {
            split: [(key, label) for key, label in members if key in arrays]
            for split, members in assignment.items()
        }
        folders.check_splits_not_empty(
            root,
            {split: len(members) for split, members in usable.items()},
            {split: len(members) for split, members in assignment.items()},
        )
        mean, std = feature_statistics([arrays[key] for key, _ in usable["train"]])

        def dataset(split: str) -> FeatureDataset:
            tensors = []
            for key, _ in usable[split]:
                tensors.append(model_input(arrays[key], mean, std, settings.normalize))
            keys, labels = [key for key, _ in usable[split]], [label for _, label in usable[split]]
            return FeatureDataset(tensors, labels, keys)

        scales = settings.time_scales()
        longest = max(array.shape[0] for array in arrays.values())
        longest = max([longest, *(round(longest * scale) for scale in scales)])
        lists = folders.split_lists(root, split_settings) is not None
        info = {
            "num_classes": len(classes),
            "class_names": list(classes),
            "feature_dim": next(iter(arrays.values())).shape[1],
            "stack": settings.stack,
            "max_len": -(-longest // settings.stack),  # tokens of the longest item, stacked
            "split_source": "list files" if lists else f"seed {split_settings.seed}",
            "skipped_reasons": dict(reasons),
            "feature_mean": mean.tolist(),
            "feature_std": std.tolist(),
        }
        splits = {
            "val": Split(dataset("val"), description="validation items"),
            "test": Split(dataset("test"), description="test items"),
        }
        test = dataset("test")
        for scale in scales:
            resampled = [resample_time(tensor, scale) for tensor in test.arrays]
            splits[f"time-x{scale:g}"] = Split(
                FeatureDataset(resampled, test.labels, test.names),
                ood=True,
                description=f"test items resampled to {scale:g}x their frames",
            )
        skipped = [relative for relative in relatives if relative not in arrays]
        return DataBundle(dataset("train"), splits, pad_collate, info, len(skipped), skipped)

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        """FeatureFrontend (stacked frames) + encoder + sequence classification head."""
        from encoders.frontends import FeatureFrontend
        from encoders.transformer import SequenceClassifier

        encoder = encoder_config(config)
        # The class token (pooling "cls") takes one position beside the item's tokens.
        needed = int(info["max_len"]) + (1 if encoder.pooling == "cls" else 0)
        if needed > encoder.max_len:
            raise UserError(
                f"the longest item needs {needed} positions but model.max_len is "
                f"{encoder.max_len}; raise it with --set model.max_len={needed}, or crop items "
                "with data.max_frames or stack frames with data.stack"
            )
        frontend = FeatureFrontend(int(info["feature_dim"]), encoder.dim, int(info["stack"]))
        return SequenceClassifier(frontend, encoder, int(info["num_classes"]))

    def read_file(self, path: Path, config: Config, info: dict[str, Any]) -> Any:
        """A file's array as a training item's: same checks, crop and training statistics."""
        settings = settings_of(ArraySettings, config)
        array, reason = read_features(path)
        if array is None:
            raise UnreadableFile(f"{path}: {reason}")
        if array.shape[1] != int(info["feature_dim"]):
            raise UnreadableFile(f"{path}: not {info['feature_dim']} features")
        if settings.max_frames > 0:
            array = array[: settings.max_frames]
        mean = np.asarray(info["feature_mean"], dtype=np.float32)
        std = np.asarray(info["feature_std"], dtype=np.float32)
        return model_input(array, mean, std, settings.normalize)
