"""`audio-folder`: classify the audio files of any folder of class sub-folders.

``<data-dir>/<class>/**/*.wav|flac`` at any sample rate, mono or stereo (channels averaged,
resampled to data.sample_rate). Listing and splits (list files or a stratified split by
data.seed) are :mod:`recipes.folders`', shared with the other folder recipes. Files soundfile
cannot read are skipped and counted. Clips keep their length (up to ``data.max_seconds``)
unless ``data.clip_seconds`` pads or crops them to a fixed length. Features: log-mel (default)
or MFCC, cached once per setting under ``data.cache_dir`` (default: the user cache folder,
so a read-only data folder works; see :func:`recipes._audio.feature_cache_dir`).

OOD splits (each off unless set; see :class:`OodSettings`) transform the test files' clips
(after the crop or pad above) and are not cropped again: ``data.ood_stretch`` (pitch-keeping
time stretch, torchaudio's phase vocoder), ``data.ood_speed`` (resampling: pitch and tempo
together), ``data.ood_pad_seconds`` (silence or noise around the clip) and ``data.ood_shift_ms``
(onset moved). Their features are cached apart from the training cache, which stays as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    change_speed,
    feature_cache_dir,
    feature_stats,
    fit_length,
    progress_bar,
    read_audio,
    settings_hash,
    single_thread,
    time_stretch,
    wave_rms,
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


OodTransform = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class OodSettings:
    """OOD splits of the test files, each off unless set: ``data.ood_*``."""

    ood_stretch: str = ""  # "0.5,2": splits stretch-xF, clips F times as long, pitch kept
    ood_speed: str = ""  # "0.7,1.4": splits speed-xF, played F times faster (pitch up by F)
    ood_pad_seconds: float = 0.0  # > 0: splits pad-Ss-silence/-noise, S seconds added around
    ood_noise_level: float = 0.1  # RMS of the pad noise (white) relative to the clip's RMS
    ood_shift_ms: float = 0.0  # != 0: split shift-Nms, the onset N ms later (< 0: earlier)

    def __post_init__(self) -> None:
        self.factors("ood_stretch")
        self.factors("ood_speed")  # fail early on a malformed list
        if self.ood_pad_seconds < 0 or self.ood_noise_level < 0:
            raise UserError("data.ood_pad_seconds and data.ood_noise_level cannot be negative")

    def factors(self, key: str) -> list[float]:
        """The positive factors listed in ``key`` ("0.5,2")."""
        text = str(getattr(self, key))
        try:
            factors = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            factors = [0.0]
        if any(not factor > 0 for factor in factors):
            raise UserError(
                f"data.{key} must be a comma-separated list of positive factors, like '0.5,2', "
                f"not {text!r}"
            )
        return factors

    def transforms(self, rate: int) -> dict[str, tuple[OodTransform, str]]:
        """Split name -> (transform of a clip and a per-item random generator, description)."""
        chosen: dict[str, tuple[OodTransform, str]] = {}
        for factor in self.factors("ood_stretch"):
            chosen[f"stretch-x{factor:g}"] = (
                lambda wave, _, factor=factor: time_stretch(wave, factor, rate),
                f"test files {factor:g}x as long, same pitch",
            )
        for factor in self.factors("ood_speed"):
            chosen[f"speed-x{factor:g}"] = (
                lambda wave, _, factor=factor: change_speed(wave, factor, rate),
                f"test files {factor:g}x as fast (resampled)",
            )
        if self.ood_pad_seconds > 0:
            added = round(self.ood_pad_seconds * rate)
            for noise in (False, True):
                level = self.ood_noise_level if noise else 0.0
                chosen[f"pad-{self.ood_pad_seconds:g}s-{'noise' if noise else 'silence'}"] = (
                    partial(pad_clip, added=added, noise_level=level),
                    f"{self.ood_pad_seconds:g} s of {'noise' if noise else 'silence'} added",
                )
        if self.ood_shift_ms:
            shift = round(self.ood_shift_ms * rate / 1000)
            chosen[f"shift-{self.ood_shift_ms:g}ms"] = (
                lambda wave, _: fit_length(wave, wave.shape[-1], shift),
                f"onset moved {self.ood_shift_ms:g} ms",
            )
        return chosen


def pad_clip(
    wave: torch.Tensor, rng: np.random.Generator, added: int, noise_level: float
) -> torch.Tensor:
    """``wave`` inside ``added`` more samples, split at random before and after it.

    The padding is silence, or white noise at ``noise_level`` times the clip's RMS; the clip's
    own samples are kept as they are.
    """
    before = int(rng.integers(added + 1))
    padded = fit_length(wave, wave.shape[-1] + added, before)
    if noise_level > 0:
        rms = wave_rms(wave)
        noise = torch.from_numpy(rng.standard_normal(padded.shape[-1]).astype(np.float32))
        noise[before : before + wave.shape[-1]] = 0.0
        padded = padded + noise_level * rms * noise
    return padded


def clip_wave(path: Path, rate: int, clip_seconds: float, max_seconds: float) -> torch.Tensor:
    """One file's waveform at ``rate``, cropped or padded as set (what the features are of).

    Raises AudioReadError for a file soundfile cannot read (or holding NaN/inf).
    """
    wave = read_audio(path, rate)
    if clip_seconds > 0:
        wave = centre(wave, int(clip_seconds * rate))
    elif max_seconds > 0:
        wave = wave[: int(max_seconds * rate)]
    return wave


def clip_mel_db(path: Path, analyzer: MelAnalyzer, clip_seconds: float, max_seconds: float) -> Any:
    """One file's cached form: mel_db (frames, mels) in float16, cropped or padded as set."""
    rate = analyzer.settings.sample_rate
    return analyzer.mel_db(clip_wave(path, rate, clip_seconds, max_seconds)).half()


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
    return {
        "mel_db": Ragged.from_list(arrays).state(),
        "rows": torch.tensor(rows, dtype=torch.long),
        "skipped": skipped,
    }


def features_key(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clips: ClipSettings,
    **extra: Any,
) -> str:
    """The cache key of features of ``relatives``: analysis, clip settings, the listing (names
    and sizes) and ``extra`` (what an OOD split adds)."""
    listing = hashlib.sha256(
        "".join(f"{rel}:{(root / rel).stat().st_size}\n" for rel in relatives).encode()
    ).hexdigest()
    return settings_hash(
        {
            "version": CACHE_VERSION,
            "analysis": settings.analysis_key(),
            "clip_seconds": clips.clip_seconds,
            "max_seconds": clips.max_seconds,
            "listing": listing,
            **extra,
        }
    )


def cached_features(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clips: ClipSettings,
    cache_dir: Path,
) -> dict[str, Any]:
    """The features of every listed file, built once per (analysis, clip settings, listing)."""
    key = features_key(root, relatives, settings, clips)
    return cached(
        cache_dir / f"features-{key}.pt",
        lambda: build_cache(root, relatives, settings, clips.clip_seconds, clips.max_seconds),
    )


def cached_ood_features(
    root: Path,
    relatives: list[str],
    settings: FeatureSettings,
    clips: ClipSettings,
    split: tuple[str, OodTransform, float, int],
    cache_dir: Path,
) -> Ragged:
    """Mel_db of one OOD split's transformed test files, built once per split and setting.

    ``split`` is (name, transform, noise level, seed); item i's transform draws from a
    generator seeded with (seed, i), so every split and rerun gets the same draws.
    """
    name, transform, noise_level, seed = split
    key = features_key(
        root, relatives, settings, clips, split=name, noise_level=noise_level, seed=seed
    )

    def build() -> dict[str, Any]:
        analyzer, rate = MelAnalyzer(settings), settings.sample_rate
        arrays = []
        with progress_bar(f"caching {name} of {root.name}", len(relatives)) as bar:
            with single_thread():
                for index, relative in enumerate(relatives):
                    advance(bar)
                    wave = clip_wave(root / relative, rate, clips.clip_seconds, clips.max_seconds)
                    rng = np.random.default_rng([seed, index])
                    arrays.append(analyzer.mel_db(transform(wave, rng)).half())
        return {"mel_db": Ragged.from_list(arrays).state()}

    state = cached(cache_dir / f"ood-{key}.pt", build)["mel_db"]
    return Ragged(state["flat"], state["offsets"])


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
        **defaults_of(OodSettings),
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
        readable_tests = [rel for rel, _ in assignment["test"] if row_of[rel] >= 0]
        ood_splits = settings_of(OodSettings, config).transforms(settings.sample_rate)
        noise_level = float(config.get("data.ood_noise_level", OodSettings.ood_noise_level))
        ood_mel_db = {
            name: cached_ood_features(
                root,
                readable_tests,
                settings,
                clips,
                (name, transform, noise_level, int(config.get("data.seed", 0))),
                cache_dir,
            )
            for name, (transform, _) in ood_splits.items()
        }
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
        for variant in ood_mel_db.values():
            longest = max([longest, *(variant.length(row) for row in range(len(variant)))])
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
        for name, variant in ood_mel_db.items():
            rows, labels = list(range(len(variant))), chosen["test"][1]
            splits[name] = Split(
                FeatureDataset(variant, rows, labels, analyzer, mean, std),
                ood=True,
                description=ood_splits[name][1],
            )
        skipped = list(cache["skipped"])
        return DataBundle(dataset("train"), splits, pad_collate, info, len(skipped), skipped)

    def read_file(self, path: Path, config: Config, info: dict[str, Any]) -> Any:
        """A file's features as a training item's: same reading, analysis and statistics."""
        analyzer = MelAnalyzer(FeatureSettings.from_config(config))
        clips = settings_of(ClipSettings, config)
        try:
            mel_db = clip_mel_db(path, analyzer, clips.clip_seconds, clips.max_seconds)
        except AudioReadError as error:
            raise UnreadableFile(str(error) or "unreadable audio") from None
        mean, std = torch.tensor(info["feature_mean"]), torch.tensor(info["feature_std"])
        item = FeatureDataset(Ragged.from_list([mel_db]), [0], [0], analyzer, mean, std)[0]
        return item["inputs"]
