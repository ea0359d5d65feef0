"""`audio-folder`: classify the audio files of any folder of class sub-folders.

``<data-dir>/<class>/**/*.wav|flac`` at any sample rate, mono or stereo (channels averaged,
resampled to data.sample_rate). Listing and splits (list files or a stratified split by
data.seed) are :mod:`recipes.folders`', shared with the other folder recipes. Files soundfile
cannot read are skipped and counted. Clips keep their length (up to ``data.max_seconds``)
unless ``data.clip_seconds`` pads or crops them to a fixed length. Features: log-mel (default)
or MFCC, cached once per setting under ``data.cache_dir`` (default: the user cache folder,
so a read-only data folder works; see :func:`recipes._audio.feature_cache_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from recipes import folders
from recipes._audio import (
    AUDIO_EXTENSIONS,
    AudioReadError,
    FeatureDataset,
    FeatureSettings,
    MelAnalyzer,
    Ragged,
    SpecAugmentSettings,
    SpectrogramClassifier,
    advance,
    cached,
    centre,
    feature_cache_dir,
    feature_stats,
    progress_bar,
    read_audio,
    settings_hash,
    single_thread,
)
from recipes.base import (
    Config,
    DataBundle,
    Split,
    UnreadableFile,
    UserError,
    pad_collate,
    register_recipe,
)
from recipes.settings import defaults_of, settings_of

CACHE_VERSION = 2  # 2: samples with NaN/inf are skipped (c6abaf6), not cached


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """audio-folder's own ``data.*`` options (analysis: FeatureSettings; SpecAugmentSettings)."""

    clip_seconds: float = 0.0  # > 0: pad or crop every clip to this length around its middle
    max_seconds: float = 10.0  # > 0: crop longer clips (when clip_seconds is 0)
    stack: int = 2  # feature frames per token

    def __post_init__(self) -> None:
        if self.stack < 1:
            raise UserError(f"data.stack must be at least 1, got {self.stack}")


def clip_mel_db(path: Path, analyzer: MelAnalyzer, clip_seconds: float, max_seconds: float) -> Any:
    """One file's cached form: mel_db (frames, mels) in float16, cropped or padded as set.

    Raises AudioReadError for a file soundfile cannot read (or holding NaN/inf).
    """
    rate = analyzer.settings.sample_rate
    wave = read_audio(path, rate)
    if clip_seconds > 0:
        wave = centre(wave, int(clip_seconds * rate))
    elif max_seconds > 0:
        wave = wave[: int(max_seconds * rate)]
    return analyzer.mel_db(wave).half()


def build_cache(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clip_seconds: float,
    max_seconds: float,
) -> dict[str, Any]:
    """Mel_db of every readable file (row -1 and a name in "skipped" for the others)."""
    analyzer = MelAnalyzer(settings)
    arrays, rows, skipped = [], [], []
    with progress_bar(f"caching features of {root.name}", len(relatives)) as bar, single_thread():
        for relative in relatives:
            advance(bar)
            try:
                arrays.append(clip_mel_db(root / relative, analyzer, clip_seconds, max_seconds))
            except AudioReadError:
                rows.append(-1)
                skipped.append(relative)
                continue
            rows.append(len(arrays) - 1)
    import torch

    return {
        "mel_db": Ragged.from_list(arrays).state(),
        "rows": torch.tensor(rows, dtype=torch.long),
        "skipped": skipped,
    }


def cached_features(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clips: ClipSettings,
    cache_dir: Path,
) -> dict[str, Any]:
    """The features of every listed file, built once per (analysis, clip settings, listing)."""
    listing = hashlib.sha256(
        "".join(f"{rel}:{(root / rel).stat().st_size}\n" for rel in relatives).encode()
    ).hexdigest()
    key = settings_hash(
        {
            "version": CACHE_VERSION,
            "analysis": settings.analysis_key(),
            "clip_seconds": clips.clip_seconds,
            "max_seconds": clips.max_seconds,
            "listing": listing,
        }
    )
    return cached(
        cache_dir / f"features-{key}.pt",
        lambda: build_cache(root, relatives, settings, clips.clip_seconds, clips.max_seconds),
    )


@register_recipe
class AudioFolder(SpectrogramClassifier):
    """Any folder of class sub-folders of WAV/FLAC files."""

    name = "audio-folder"
    modality = "audio"
    task = "class of an audio file (folder name)"
    data_source = "folder"
    metric = "accuracy"
    defaults: Config = {
        **folders.FOLDER_DEFAULTS,
        "data.features": "logmel",
        "data.n_features": 40,
        "data.n_mels": 40,
        "data.sample_rate": 16000,
        "data.win_ms": 25.0,
        "data.hop_ms": 10.0,
        "data.cache_dir": "",  # "": the user cache folder (COPE_CACHE_DIR), never the data folder
        **defaults_of(ClipSettings),
        **defaults_of(SpecAugmentSettings),
        "model.dim": 64,
        "model.depth": 2,
        "model.heads": 4,
        "model.mlp_dim": 128,
        "model.npos": 64,
    }
    presets: dict[str, Config] = {}
    file_suffixes = AUDIO_EXTENSIONS

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """List and split the folder, read (or load the cached) features, wrap the splits."""
        root = folders.folder_root(data_dir, self.name, "WAV/FLAC")
        classes = folders.find_class_files(root, AUDIO_EXTENSIONS, "audio")
        assignment = folders.assign_splits(root, classes, folders.SplitSettings.from_config(config))
        settings, clips = FeatureSettings.from_config(config), settings_of(ClipSettings, config)
        relatives = [relative for files in classes.values() for relative in files]
        cache_dir = feature_cache_dir(config, self.name, root)
        cache = cached_features(root, relatives, settings, clips, cache_dir)
        mel_db = Ragged(cache["mel_db"]["flat"], cache["mel_db"]["offsets"])
        row_of = dict(zip(relatives, cache["rows"].tolist(), strict=True))
        chosen: dict[str, tuple[list[int], list[int]]] = {}
        for split, members in assignment.items():
            readable = [(row_of[rel], label) for rel, label in members if row_of[rel] >= 0]
            chosen[split] = ([row for row, _ in readable], [label for _, label in readable])
        folders.check_splits_not_empty(
            root,
            {split: len(rows) for split, (rows, _) in chosen.items()},
            {split: len(members) for split, members in assignment.items()},
        )
        analyzer = MelAnalyzer(settings)
        mean, std = feature_stats(mel_db, chosen["train"][0], analyzer)
        augmentation = settings_of(SpecAugmentSettings, config).augmentation(settings.hop_ms)

        def dataset(split: str) -> FeatureDataset:
            extra = augmentation if split == "train" else None
            return FeatureDataset(mel_db, *chosen[split], analyzer, mean, std, extra)

        longest = max(mel_db.length(row) for split in chosen.values() for row in split[0])
        info = {
            "num_classes": len(classes),
            "class_names": list(classes),
            "feature_dim": settings.n_features,
            "stack": clips.stack,
            "max_len": -(-longest // clips.stack) + 1,  # + the classifier's CLS token
            "feature_mean": mean.tolist(),  # kept in checkpoints: prediction standardises so
            "feature_std": std.tolist(),
        }
        splits = {
            "val": Split(dataset("val"), description="validation files"),
            "test": Split(dataset("test"), description="test files"),
        }
        skipped = list(cache["skipped"])
        return DataBundle(dataset("train"), splits, pad_collate, info, len(skipped), skipped)

    def read_file(self, path: Path, config: Config, info: dict[str, Any]) -> Any:
        """A file's features as a training item's: same reading, analysis and statistics."""
        import torch

        analyzer = MelAnalyzer(FeatureSettings.from_config(config))
        clips = settings_of(ClipSettings, config)
        try:
            mel_db = clip_mel_db(path, analyzer, clips.clip_seconds, clips.max_seconds)
        except AudioReadError as error:
            raise UnreadableFile(str(error) or "unreadable audio") from None
        mean, std = torch.tensor(info["feature_mean"]), torch.tensor(info["feature_std"])
        item = FeatureDataset(Ragged.from_list([mel_db]), [0], [0], analyzer, mean, std)[0]
        return item["inputs"]
