"""`audio-folder`: classify the audio files of any folder of class sub-folders.

``<data-dir>/<class>/**/*.wav|flac`` at any sample rate, mono or stereo (channels averaged,
resampled to data.sample_rate). Splits: by list files (``data.val_list`` / ``data.test_list``,
paths relative to the data dir, one per line; ``validation_list.txt`` / ``testing_list.txt`` are
used when present and data.split is "auto") or, otherwise, per class at random from data.seed
(``data.val_fraction``, ``data.test_fraction``). Files soundfile cannot read are skipped and
counted. Clips keep their length (up to ``data.max_seconds``) unless ``data.clip_seconds`` pads
or crops them to a fixed length. Features: log-mel (default) or MFCC, cached once per setting
under ``<data-dir>/.cache`` (see :mod:`recipes._audio`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from recipes._audio import (
    AudioReadError,
    Augmentation,
    FeatureDataset,
    FeatureSettings,
    MelAnalyzer,
    Ragged,
    advance,
    cached,
    centre,
    feature_stats,
    progress_bar,
    read_audio,
    read_list,
    scan_class_folders,
    settings_hash,
    single_thread,
)
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

CACHE_VERSION = 2  # 2: samples with NaN/inf are skipped (c6abaf6), not cached
DEFAULT_LISTS = ("validation_list.txt", "testing_list.txt")


def split_by_seed(
    labels: list[int], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """ "train"/"val"/"test" per item, drawn per class so every split sees every class."""
    rng = np.random.default_rng([seed, 7])
    split_of = ["train"] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        order = rng.permutation(len(members))
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        for rank, position in enumerate(order):
            if rank < n_val:
                split_of[members[position]] = "val"
            elif rank < n_val + n_test:
                split_of[members[position]] = "test"
    return split_of


def split_by_lists(relatives: list[str], val: set[str], test: set[str]) -> list[str]:
    """ "test" for listed test files, "val" for listed validation files, else "train"."""
    return ["test" if rel in test else "val" if rel in val else "train" for rel in relatives]


def build_cache(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clip_seconds: float,
    max_seconds: float,
) -> dict[str, Any]:
    """Mel_db of every readable file (row -1 and a name in "skipped" for the others)."""
    analyzer = MelAnalyzer(settings)
    rate = settings.sample_rate
    arrays, rows, skipped = [], [], []
    with progress_bar(f"caching features of {root.name}", len(relatives)) as bar, single_thread():
        for relative in relatives:
            advance(bar)
            try:
                wave = read_audio(root / relative, rate)
            except AudioReadError:
                rows.append(-1)
                skipped.append(relative)
                continue
            if clip_seconds > 0:
                wave = centre(wave, int(clip_seconds * rate))
            elif max_seconds > 0:
                wave = wave[: int(max_seconds * rate)]
            arrays.append(analyzer.mel_db(wave).half())
            rows.append(len(arrays) - 1)
    import torch

    return {
        "mel_db": Ragged.from_list(arrays).state(),
        "rows": torch.tensor(rows, dtype=torch.long),
        "skipped": skipped,
    }


@register_recipe
class AudioFolder(Recipe):
    """Any folder of class sub-folders of WAV/FLAC files."""

    name = "audio-folder"
    modality = "audio"
    task = "class of an audio file (folder name)"
    data_source = "folder"
    metric = "accuracy"
    defaults: Config = {
        "data.features": "logmel",
        "data.n_features": 40,
        "data.n_mels": 40,
        "data.sample_rate": 16000,
        "data.win_ms": 25.0,
        "data.hop_ms": 10.0,
        "data.stack": 2,
        "data.clip_seconds": 0.0,
        "data.max_seconds": 10.0,
        "data.split": "auto",
        "data.val_list": "",
        "data.test_list": "",
        "data.val_fraction": 0.1,
        "data.test_fraction": 0.1,
        "data.shift_ms": 0.0,
        "data.time_masks": 0,
        "data.time_mask_width": 10,
        "data.freq_masks": 0,
        "data.freq_mask_width": 5,
        "model.dim": 64,
        "model.depth": 2,
        "model.heads": 4,
        "model.mlp_dim": 128,
        "model.npos": 64,
    }
    presets: dict[str, Config] = {}

    def list_files(self, root: Path, config: Config) -> tuple[Path | None, Path | None]:
        """The validation and test list files to split by, or (None, None) to split by seed."""
        mode = str(config.get("data.split", "auto"))
        if mode not in ("auto", "seed", "lists"):
            raise UserError(f"data.split must be auto, seed or lists, not {mode!r}")
        names = (str(config.get("data.val_list", "")), str(config.get("data.test_list", "")))
        if mode == "seed":
            return None, None
        if any(names):
            paths = tuple(root / name if name else None for name in names)
        else:
            paths = tuple(root / name for name in DEFAULT_LISTS)
            if mode == "auto" and not all(path.is_file() for path in paths):
                return None, None
        for path in paths:
            if path is not None and not path.is_file():
                raise UserError(f"list file not found: {path}")
        return paths  # type: ignore[return-value]

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        if data_dir is None:
            raise UserError("audio-folder needs --data-dir DIR (class sub-folders of WAV/FLAC)")
        root = Path(data_dir)
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        items = scan_class_folders(root)
        if not items:
            raise UserError(f"{root} holds no class sub-folders with .wav or .flac files")
        classes = sorted({name for _, name in items})
        if len(classes) < 2:
            raise UserError(f"{root} has one class folder ({classes[0]}); at least two are needed")
        relatives = [relative for relative, _ in items]
        labels = [classes.index(name) for _, name in items]
        val_list, test_list = self.list_files(root, config)
        if val_list is None and test_list is None:
            split_of = split_by_seed(
                labels,
                float(config.get("data.val_fraction", 0.1)),
                float(config.get("data.test_fraction", 0.1)),
                int(config.get("data.seed", 0)),
            )
        else:
            split_of = split_by_lists(
                relatives,
                read_list(val_list) if val_list else set(),
                read_list(test_list) if test_list else set(),
            )

        settings = FeatureSettings.from_config(config)
        clip_seconds = float(config.get("data.clip_seconds", 0.0))
        max_seconds = float(config.get("data.max_seconds", 10.0))
        listing = hashlib.sha256(
            "".join(f"{rel}:{(root / rel).stat().st_size}\n" for rel in relatives).encode()
        ).hexdigest()
        key = settings_hash(
            {
                "version": CACHE_VERSION,
                "analysis": settings.analysis_key(),
                "clip_seconds": clip_seconds,
                "max_seconds": max_seconds,
                "listing": listing,
            }
        )
        cache = cached(
            root / ".cache" / f"features-{key}.pt",
            lambda: build_cache(root, relatives, settings, clip_seconds, max_seconds),
        )
        mel_db = Ragged(cache["mel_db"]["flat"], cache["mel_db"]["offsets"])
        rows = cache["rows"].tolist()
        chosen: dict[str, tuple[list[int], list[int]]] = {}
        for split in ("train", "val", "test"):
            members = [i for i, where in enumerate(split_of) if where == split and rows[i] >= 0]
            chosen[split] = ([rows[i] for i in members], [labels[i] for i in members])
            if not members:
                unreadable = sum(where == split for where in split_of)  # all of them, if any
                why = f" (all {unreadable} of its files are unreadable)" if unreadable else ""
                raise UserError(
                    f"the {split} split of {root} is empty{why}; add files, or change "
                    "data.val_fraction / data.test_fraction or the list files"
                )
        analyzer = MelAnalyzer(settings)
        mean, std = feature_stats(mel_db, chosen["train"][0], analyzer)
        augmentation = Augmentation(
            shift_frames=round(float(config.get("data.shift_ms", 0.0)) / settings.hop_ms),
            freq_masks=int(config.get("data.freq_masks", 0)),
            freq_mask_width=int(config.get("data.freq_mask_width", 0)),
            time_masks=int(config.get("data.time_masks", 0)),
            time_mask_width=int(config.get("data.time_mask_width", 0)),
        )
        augment = augmentation.shift_frames or augmentation.freq_masks or augmentation.time_masks

        def dataset(split: str) -> FeatureDataset:
            extra = augmentation if split == "train" and augment else None
            return FeatureDataset(mel_db, *chosen[split], analyzer, mean, std, extra)

        stack = int(config.get("data.stack", 2))
        if stack < 1:
            raise UserError(f"data.stack must be at least 1, got {stack}")
        longest = max(mel_db.length(row) for split in chosen.values() for row in split[0])
        info = {
            "num_classes": len(classes),
            "class_names": classes,
            "feature_dim": settings.n_features,
            "stack": stack,
            "max_len": -(-longest // stack) + 1,  # + the classifier's CLS token
        }
        splits = {
            "val": Split(dataset("val"), description="validation files"),
            "test": Split(dataset("test"), description="test files"),
        }
        return DataBundle(dataset("train"), splits, pad_collate, info, len(cache["skipped"]))

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        from encoders.frontends import FeatureFrontend
        from encoders.transformer import SequenceClassifier

        encoder = encoder_config(config)
        encoder = dataclasses.replace(encoder, max_len=max(encoder.max_len, info["max_len"]))
        frontend = FeatureFrontend(info["feature_dim"], encoder.dim, stack=info["stack"])
        return SequenceClassifier(frontend, encoder, info["num_classes"])

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "kind": "spectrogram",
            "image": item["inputs"].T,
            "tokens_per_frame": 1.0 / info.get("stack", 1),
        }
