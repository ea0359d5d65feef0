"""`speech-commands`: Google Speech Commands v0.02 keyword spotting, 35-word or 12-class protocol.

Layout (as the official archive unpacks): ``<data-dir>/speech_commands_v0.02/<word>/*.wav``
(1 s, 16 kHz), ``validation_list.txt``, ``testing_list.txt`` and ``_background_noise_/``.
Files in neither list are training data.

Protocols (``data.protocol``):

- ``35``: every word folder is a class.
- ``12``: yes, no, up, down, left, right, on, off, stop, go, ``_unknown_`` (every other word,
  subsampled per split to the mean count of the ten words, times ``data.unknown_scale``) and
  ``_silence_`` (1 s cut from the background-noise recordings at a random gain, as many per split
  as the mean word count), the shape of the official 12-class test set.

Audio is read with soundfile (other rates resampled, stereo averaged), padded or cropped to 1 s
around its middle, and turned into mel power in dB once; that is cached on disk per feature
setting (``<data.cache_dir>/<folder>-<hash of its path>/features-<hash>.pt``, by default in
the user cache folder, so the data folder may be read-only; the hash covers the analysis
settings, data.seed, the OOD settings and the file listing, so any change builds a new
cache). MFCC (40, default) or log-mel (80) features are finished from it on the fly.
Training augmentation works in the feature domain (see :mod:`recipes._audio`): random time
shift (frames), background noise mixed in the mel power domain, SpecAugment; later epochs do
no audio work.

OOD splits, all built from the test split: ``speed`` (speed changed by a factor drawn from
0.7-1.4 by resampling; slow clips keep their full length, over 1 s), ``pad2s-silence`` and
``pad2s-noise`` (the 1 s clip placed at a random offset in 2 s of silence, or of background
noise), ``shifted`` (onset moved 120-250 ms either way inside the 1 s window, beyond the training
shift of 100 ms; part of the word may be cut).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from recipes import folders
from recipes._audio import (
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
    default_cache_dir,
    feature_cache_dir,
    feature_stats,
    fit_length,
    noise_excerpt,
    progress_bar,
    read_audio,
    scan_class_folders,
    settings_hash,
    single_thread,
)
from recipes.base import (
    Config,
    DataBundle,
    Split,
    UserError,
    pad_collate,
    register_recipe,
)
from recipes.files import is_storage_error, storage_error
from recipes.settings import defaults_of, settings_of

ARCHIVE_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
# Digest and size of the official archive as published in TFDS's checksum list and elsewhere;
# not re-verified here (no network), so a mismatch names both values.
ARCHIVE_SHA256 = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
ARCHIVE_SIZE = 2428923189
FOLDER = "speech_commands_v0.02"
NOISE_FOLDER = "_background_noise_"
TEN_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
CACHE_VERSION = 2  # 2: samples with NaN/inf are skipped (c6abaf6), not cached
OOD_SPLITS = {
    "speed": "speed changed 0.7x-1.4x (resampling)",
    "pad2s-silence": "padded to 2 s with silence at a random offset",
    "pad2s-noise": "padded to 2 s with background noise at a random offset",
    "shifted": "onset shifted 120-250 ms (training shifts up to 100 ms)",
}
CHUNK = 1 << 20  # download buffer


# ----------------------------------------------------------------------------- download


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str, destination: Path, *, size: int | None, sha256: str | None, timeout: float = 30
) -> Path:
    """Fetch ``url`` to ``destination`` with a progress bar, resuming a ``.part`` file.

    The partial file grows through HTTP Range requests (a server that ignores Range restarts
    it); on completion size and SHA-256 are checked before the rename, and a mismatch deletes
    the partial file and raises UserError. No network is a UserError too.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if not (size is not None and have == size):
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            raise UserError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise UserError(
                f"cannot download {url} ({reason}); check the network, or put the archive "
                f"at {destination} by hand and run again"
            ) from None
        with response:
            if have and getattr(response, "status", None) != 206:
                have = 0  # the server sent the whole file
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else size
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            try:
                with (
                    Progress(*columns, console=Console(stderr=True), transient=True) as bar,
                    part.open("ab" if have else "wb") as stream,
                ):
                    task = bar.add_task(
                        f"downloading {destination.name}", total=total, completed=have
                    )
                    while block := response.read(CHUNK):
                        stream.write(block)
                        bar.advance(task, len(block))
            except OSError as error:  # the part already written is kept: a rerun resumes it
                if is_storage_error(error):
                    raise storage_error(part, error) from None
                raise
    got = part.stat().st_size
    if size is not None and got != size:
        raise UserError(
            f"download of {url} stopped at {got} of {size} bytes; run again to resume it"
        )
    if sha256 is not None:
        digest = sha256_of(part)
        if digest != sha256:
            part.unlink()
            raise UserError(
                f"checksum mismatch for {url}: sha256 {digest}, expected {sha256}; "
                "the partial file was deleted, run again to download it afresh"
            )
    os.replace(part, destination)
    return destination


def extract_archive(archive: Path, target: Path) -> Path:
    """Unpack a .tar.gz into ``target`` atomically: a temporary sibling folder, then a rename.

    Reading every member is also the gzip/tar integrity pass; a damaged archive leaves no
    half-unpacked folder behind.
    """
    temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(temp, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        shutil.rmtree(temp, ignore_errors=True)
        if is_storage_error(error) and not isinstance(error, FileNotFoundError):
            raise storage_error(Path(getattr(error, "filename", None) or target), error) from None
        raise UserError(f"{archive} is damaged ({error}); delete it and download again") from None
    # an archive with a single top folder of the expected name unpacks one level deeper
    inner = temp / target.name
    source = inner if inner.is_dir() and len(list(temp.iterdir())) == 1 else temp
    os.replace(source, target)
    shutil.rmtree(temp, ignore_errors=True)
    return target


TORCHAUDIO_FOLDER = "SpeechCommands"  # torchaudio.datasets.SPEECHCOMMANDS puts FOLDER in here


def find_root(data_dir: Path) -> Path | None:
    """The Speech Commands folder: ``data_dir/speech_commands_v0.02``, torchaudio's
    ``data_dir/SpeechCommands/speech_commands_v0.02``, or ``data_dir`` itself."""
    for candidate in (data_dir / FOLDER, data_dir / TORCHAUDIO_FOLDER / FOLDER, data_dir):
        if (candidate / "testing_list.txt").is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- cache


@dataclasses.dataclass(frozen=True)
class OodSettings:
    """How the OOD variants of the test split are made (part of the cache key)."""

    speed: tuple[float, float] = (0.7, 1.4)
    pad_seconds: float = 2.0
    pad_noise_gain: tuple[float, float] = (0.05, 0.3)
    shift_ms: tuple[float, float] = (120.0, 250.0)


def listing_signature(root: Path, items: list[tuple[str, str]], noise: list[Path]) -> str:
    """Hash of the file names and sizes the cache was built from."""
    digest = hashlib.sha256()
    for relative, _ in items:
        digest.update(f"{relative}:{(root / relative).stat().st_size}\n".encode())
    for path in noise:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def ood_variant(
    name: str,
    wave: torch.Tensor,
    rng: np.random.Generator,
    noises: list[torch.Tensor],
    ood: OodSettings,
    sample_rate: int,
) -> torch.Tensor:
    """The OOD version ``name`` of a raw test waveform (before the 1 s pad/crop)."""
    clip_length = sample_rate
    if name == "speed":
        fast = change_speed(wave, float(rng.uniform(*ood.speed)), sample_rate)
        return centre(fast, max(clip_length, fast.shape[0]))
    clip = centre(wave, clip_length)
    if name == "shifted":
        shift = int(rng.uniform(*ood.shift_ms) * sample_rate / 1000) * int(rng.choice([-1, 1]))
        return fit_length(clip, clip_length, shift)
    length = int(ood.pad_seconds * sample_rate)
    padded = fit_length(clip, length, int(rng.integers(length - clip_length + 1)))
    if name == "pad2s-noise":
        padded = padded + float(rng.uniform(*ood.pad_noise_gain)) * noise_excerpt(
            rng, noises, length
        )
    return padded


def build_cache(
    root: Path,
    items: list[tuple[str, str]],
    split_of: list[str],
    noise_files: list[Path],
    settings: FeatureSettings,
    ood: OodSettings,
    seed: int,
) -> dict[str, Any]:
    """Mel_db of every clip, the silence clips, the noise recordings and the OOD test variants.

    Every random draw comes from a generator seeded by (seed, purpose, index), so the cache
    does not depend on iteration order.
    """
    analyzer = MelAnalyzer(settings)
    rate = settings.sample_rate
    arrays: list[torch.Tensor] = []

    def add(wave: torch.Tensor) -> int:
        arrays.append(analyzer.mel_db(wave).to(torch.float16))
        return len(arrays) - 1

    noises, noise_rows = [], []
    for path in noise_files:
        try:
            noises.append(read_audio(path, rate))
        except AudioReadError:
            continue
        noise_rows.append(add(noises[-1]))

    word_counts = {split: {} for split in ("train", "val", "test")}
    for (_, word), split in zip(items, split_of, strict=True):
        word_counts[split][word] = word_counts[split].get(word, 0) + 1
    silence_count = {
        split: round(sum(counts.get(w, 0) for w in TEN_WORDS) / len(TEN_WORDS))
        for split, counts in word_counts.items()
    }
    clip_rows: list[int] = []
    skipped: list[str] = []
    ood_rows: dict[str, list[int]] = {name: [] for name in OOD_SPLITS}
    ood_items: list[int] = []  # item index of each OOD row (silence: -1 - silence position)
    silence_rows: dict[str, list[int]] = {split: [] for split in silence_count}
    total = len(items) + sum(silence_count.values())
    with progress_bar(f"caching features of {root.name}", total) as bar, single_thread():
        for index, (relative, _) in enumerate(items):
            advance(bar)
            try:
                wave = read_audio(root / relative, rate)
            except AudioReadError:
                clip_rows.append(-1)
                skipped.append(relative)
                continue
            clip_rows.append(add(centre(wave, rate)))
            if split_of[index] == "test":
                ood_items.append(index)
                for variant_id, name in enumerate(OOD_SPLITS):
                    rng = np.random.default_rng([seed, 10 + variant_id, index])
                    ood_rows[name].append(add(ood_variant(name, wave, rng, noises, ood, rate)))
        for split_id, (split, count) in enumerate(silence_count.items()):
            for position in range(count):
                advance(bar)
                rng = np.random.default_rng([seed, 1, split_id, position])
                wave = float(rng.uniform(0, 1)) * noise_excerpt(rng, noises, rate)
                silence_rows[split].append(add(wave))
                if split == "test":
                    ood_items.append(-1 - position)
                    for variant_id, name in enumerate(OOD_SPLITS):
                        rng = np.random.default_rng([seed, 20 + variant_id, position])
                        ood_rows[name].append(add(ood_variant(name, wave, rng, noises, ood, rate)))
    mel_db = Ragged.from_list(arrays)
    return {
        "mel_db": mel_db.state(),
        "clip_rows": torch.tensor(clip_rows, dtype=torch.long),
        "noise_rows": torch.tensor(noise_rows, dtype=torch.long),
        "silence_rows": {split: torch.tensor(rows) for split, rows in silence_rows.items()},
        "ood_rows": {name: torch.tensor(rows) for name, rows in ood_rows.items()},
        "ood_items": torch.tensor(ood_items, dtype=torch.long),
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------- protocol


def cached_features(
    root: Path,
    items: list[tuple[str, str]],
    split_of: list[str],
    noise_files: list[Path],
    settings: FeatureSettings,
    seed: int,
    cache_dir: Path,
) -> dict[str, Any]:
    """The cache of :func:`build_cache`, keyed by everything that goes into it."""
    ood = OodSettings()
    key = settings_hash(
        {
            "version": CACHE_VERSION,
            "analysis": settings.analysis_key(),
            "seed": seed,
            "ood": dataclasses.asdict(ood),
            "listing": listing_signature(root, items, noise_files),
        }
    )
    return cached(
        cache_dir / f"features-{key}.pt",
        lambda: build_cache(root, items, split_of, noise_files, settings, ood, seed),
    )


def ood_splits(
    cache: dict[str, Any],
    test: tuple[list[int], list[int], list[int]],
    dataset: Callable[[list[int], list[int]], Dataset],
) -> dict[str, Split]:
    """The OOD variants of the protocol's test items (rows aligned with cache["ood_items"])."""
    position_of = {int(item): pos for pos, item in enumerate(cache["ood_items"].tolist())}
    _, test_labels, test_items = test
    splits = {}
    for name, description in OOD_SPLITS.items():
        variant = cache["ood_rows"][name]
        rows = [int(variant[position_of[item]]) for item in test_items]
        splits[name] = Split(dataset(rows, test_labels), ood=True, description=description)
    return splits


def protocol_classes(protocol: str, words: list[str]) -> list[str]:
    """Class names of a protocol, in label order."""
    if protocol == "12":
        return [*TEN_WORDS, UNKNOWN, SILENCE]
    return sorted(words)


def select_split(
    protocol: str,
    split: str,
    items: list[tuple[str, str]],
    split_of: list[str],
    rows: torch.Tensor,
    silence_rows: torch.Tensor,
    classes: list[str],
    seed: int,
    unknown_scale: float,
) -> tuple[list[int], list[int], list[int]]:
    """(cache rows, labels, item indices; silence = -1 - its position) of one split."""
    chosen_rows, labels, item_ids = [], [], []
    unknown: list[int] = []
    for index, ((_, word), where) in enumerate(zip(items, split_of, strict=True)):
        if where != split or rows[index] < 0:
            continue
        if protocol == "12" and word not in TEN_WORDS:
            unknown.append(index)
            continue
        chosen_rows.append(int(rows[index]))
        labels.append(classes.index(word))
        item_ids.append(index)
    if protocol == "12":
        # as many unknown words as an average keyword has clips (times unknown_scale)
        keep = round(len(chosen_rows) / len(TEN_WORDS) * unknown_scale)
        rng = np.random.default_rng([seed, 2, ("train", "val", "test").index(split)])
        picked = sorted(rng.permutation(len(unknown))[: min(keep, len(unknown))].tolist())
        for position in picked:
            index = unknown[position]
            chosen_rows.append(int(rows[index]))
            labels.append(classes.index(UNKNOWN))
            item_ids.append(index)
        for position, row in enumerate(silence_rows.tolist()):
            chosen_rows.append(int(row))
            labels.append(classes.index(SILENCE))
            item_ids.append(-1 - position)
    return chosen_rows, labels, item_ids


# ----------------------------------------------------------------------------- recipe


@dataclasses.dataclass(frozen=True)
class SpeechSettings:
    """speech-commands' own ``data.*`` options (analysis: FeatureSettings; SpecAugmentSettings)."""

    seed: int = 0  # silence excerpts, unknown-word subsampling and OOD draws
    protocol: str = "12"  # "12" or "35"
    stack: int = 1  # feature frames per token
    unknown_scale: float = 1.0  # _unknown_ items per split, relative to the mean word count
    noise_prob: float = 0.8  # training: chance of mixing in background noise
    noise_volume: float = 0.1  # its waveform gain, drawn from [0, noise_volume]

    def __post_init__(self) -> None:
        if self.protocol not in ("12", "35"):
            raise UserError(f"data.protocol must be '12' or '35', not {self.protocol!r}")


KWT_TRAINING: Config = {
    # Keyword Transformer (Berg et al. 2021): AdamW, lr 1e-3, wd 0.1, 10 warm-up epochs,
    # batch 512, 140 epochs (84,843 training clips -> 166 steps per epoch). KWT also used label
    # smoothing 0.1, which the engine does not offer (cross-entropy without smoothing here).
    "train.optimizer": "adamw",
    "train.lr": 1e-3,
    "train.weight_decay": 0.1,
    "train.batch_size": 512,
    "train.epochs": 140,
    "train.warmup_steps": 1660,
    "train.schedule": "cosine",
    "train.eval_every": 1000,
    "train.eval_batch_size": 512,
    "model.norm": "post",  # KWT's models are post-norm
    "model.dropout": 0.0,
    "data.time_masks": 2,
    "data.time_mask_width": 25,
    "data.freq_masks": 2,
    "data.freq_mask_width": 7,
}


@register_recipe
class SpeechCommands(SpectrogramClassifier):
    """Keyword spotting on Google Speech Commands v0.02 (35 words or 12 classes)."""

    name = "speech-commands"
    modality = "audio"
    task = "which keyword is spoken in a 1 s clip (35 words, or 10 + unknown + silence)"
    data_source = "download"
    metric = "accuracy"
    archive_url = ARCHIVE_URL
    archive_sha256: str | None = ARCHIVE_SHA256
    archive_size: int | None = ARCHIVE_SIZE
    defaults: Config = {
        **defaults_of(SpeechSettings),
        "data.features": "mfcc",
        "data.n_features": 40,
        "data.n_mels": 40,
        "data.sample_rate": 16000,
        "data.win_ms": 30.0,
        "data.hop_ms": 10.0,
        "data.cache_dir": "",  # "": the user cache folder (COPE_CACHE_DIR), never the data folder
        **defaults_of(SpecAugmentSettings),
        # Keyword spotting trains with a 100 ms shift and two masks of each kind (KWT's setting).
        "data.shift_ms": 100.0,
        "data.time_masks": 2,
        "data.freq_masks": 2,
        "model.dim": 64,
        "model.depth": 2,
        "model.heads": 4,
        "model.mlp_dim": 128,
        "model.npos": 64,
        "train.steps": 300,
        "train.batch_size": 64,
        "train.eval_every": 100,
    }
    presets: dict[str, Config] = {
        "tiny": {},
        "kwt1": {
            **KWT_TRAINING,
            "model.dim": 64,
            "model.depth": 12,
            "model.heads": 1,
            "model.mlp_dim": 256,
        },
        "kwt2": {
            **KWT_TRAINING,
            "model.dim": 128,
            "model.depth": 12,
            "model.heads": 2,
            "model.mlp_dim": 512,
        },
        "kwt3": {
            **KWT_TRAINING,
            "model.dim": 192,
            "model.depth": 12,
            "model.heads": 3,
            "model.mlp_dim": 768,
        },
    }
    default_preset = "tiny"

    def split_names(self) -> list[str]:
        return ["val", "test", *OOD_SPLITS]

    def download(self, data_dir: Path) -> Path:
        data_dir = Path(data_dir)
        if (root := find_root(data_dir)) is not None:
            return root
        data_dir.mkdir(parents=True, exist_ok=True)
        archive = data_dir / Path(urllib.parse.urlparse(self.archive_url).path).name
        if not archive.exists():
            download_file(
                self.archive_url, archive, size=self.archive_size, sha256=self.archive_sha256
            )
        return extract_archive(archive, data_dir / FOLDER)

    def locate(self, data_dir: Path | None, download: bool) -> Path:
        """The dataset folder, downloading it first when asked."""
        if data_dir is None:
            if not download:
                raise UserError(
                    "speech-commands needs --data-dir DIR (holding speech_commands_v0.02/) "
                    "or --download"
                )
            data_dir = default_cache_dir() / "data"
        data_dir = Path(data_dir)
        root = find_root(data_dir)
        if root is None and download:
            root = self.download(data_dir)
        if root is None:
            raise UserError(
                f"no Speech Commands data in {data_dir} (expected {FOLDER}/ with "
                "testing_list.txt); pass --download to fetch it"
            )
        return root

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Features of the protocol's splits (cached), then the OOD variants of the test split."""
        speech = settings_of(SpeechSettings, config)
        root = self.locate(data_dir, download)
        settings = FeatureSettings.from_config(config)
        items = scan_class_folders(root, skip=[NOISE_FOLDER])
        if not items:
            raise UserError(f"{root} holds no word folders with WAV files")
        lists = folders.split_lists(root, folders.SplitSettings(split="lists"))
        assert lists is not None  # split="lists" never falls back to the seed
        split_of = [
            "test" if rel in lists["test"] else "val" if rel in lists["val"] else "train"
            for rel, _ in items
        ]
        noise_files = sorted((root / NOISE_FOLDER).glob("*.wav"))
        cache_dir = feature_cache_dir(config, self.name, root)
        cache = cached_features(
            root, items, split_of, noise_files, settings, speech.seed, cache_dir
        )
        mel_db = Ragged(cache["mel_db"]["flat"], cache["mel_db"]["offsets"])
        classes = protocol_classes(speech.protocol, sorted({word for _, word in items}))
        selections = {
            split: select_split(
                speech.protocol,
                split,
                items,
                split_of,
                cache["clip_rows"],
                cache["silence_rows"][split],
                classes,
                speech.seed,
                speech.unknown_scale,
            )
            for split in ("train", "val", "test")
        }
        analyzer = MelAnalyzer(settings)
        mean, std = feature_stats(mel_db, selections["train"][0], analyzer)
        noise = Ragged.from_list([mel_db[int(row)] for row in cache["noise_rows"]])
        augmentation = settings_of(SpecAugmentSettings, config).augmentation(
            settings.hop_ms, noise, speech.noise_prob, speech.noise_volume
        )

        def dataset(rows: list[int], labels: list[int], train: bool = False) -> FeatureDataset:
            return FeatureDataset(
                mel_db, rows, labels, analyzer, mean, std, augmentation if train else None
            )

        splits = {
            "val": Split(dataset(*selections["val"][:2]), description="validation_list.txt"),
            "test": Split(dataset(*selections["test"][:2]), description="testing_list.txt"),
            **ood_splits(cache, selections["test"], dataset),
        }
        every_row = [row for rows, _, _ in selections.values() for row in rows]
        every_row += [int(row) for rows in cache["ood_rows"].values() for row in rows]
        longest = max(mel_db.length(row) for row in every_row)
        info = {
            "num_classes": len(classes),
            "class_names": classes,
            "feature_dim": settings.n_features,
            "stack": speech.stack,
            "max_len": -(-longest // speech.stack) + 1,  # + CLS
            "protocol": speech.protocol,
            "root": str(root),
        }
        train = dataset(*selections["train"][:2], train=True)
        skipped = list(cache["skipped"])
        return DataBundle(train, splits, pad_collate, info, len(skipped), skipped)
