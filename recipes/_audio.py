"""Shared audio helpers of the speech recipes: reading, resampling, features, caching, augmenting.

Features are kept on disk (and in memory) as **mel power in decibels without a floor**
(``mel_db``, frames x mels, float16). The model's features are finished from it on the fly:
``logmel`` = mel_db floored at (clip max - 80 dB); ``mfcc`` = the orthonormal DCT-II of that,
exactly what ``torchaudio.transforms.MFCC`` computes (tested). Keeping the power domain lets
training augmentation work without audio: background noise is mixed by adding mel powers
(exact in expectation for uncorrelated noise), a time shift moves frames, and SpecAugment masks
the finished features, so later epochs never touch a waveform or an STFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio
from torch import nn
from torch.utils.data import Dataset

from recipes.base import Config, Recipe, UserError, encoder_config
from recipes.files import DamagedFile, load_verified, note, save_verified
from recipes.folders import list_class_files
from recipes.folders import read_list as read_list  # one parser for every list file

AUDIO_EXTENSIONS = (".wav", ".flac")
TOP_DB = 80.0  # the floor below each clip's loudest mel bin, as torchaudio's MFCC uses
POWER_FLOOR = 1e-10  # torchaudio's amin: mel power is clamped here before the logarithm


class AudioReadError(Exception):
    """A file that soundfile cannot decode (corrupt, truncated, not audio)."""


# ----------------------------------------------------------------------------- waveforms


def read_audio(path: Path | str, sample_rate: int) -> torch.Tensor:
    """Read a WAV/FLAC file as mono float32 at ``sample_rate`` (channels averaged, resampled)."""
    try:
        samples, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, OSError, ValueError) as error:
        raise AudioReadError(f"{path}: {error}") from error
    if samples.size == 0:
        raise AudioReadError(f"{path}: no samples")
    if not np.isfinite(samples).all():  # float WAVs can hold NaN/inf; they would poison training
        raise AudioReadError(f"{path}: NaN or infinite samples")
    wave = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
    return resample(wave, file_rate, sample_rate)


def resample(wave: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Band-limited resampling (torchaudio's sinc interpolation); a no-op for equal rates."""
    if from_rate == to_rate:
        return wave
    return torchaudio.functional.resample(wave, int(from_rate), int(to_rate))


def fit_length(wave: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Place ``wave`` at ``offset`` samples inside ``length`` samples of silence (cropping)."""
    out = wave.new_zeros(length)
    start, stop = max(offset, 0), min(offset + wave.shape[-1], length)
    if stop > start:
        out[start:stop] = wave[start - offset : stop - offset]
    return out


def centre(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Pad or crop ``wave`` to ``length`` samples, keeping its middle."""
    return fit_length(wave, length, (length - wave.shape[-1]) // 2)


def change_speed(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """Play ``wave`` ``factor`` times faster (pitch moves with it), by resampling.

    The source rate is rounded to 100 Hz so that torchaudio's rational resampler keeps a short
    kernel; the factor actually applied is therefore within 0.3 % of the one asked for.
    """
    source_rate = max(100, round(sample_rate * factor / 100) * 100)
    return resample(wave, source_rate, sample_rate)


def time_stretch(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """``wave`` made ``factor`` times as long with its pitch kept (torchaudio's phase vocoder).

    STFT with a ~32 ms Hann window and 75 % overlap, :func:`torchaudio.functional.phase_vocoder`
    at rate ``1 / factor``, inverse STFT to ``round(factor * samples)`` samples. A plain phase
    vocoder loses level when it slows down (a 440 Hz tone: -4.6 dB at 2x, -4.4 dB at 1.25x,
    results/audio-ood/transforms.md; librosa's does too, librosa issue #1388), so the result is
    scaled back to the input's RMS: only the duration changes.
    """
    n_fft = 2 ** max(6, round(math.log2(sample_rate * 0.032)))
    hop = n_fft // 4
    window = torch.hann_window(n_fft)
    length = max(1, round(wave.shape[-1] * factor))
    padded = fit_length(wave, max(wave.shape[-1], n_fft))  # the STFT's reflect padding needs it
    spectrum = torch.stft(padded, n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[:, None]
    stretched = torchaudio.functional.phase_vocoder(spectrum, 1.0 / factor, phase_advance)
    stretched_length = round(padded.shape[-1] * factor)
    long = torch.istft(stretched, n_fft, hop, window=window, length=stretched_length)
    long = fit_length(long, length)
    level, stretched_level = wave_rms(wave), wave_rms(long)
    return long * (level / stretched_level) if stretched_level > 0 else long


def wave_rms(wave: torch.Tensor) -> float:
    """Root mean square of a waveform's samples."""
    return float(wave.pow(2).mean().sqrt())


def noise_excerpt(
    rng: np.random.Generator, noises: list[torch.Tensor], length: int
) -> torch.Tensor:
    """``length`` samples from a random background recording at a random offset (looped)."""
    if not noises:
        return torch.zeros(length)
    noise = noises[int(rng.integers(len(noises)))]
    if noise.shape[0] < length:
        noise = noise.repeat(length // noise.shape[0] + 1)
    start = int(rng.integers(noise.shape[0] - length + 1))
    return noise[start : start + length]


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSettings:
    """How waveforms become features; its hash names the feature cache."""

    kind: str = "mfcc"  # "mfcc" | "logmel"
    n_features: int = 40
    n_mels: int = 40
    sample_rate: int = 16000
    win_ms: float = 30.0
    hop_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("mfcc", "logmel"):
            raise UserError(f"data.features must be 'mfcc' or 'logmel', not {self.kind!r}")
        if self.kind == "logmel" and self.n_features != self.n_mels:
            raise UserError("with data.features=logmel, data.n_mels must equal data.n_features")
        if self.kind == "mfcc" and self.n_features > self.n_mels:
            raise UserError("data.n_features (MFCC count) cannot exceed data.n_mels")
        for key, value in (
            ("data.sample_rate", self.sample_rate),
            ("data.win_ms", self.win_ms),
            ("data.hop_ms", self.hop_ms),
            ("data.n_mels", self.n_mels),
        ):
            if not value > 0:  # zero would divide by zero deep inside the STFT
                raise UserError(f"{key} must be positive, got {value!r}")

    @classmethod
    def from_config(cls, config: Config) -> FeatureSettings:
        """Settings from ``data.features``, ``data.n_features``, ``data.n_mels``, ... keys.

        Absent keys keep this class's defaults; an unset feature count is 40 for MFCC and 80
        for log-mel (the recipes' conventional sizes).
        """
        default = cls()
        kind = str(config.get("data.features", default.kind))
        n_features = int(config.get("data.n_features") or (40 if kind == "mfcc" else 80))
        # log-mel features are the mel bands themselves: data.n_mels only matters for MFCC
        n_mels = (
            n_features if kind == "logmel" else int(config.get("data.n_mels") or default.n_mels)
        )
        return cls(
            kind=kind,
            n_features=n_features,
            n_mels=n_mels,
            sample_rate=int(config.get("data.sample_rate", default.sample_rate)),
            win_ms=float(config.get("data.win_ms", default.win_ms)),
            hop_ms=float(config.get("data.hop_ms", default.hop_ms)),
        )

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def n_fft(self) -> int:
        return 1 << math.ceil(math.log2(self.win_length))

    def mel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of torchaudio's MelSpectrogram for these settings."""
        return {
            "n_fft": self.n_fft,
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
        }

    def analysis_key(self) -> dict[str, Any]:
        """What the cached mel_db depends on (the finishing step does not change the cache)."""
        return {key: value for key, value in asdict(self).items() if key not in ("kind",)}


class MelAnalyzer:
    """Waveform -> mel_db (frames, mels); mel_db -> finished features (frames, n_features)."""

    def __init__(self, settings: FeatureSettings) -> None:
        self.settings = settings
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=settings.sample_rate, **settings.mel_kwargs()
        )
        # (mels, n_features): the same orthonormal DCT-II matrix torchaudio's MFCC multiplies by
        self.dct = torchaudio.functional.create_dct(settings.n_features, settings.n_mels, "ortho")

    def frames(self, samples: int) -> int:
        """Frames produced for ``samples`` samples (centred STFT)."""
        return samples // self.settings.hop_length + 1

    @torch.no_grad()
    def mel_db(self, waves: torch.Tensor) -> torch.Tensor:
        """(..., samples) waveforms -> (..., frames, mels) mel power in dB, no floor applied."""
        samples = waves.shape[-1]
        shortest = self.mel.n_fft // 2 + 1  # the centred STFT's reflect padding needs this many
        if samples < shortest:  # a clip shorter than half a window: pad with silence, crop after
            waves = torch.nn.functional.pad(waves, (0, shortest - samples))
        power = self.mel(waves.float())  # (..., mels, frames)
        mel_db = (10.0 * torch.log10(power.clamp_min(POWER_FLOOR))).transpose(-1, -2)
        return mel_db[..., : self.frames(samples), :]

    def finish(self, mel_db: torch.Tensor) -> torch.Tensor:
        """(..., frames, mels) mel_db -> (..., frames, n_features): floored, DCT for MFCC."""
        mel_db = mel_db.float()
        loudest = mel_db.amax(dim=(-2, -1), keepdim=True)
        floored = torch.maximum(mel_db, loudest - TOP_DB)
        if self.settings.kind == "mfcc":
            return floored @ self.dct
        return floored


def mix_noise_db(clip_db: torch.Tensor, noise_db: torch.Tensor, gain: float) -> torch.Tensor:
    """Mel_db of ``clip + gain * noise``: mel powers add (exact in expectation)."""
    clip_power = torch.pow(10.0, clip_db.float() / 10.0)
    noise_power = torch.pow(10.0, noise_db.float() / 10.0)
    mixed = clip_power + (gain * gain) * noise_power
    return 10.0 * torch.log10(mixed.clamp_min(POWER_FLOOR))


def silence_db(frames: int, n_mels: int) -> torch.Tensor:
    """Mel_db of digital silence (what zero padding of a waveform produces)."""
    return torch.full((frames, n_mels), 10.0 * math.log10(POWER_FLOOR))


# ----------------------------------------------------------------------------- ragged storage


class Ragged:
    """Variable-length (frames, dims) arrays stored as one flat tensor plus offsets."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor) -> None:
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_list(
        cls, arrays: Sequence[torch.Tensor], dtype: torch.dtype = torch.float16
    ) -> Ragged:
        lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
        offsets = torch.zeros(len(arrays) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = (
            torch.cat([a.to(dtype) for a in arrays]) if arrays else torch.zeros(0, 0, dtype=dtype)
        )
        return cls(flat, offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.flat[self.offsets[index] : self.offsets[index + 1]]

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def state(self) -> dict[str, torch.Tensor]:
        return {"flat": self.flat, "offsets": self.offsets}


class SpectrogramClassifier(Recipe):
    """Recipes whose items are (frames, features) spectrograms with one class each.

    The model is a FeatureFrontend (``info["stack"]`` frames per token), an encoder whose
    ``max_len`` is raised to the data's longest item, and a SequenceClassifier.
    """

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        from encoders.frontends import FeatureFrontend
        from encoders.transformer import SequenceClassifier

        encoder = encoder_config(config)
        encoder = dataclasses.replace(encoder, max_len=max(encoder.max_len, info["max_len"]))
        frontend = FeatureFrontend(info["feature_dim"], encoder.dim, stack=info["stack"])
        return SequenceClassifier(frontend, encoder, info["num_classes"])

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        """The item's spectrogram (features, frames)."""
        return {
            "kind": "spectrogram",
            "image": item["inputs"].T,
            "tokens_per_frame": 1.0 / info.get("stack", 1),
        }


# ----------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """Where generated or derived data is cached when no data directory is given."""
    if os.environ.get("COPE_CACHE_DIR"):
        return Path(os.environ["COPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cope"


def feature_cache_dir(config: Config, recipe: str, root: Path) -> Path:
    """Where the feature caches of data folder ``root`` go, never inside it (it may be read-only).

    ``data.cache_dir`` when set, else the user cache folder (:func:`default_cache_dir`, which
    honours COPE_CACHE_DIR); one sub-folder per data folder, named by its absolute path.
    """
    chosen = str(config.get("data.cache_dir") or "")
    base = Path(chosen).expanduser() if chosen else default_cache_dir() / recipe
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return base / f"{Path(root).resolve().name}-{where}"


def settings_hash(settings: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able dict of settings (the cache key)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MEMORY_CACHE: dict[str, Any] = {}


def cached(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load ``path`` (kept in memory for the process) or build it once and save it atomically.

    The file carries a digest of its contents: a damaged cache (or one from before digests)
    is rebuilt, never trusted. Runs of a compare share the process, so the in-memory copy
    spares them re-reading the file.
    """
    key = str(path)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    data = None
    if path.exists():
        try:
            data = load_verified(path)
        except DamagedFile as error:
            note(f"{error}; rebuilding it")
    if data is None:
        data = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_verified(path, data)
    _MEMORY_CACHE[key] = data
    return data


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small per-clip STFTs on one thread: with 2 shared CPUs, thread hand-offs cost more
    than the transforms themselves (measured: 128 two-second clips 0.3 s on one thread, up to
    20 s on two when the other CPU is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def progress_bar(description: str, total: int) -> Any:
    """A rich progress bar (on stderr) for feature caching; use as a context manager."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.add_task(description, total=total)
    return bar


def advance(bar: Any, steps: int = 1) -> None:
    """Advance the single task of a bar made by :func:`progress_bar`."""
    bar.advance(bar.task_ids[0], steps)


# ----------------------------------------------------------------------------- folders


def scan_class_folders(root: Path, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(path relative to root, class name) of every WAV/FLAC in root's class sub-folders, sorted."""
    skipped = set(skip)
    classes = list_class_files(root, AUDIO_EXTENSIONS)
    return [(rel, name) for name, files in classes.items() if name not in skipped for rel in files]


# ----------------------------------------------------------------------------- datasets


@dataclass
class Augmentation:
    """Training augmentation in the feature domain (see the module docstring)."""

    shift_frames: int = 0  # random time shift of up to this many frames either way
    noise: Ragged | None = None  # mel_db segments of background noise, each >= a clip long
    noise_prob: float = 0.0
    noise_volume: float = 0.0  # waveform gain drawn uniformly from [0, noise_volume]
    freq_masks: int = 0
    freq_mask_width: int = 0
    time_masks: int = 0
    time_mask_width: int = 0

    def apply_db(self, mel_db: torch.Tensor) -> torch.Tensor:
        """Shift and noise-mix one clip's mel_db (frames, mels)."""
        mel_db = mel_db.float()
        if self.shift_frames > 0:
            shift = int(torch.randint(-self.shift_frames, self.shift_frames + 1, ()))
            if shift:
                moved = silence_db(*mel_db.shape)
                if shift > 0:
                    moved[shift:] = mel_db[:-shift]
                else:
                    moved[:shift] = mel_db[-shift:]
                mel_db = moved
        if self.noise is not None and len(self.noise) and torch.rand(()) < self.noise_prob:
            segment = self.noise[int(torch.randint(len(self.noise), ()))]
            frames = mel_db.shape[0]
            if segment.shape[0] >= frames:
                start = int(torch.randint(segment.shape[0] - frames + 1, ()))
                gain = float(torch.rand(())) * self.noise_volume
                mel_db = mix_noise_db(mel_db, segment[start : start + frames], gain)
        return mel_db

    def apply_features(self, features: torch.Tensor) -> torch.Tensor:
        """SpecAugment on finished features (frames, n_features), masked with 0 (the mean).

        The same draws as torchaudio's FrequencyMasking/TimeMasking (tested equal), without
        building two modules per item: this runs for every training item on the CPU.
        """
        if not (self.freq_masks or self.time_masks):
            return features
        features = features.clone()
        for _ in range(self.freq_masks):
            _mask_along(features, 1, self.freq_mask_width)
        for _ in range(self.time_masks):
            _mask_along(features, 0, min(self.time_mask_width, features.shape[0]))
        return features


@dataclass(frozen=True)
class SpecAugmentSettings:
    """Training augmentation options (``data.*``) of the audio recipes; 0 turns one off."""

    shift_ms: float = 0.0  # random time shift of up to this much either way
    time_masks: int = 0
    time_mask_width: int = 10  # frames
    freq_masks: int = 0
    freq_mask_width: int = 5  # feature bins

    def augmentation(
        self,
        hop_ms: float,
        noise: Ragged | None = None,
        noise_prob: float = 0.0,
        noise_volume: float = 0.0,
    ) -> Augmentation | None:
        """The :class:`Augmentation` these options describe, or None when it does nothing."""
        augmentation = Augmentation(
            shift_frames=round(self.shift_ms / hop_ms),
            noise=noise,
            noise_prob=noise_prob,
            noise_volume=noise_volume,
            freq_masks=self.freq_masks,
            freq_mask_width=self.freq_mask_width,
            time_masks=self.time_masks,
            time_mask_width=self.time_mask_width,
        )
        active = augmentation.shift_frames or augmentation.freq_masks or augmentation.time_masks
        return augmentation if active or noise is not None else None


def _mask_along(features: torch.Tensor, axis: int, width: int) -> None:
    """Zero one random band of ``axis`` in place, drawn as torchaudio's mask_along_axis does."""
    if width < 1:
        return
    value = torch.rand(1) * width
    start = torch.rand(1) * (features.shape[axis] - value)
    first, stop = int(start.long()), int(start.long() + value.long())
    if axis == 0:
        features[first:stop] = 0.0
    else:
        features[:, first:stop] = 0.0


class FeatureDataset(Dataset):
    """Labelled clips from cached mel_db; items {"inputs": (frames, features), "targets": int}."""

    def __init__(
        self,
        mel_db: Ragged,
        indices: Sequence[int],
        labels: Sequence[int],
        analyzer: MelAnalyzer,
        mean: torch.Tensor,
        std: torch.Tensor,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.mel_db = mel_db
        self.indices = list(indices)
        self.labels = list(labels)
        self.analyzer = analyzer
        self.mean = mean
        self.std = std
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        mel_db = self.mel_db[self.indices[position]]
        if self.augmentation is not None:
            mel_db = self.augmentation.apply_db(mel_db)
        features = (self.analyzer.finish(mel_db) - self.mean) / self.std
        if self.augmentation is not None:
            features = self.augmentation.apply_features(features)
        return {"inputs": features, "targets": self.labels[position]}


def feature_stats(
    mel_db: Ragged, indices: Sequence[int], analyzer: MelAnalyzer, limit: int = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over (up to ``limit`` evenly spaced) training clips."""
    if not indices:
        raise UserError("the training split is empty")
    step = max(1, len(indices) // limit)
    chosen = list(indices)[::step][:limit]
    features = torch.cat([analyzer.finish(mel_db[i]) for i in chosen])
    return features.mean(0), features.std(0).clamp_min(1e-3)
