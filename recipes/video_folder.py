"""`video-folder`: classify videos stored as class sub-folders of video files.

Layout (``--data-dir ROOT``)::

    ROOT/<class name>/<any sub-folders>/<video>.{mp4,avi,webm,mkv,mov,...}
    ROOT/validation_list.txt   optional: one path per line, relative to ROOT
    ROOT/testing_list.txt      optional: likewise

Videos are decoded with PyAV (its bundled FFmpeg reads most containers and codecs); frames are
taken at ``data.fps`` frames per second of the video's own timeline, starting at
``data.start`` seconds, ``data.frames`` at most (a shorter video gives a shorter clip, padded
and masked in the batch), resized to ``data.size`` x ``data.size`` and normalised with
torchvision transforms (v2). Decoded clips are cached as uint8 tensors under
``data.cache_dir`` (default ``ROOT/.cope-cache``) in a folder named by the decoding settings,
so a changed setting decodes again and an unchanged one never does. Unreadable or empty files
are skipped and counted (the count is reported when training starts).

Listing and splits (list files, or a stratified split of each class by ``data.seed``) are
:mod:`recipes.folders`', shared with the other folder recipes. No OOD splits are defined: a
folder has no known notion of tempo, though ``data.fps`` can be changed at evaluation time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from recipes import folders
from recipes._video import (
    VIDEO_MODEL_DEFAULTS,
    VIDEO_PRESETS,
    VIDEO_SUFFIXES,
    DecodeSettings,
    build_video_classifier,
    decode_all,
    decode_video,
    drop_frames,
    load_clip,
    normalise,
    repeat_frames,
)
from recipes.base import (
    Config,
    DataBundle,
    Recipe,
    Split,
    UnreadableFile,
    UserError,
    pad_collate,
    register_recipe,
)
from recipes.settings import defaults_of, settings_of


@dataclass(frozen=True)
class CacheSettings:
    """Where decoded clips are kept (``data.*``)."""

    cache: bool = True  # keep decoded clips as uint8 tensors on disk
    cache_dir: str = ""  # "" = <data-dir>/.cope-cache
    progress: bool = True  # a progress bar while decoding


@dataclass(frozen=True)
class RetimeSettings:
    """OOD splits of the test videos, each off (0) unless set: ``data.ood_*``."""

    ood_slow: int = 0  # > 1: every frame repeated this many times (split slow-xN)
    ood_fast: int = 0  # > 1: every N-th frame kept (split fast-xN)
    ood_crop: float = 0.0  # in (0, 1): the middle fraction of the frames kept (split crop-F)

    def __post_init__(self) -> None:
        if self.ood_slow < 0 or self.ood_fast < 0 or not 0 <= self.ood_crop < 1:
            raise UserError(
                "data.ood_slow and data.ood_fast must be whole factors >= 0 and data.ood_crop "
                "a fraction in [0, 1)"
            )

    def transforms(self) -> dict[str, tuple[Callable[[Tensor], Tensor], str]]:
        """Split name -> (what it does to a uint8 clip, description)."""
        chosen: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {}
        if self.ood_slow > 1:
            chosen[f"slow-x{self.ood_slow}"] = (
                partial(repeat_frames, factor=self.ood_slow),
                f"test videos at 1/{self.ood_slow} of the frame rate's speed (frames repeated)",
            )
        if self.ood_fast > 1:
            chosen[f"fast-x{self.ood_fast}"] = (
                partial(drop_frames, keep_every=self.ood_fast),
                f"test videos {self.ood_fast}x faster (every {self.ood_fast}th frame)",
            )
        if self.ood_crop > 0:
            chosen[f"crop-{self.ood_crop:g}"] = (
                partial(crop_middle, fraction=self.ood_crop),
                f"the middle {self.ood_crop:g} of each test video's frames",
            )
        return chosen

    def longest(self, frames: int) -> int:
        """The most frames a split can hold when training clips have ``frames``."""
        return frames * max(self.ood_slow, 1)


def crop_middle(clip: Tensor, fraction: float) -> Tensor:
    """The middle ``fraction`` of a clip's frames (at least one): a temporal crop."""
    keep = max(1, round(clip.shape[0] * fraction))
    start = (clip.shape[0] - keep) // 2
    return clip[start : start + keep]


class VideoClips(Dataset):
    """Decoded clips (in memory or in the cache) with their class ids."""

    def __init__(self, clips: list[Tensor | Path], labels: list[int]) -> None:
        self.clips, self.labels = clips, labels

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = normalise(self.frames(index))  # (frames, channels, size, size) float
        return {"inputs": clip, "targets": self.labels[index]}

    def frames(self, index: int) -> Tensor:
        """The uint8 clip as decoded."""
        return load_clip(self.clips[index])


class RetimedClips(VideoClips):
    """Clips with their frames changed (repeated, dropped, cropped) before normalising."""

    def __init__(self, base: VideoClips, change: Callable[[Tensor], Tensor]) -> None:
        super().__init__(base.clips, base.labels)
        self.change = change

    def frames(self, index: int) -> Tensor:
        return self.change(load_clip(self.clips[index]))


def decode_settings(config: Config) -> DecodeSettings:
    """The decoding options of a config, checked."""
    settings = settings_of(DecodeSettings, config)
    if settings.channels not in (1, 3):
        raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {settings.channels}")
    if settings.size < 1:
        raise UserError(f"data.size must be positive, got {settings.size}")
    return settings


@register_recipe
class VideoFolder(Recipe):
    """Any folder of class sub-folders of videos, decoded with PyAV."""

    name = "video-folder"
    modality = "video"
    task = "class of a video (its sub-folder)"
    data_source = "folder"
    metric = "accuracy"
    defaults: Config = {
        "data.seed": 0,
        **defaults_of(DecodeSettings),
        **folders.FOLDER_DEFAULTS,
        **defaults_of(CacheSettings),
        **defaults_of(RetimeSettings),
        **VIDEO_MODEL_DEFAULTS,
        "train.steps": 2000,
        "train.batch_size": 16,
        "train.eval_every": 200,
    }
    presets: dict[str, Config] = VIDEO_PRESETS
    default_preset = "small"
    file_suffixes = VIDEO_SUFFIXES

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Find, split, decode (or load from the cache) and wrap the videos."""
        config = {**self.defaults, **config}
        root = folders.folder_root(data_dir, self.name, "video")
        classes = folders.find_class_files(root, VIDEO_SUFFIXES, "video")
        assignment = folders.assign_splits(root, classes, folders.SplitSettings.from_config(config))
        settings, caching = decode_settings(config), settings_of(CacheSettings, config)
        retime = settings_of(RetimeSettings, config)
        cache_dir = None
        if caching.cache:
            cache_dir = Path(caching.cache_dir) if caching.cache_dir else root / ".cope-cache"
        datasets: dict[str, VideoClips] = {}
        skipped: list[str] = []
        for split, members in assignment.items():
            clips, _ = decode_all(
                [root / relative for relative, _ in members],
                root,
                settings,
                cache_dir,
                show_progress=caching.progress,
            )
            skipped += [rel for clip, (rel, _) in zip(clips, members, strict=True) if clip is None]
            kept = [
                (clip, label)
                for clip, (_, label) in zip(clips, members, strict=True)
                if clip is not None
            ]
            datasets[split] = VideoClips([clip for clip, _ in kept], [label for _, label in kept])
        folders.check_splits_not_empty(
            root,
            {split: len(dataset) for split, dataset in datasets.items()},
            {split: len(members) for split, members in assignment.items()},
        )
        info = {
            "num_classes": len(classes),
            "class_names": list(classes),
            "channels": settings.channels,
            "frame_size": settings.size,
            "max_frames": retime.longest(settings.frames),
            "tubelet_frames": int(config["model.tubelet_frames"]),
        }
        splits = {
            "val": Split(datasets["val"], description="held-out videos"),
            "test": Split(datasets["test"], description="held-out videos"),
        }
        for name, (change, description) in retime.transforms().items():
            splits[name] = Split(RetimedClips(datasets["test"], change), True, description)
        return DataBundle(datasets["train"], splits, pad_collate, info, len(skipped), skipped)

    def read_file(self, path: Path, config: Config, info: dict[str, Any]) -> Any:
        """A video decoded and normalised as a training item (same decoding settings)."""
        try:
            clip = decode_video(path, decode_settings({**self.defaults, **config}))
        except (ValueError, OSError) as error:
            raise UnreadableFile(str(error)) from None
        return VideoClips([clip], [0])[0]["inputs"]

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        """Video frontend (tubelets) + encoder + classification head."""
        return build_video_classifier({**self.defaults, **config}, info)

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        """The clip's frames (first channel), without known event onsets."""
        return {
            "kind": "frames",
            "image": item["inputs"][:, 0],
            "tokens_per_frame": 1.0 / int(info.get("tubelet_frames", 2)),
            "onsets": [],
        }
