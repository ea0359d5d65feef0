"""`npy-folder`: classify sequences of precomputed features stored as .npy files.

Layout (any modality that is already features: sensors, EEG, embeddings, cached audio)::

    DATA_DIR/<class>/<item>.npy         arrays shaped (time, features), any real dtype
    DATA_DIR/validation_list.txt        optional, Speech Commands style: one
    DATA_DIR/testing_list.txt           "<class>/<item>.npy" per line

Sub-folders whose names start with "." or "_" are not classes (e.g. ``_background_noise_``).
With both list files, the listed items form the validation and test splits and the rest the
training split; without them each class is shuffled with ``data.seed`` and cut by
``data.val_fraction`` and ``data.test_fraction`` (stratified, the same split for every model
seed). Bad items (unreadable, not 2-D, not a real number type, empty, NaN or infinite, or with
a feature count other than the majority's) are skipped, counted in ``DataBundle.skipped`` and
reported in one log line; an empty or missing folder is a UserError.

Features are standardised per feature with the training split's mean and deviation
(``data.normalize``); the model is a FeatureFrontend (``data.stack`` frames per token), a
bidirectional encoder and a SequenceClassifier.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from recipes._text import option
from recipes.base import (
    Config,
    DataBundle,
    Recipe,
    Split,
    UserError,
    encoder_config,
    pad_collate,
    register_recipe,
)

LOG = logging.getLogger(__name__)
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"


class FeatureDataset(Dataset):
    """In-memory (time, features) tensors with their class ids."""

    def __init__(self, arrays: list[torch.Tensor], labels: list[int], names: list[str]) -> None:
        self.arrays, self.labels, self.names = arrays, labels, names

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"inputs": self.arrays[index], "targets": self.labels[index]}


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of ``root``, sorted by name; a UserError when there are none."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a folder")
    folders = sorted(
        path for path in root.iterdir() if path.is_dir() and not path.name.startswith((".", "_"))
    )
    if not folders:
        raise UserError(f"{root} has no class sub-folders (expected {root}/<class>/<item>.npy)")
    return folders


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


def read_list(root: Path, name: str) -> set[str]:
    """Relative item paths (``class/item.npy``) listed in a Speech Commands style list file."""
    lines = (root / name).read_text().splitlines()
    return {line.strip().replace("\\", "/") for line in lines if line.strip()}


def seeded_split(
    class_name: str, names: list[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Split one class's item names into train/val/test with a shuffle fixed by the seed."""
    shuffled = sorted(names)
    random.Random(f"{seed}:{class_name}").shuffle(shuffled)
    count = len(shuffled)

    def share(fraction: float) -> int:
        wanted = round(count * fraction)
        # A small class still lends one item to each held-out split it can spare.
        return max(wanted, 1) if fraction > 0 and count >= 3 else wanted

    val, test = share(val_fraction), share(test_fraction)
    return {
        "val": shuffled[:val],
        "test": shuffled[val : val + test],
        "train": shuffled[val + test :],
    }


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
        "data.val_fraction": 0.1,
        "data.test_fraction": 0.1,
        "data.stack": 1,
        "data.normalize": True,
        "data.max_frames": 0,  # > 0 keeps only the first max_frames frames of each item
    }
    presets: dict[str, Config] = {}
    default_preset = None

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Read, check and split the folder; standardise with training statistics."""
        if data_dir is None:
            raise UserError(
                "npy-folder reads a folder: pass --data-dir DIR holding one sub-folder of .npy "
                "files per class"
            )
        root = Path(data_dir).expanduser()
        seed = option(config, "data.seed", int)
        val_fraction = option(config, "data.val_fraction", float)
        test_fraction = option(config, "data.test_fraction", float)
        if not (
            0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise UserError(
                "data.val_fraction and data.test_fraction must lie in [0, 1) and sum below 1"
            )
        max_frames = option(config, "data.max_frames", int)

        folders = class_folders(root)
        files: dict[str, list[Path]] = {}
        for folder in folders:
            found = sorted(folder.rglob("*.npy"))
            if not found:
                raise UserError(f"class folder {folder} holds no .npy files")
            files[folder.name] = found

        arrays: dict[str, np.ndarray] = {}
        reasons: Counter[str] = Counter()
        for class_files in files.values():
            for path in class_files:
                array, reason = read_features(path)
                key = path.relative_to(root).as_posix()
                if array is None:
                    reasons[reason] += 1
                    continue
                arrays[key] = array[:max_frames] if max_frames > 0 else array
        if not arrays:
            raise UserError(
                f"none of the .npy files under {root} holds a usable (time, features) array"
            )
        feature_counts = Counter(array.shape[1] for array in arrays.values())
        feature_dim = feature_counts.most_common(1)[0][0]
        for key in [key for key, array in arrays.items() if array.shape[1] != feature_dim]:
            del arrays[key]
            reasons[f"not {feature_dim} features"] += 1
        skipped = sum(reasons.values())
        if skipped:
            detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            LOG.warning(
                "npy-folder: skipped %d of %d files under %s (%s)",
                skipped,
                skipped + len(arrays),
                root,
                detail,
            )

        assignment = self._assign_splits(root, files, arrays, seed, val_fraction, test_fraction)
        class_names = [folder.name for folder in folders]
        class_ids = {name: index for index, name in enumerate(class_names)}
        for split in ("train", "val", "test"):
            if not assignment[split]:
                raise UserError(
                    f"the {split} split of {root} is empty: add files, or change "
                    "data.val_fraction / data.test_fraction (or the list files)"
                )

        mean, std = self._statistics([arrays[key] for key in assignment["train"]])
        normalize = option(config, "data.normalize", bool)

        def dataset(split: str) -> FeatureDataset:
            keys = assignment[split]
            tensors = []
            for key in keys:
                array = (arrays[key] - mean) / std if normalize else arrays[key]
                tensors.append(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
            labels = [class_ids[key.split("/", 1)[0]] for key in keys]
            return FeatureDataset(tensors, labels, keys)

        stack = option(config, "data.stack", int)
        if stack < 1:
            raise UserError(f"data.stack must be at least 1, got {stack}")
        longest = max(array.shape[0] for array in arrays.values())
        info = {
            "num_classes": len(class_names),
            "class_names": class_names,
            "feature_dim": feature_dim,
            "stack": stack,
            "max_len": -(-longest // stack),  # tokens of the longest item after stacking
            "split_source": "list files" if (root / VALIDATION_LIST).exists() else f"seed {seed}",
            "skipped_reasons": dict(reasons),
            "feature_mean": mean.tolist(),
            "feature_std": std.tolist(),
        }
        return DataBundle(
            train=dataset("train"),
            splits={
                "val": Split(dataset("val"), description="validation items"),
                "test": Split(dataset("test"), description="test items"),
            },
            collate=pad_collate,
            info=info,
            skipped=skipped,
        )

    @staticmethod
    def _assign_splits(
        root: Path,
        files: dict[str, list[Path]],
        arrays: dict[str, np.ndarray],
        seed: int,
        val_fraction: float,
        test_fraction: float,
    ) -> dict[str, list[str]]:
        """Usable item keys per split, from the list files when present, else by seed."""
        has_val, has_test = (root / VALIDATION_LIST).exists(), (root / TESTING_LIST).exists()
        if has_val != has_test:
            present, missing = (
                (VALIDATION_LIST, TESTING_LIST) if has_val else (TESTING_LIST, VALIDATION_LIST)
            )
            raise UserError(f"{root} has {present} but no {missing}: provide both or neither")
        assignment: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        if has_val:
            listed_val, listed_test = (
                read_list(root, VALIDATION_LIST),
                read_list(root, TESTING_LIST),
            )
            for key in sorted(arrays):
                split = "val" if key in listed_val else "test" if key in listed_test else "train"
                assignment[split].append(key)
            return assignment
        for class_name, class_files in files.items():
            keys = [path.relative_to(root).as_posix() for path in class_files]
            usable = [key for key in keys if key in arrays]
            for split, chosen in seeded_split(
                class_name, usable, seed, val_fraction, test_fraction
            ).items():
                assignment[split].extend(chosen)
        return assignment

    @staticmethod
    def _statistics(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and deviation over all training frames (deviation floored)."""
        frames = np.concatenate(arrays, axis=0).astype(np.float64)
        mean = frames.mean(axis=0)
        std = np.maximum(frames.std(axis=0), 1e-6)
        return mean.astype(np.float32), std.astype(np.float32)

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
