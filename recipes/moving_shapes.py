"""`moving-shapes`: the embedded video task (generated, no download).

Each clip shows K shapes one after another: a shape of one of several kinds appears at a random
place, moves in a straight line for a few frames (bouncing off the walls), and disappears;
a gap of blank frames follows. A question is asked about the order or the count of the
appearances, never about frame indices:

- ``nth``:   "what kind was the n-th shape to appear?"  (n in 1..max_nth, and max_nth <=
  min_events, so n is drawn independently of K and "the n-th" never means "the last");
- ``count``: "how many shapes of kind k appeared?"      (answer 0..K).

How the question reaches the model: the clip starts with one tubelet of *question frames*
(``model.tubelet_frames`` frames, one token for the default tokenizer) that tile a fixed
8 x 8 binary glyph, one glyph per question (``nth`` for n = 1, 2, ...; then ``count`` for each
kind), over the whole frame. Glyphs are fixed random patterns, independent of ``data.seed``,
and look nothing like a shape. The answer is a class id: the kind for ``nth``, the count for
``count``; the classes are shared, so ``num_classes = max(kinds, long_max_events + 1)``.

Splits: ``val`` and ``test`` come from the training distribution; the OOD splits are
``slow`` (the test clips with every frame shown twice: 2x frames, same events and answers),
``fast`` (every other frame dropped, from clips whose gaps are at least two frames so that no
gap or event vanishes) and ``long`` (more events: K in long_min_events..long_max_events, with
counts above the training range). Clips are rendered on the fly from
``(data.seed, split, index)``: the same data for every model seed.

Defaults (see ``MovingShapes.defaults``) follow the prototype in docs/tasks.md: 32 x 32 grey
frames, 4 kinds, one token per 2-frame tubelet made by a small MLP on each 8 x 8 patch and a
max over the patches (``model.tokenizer=mlp-max``), 2 layers of width 64. ``model.pe`` accepts
every registered encoding; with one token per time step all of them act over time only
(``rope`` is 1-D over time). With ``model.tokenizer=patches`` each tubelet gives one token per
patch with (t, h, w) coordinates: ``rope`` becomes axial, and CoPE counts over the flat
token sequence; ``model.spatial_pe=learned`` adds a learned (h, w) embedding beside it.
CoPE's cap ``model.npos`` defaults to min(max_len, 64) (its bidirectional table has 2*npos-1
rows); ``model.max_len`` is raised to the longest token sequence of any split.
The default is CoPE over time steps with no spatial encoding: the questions do not depend on
where a shape is, the max over patches already discards the place, and the prototype's patch
tokens (16 per step) were 2.5x slower and did not learn within 3 CPU-minutes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from recipes._video import (
    VIDEO_MODEL_DEFAULTS,
    VIDEO_PRESETS,
    build_video_classifier,
    drop_frames,
    pad_frames,
    repeat_frames,
)
from recipes.base import (
    Config,
    DataBundle,
    Recipe,
    Split,
    UserError,
    pad_collate,
    register_recipe,
)

KINDS = ("square", "disk", "plus", "triangle", "ring", "diamond")
QUESTION_TYPES = ("nth", "count")
GLYPH_SIZE = 8
MAX_ONSETS = 32  # onsets are stored in a fixed-size tensor (-1 padded) so batches stack
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2, "fast": 3, "long": 4}  # "slow" reuses test


@functools.lru_cache(maxsize=64)
def shape_mask(kind: str, size: int) -> np.ndarray:
    """The boolean (size, size) stencil of a shape kind (cached, read-only)."""
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size]
    dy, dx = rows - centre, cols - centre
    half = size / 2
    if kind == "square":
        mask = np.ones((size, size), bool)
    elif kind == "disk":
        mask = dy**2 + dx**2 <= (half + 0.1) ** 2 * 0.85
    elif kind == "plus":
        arm = max(1, size // 3) / 2 + 0.01  # half the bar's thickness (3 px for size 7)
        mask = (np.abs(dy) <= arm) | (np.abs(dx) <= arm)
    elif kind == "triangle":
        mask = np.abs(dx) <= (rows + 1) / 2  # apex at the top, base the bottom row
    elif kind == "ring":
        mask = np.ones((size, size), bool)
        mask[2:-2, 2:-2] = False
    elif kind == "diamond":
        mask = np.abs(dy) + np.abs(dx) <= half
    else:
        raise ValueError(f"unknown shape kind {kind!r}; choose one of {', '.join(KINDS)}")
    mask.flags.writeable = False
    return mask


@functools.lru_cache(maxsize=256)
def question_glyph(question: int) -> np.ndarray:
    """The fixed 8 x 8 binary pattern that asks question number ``question`` (read-only)."""
    rng = np.random.default_rng(10_000 + question)
    glyph = rng.random((GLYPH_SIZE, GLYPH_SIZE)) < 0.5
    glyph[0, 0], glyph[-1, -1] = True, False  # never blank, never full
    glyph.flags.writeable = False
    return glyph


@dataclass(frozen=True)
class ShapesSpec:
    """The rules of one split's generator (all in frames and pixels)."""

    size: int = 32  # frame side
    shape_size: int = 7
    kinds: int = 4  # the first `kinds` entries of KINDS
    min_events: int = 3
    max_events: int = 5
    min_duration: int = 2  # frames a shape stays visible
    max_duration: int = 4
    min_gap: int = 1  # blank frames between two shapes
    max_gap: int = 3
    max_speed: int = 2  # pixels per frame along each axis
    max_nth: int = 3
    questions: tuple[str, ...] = QUESTION_TYPES
    noise: float = 0.0  # std of Gaussian pixel noise, in [0, 1] units

    def check(self) -> None:
        """Raise UserError for rules that cannot be met."""
        if not 1 <= self.kinds <= len(KINDS):
            raise UserError(f"data.kinds must be between 1 and {len(KINDS)}, got {self.kinds}")
        if not 1 <= self.min_events <= self.max_events:
            raise UserError("data.min_events must be >= 1 and <= data.max_events")
        if self.max_nth > self.min_events:
            raise UserError(
                "data.max_nth must not exceed data.min_events, or 'the n-th' would depend on K"
            )
        if not 1 <= self.min_duration <= self.max_duration:
            raise UserError("data.min_duration must be >= 1 and <= data.max_duration")
        if not 1 <= self.min_gap <= self.max_gap:
            raise UserError("data.min_gap must be >= 1 (shapes must not touch) and <= max_gap")
        if not 3 <= self.shape_size <= self.size:
            raise UserError(f"data.shape_size must be between 3 and data.size ({self.size})")
        unknown = set(self.questions) - set(QUESTION_TYPES)
        if unknown or not self.questions:
            raise UserError(f"data.questions must be a subset of {', '.join(QUESTION_TYPES)}")

    @property
    def question_count(self) -> int:
        """How many distinct questions (glyphs) exist."""
        return self.max_nth + self.kinds


@dataclass
class Event:
    """One appearance: a shape visible in frames [start, end), top-left corner per frame."""

    kind: int
    start: int
    end: int
    positions: list[tuple[int, int]]


def generate_events(rng: np.random.Generator, spec: ShapesSpec) -> tuple[list[Event], int]:
    """Draw the appearances of one clip and its length in frames (before any tubelet padding)."""
    count = int(rng.integers(spec.min_events, spec.max_events + 1))
    limit = spec.size - spec.shape_size  # largest top-left coordinate that keeps it inside
    frame = int(rng.integers(0, spec.max_gap + 1))  # a lead-in of blank frames
    events: list[Event] = []
    for number in range(count):
        if number > 0:
            frame += int(rng.integers(spec.min_gap, spec.max_gap + 1))
        duration = int(rng.integers(spec.min_duration, spec.max_duration + 1))
        position = [int(rng.integers(0, limit + 1)), int(rng.integers(0, limit + 1))]
        velocity = [0, 0]
        while velocity == [0, 0]:
            velocity = [int(v) for v in rng.integers(-spec.max_speed, spec.max_speed + 1, 2)]
        positions = []
        for _ in range(duration):
            positions.append((position[0], position[1]))
            for axis in range(2):  # move, reflecting off the walls
                moved = position[axis] + velocity[axis]
                if moved < 0 or moved > limit:
                    velocity[axis] = -velocity[axis]
                    moved = -moved if moved < 0 else 2 * limit - moved
                position[axis] = moved
        kind = int(rng.integers(0, spec.kinds))
        events.append(Event(kind, frame, frame + duration, positions))
        frame += duration
    length = frame + int(rng.integers(0, spec.max_gap + 1))  # trailing blank frames
    return events, length


def render(events: list[Event], length: int, spec: ShapesSpec) -> np.ndarray:
    """The uint8 frames (length, size, size) showing the events, 255 on the shapes."""
    frames = np.zeros((length, spec.size, spec.size), np.uint8)
    masks = [shape_mask(KINDS[kind], spec.shape_size) for kind in range(spec.kinds)]
    side = spec.shape_size
    for event in events:
        for offset, (row, col) in enumerate(event.positions):
            patch = frames[event.start + offset, row : row + side, col : col + side]
            patch[masks[event.kind]] = 255
    return frames


def answer(question: int, events: list[Event], spec: ShapesSpec) -> int:
    """The class id that answers ``question`` for these events (see the module docstring)."""
    if question < spec.max_nth:
        return events[question].kind  # events are in order of appearance
    kind = question - spec.max_nth
    return sum(event.kind == kind for event in events)


def draw_question(rng: np.random.Generator, spec: ShapesSpec) -> int:
    """A question id: the type uniformly among the enabled ones, then n or the kind."""
    kind_of_question = spec.questions[int(rng.integers(0, len(spec.questions)))]
    if kind_of_question == "nth":
        return int(rng.integers(0, spec.max_nth))
    return spec.max_nth + int(rng.integers(0, spec.kinds))


def question_frames(question: int, spec: ShapesSpec, frames: int) -> np.ndarray:
    """``frames`` uint8 frames tiling the question's glyph."""
    reps = math.ceil(spec.size / GLYPH_SIZE)
    tiled = np.tile(question_glyph(question), (reps, reps))[: spec.size, : spec.size]
    return np.repeat((tiled * 255).astype(np.uint8)[None], frames, axis=0)


@dataclass
class Clip:
    """Everything about one generated item, for tests and ``cope positions``."""

    frames: np.ndarray  # (T, size, size) uint8, question frames first
    events: list[Event]  # in the frame numbering of the clip before speed changes
    question: int
    answer: int
    onsets: list[int]  # frame index in ``frames`` where each event first shows
    question_frames: int


class MovingShapesDataset(Dataset):
    """Clips rendered on demand from ``(seed, stream, index)``; ``speed`` makes OOD variants."""

    def __init__(
        self,
        spec: ShapesSpec,
        *,
        seed: int,
        stream: int,
        size: int,
        speed: str = "normal",
        tubelet_frames: int = 2,
        frame_diff: bool = False,
    ) -> None:
        if speed not in ("normal", "slow", "fast"):
            raise ValueError(f"speed must be normal, slow or fast, got {speed!r}")
        spec.check()
        self.spec, self.seed, self.stream, self.size = spec, seed, stream, size
        self.speed, self.tubelet_frames = speed, tubelet_frames
        self.frame_diff = frame_diff  # data.frame_diff: a second channel, frame t minus t-1

    def __len__(self) -> int:
        return self.size

    def clip(self, index: int) -> Clip:
        """Generate item ``index`` with its events, question and true onsets."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.stream, index])
        events, length = generate_events(rng, self.spec)
        question = draw_question(rng, self.spec)
        frames = torch.from_numpy(render(events, length, self.spec))
        onsets = [event.start for event in events]
        if self.speed == "slow":
            frames = repeat_frames(frames, 2)
            onsets = [2 * onset for onset in onsets]
        elif self.speed == "fast":
            frames = drop_frames(frames, 2)
            onsets = [math.ceil(onset / 2) for onset in onsets]  # first kept frame of each
        frames = pad_frames(frames, self.tubelet_frames)
        if self.spec.noise > 0:
            noise = rng.normal(0.0, self.spec.noise * 255, frames.shape)
            frames = torch.from_numpy(np.clip(frames.numpy() + noise, 0, 255).astype(np.uint8))
        lead = self.tubelet_frames
        head = question_frames(question, self.spec, lead)
        return Clip(
            frames=np.concatenate([head, frames.numpy()]),
            events=events,
            question=question,
            answer=answer(question, events, self.spec),
            onsets=[lead + onset for onset in onsets],
            question_frames=lead,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clip(index)
        inputs = torch.from_numpy(clip.frames).float().div_(255.0)[:, None]  # (T, 1, H, W)
        if self.frame_diff:  # change cue (issue 10): signed difference, 0 on the first frame
            previous = torch.cat((inputs[:1], inputs[:-1]))
            inputs = torch.cat((inputs, inputs - previous), dim=1)  # (T, 2, H, W)
        onsets = torch.full((MAX_ONSETS,), -1, dtype=torch.long)
        kept = clip.onsets[:MAX_ONSETS]
        onsets[: len(kept)] = torch.tensor(kept, dtype=torch.long)
        return {
            "inputs": inputs,
            "targets": clip.answer,
            "question": clip.question,
            "onsets": onsets,
        }


def spec_from_config(config: Config) -> ShapesSpec:
    """The training-distribution generator rules from the ``data.*`` keys named as its fields."""
    values: dict[str, Any] = {}
    for item in fields(ShapesSpec):
        value = config[f"data.{item.name}"]
        if item.name == "questions":  # "nth,count" in a config
            parts = value.split(",") if isinstance(value, str) else value
            values[item.name] = tuple(part.strip() for part in parts if part.strip())
        else:
            values[item.name] = type(item.default)(value)
    spec = ShapesSpec(**values)
    spec.check()
    return spec


def spec_defaults() -> Config:
    """ShapesSpec's defaults as ``data.*`` options (questions comma-separated)."""
    spec = ShapesSpec()
    return {
        f"data.{item.name}": ",".join(spec.questions)
        if item.name == "questions"
        else getattr(spec, item.name)
        for item in fields(ShapesSpec)
    }


def long_spec(spec: ShapesSpec, config: Config) -> ShapesSpec:
    """The ``long`` split's rules: more events, everything else as in training."""
    low, high = int(config["data.long_min_events"]), int(config["data.long_max_events"])
    if not spec.max_events < low <= high:
        raise UserError("data.long_min_events must exceed data.max_events and be <= long_max")
    return replace(spec, min_events=low, max_events=high)


def fast_spec(spec: ShapesSpec) -> ShapesSpec:
    """The ``fast`` split's rules before dropping frames: gaps of two frames at least."""
    min_gap = max(spec.min_gap, 2)
    return replace(spec, min_gap=min_gap, max_gap=max(spec.max_gap, min_gap))


def max_frames(spec: ShapesSpec, factor: float = 1.0) -> int:
    """An upper bound on a clip's frame count under ``spec``, shown ``factor`` times slower."""
    longest = (
        spec.max_gap * 2
        + spec.max_events * spec.max_duration
        + (spec.max_events - 1) * spec.max_gap
    )
    return math.ceil(longest * factor) + 2


@register_recipe
class MovingShapes(Recipe):
    """Generated clips of moving shapes; questions about the order and count of appearances."""

    name = "moving-shapes"
    modality = "video"
    task = "kind of the n-th shape to appear, or count of a kind (question in the first frames)"
    data_source = "generated"
    metric = "accuracy"
    defaults: Config = {
        "data.seed": 0,
        "data.train_size": 8000,
        "data.eval_size": 500,
        **spec_defaults(),
        "data.questions": "nth",  # count questions did not learn within budget (README)
        "data.long_min_events": 7,
        "data.long_max_events": 9,
        "data.frame_diff": False,  # add a frame-difference channel (issue 10: change cues)
        **VIDEO_MODEL_DEFAULTS,
        # Otherwise the engine's: AdamW at lr 1e-3, cosine schedule, batch 32.
        "train.steps": 1500,
        "train.warmup_steps": 50,
        "train.eval_every": 250,
    }
    presets: dict[str, Config] = VIDEO_PRESETS
    default_preset = "small"

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        """Datasets of every split (rendered lazily), deterministic from ``data.seed``."""
        config = {**self.defaults, **config}
        spec = spec_from_config(config)
        seed = int(config["data.seed"])
        tubelet = int(config["model.tubelet_frames"])
        eval_size = int(config["data.eval_size"])

        def dataset(stream: str, rules: ShapesSpec, size: int, speed: str = "normal") -> Dataset:
            return MovingShapesDataset(
                rules,
                seed=seed,
                stream=SPLIT_STREAMS[stream],
                size=size,
                speed=speed,
                tubelet_frames=tubelet,
                frame_diff=bool(config.get("data.frame_diff", False)),
            )

        longer = long_spec(spec, config)
        splits = {
            "val": Split(dataset("val", spec, eval_size), description="training distribution"),
            "test": Split(dataset("test", spec, eval_size), description="training distribution"),
            "slow": Split(
                dataset("test", spec, eval_size, "slow"),
                ood=True,
                description="test clips with every frame shown twice (2x frames)",
            ),
            "fast": Split(
                dataset("fast", fast_spec(spec), eval_size, "fast"),
                ood=True,
                description="every other frame dropped (gaps >= 2 frames before dropping)",
            ),
            "long": Split(
                dataset("long", longer, eval_size),
                ood=True,
                description=f"{longer.min_events}-{longer.max_events} shapes per clip "
                f"(training: {spec.min_events}-{spec.max_events})",
            ),
        }
        longest_frames = max(max_frames(spec, 2.0), max_frames(longer)) + tubelet
        info = {
            "num_classes": max(spec.kinds, longer.max_events + 1),
            "channels": 2 if config.get("data.frame_diff", False) else 1,
            "frame_size": spec.size,
            "max_frames": longest_frames,
            "question_frames": tubelet,
            "tubelet_frames": tubelet,
            "kinds": list(KINDS[: spec.kinds]),
        }
        train = dataset("train", spec, int(config["data.train_size"]))
        return DataBundle(train=train, splits=splits, collate=pad_collate, info=info)

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        """Video frontend (tubelets) + encoder + classification head."""
        return build_video_classifier({**self.defaults, **config}, info)

    def question_of(self, item: dict[str, Any], config: Config) -> str | None:
        """The question's name: "shape n=1", ..., or "count" (of any kind)."""
        question = int(item["question"])
        return f"shape n={question + 1}" if question < int(config["data.max_nth"]) else "count"

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        """The clip's frames and the token index where each shape first shows."""
        frames = item["inputs"][:, 0]  # (T, H, W)
        tubelet = int(info.get("question_frames", 2))
        onsets = [int(onset) // tubelet for onset in item["onsets"].tolist() if onset >= 0]
        return {
            "kind": "frames",
            "image": frames,
            "tokens_per_frame": 1.0 / tubelet,
            "onsets": onsets,
        }

    def split_names(self) -> list[str]:
        """The evaluation splits: val, test and the OOD slow, fast and long."""
        return ["val", "test", "slow", "fast", "long"]
