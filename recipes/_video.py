"""Video helpers shared by the video recipes: frame-rate changes, PyAV decoding, caching.

Clips are tensors shaped (frames, channels, height, width). Generated clips are uint8 in
[0, 255] until a dataset hands them out as float32 in [0, 1]; decoded clips are cached as
uint8 and normalised when an item is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encoders.frontends import FrontendOutput, VideoFrontend
from encoders.transformer import SequenceClassifier
from recipes.base import Config, UserError, encoder_config
from recipes.files import DamagedFile, load_verified, note, save_verified, write_text_atomic

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
CACHE_VERSION = 1  # bump when the cached representation changes
VIDEO_MODEL_DEFAULTS = {
    "model.pe": "cope",
    "model.dim": 64,
    "model.depth": 2,
    "model.heads": 4,
    "model.mlp_dim": 128,
    "model.dropout": 0.0,
    "model.pooling": "cls",
    "model.tokenizer": "mlp-max",  # "mlp-max" (one token per tubelet step) | "patches" | "linear"
    "model.tubelet_frames": 2,
    "model.patch": 8,
    "model.spatial_pe": "none",  # "none" | "learned" (a (h, w) embedding for patch tokens)
}
VIDEO_PRESETS: dict[str, Config] = {
    "tiny": {"model.dim": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 64},
    "small": {},
    "base": {"model.dim": 128, "model.depth": 4, "model.heads": 4, "model.mlp_dim": 256},
}
NPOS_CAP = 64  # default CoPE cap: above any count of events, far below patch-token counts


# ---------------------------------------------------------------------------------------------
# Frame-rate changes (the OOD splits of the video recipes)


def repeat_frames(clip: Tensor, factor: int) -> Tensor:
    """Each frame repeated ``factor`` times: the same clip shown at 1/factor of the speed."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return clip.repeat_interleave(factor, dim=0)


def drop_frames(clip: Tensor, keep_every: int) -> Tensor:
    """Every ``keep_every``-th frame, starting with the first: the clip sped up."""
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    return clip[::keep_every]


def pad_frames(clip: Tensor, multiple: int) -> Tensor:
    """Blank frames appended so that the frame count is a multiple of ``multiple`` (tubelets)."""
    missing = -clip.shape[0] % multiple
    if missing == 0:
        return clip
    blank = clip.new_zeros((missing, *clip.shape[1:]))
    return torch.cat([clip, blank], dim=0)


# ---------------------------------------------------------------------------------------------
# Decoding with PyAV


@dataclass(frozen=True)
class DecodeSettings:
    """How a video file becomes a clip; also the cache key, so every field matters."""

    fps: float = 8.0  # frames per second sampled from the video's own timeline
    frames: int = 16  # at most this many frames (shorter videos give shorter clips)
    size: int = 64  # frames resized to size x size
    channels: int = 3  # 3 (RGB) or 1 (grey)
    start: float = 0.0  # seconds skipped at the beginning

    def key(self) -> str:
        """A short hash naming the cache folder of these settings."""
        fields = {**self.__dict__, "version": CACHE_VERSION}
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def sample_times(fps: float, frames: int, start: float = 0.0) -> list[float]:
    """The timestamps (seconds) at which frames are taken: ``start + k / fps``."""
    if fps <= 0:
        raise UserError(f"data.fps must be positive, got {fps}")
    if frames < 1:
        raise UserError(f"data.frames must be at least 1, got {frames}")
    return [start + index / fps for index in range(frames)]


def pick_frames(frame_times: Sequence[float], wanted: Sequence[float]) -> list[int]:
    """For each wanted time, the index of the decoded frame shown at that time.

    A frame is shown from its timestamp until the next frame's, so the pick is the last frame
    whose time is <= the wanted time (the first frame for earlier times). Wanted times at or
    after the end of the last frame's display (its time + the mean frame interval) are
    dropped: a short video gives a shorter clip.
    """
    if not frame_times:
        return []
    interval = (frame_times[-1] - frame_times[0]) / max(len(frame_times) - 1, 1)
    end = frame_times[-1] + interval  # when the last frame stops being shown
    picks: list[int] = []
    index = 0
    for time in wanted:
        if time > end + 1e-9 or (interval > 0 and time >= end - 1e-9):
            break
        while index + 1 < len(frame_times) and frame_times[index + 1] <= time + 1e-9:
            index += 1
        picks.append(index)
    return picks


def decode_video(path: Path, settings: DecodeSettings) -> Tensor:
    """Decode a video file into a uint8 clip (frames, channels, size, size) with PyAV.

    Frames are sampled at ``settings.fps`` from the stream's timestamps, not by index, so
    videos with different frame rates give clips of the same rate. Decoding runs from the
    start without seeking (clips are short) and stops one frame past the last wanted time.
    Raises ValueError for a file that holds no decodable video frame (the caller skips and
    counts it).
    """
    import av
    from torchvision.transforms import v2

    wanted = sample_times(settings.fps, settings.frames, settings.start)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            times: list[float] = []
            images: list[Tensor] = []
            last_needed = wanted[-1]
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else len(times) / 25.0
                if times and time <= times[-1]:
                    continue  # duplicate or out-of-order timestamp: keep the first
                times.append(time)
                array = frame.to_ndarray(format="gray" if settings.channels == 1 else "rgb24")
                image = torch.from_numpy(array)
                images.append(image[None] if image.dim() == 2 else image.permute(2, 0, 1))
                if time > last_needed:
                    break  # one frame past the last wanted time is enough
    except av.FFmpegError as error:
        raise ValueError(f"{path} could not be decoded: {error}") from error
    if not images:
        raise ValueError(f"{path} holds no video frames")
    picks = pick_frames(times, wanted)
    if not picks:
        raise ValueError(f"{path} ends before {settings.start} s")
    clip = torch.stack([images[index] for index in picks])  # (frames, channels, H, W) uint8
    resize = v2.Resize((settings.size, settings.size), antialias=True)
    return resize(clip).contiguous()


def normalise(clip: Tensor, mean: float = 0.5, std: float = 0.5) -> Tensor:
    """uint8 clip -> float32 in roughly [-1, 1] (torchvision's ToDtype + Normalize)."""
    from torchvision.transforms import v2

    channels = clip.shape[1]
    transform = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean] * channels, [std] * channels)]
    )
    return transform(clip)


# ---------------------------------------------------------------------------------------------
# Cache of decoded clips


def _file_key(path: Path, root: Path) -> str:
    """A cache file name for one video: its relative path, size and modification time."""
    stat = path.stat()
    text = f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def decode_all(
    paths: Sequence[Path],
    root: Path,
    settings: DecodeSettings,
    cache_dir: Path | None,
    *,
    show_progress: bool = True,
) -> tuple[list[Tensor | Path | None], list[str]]:
    """Decode every video, or find it in the cache; unreadable ones give None and a reason.

    With a cache, each clip is returned as the path of its cached uint8 tensor (read back with
    :func:`load_clip` when an item is used, so a large folder does not sit in memory);
    without one, as the tensor itself. Cache layout: ``<cache_dir>/video-<settings key>/``
    holding ``<file key>.pt`` for a clip, or ``<file key>.err`` (the reason) for a file that
    failed, so failures are not retried until the file changes. A cached clip carries a digest
    of its contents, checked here and whenever it is read: a damaged one is decoded again.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    folder = cache_dir / f"video-{settings.key()}" if cache_dir is not None else None
    clips: list[Tensor | Path | None] = []
    errors: list[str] = []
    columns = (
        TextColumn("decoding videos"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("decode", total=len(paths))
        for path in paths:
            clip, error = _decode_cached(path, root, settings, folder)
            clips.append(clip)
            if error is not None:
                errors.append(error)
            progress.advance(task)
    return clips, errors


def _decode_cached(
    path: Path, root: Path, settings: DecodeSettings, folder: Path | None
) -> tuple[Tensor | Path | None, str | None]:
    """One video through the cache: (clip or its cache path, None) or (None, reason)."""
    if folder is None:
        try:
            return decode_video(path, settings), None
        except (ValueError, OSError) as error:
            return None, str(error)
    key = _file_key(path, root)
    stored, failed = folder / f"{key}.pt", folder / f"{key}.err"
    if stored.exists():
        try:
            load_clip(stored)
            return stored, None
        except DamagedFile as error:
            note(f"{error}; decoding {path} again")
    if failed.exists():
        return None, failed.read_text()
    try:
        clip = decode_video(path, settings)
    except (ValueError, OSError) as error:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(failed, str(error))
        return None, str(error)
    folder.mkdir(parents=True, exist_ok=True)
    save_verified(stored, {"clip": clip})
    return stored, None


def load_clip(clip: Tensor | Path) -> Tensor:
    """A clip held in memory, or read from its cache file (its digest checked)."""
    if isinstance(clip, Tensor):
        return clip
    return load_verified(clip)["clip"]


# ---------------------------------------------------------------------------------------------
# Models


class SpatialEmbedding(nn.Module):
    """A video frontend whose patch tokens get a learned embedding of their (h, w) place.

    Used with ``model.spatial_pe=learned`` beside a sequence encoding (CoPE, abs, ...) that only
    sees the flat token order; tokens without coordinates pass through unchanged.
    """

    def __init__(self, frontend: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.frontend, self.dim, self.grid = frontend, frontend.dim, grid
        self.cue_dim = frontend.cue_dim
        self.table = nn.Parameter(torch.zeros(grid[0] * grid[1], frontend.dim))
        nn.init.normal_(self.table, std=0.02)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FrontendOutput:
        front = self.frontend(inputs, padding_mask)
        if front.coords is None:
            return front
        place = front.coords[:, 1] * self.grid[1] + front.coords[:, 2]  # (T',) row-major patch
        return front._replace(tokens=front.tokens + self.table[place])


def build_video_classifier(config: Config, info: dict[str, Any]) -> nn.Module:
    """Tubelet frontend (``model.tokenizer``) + encoder + classification head.

    ``model.max_len`` is raised to the longest token sequence any split can produce (plus the
    CLS token), so that learned absolute positions have a row for every token; rows past the
    training clips' lengths stay untrained, which the OOD tables should say.
    """
    tokenizer = str(config["model.tokenizer"])
    if tokenizer not in VideoFrontend.TOKENIZERS:
        raise UserError(
            f"model.tokenizer must be one of {', '.join(VideoFrontend.TOKENIZERS)}, "
            f"got {tokenizer!r}"
        )
    spatial = str(config.get("model.spatial_pe", "none"))
    if spatial not in ("none", "learned"):
        raise UserError(f"model.spatial_pe must be 'none' or 'learned', got {spatial!r}")
    patch = int(config["model.patch"])
    frame_size = int(info["frame_size"])
    if frame_size % patch:
        raise UserError(f"model.patch ({patch}) must divide the frame size ({frame_size})")
    tubelet = (int(config["model.tubelet_frames"]), patch, patch)
    grid = (frame_size // patch, frame_size // patch)
    steps = math.ceil(int(info["max_frames"]) / tubelet[0])
    tokens = steps if tokenizer == "mlp-max" else steps * grid[0] * grid[1]
    longest = tokens + 1  # the CLS token
    max_len = max(int(config.get("model.max_len", 0) or 0), longest)
    npos = config.get("model.npos")
    if npos is None:  # CoPE's table has 2*npos-1 rows and z is (B, H, T, rows): keep it small
        npos = min(max_len, NPOS_CAP)
    try:
        encoder = encoder_config({**config, "model.max_len": max_len, "model.npos": npos})
    except (ValueError, TypeError) as error:
        raise UserError(f"bad model option: {error}") from error
    question_steps = math.ceil(int(info.get("question_frames", 0)) / tubelet[0])
    frontend: nn.Module = VideoFrontend(
        int(info["channels"]), encoder.dim, tubelet, tokenizer, question_steps
    )
    if spatial == "learned":
        frontend = SpatialEmbedding(frontend, grid)
    return SequenceClassifier(frontend, encoder, int(info["num_classes"]))
