"""`spoken-words`: clips of K synthesised spoken words; questions about their order and count.

Each clip holds K words from a small vocabulary (the ten Speech Commands keywords by default),
each said by one of many voices at its own speaking rate and pitch, separated by random gaps,
over background noise. Speech comes from eSpeak NG (:mod:`recipes._espeak`, installed by pip
with the project, offline). Each clip comes with one question, as in ``audio-events``:

- ``nth``: "which word was said n-th?" with n drawn from 1..data.max_n independently of K;
- ``count``: "how many times was word w said?" with w drawn uniformly.

The question enters as one token (the ``audio-events`` frontend); answers share one class
space, words first, then counts 0..max.

Word clips are synthesised once per (word, voice, rate, pitch) into a word bank
(``<root>/spoken-words/words-<hash>.pt``; rates and pitches are drawn on a grid of
``RATE_STEP``/``PITCH_STEP`` so that the bank stays small), trimmed to their voiced extent and
resampled to 16 kHz. Clips are composed from the bank deterministically from
``(data.seed, split, index)``, turned into 40 log-mel bands and cached per settings hash.

Voices are ``accent+variant`` (``en-us+m3``): ``data.accents`` x ``data.variants`` in training,
``data.accents`` x ``data.unseen_variants`` (disjoint variants) in ``unseen-voices``. OOD splits:
``slow`` (speaking rate ``data.slow_rate``, about half of training's, from the synthesizer: longer
phonemes, same pitch; gaps stretched by the same ratio), ``fast``, ``more-words`` (K beyond
training), ``unseen-voices``.

:func:`write_speech_commands_tree` writes single words in the Speech Commands v0.02 layout
(``cope data spoken-words --layout speech-commands``), speakers (voices) disjoint across splits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from encoders.frontends import AudioFeatures
from recipes._audio import (
    Ragged,
    advance,
    cached,
    default_cache_dir,
    progress_bar,
    settings_hash,
    single_thread,
)
from recipes.audio_events import (
    MAX_ONSETS,
    QUESTION_TASK_BUDGET,
    QUESTION_TASK_FULL,
    AudioEvents,
    Event,
    EventClips,
    QuestionSpace,
    answer,
    draw_question,
    longest_tokens,
    parse_range,
)
from recipes.base import Config, DataBundle, Split, UserError, pad_collate, register_recipe
from recipes.files import DamagedFile, load_verified, note, save_verified

VOCABULARIES = {
    "commands": ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"),
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
}
# every word of Speech Commands v0.02 (the ten keywords first), for the folder layout
SPEECH_COMMANDS_WORDS = (
    *VOCABULARIES["commands"],
    *("backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward", "four"),
    *("happy", "house", "learn", "marvin", "nine", "one", "seven", "sheila", "six", "three"),
    *("tree", "two", "visual", "wow", "zero"),
)
ACCENTS = "en,en-us,en-gb-scotland,en-gb-x-rp,en-029,en-gb-x-gbclan,en-gb-x-gbcwmd,en-us-nyc"
VARIANTS = "m1,m2,m3,m4,m5,m6,f1,f2,f3,klatt,klatt2,klatt4"
UNSEEN_VARIANTS = "m7,m8,f4,f5,klatt3,klatt5"
RATE_STEP, PITCH_STEP = 20, 20  # the word bank's grid (words per minute, eSpeak pitch units)
SILENCE_DB = -40.0  # trimming: 5 ms frames this far below the loudest frame are silence
BANK_VERSION = 1  # bump when synthesis or trimming changes, so old word banks are not reused
GENERATOR_VERSION = 1  # bump when clip composition changes


def parse_list(text: str | Iterable[str], name: str) -> tuple[str, ...]:
    """``"a,b,c"`` or a list -> ("a", "b", "c"), stripped; empty or repeated entries fail."""
    items = [str(item).strip() for item in (text.split(",") if isinstance(text, str) else text)]
    items = [item for item in items if item]
    if not items:
        raise UserError(f"{name} is empty")
    if len(set(items)) != len(items):
        raise UserError(f"{name} repeats an entry: {','.join(items)}")
    return tuple(items)


def parse_vocabulary(text: str | Iterable[str]) -> tuple[str, ...]:
    """A named vocabulary (``commands``, ``digits``) or comma-separated words (letters only)."""
    if isinstance(text, str) and text in VOCABULARIES:
        return VOCABULARIES[text]
    words = parse_list(text, "data.vocabulary")
    if len(words) < 2:
        raise UserError(f"data.vocabulary needs at least two words, got {','.join(words)}")
    for word in words:
        if not (word.isascii() and word.isalpha()):
            raise UserError(f"data.vocabulary: {word!r} is not a word (letters a-z only)")
    return words


@dataclasses.dataclass(frozen=True)
class WordSettings(QuestionSpace):
    """Everything the generated clips depend on (its hash keys the clip cache)."""

    seed: int = 0
    vocabulary: tuple[str, ...] = VOCABULARIES["commands"]
    accents: tuple[str, ...] = tuple(ACCENTS.split(","))
    variants: tuple[str, ...] = tuple(VARIANTS.split(","))
    unseen_variants: tuple[str, ...] = tuple(UNSEEN_VARIANTS.split(","))
    words: tuple[int, int] = (2, 4)  # K, words per clip
    ood_words: tuple[int, int] = (7, 9)
    max_n: int = 2
    questions: str = "nth"  # "nth" | "count" | "both"
    rate: tuple[int, int] = (150, 210)  # words per minute
    slow_rate: tuple[int, int] = (80, 100)
    fast_rate: tuple[int, int] = (300, 360)
    pitch: tuple[int, int] = (30, 70)
    gap_ms: tuple[int, int] = (50, 250)
    train_size: int = 3000
    eval_size: int = 400
    sample_rate: int = 16000
    n_mels: int = 40
    win_ms: float = 25.0
    hop_ms: float = 10.0

    def __post_init__(self) -> None:
        from recipes._espeak import MAX_PITCH, MAX_RATE, MIN_PITCH, MIN_RATE, check_voice

        if self.questions not in ("nth", "count", "both"):
            raise UserError(f"data.questions must be nth, count or both, not {self.questions!r}")
        if self.max_n < 1 or self.max_n > self.words[0]:
            raise UserError(
                f"data.max_n ({self.max_n}) must be between 1 and the fewest words "
                f"({self.words[0]}), so that every question has an answer"
            )
        if self.ood_words[1] > MAX_ONSETS:
            raise UserError(f"at most {MAX_ONSETS} words per clip")
        for key in ("rate", "slow_rate", "fast_rate"):
            low, high = getattr(self, key)
            if low < MIN_RATE or high > MAX_RATE:
                raise UserError(
                    f"data.{key} must lie within {MIN_RATE}-{MAX_RATE} words per minute, "
                    f"got {low}-{high}"
                )
        if self.pitch[0] < MIN_PITCH or self.pitch[1] > MAX_PITCH:
            raise UserError(f"data.pitch must lie within {MIN_PITCH}-{MAX_PITCH}, got {self.pitch}")
        if self.train_size < 1 or self.eval_size < 1:
            raise UserError("data.train_size and data.eval_size must be at least 1")
        if shared := set(self.variants) & set(self.unseen_variants):
            raise UserError(
                f"data.variants and data.unseen_variants share {', '.join(sorted(shared))}; "
                "unseen voices must be new"
            )
        for voice in self.voices(self.variants) + self.voices(self.unseen_variants):
            check_voice(voice)

    @classmethod
    def from_config(cls, config: Config) -> WordSettings:
        def ints(key: str, default: str) -> tuple[int, int]:
            text = config.get(key, default)
            if isinstance(text, str) and text.strip().startswith("-"):
                raise UserError(f"{key} must be a range of positive numbers, got {text!r}")
            return parse_range(text, key)

        return cls(
            seed=int(config.get("data.seed", 0)),
            vocabulary=parse_vocabulary(config.get("data.vocabulary", "commands")),
            accents=parse_list(config.get("data.accents", ACCENTS), "data.accents"),
            variants=parse_list(config.get("data.variants", VARIANTS), "data.variants"),
            unseen_variants=parse_list(
                config.get("data.unseen_variants", UNSEEN_VARIANTS), "data.unseen_variants"
            ),
            words=ints("data.words", "2-4"),
            ood_words=ints("data.ood_words", "7-9"),
            max_n=int(config.get("data.max_n", 2)),
            questions=str(config.get("data.questions", "nth")),
            rate=ints("data.rate", "150-210"),
            slow_rate=ints("data.slow_rate", "80-100"),
            fast_rate=ints("data.fast_rate", "300-360"),
            pitch=ints("data.pitch", "30-70"),
            gap_ms=ints("data.gap_ms", "50-250"),
            train_size=int(config.get("data.train_size", 3000)),
            eval_size=int(config.get("data.eval_size", 400)),
        )

    def voices(self, variants: Iterable[str]) -> list[str]:
        """``accent+variant`` for every accent and the given variants."""
        return [f"{accent}+{variant}" for variant in variants for accent in self.accents]

    @property
    def kinds(self) -> int:
        """Word classes of the answer space (``audio-events`` calls its classes kinds)."""
        return len(self.vocabulary)

    @property
    def max_count(self) -> int:
        return max(self.words[1], self.ood_words[1])


# ----------------------------------------------------------------------------- word bank


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One word said once: a word of the vocabulary and how it is said."""

    word: str
    voice: str
    rate: int
    pitch: int

    @property
    def group(self) -> str:
        """The word bank's key: every vocabulary word is synthesised with these settings."""
        return f"{self.voice}|{self.rate}|{self.pitch}"


def trim_silence(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The voiced extent of ``wave``: first to last 5 ms frame within SILENCE_DB of the loudest."""
    frame = max(1, sample_rate // 200)
    frames = len(wave) // frame
    if frames == 0:
        return wave
    energy = (wave[: frames * frame].reshape(frames, frame).astype(np.float64) ** 2).mean(1)
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (SILENCE_DB / 10))
    return wave[loud[0] * frame : (loud[-1] + 1) * frame]


@functools.cache
def resampler(from_rate: int, to_rate: int) -> torchaudio.transforms.Resample:
    """A resampler whose sinc kernel is built once (building it costs 10x resampling a word)."""
    return torchaudio.transforms.Resample(from_rate, to_rate)


def synthesize_group(
    vocabulary: tuple[str, ...], voice: str, rate: int, pitch: int, sample_rate: int
) -> dict[str, torch.Tensor]:
    """Every vocabulary word said with one voice, rate and pitch: float32, trimmed, peak 1.

    The words are said in vocabulary order by a fresh synthesizer (see :mod:`recipes._espeak`),
    so the result depends on these arguments only.
    """
    from recipes._espeak import synthesize_words

    raw, raw_rate = synthesize_words(list(vocabulary), voice, rate, pitch)
    words = {}
    for word, samples in zip(vocabulary, raw, strict=True):
        wave = resampler(raw_rate, sample_rate)(torch.from_numpy(samples / 32768.0).float())
        wave = torch.from_numpy(trim_silence(wave.numpy(), sample_rate).copy())
        words[word] = wave / wave.abs().max().clamp_min(1e-6)
    return words


_BANKS: dict[str, dict[str, dict[str, torch.Tensor]]] = {}


def word_bank(
    root: Path, vocabulary: tuple[str, ...], utterances: Iterable[Utterance], sample_rate: int
) -> dict[str, dict[str, torch.Tensor]]:
    """{voice|rate|pitch: {word: waveform}} covering ``utterances``, synthesising what is new.

    The bank (``root/spoken-words/words-<hash>.pt``, float16 waveforms, one per vocabulary and
    eSpeak NG version) grows as new (voice, rate, pitch) settings are asked for and is saved
    when it grew.
    """
    from recipes._espeak import version

    key = settings_hash(
        {"version": BANK_VERSION, "espeak": version(), "rate": sample_rate, "words": vocabulary}
    )
    path = root / "spoken-words" / f"words-{key}.pt"
    bank = _BANKS.get(str(path))
    if bank is None:
        bank = {}
        if path.exists():
            try:
                bank = load_verified(path)
            except DamagedFile as error:  # never trusted: synthesised again
                note(f"{error}; rebuilding it")
        _BANKS[str(path)] = bank
    missing = sorted({u.group: u for u in utterances if u.group not in bank}.values(),
                     key=lambda u: u.group)  # fmt: skip
    if missing:
        with progress_bar("synthesising spoken words", len(missing)) as bar, single_thread():
            for u in missing:
                words = synthesize_group(vocabulary, u.voice, u.rate, u.pitch, sample_rate)
                bank[u.group] = {word: wave.to(torch.float16) for word, wave in words.items()}
                advance(bar)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_verified(path, bank)
    return bank


# ----------------------------------------------------------------------------- clips

SPLITS = {  # name: (sub-seed, rate key, unseen voices, OOD word counts, OOD, description)
    "train": (1, "rate", False, False, False, "training clips"),
    "val": (2, "rate", False, False, False, "in distribution"),
    "test": (3, "rate", False, False, False, "in distribution"),
    "slow": (4, "slow_rate", False, False, True, "speaking rate about half (data.slow_rate)"),
    "fast": (5, "fast_rate", False, False, True, "speaking rate faster (data.fast_rate)"),
    "more-words": (6, "rate", False, True, True, "more words than in training (data.ood_words)"),
    "unseen-voices": (7, "rate", True, False, True, "voice variants never heard in training"),
}


def grid(rng: np.random.Generator, low: int, high: int, step: int) -> int:
    """A value drawn uniformly from low, low + step, ... <= high (low itself if step > span)."""
    return int(low + step * rng.integers((high - low) // step + 1))


@dataclasses.dataclass
class ClipPlan:
    """What one clip says and where: utterances, onsets (samples), amplitudes, length."""

    words: list[int]
    utterances: list[Utterance]
    gaps: list[int]  # samples of silence before each word (the first is the lead-in)
    amplitudes: list[float]
    tail: int
    noise_seed: list[int]
    question: int


def plan_clip(settings: WordSettings, split: str, index: int) -> ClipPlan:
    """The clip ``index`` of ``split``, drawn from its own generator (seed, split, index)."""
    sub_seed, rate_key, unseen, ood_counts, _, _ = SPLITS[split]
    rng = np.random.default_rng([settings.seed, sub_seed, index])
    voices = settings.voices(settings.unseen_variants if unseen else settings.variants)
    low, high = settings.ood_words if ood_counts else settings.words
    rate_low, rate_high = getattr(settings, rate_key)
    # gaps slow down with the words: scaled by training's mean rate over this split's
    tempo = sum(settings.rate) / (rate_low + rate_high)
    ms = settings.sample_rate / 1000
    count = int(rng.integers(low, high + 1))
    words, utterances, gaps, amplitudes = [], [], [], []
    for position in range(count):
        word = int(rng.integers(settings.kinds))
        words.append(word)
        utterances.append(
            Utterance(
                settings.vocabulary[word],
                voices[int(rng.integers(len(voices)))],
                grid(rng, rate_low, rate_high, RATE_STEP),
                grid(rng, *settings.pitch, PITCH_STEP),
            )
        )
        lead = rng.uniform(50, 250) if position == 0 else rng.uniform(*settings.gap_ms) * tempo
        gaps.append(int(lead * ms))
        amplitudes.append(float(rng.uniform(0.2, 0.6)))
    tail = int(rng.uniform(50, 150) * ms)
    question = draw_question(rng, settings)  # type: ignore[arg-type]
    return ClipPlan(words, utterances, gaps, amplitudes, tail, [settings.seed, sub_seed, index, 1],
                    question)  # fmt: skip


def render_clip(plan: ClipPlan, bank: dict[str, Any]) -> tuple[torch.Tensor, list[Event]]:
    """Background noise plus every word at its onset; the words as events (kind = word id)."""
    waves = [bank[u.group][u.word].float() for u in plan.utterances]
    length = sum(plan.gaps) + sum(len(w) for w in waves) + plan.tail
    rng = np.random.default_rng(plan.noise_seed)
    noise_level = rng.uniform(0.001, 0.008)
    clip = torch.from_numpy((rng.standard_normal(length) * noise_level).astype(np.float32))
    events, cursor = [], 0
    for word, gap, wave, amplitude in zip(
        plan.words, plan.gaps, waves, plan.amplitudes, strict=True
    ):
        cursor += gap
        clip[cursor : cursor + len(wave)] += amplitude * wave
        events.append(Event(word, cursor, len(wave), amplitude))
        cursor += len(wave)
    return clip, events


def generate_split(
    name: str, settings: WordSettings, bank: dict[str, Any], bar: Any
) -> dict[str, Any]:
    """Features, questions, answers and word events of one split (as ``audio-events`` stores)."""
    size = settings.train_size if name == "train" else settings.eval_size
    analyzer = AudioFeatures(
        settings.sample_rate, "logmel", settings.n_mels, settings.win_ms, settings.hop_ms
    )
    features, questions, answers, event_rows, voices = [], [], [], [], []
    with single_thread(), torch.no_grad():
        for index in range(size):
            plan = plan_clip(settings, name, index)
            wave, events = render_clip(plan, bank)
            features.append(analyzer(wave))
            questions.append(plan.question)
            answers.append(answer(events, plan.question, settings))  # type: ignore[arg-type]
            event_rows.append([(e.kind, e.onset, e.length, e.amplitude) for e in events])
            voices.append([(u.rate, u.pitch) for u in plan.utterances])
            advance(bar)
    flat_events = torch.tensor([row for rows in event_rows for row in rows], dtype=torch.float64)
    return {
        "features": Ragged.from_list(features, dtype=torch.float32).state(),
        "questions": torch.tensor(questions),
        "answers": torch.tensor(answers),
        "events": flat_events,  # (words, 4): word id, onset, length (samples), amplitude
        "event_offsets": torch.tensor([0, *np.cumsum([len(rows) for rows in event_rows])]),
        "rates": torch.tensor([rate for rows in voices for rate, _ in rows]),  # per word
    }


def split_sizes(settings: WordSettings) -> dict[str, int]:
    return {name: settings.train_size if name == "train" else settings.eval_size for name in SPLITS}


def generate_all(settings: WordSettings, root: Path) -> dict[str, Any]:
    """Every split (the clip cache's content): plan all clips, synthesise their words, render."""
    sizes = split_sizes(settings)
    utterances = [
        u
        for name, size in sizes.items()
        for index in range(size)
        for u in plan_clip(settings, name, index).utterances
    ]
    bank = word_bank(root, settings.vocabulary, utterances, settings.sample_rate)
    with progress_bar("composing spoken-words clips", sum(sizes.values())) as bar:
        return {name: generate_split(name, settings, bank, bar) for name in SPLITS}


# ----------------------------------------------------------------------------- recipe


@register_recipe
class SpokenWords(AudioEvents):
    """Which word was said n-th / how often a word was said, in clips of synthesised speech.

    Model and ``cope positions`` signal are those of ``audio-events`` (question token, log-mel
    frames stacked in pairs); the data differ.
    """

    name = "spoken-words"
    task = "the n-th spoken word (or how often a word was said) in a clip of synthesised speech"
    data_source = "generated"
    event_noun = "word"
    defaults: Config = {
        "data.vocabulary": "commands",
        "data.accents": ACCENTS,
        "data.variants": VARIANTS,
        "data.unseen_variants": UNSEEN_VARIANTS,
        "data.words": "2-4",
        "data.ood_words": "7-9",
        "data.max_n": 2,
        "data.questions": "nth",
        "data.rate": "150-210",
        "data.slow_rate": "80-100",
        "data.fast_rate": "300-360",
        "data.pitch": "30-70",
        "data.gap_ms": "50-250",
        "data.train_size": 3000,
        "data.eval_size": 400,
        **QUESTION_TASK_BUDGET,
    }
    presets: dict[str, Config] = {
        "fast": {},
        "full": {
            "data.words": "3-6",
            "data.ood_words": "9-12",
            **QUESTION_TASK_FULL,
        },
    }
    default_preset = "fast"

    def split_names(self) -> list[str]:
        return [name for name in SPLITS if name != "train"]

    def download(self, data_dir: Path) -> Path:
        raise UserError(
            "spoken-words is generated, there is nothing to download; "
            "`cope data spoken-words --layout speech-commands --root DIR` writes its words "
            "as a Speech Commands tree"
        )

    def build_data(self, config: Config, data_dir: Path | None, download: bool) -> DataBundle:
        settings = WordSettings.from_config(config)
        root = Path(data_dir) if data_dir is not None else default_cache_dir()
        key = settings_hash({"version": GENERATOR_VERSION, **dataclasses.asdict(settings)})
        data = cached(
            root / "spoken-words" / f"clips-{key}.pt", lambda: generate_all(settings, root)
        )
        train_features = data["train"]["features"]["flat"]
        mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-3)
        datasets = {
            name: EventClips(data[name], settings, mean, std)  # type: ignore[arg-type]
            for name in SPLITS
        }
        splits = {
            name: Split(datasets[name], ood=SPLITS[name][4], description=SPLITS[name][5])
            for name in self.split_names()
        }
        info = {
            "num_classes": settings.num_classes,
            "feature_dim": settings.n_mels,
            "n_questions": settings.n_questions,
            "max_len": longest_tokens(data) + 1,  # + the classifier's CLS token
            "train_max_len": longest_tokens({"train": data["train"]}) + 1,
            "class_names": [*settings.vocabulary, *map(str, range(settings.max_count + 1))],
        }
        return DataBundle(datasets["train"], splits, pad_collate, info)

    def export(self, root: Path, layout: str) -> Path:
        if layout != "speech-commands":
            raise UserError(f"spoken-words writes the layout 'speech-commands', not {layout!r}")
        return write_speech_commands_tree(Path(root), WordSettings.from_config(self.defaults))


# ----------------------------------------------------------------------------- folder layout

LAYOUT_FOLDER = "speech_commands_v0.02"
LAYOUT_VAL_VARIANTS = ("m6", "klatt4")  # held out of the training variants for validation
NOISE_SECONDS = 20


def speaker_id(voice: str) -> str:
    """An 8-hex-digit speaker id, as Speech Commands file names carry (stable per voice)."""
    return hashlib.sha1(voice.encode()).hexdigest()[:8]


def background_noise(kind: str, seconds: int, sample_rate: int, seed: int) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2) noise, peak 0.5, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(seconds * sample_rate)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        frequency = np.maximum(np.fft.rfftfreq(len(white)), 1.0 / len(white))
        spectrum /= frequency ** (0.5 if kind == "pink" else 1.0)
        white = np.fft.irfft(spectrum, len(white))
    return (0.5 * white / np.abs(white).max()).astype(np.float32)


def write_speech_commands_tree(
    root: Path,
    settings: WordSettings,
    words: tuple[str, ...] = SPEECH_COMMANDS_WORDS,
    per_speaker: int = 2,
    val_variants: tuple[str, ...] = LAYOUT_VAL_VARIANTS,
) -> Path:
    """Single spoken words as ``root/speech_commands_v0.02`` in the Speech Commands v0.02 layout.

    Speakers are voices (accent+variant). Test speakers use ``settings.unseen_variants``,
    validation speakers ``val_variants`` (taken out of the training variants), training speakers
    the rest, so no voice variant is shared between splits. Each speaker says each word
    ``per_speaker`` times at a rate and pitch drawn from the training ranges, placed at a random
    offset in 1 s of faint noise (16 kHz, 16-bit PCM). ``_background_noise_`` holds white, pink
    and brown noise.
    """
    import soundfile

    if missing := set(val_variants) - set(settings.variants):
        raise UserError(f"validation variants {sorted(missing)} are not training variants")
    train_variants = [v for v in settings.variants if v not in val_variants]
    if not train_variants:
        raise UserError("no training variants are left after the validation ones")
    split_variants = {
        "train": train_variants,
        "val": list(val_variants),
        "test": list(settings.unseen_variants),
    }
    sample_rate = settings.sample_rate
    plans = []  # (split, word, repeat, utterance, generator)
    for split, variants in split_variants.items():
        for voice in settings.voices(variants):
            for repeat in range(per_speaker):
                # one rate and pitch per speaker and session (repeat), as a person records
                rng = np.random.default_rng([settings.seed, int(speaker_id(voice), 16), repeat])
                rate = grid(rng, *settings.rate, RATE_STEP)
                pitch = grid(rng, *settings.pitch, PITCH_STEP)
                for word in words:
                    utterance = Utterance(word, voice, rate, pitch)
                    plans.append((split, word, repeat, utterance, rng))
    target = root / LAYOUT_FOLDER
    bank = word_bank(root, words, (plan[3] for plan in plans), sample_rate)
    lists: dict[str, list[str]] = {"val": [], "test": []}
    with progress_bar(f"writing {target}", len(plans)) as bar:
        for split, word, repeat, utterance, rng in plans:
            wave = bank[utterance.group][word].float().numpy()[:sample_rate]
            clip = rng.standard_normal(sample_rate).astype(np.float32) * rng.uniform(0.001, 0.005)
            offset = int(rng.integers(sample_rate - len(wave) + 1))
            clip[offset : offset + len(wave)] += float(rng.uniform(0.3, 0.8)) * wave
            relative = f"{word}/{speaker_id(utterance.voice)}_nohash_{repeat}.wav"
            (target / word).mkdir(parents=True, exist_ok=True)
            soundfile.write(target / relative, clip, sample_rate, subtype="PCM_16")
            if split in lists:
                lists[split].append(relative)
            advance(bar)
    noise_folder = target / "_background_noise_"
    noise_folder.mkdir(exist_ok=True)
    for seed, kind in enumerate(("white", "pink", "brown")):
        noise = background_noise(kind, NOISE_SECONDS, sample_rate, settings.seed * 10 + seed)
        soundfile.write(noise_folder / f"{kind}_noise.wav", noise, sample_rate, subtype="PCM_16")
    (target / "validation_list.txt").write_text("".join(f"{p}\n" for p in sorted(lists["val"])))
    (target / "testing_list.txt").write_text("".join(f"{p}\n" for p in sorted(lists["test"])))
    return target
