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

Splits: with the list files, those; otherwise a stratified split of each class by
``data.seed`` (``data.val_fraction``, ``data.test_fraction``). No OOD splits are defined: a
folder has no known notion of tempo, though ``data.fps`` can be changed at evaluation time.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from recipes._video import (
    VIDEO_MODEL_DEFAULTS,
    VIDEO_SUFFIXES,
    DecodeSettings,
    build_video_classifier,
    decode_all,
    find_videos,
    load_clip,
    normalise,
)
from recipes.base import Config, DataBundle, Recipe, Split, UserError, pad_collate, register_recipe

LIST_FILES = {"val": "validation_list.txt", "test": "testing_list.txt"}


class VideoClips(Dataset):
    """Decoded clips (in memory or in the cache) with their class ids."""

    def __init__(self, clips: list[Tensor | Path], labels: list[int]) -> None:
        self.clips, self.labels = clips, labels

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = normalise(load_clip(self.clips[index]))  # (frames, channels, size, size) float
        return {"inputs": clip, "targets": self.labels[index]}


def read_list(path: Path) -> set[str]:
    """The relative paths named in a split list file (blank lines and comments ignored)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(Path(line).as_posix())
    return names


def assign_splits(
    classes: dict[str, list[Path]], root: Path, config: Config
) -> dict[str, list[tuple[Path, int]]]:
    """(path, class id) lists of train, val and test: by list files when present, else by seed."""
    lists = {split: root / name for split, name in LIST_FILES.items()}
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    if any(path.exists() for path in lists.values()):
        named = {
            split: read_list(path) if path.exists() else set() for split, path in lists.items()
        }
        for label, files in enumerate(classes.values()):
            for path in files:
                relative = path.relative_to(root).as_posix()
                split = next(
                    (name for name, members in named.items() if relative in members), "train"
                )
                splits[split].append((path, label))
        return splits
    val_fraction = float(config["data.val_fraction"])
    test_fraction = float(config["data.test_fraction"])
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            "data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1"
        )
    rng = random.Random(int(config["data.seed"]))
    for label, files in enumerate(classes.values()):
        order = list(files)
        rng.shuffle(order)
        # at least one video of each class in val and test once the class has three
        val = max(1, round(len(order) * val_fraction)) if len(order) >= 3 and val_fraction else 0
        test = max(1, round(len(order) * test_fraction)) if len(order) >= 3 and test_fraction else 0
        splits["val"] += [(path, label) for path in order[:val]]
        splits["test"] += [(path, label) for path in order[val : val + test]]
        splits["train"] += [(path, label) for path in order[val + test :]]
    return splits


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
        "data.fps": 8.0,
        "data.frames": 16,
        "data.size": 64,
        "data.channels": 3,
        "data.start": 0.0,
        "data.val_fraction": 0.1,
        "data.test_fraction": 0.1,
        "data.cache": True,
        "data.cache_dir": "",
        "data.progress": True,
        **VIDEO_MODEL_DEFAULTS,
        "train.steps": 2000,
        "train.batch_size": 16,
        "train.eval_every": 200,
    }
    presets: dict[str, Config] = {
        "tiny": {"model.dim": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 64},
        "small": {},
        "base": {"model.dim": 128, "model.depth": 4, "model.heads": 4, "model.mlp_dim": 256},
    }
    default_preset = "small"

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Find, split, decode (or load from the cache) and wrap the videos."""
        config = {**self.defaults, **config}
        if data_dir is None:
            raise UserError(
                "video-folder needs --data-dir pointing at a folder of class sub-folders of videos"
            )
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"video folder {root} does not exist")
        classes = find_videos(root)
        if not classes:
            suffixes = ", ".join(suffix.lstrip(".") for suffix in VIDEO_SUFFIXES)
            raise UserError(f"no video files ({suffixes}) in class sub-folders of {root}")
        if len(classes) < 2:
            raise UserError(f"{root} holds one class ({next(iter(classes))}); at least two needed")
        channels = int(config["data.channels"])
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels}")
        if int(config["data.size"]) < 1:
            raise UserError(f"data.size must be positive, got {config['data.size']}")
        settings = DecodeSettings(
            fps=float(config["data.fps"]),
            frames=int(config["data.frames"]),
            size=int(config["data.size"]),
            channels=channels,
            start=float(config["data.start"]),
        )
        cache_dir = None
        if config["data.cache"]:
            cache_dir = (
                Path(config["data.cache_dir"]) if config["data.cache_dir"] else root / ".cope-cache"
            )
        assigned = assign_splits(classes, root, config)
        datasets: dict[str, VideoClips] = {}
        skipped = 0
        for split, members in assigned.items():
            clips, errors = decode_all(
                [path for path, _ in members],
                root,
                settings,
                cache_dir,
                show_progress=bool(config["data.progress"]),
            )
            skipped += len(errors)
            kept = [
                (clip, label)
                for clip, (_, label) in zip(clips, members, strict=True)
                if clip is not None
            ]
            datasets[split] = VideoClips([clip for clip, _ in kept], [label for _, label in kept])
        for split in ("train", "val", "test"):
            if len(datasets[split]) == 0:
                raise UserError(
                    f"the {split} split of {root} holds no readable video; add videos or list files"
                )
        info = {
            "num_classes": len(classes),
            "classes": list(classes),
            "channels": channels,
            "frame_size": settings.size,
            "max_frames": settings.frames,
            "tubelet_frames": int(config["model.tubelet_frames"]),
        }
        splits = {
            "val": Split(datasets["val"], description="held-out videos"),
            "test": Split(datasets["test"], description="held-out videos"),
        }
        return DataBundle(datasets["train"], splits, pad_collate, info, skipped)

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
