"""`audio-events`: generated clips of sound events; questions about their order and count.

Each clip holds K events of a few kinds (pure tones of three pitches, rising and falling chirps,
noise bursts) of random duration (40-400 ms by default, so that counting frames cannot stand in
for counting events), separated by random gaps, over background noise. Each clip comes with one
question:

- ``nth``: "what kind is the n-th event?" with n drawn from 1..data.max_n independently of K
  (K >= max_n always), so "the n-th" never means "the last";
- ``count``: "how many events of kind c?" with c drawn uniformly.

The question reaches the model as extra one-hot channels appended to every feature frame
(inputs are (frames, n_mels + n_questions)); the recipe's frontend splits them off and turns the
question into one token placed before the audio tokens (after the classifier's CLS token).
Answers share one class space: kinds first, then counts 0..max events.

Features: 40 log-mel bands (:class:`encoders.frontends.AudioFeatures`, 25 ms window, 10 ms
hop), standardised with the training set's per-band mean and std, two frames stacked per token.
OOD splits: ``slow`` (events and gaps twice as long) and ``more-events`` (K beyond the training
range). Clips are deterministic from data.seed and cached (in memory and under the data or cache
directory, keyed by the settings' hash).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from encoders.frontends import AudioFeatures, FeatureFrontend, FrontendOutput
from recipes._audio import Ragged, cached, default_cache_dir, settings_hash, single_thread
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

KINDS = ("low-tone", "mid-tone", "high-tone", "chirp-up", "chirp-down", "noise-burst", "buzz")
TONE_HZ = {"low-tone": 400.0, "mid-tone": 1000.0, "high-tone": 2500.0}
CHIRP_HZ = (500.0, 3500.0)
RAMP_MS = 5.0  # raised-cosine on/off ramps, so events do not click
MAX_ONSETS = 32  # items carry onsets padded to this length (-1 = none), so they batch
STACK = 2  # feature frames per token
GENERATOR_VERSION = 1  # bump when the generator changes, so old caches are not reused


@dataclasses.dataclass(frozen=True)
class Event:
    """One sound event of a clip, in samples."""

    kind: int
    onset: int
    length: int
    amplitude: float


def parse_range(text: str | list[int] | tuple[int, int], name: str) -> tuple[int, int]:
    """``"3-8"``, ``"5"`` or ``[3, 8]`` -> (3, 8)."""
    try:
        if isinstance(text, (list, tuple)):
            low, high = (int(text[0]), int(text[-1]))
        else:
            parts = str(text).split("-")
            low, high = int(parts[0]), int(parts[-1])
    except (ValueError, IndexError):
        raise UserError(f"{name} must look like '3-8', got {text!r}") from None
    if low < 1 or high < low:
        raise UserError(f"{name} must be a range of positive counts, got {text!r}")
    return low, high


# EventSettings' fields that are data.* options (the analysis fields after them are fixed), and
# which of them are ranges, written "low-high" in a config.
OPTIONS = ("seed", "kinds", "events", "ood_events", "max_n", "questions", "event_ms", "gap_ms")
OPTIONS += ("slow_factor", "train_size", "eval_size")
RANGES = ("events", "ood_events", "event_ms", "gap_ms")


class QuestionSpace:
    """Frames and answers of the question tasks (audio-events, spoken-words): "which kind was
    the n-th" (``max_n`` questions) and "how many of kind k" (``kinds`` questions); answers are
    a kind or a count up to ``max_count``. Subclasses give those fields and the analysis."""

    sample_rate: int
    hop_ms: float
    max_n: int
    kinds: int
    max_count: int

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def n_questions(self) -> int:
        return self.max_n + self.kinds

    @property
    def num_classes(self) -> int:
        return self.kinds + self.max_count + 1


@dataclasses.dataclass(frozen=True)
class EventSettings(QuestionSpace):
    """Everything the generated data depends on (its hash keys the cache)."""

    seed: int = 0
    kinds: int = 6
    events: tuple[int, int] = (2, 5)
    ood_events: tuple[int, int] = (8, 10)
    max_n: int = 2
    questions: str = "nth"  # "nth" | "count" | "both"
    event_ms: tuple[float, float] = (40.0, 400.0)
    gap_ms: tuple[float, float] = (30.0, 150.0)
    slow_factor: float = 2.0
    train_size: int = 3000
    eval_size: int = 400
    sample_rate: int = 16000
    n_mels: int = 40
    win_ms: float = 25.0
    hop_ms: float = 10.0

    def __post_init__(self) -> None:
        if not 2 <= self.kinds <= len(KINDS):
            raise UserError(f"data.kinds must be between 2 and {len(KINDS)}, got {self.kinds}")
        if self.questions not in ("nth", "count", "both"):
            raise UserError(f"data.questions must be nth, count or both, not {self.questions!r}")
        if self.max_n < 1 or self.max_n > self.events[0]:
            raise UserError(
                f"data.max_n ({self.max_n}) must be between 1 and the fewest events "
                f"({self.events[0]}), so that every question has an answer"
            )
        if self.ood_events[1] > MAX_ONSETS:
            raise UserError(f"at most {MAX_ONSETS} events per clip")
        if self.train_size < 1 or self.eval_size < 1:
            raise UserError(
                f"data.train_size and data.eval_size must be at least 1, "
                f"got {self.train_size} and {self.eval_size}"
            )

    @classmethod
    def from_config(cls, config: Config) -> EventSettings:
        """The settings of a config's ``data.*`` options (absent ones keep the defaults)."""
        default, values = cls(), {}
        for name in OPTIONS:
            key = f"data.{name}"
            if key not in config:
                continue
            if name in RANGES:
                low, high = parse_range(config[key], key)
                kind = type(getattr(default, name)[0])
                values[name] = (kind(low), kind(high))
            else:
                values[name] = type(getattr(default, name))(config[key])
        return cls(**values)

    @classmethod
    def option_defaults(cls) -> Config:
        """The recipe defaults of the data.* options (data.seed is the engine's)."""
        default = cls()

        def as_option(name: str) -> Any:
            value = getattr(default, name)
            return f"{value[0]:g}-{value[1]:g}" if name in RANGES else value

        return {f"data.{name}": as_option(name) for name in OPTIONS if name != "seed"}

    @property
    def max_count(self) -> int:
        return max(self.events[1], self.ood_events[1])


# ----------------------------------------------------------------------------- generator


def draw_events(
    rng: np.random.Generator, settings: EventSettings, count: int, tempo: float
) -> tuple[list[Event], int]:
    """Event list and clip length (samples): lead-in, events separated by gaps, tail.

    ``tempo`` stretches events and gaps alike (2.0 = twice as slow); lead-in and tail do not
    stretch, so a slow clip differs from a normal one only in what the question is about.
    """
    rate = settings.sample_rate / 1000.0
    cursor = int(rng.uniform(50, 250) * rate)
    events = []
    for _ in range(count):
        kind = int(rng.integers(settings.kinds))
        length = int(rng.uniform(*settings.event_ms) * tempo * rate)
        events.append(Event(kind, cursor, length, float(rng.uniform(0.15, 0.5))))
        cursor += length + int(rng.uniform(*settings.gap_ms) * tempo * rate)
    # the last gap becomes the tail: keep it, plus a little room
    return events, cursor + int(rng.uniform(50, 150) * rate)


def render_event(rng: np.random.Generator, event: Event, kind: str, sample_rate: int) -> np.ndarray:
    """The waveform of one event (its own samples only), ramps included."""
    t = np.arange(event.length) / sample_rate
    duration = max(event.length / sample_rate, 1e-6)
    if kind in TONE_HZ:
        frequency = TONE_HZ[kind] * rng.uniform(0.97, 1.03)
        wave = np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    elif kind in ("chirp-up", "chirp-down"):
        start, stop = CHIRP_HZ if kind == "chirp-up" else CHIRP_HZ[::-1]
        # instantaneous frequency sweeps linearly from start to stop over the event
        wave = np.sin(2 * np.pi * (start * t + (stop - start) * t**2 / (2 * duration)))
    elif kind == "noise-burst":
        wave = rng.standard_normal(event.length) * 0.5
    else:  # buzz: a 150 Hz pulse-like tone rich in harmonics
        wave = np.tanh(4 * np.sin(2 * np.pi * 150.0 * t)) * 0.8
    ramp = min(int(RAMP_MS * sample_rate / 1000), event.length // 2)
    if ramp > 0:
        window = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        wave[:ramp] *= window
        wave[-ramp:] *= window[::-1]
    return (event.amplitude * wave).astype(np.float32)


def render_clip(
    rng: np.random.Generator, events: list[Event], length: int, settings: EventSettings
) -> np.ndarray:
    """Background noise plus every event at its onset."""
    noise_level = rng.uniform(0.003, 0.02)
    wave = (rng.standard_normal(length) * noise_level).astype(np.float32)
    for event in events:
        wave[event.onset : event.onset + event.length] += render_event(
            rng, event, KINDS[event.kind], settings.sample_rate
        )
    return wave


def answer(events: list[Event], question: int, settings: EventSettings) -> int:
    """The class of the answer: the n-th event's kind, or kinds + count of a kind."""
    if question < settings.max_n:
        return events[question].kind
    kind = question - settings.max_n
    return settings.kinds + sum(event.kind == kind for event in events)


def draw_question(rng: np.random.Generator, settings: EventSettings) -> int:
    """A question id: n-th (0..max_n-1) or count of kind c (max_n + c), per data.questions."""
    kinds = {"nth": "nth", "count": "count", "both": ("nth", "count")[int(rng.integers(2))]}
    if kinds[settings.questions] == "nth":
        return int(rng.integers(settings.max_n))
    return settings.max_n + int(rng.integers(settings.kinds))


def question_label(question: int, max_n: int, noun: str) -> str:
    """A question id's name in reports: "<noun> n=<n>" for the n-th, "count" for any count."""
    return f"{noun} n={question + 1}" if question < max_n else "count"


SPLITS = {  # name: (sub-seed, tempo, uses OOD event counts, description)
    "train": (1, 1.0, False, "training clips"),
    "val": (2, 1.0, False, "in distribution"),
    "test": (3, 1.0, False, "in distribution"),
    "slow": (4, None, False, "events and gaps slower (x data.slow_factor)"),
    "more-events": (5, 1.0, True, "more events than in training (data.ood_events)"),
}


def generate_split(name: str, settings: EventSettings) -> dict[str, Any]:
    """Waveforms-turned-features of one split, with events, questions and answers.

    Returns {"features": Ragged log-mel (frames, mels), "questions", "answers", "counts",
    "kinds", "onsets", "lengths" (per event, in samples) as flat lists with "event_offsets"}.
    """
    sub_seed, tempo, ood_counts, _ = SPLITS[name]
    tempo = settings.slow_factor if tempo is None else tempo
    size = settings.train_size if name == "train" else settings.eval_size
    rng = np.random.default_rng([settings.seed, sub_seed])
    analyzer = AudioFeatures(
        settings.sample_rate, "logmel", settings.n_mels, settings.win_ms, settings.hop_ms
    )
    low, high = settings.ood_events if ood_counts else settings.events
    features, questions, answers, event_rows = [], [], [], []
    with single_thread():
        for _ in range(size):
            count = int(rng.integers(low, high + 1))
            events, length = draw_events(rng, settings, count, tempo)
            wave = render_clip(rng, events, length, settings)
            with torch.no_grad():
                features.append(analyzer(torch.from_numpy(wave)))
            question = draw_question(rng, settings)
            questions.append(question)
            answers.append(answer(events, question, settings))
            event_rows.append([(e.kind, e.onset, e.length, e.amplitude) for e in events])
    flat_events = torch.tensor([row for rows in event_rows for row in rows], dtype=torch.float64)
    event_offsets = torch.tensor([0, *np.cumsum([len(rows) for rows in event_rows])])
    ragged = Ragged.from_list(features, dtype=torch.float32)
    return {
        "features": ragged.state(),
        "questions": torch.tensor(questions),
        "answers": torch.tensor(answers),
        "events": flat_events,  # (events, 4): kind, onset, length (samples), amplitude
        "event_offsets": event_offsets,
    }


def split_events(data: dict[str, Any], index: int) -> list[Event]:
    """The events of clip ``index`` of a generated split."""
    rows = data["events"][data["event_offsets"][index] : data["event_offsets"][index + 1]]
    return [Event(int(k), int(o), int(n), float(a)) for k, o, n, a in rows.tolist()]


def generate_all(settings: EventSettings) -> dict[str, Any]:
    """Every split, generated in one go (the cache's content)."""
    from recipes._audio import advance, progress_bar

    result = {}
    with progress_bar("generating audio-events clips", len(SPLITS)) as bar:
        for name in SPLITS:
            result[name] = generate_split(name, settings)
            advance(bar)
    return result


# ----------------------------------------------------------------------------- dataset & model


class EventClips(Dataset):
    """Items {"inputs": (frames, mels + questions), "targets": answer, "question", "onsets"}."""

    def __init__(
        self,
        data: dict[str, Any],
        settings: EventSettings,
        mean: Tensor,
        std: Tensor,
        deltas: bool = False,
    ) -> None:
        self.features = Ragged(data["features"]["flat"], data["features"]["offsets"])
        self.data = data
        self.settings = settings
        self.mean, self.std = mean, std
        self.deltas = deltas  # data.deltas: append 1st and 2nd time differences (change cues)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = (self.features[index] - self.mean) / self.std
        if self.deltas:  # as AudioFeatures(deltas=True); computed here so the cache is shared
            import torchaudio

            first = torchaudio.functional.compute_deltas(features.T)
            features = torch.cat(
                (features, first.T, torchaudio.functional.compute_deltas(first).T), 1
            )
        question = int(self.data["questions"][index])
        one_hot = torch.zeros(features.shape[0], self.settings.n_questions)
        one_hot[:, question] = 1.0
        onsets = torch.full((MAX_ONSETS,), -1, dtype=torch.long)
        for slot, event in enumerate(split_events(self.data, index)):
            onsets[slot] = event.onset // self.settings.hop_length
        return {
            "inputs": torch.cat((features, one_hot), dim=1),
            "targets": int(self.data["answers"][index]),
            "question": question,
            "onsets": onsets,  # feature-frame index of each event's onset, -1 padded
        }


class QuestionFrontend(nn.Module):
    """Frames with question channels -> [question token, audio tokens (frames stacked)]."""

    def __init__(self, n_mels: int, n_questions: int, dim: int, stack: int = STACK) -> None:
        super().__init__()
        self.dim, self.n_mels, self.n_questions = dim, n_mels, n_questions
        self.audio = FeatureFrontend(n_mels, dim, stack=stack)
        self.cue_dim = self.audio.cue_dim
        self.question = nn.Embedding(n_questions, dim)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FrontendOutput:
        audio, question_channels = inputs[..., : self.n_mels], inputs[..., self.n_mels :]
        question = self.question(question_channels[:, 0].argmax(dim=-1)).unsqueeze(1)
        front = self.audio(audio, padding_mask)
        tokens = torch.cat((question, front.tokens), dim=1)
        mask = front.padding_mask
        if mask is not None:
            mask = torch.cat((mask.new_zeros(mask.shape[0], 1), mask), dim=1)
        cues = nn.functional.pad(front.cues, (0, 0, 1, 0))  # the question token: no cue
        return FrontendOutput(tokens, mask, None, leading=1, cues=cues)


def longest_tokens(data: dict[str, Any]) -> int:
    """Most frontend tokens (question + stacked frames) of any clip in any split."""
    longest = 0
    for split in data.values():
        offsets = split["features"]["offsets"]
        longest = max(longest, int((offsets[1:] - offsets[:-1]).max()))
    return 1 + math.ceil(longest / STACK)


# The model and budget shared by the question tasks (audio-events, spoken-words): the default
# ("fast") preset trains on 2 CPUs in minutes; "full" is the larger one.
QUESTION_TASK_BUDGET: Config = {
    "model.dim": 64,
    "model.depth": 2,
    "model.heads": 4,
    "model.mlp_dim": 128,
    "model.npos": 64,
    "train.steps": 600,
    "train.batch_size": 32,
    "train.lr": 2e-3,
    "train.warmup_steps": 50,
    "train.eval_every": 200,
}
QUESTION_TASK_FULL: Config = {
    "data.max_n": 3,
    "data.questions": "both",
    "data.train_size": 12000,
    "data.eval_size": 1000,
    "model.depth": 3,
    "model.mlp_dim": 256,
    "train.steps": 4000,
    "train.lr": 1e-3,
    "train.warmup_steps": 200,
    "train.eval_every": 500,
}


@register_recipe
class AudioEvents(Recipe):
    """Which kind was the n-th sound event / how many of a kind: order and count, not time."""

    name = "audio-events"
    modality = "audio"
    task = "kind of the n-th sound event (or count of a kind) in a generated clip"
    data_source = "generated"
    metric = "accuracy"
    event_noun = "event"  # questions are named "event n=1", ..., "count" in reports
    defaults: Config = {
        **EventSettings.option_defaults(),
        "data.deltas": False,  # append delta and delta-delta features (issue 10: change cues)
        **QUESTION_TASK_BUDGET,
    }
    presets: dict[str, Config] = {
        "fast": {},
        "full": {
            "data.events": "3-8",
            "data.ood_events": "10-12",
            "data.gap_ms": "40-200",
            **QUESTION_TASK_FULL,
        },
    }
    default_preset = "fast"

    def split_names(self) -> list[str]:
        return [name for name in SPLITS if name != "train"]

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        settings = EventSettings.from_config(config)
        key = settings_hash({"version": GENERATOR_VERSION, **dataclasses.asdict(settings)})
        root = Path(data_dir) if data_dir is not None else default_cache_dir()
        data = cached(root / "audio-events" / f"clips-{key}.pt", lambda: generate_all(settings))
        train_features = data["train"]["features"]["flat"]
        mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-3)
        deltas = bool(config.get("data.deltas", False))
        datasets = {name: EventClips(data[name], settings, mean, std, deltas) for name in SPLITS}
        splits = {
            name: Split(
                datasets[name], ood=name in ("slow", "more-events"), description=SPLITS[name][3]
            )
            for name in self.split_names()
        }
        info = {
            "num_classes": settings.num_classes,
            "feature_dim": settings.n_mels * (3 if deltas else 1),
            "n_questions": settings.n_questions,
            "max_len": longest_tokens(data) + 1,  # + the classifier's CLS token
            "train_max_len": longest_tokens({"train": data["train"]}) + 1,
            "class_names": [*KINDS[: settings.kinds], *map(str, range(settings.max_count + 1))],
        }
        return DataBundle(datasets["train"], splits, pad_collate, info)

    def build_model(self, config: Config, info: dict[str, Any]) -> nn.Module:
        from encoders.transformer import SequenceClassifier

        encoder = encoder_config(config)
        # room for the longest OOD clip; learned absolute rows past train_max_len stay untrained
        encoder = dataclasses.replace(encoder, max_len=max(encoder.max_len, info["max_len"]))
        frontend = QuestionFrontend(info["feature_dim"], info["n_questions"], encoder.dim)
        return SequenceClassifier(frontend, encoder, info["num_classes"])

    def question_of(self, item: dict[str, Any], config: Config) -> str | None:
        return question_label(int(item["question"]), int(config["data.max_n"]), self.event_noun)

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any] | None:
        onsets = item["onsets"][item["onsets"] >= 0]
        image = item["inputs"][:, : info["feature_dim"]].T  # (mels, frames)
        return {
            "kind": "spectrogram",
            "image": image,
            "tokens_per_frame": 1.0 / STACK,
            # index among the audio tokens (the heatmap adds the CLS and question tokens' offset)
            "onsets": [int(onset) // STACK for onset in onsets],
        }
