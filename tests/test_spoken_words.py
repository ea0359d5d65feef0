"""`spoken-words`: eSpeak NG words composed into clips, and the Speech Commands tree it writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import _wide_terminal, assert_user_error, cope  # noqa: F401 (autouse fixture)

from recipes.base import UserError, get_recipe
from recipes.spoken_words import (
    SPLITS,
    WordSettings,
    plan_clip,
    render_clip,
    speaker_id,
    synthesize_group,
    word_bank,
    write_speech_commands_tree,
)

SMALL = WordSettings(
    accents=("en", "en-us"),
    variants=("m1", "f2", "klatt"),
    unseen_variants=("m7",),
    train_size=24,
    eval_size=8,
)


def bank_for(settings: WordSettings, root: Path, split: str, count: int) -> dict:
    plans = [plan_clip(settings, split, index) for index in range(count)]
    utterances = (u for plan in plans for u in plan.utterances)
    return word_bank(root, settings.vocabulary, utterances, settings.sample_rate)


def test_synthesis_is_deterministic_for_fixed_settings() -> None:
    words = ("seven", "stop")
    first = synthesize_group(words, "en-us+f2", 170, 40, 16000)
    synthesize_group(words, "en+klatt3", 300, 90, 16000)  # state left behind must not matter
    second = synthesize_group(words, "en-us+f2", 170, 40, 16000)
    assert first["seven"].shape[0] > 1600  # a word lasts longer than 0.1 s
    assert all(torch.equal(first[word], second[word]) for word in words)
    other = synthesize_group(words, "en-us+m3", 170, 40, 16000)
    assert not (other["seven"].shape == first["seven"].shape
                and torch.equal(other["seven"], first["seven"]))  # fmt: skip


def test_clips_are_deterministic_in_seed_split_and_index(tmp_path: Path) -> None:
    bank = bank_for(SMALL, tmp_path, "val", 3)
    again = render_clip(plan_clip(SMALL, "val", 2), bank)
    assert torch.equal(render_clip(plan_clip(SMALL, "val", 2), bank)[0], again[0])
    assert plan_clip(SMALL, "val", 2) != plan_clip(SMALL, "val", 1)
    assert plan_clip(SMALL, "val", 2) != plan_clip(SMALL, "test", 2)
    reseeded = dataclasses.replace(SMALL, seed=1)
    assert plan_clip(reseeded, "val", 2) != plan_clip(SMALL, "val", 2)


def test_slower_rate_gives_a_longer_clip_with_the_same_words(tmp_path: Path) -> None:
    normal = dataclasses.replace(SMALL, rate=(180, 180))
    slow = dataclasses.replace(SMALL, rate=(90, 90))
    for index in range(3):
        quick_plan, slow_plan = plan_clip(normal, "train", index), plan_clip(slow, "train", index)
        assert quick_plan.words == slow_plan.words
        assert [u.voice for u in quick_plan.utterances] == [u.voice for u in slow_plan.utterances]
        assert [u.pitch for u in quick_plan.utterances] == [u.pitch for u in slow_plan.utterances]
        utterances = [*quick_plan.utterances, *slow_plan.utterances]
        bank = word_bank(tmp_path, SMALL.vocabulary, utterances, SMALL.sample_rate)
        quick_wave, quick_words = render_clip(quick_plan, bank)
        slow_wave, slow_words = render_clip(slow_plan, bank)
        assert slow_wave.shape[0] > 1.3 * quick_wave.shape[0]
        for fast_word, slow_word in zip(quick_words, slow_words, strict=True):
            assert slow_word.kind == fast_word.kind
            assert slow_word.length > 1.4 * fast_word.length  # vowels stretch, about 2x


def test_ood_splits_change_rate_voices_or_word_count() -> None:
    def drawn(split: str) -> list:
        return [plan_clip(SMALL, split, index) for index in range(20)]

    rates = {split: [u.rate for p in drawn(split) for u in p.utterances] for split in SPLITS}
    assert max(rates["slow"]) <= 100 and min(rates["fast"]) >= 300
    assert min(rates["test"]) >= 150 and max(rates["test"]) <= 210
    # slow speech is about half the training rate
    assert 0.4 < np.mean(rates["slow"]) / np.mean(rates["test"]) < 0.6
    voices = {split: {u.voice for p in drawn(split) for u in p.utterances} for split in SPLITS}
    assert voices["unseen-voices"].isdisjoint(voices["train"])
    assert {v.split("+")[1] for v in voices["unseen-voices"]} == {"m7"}
    assert min(len(p.words) for p in drawn("more-words")) > max(len(p.words) for p in drawn("test"))


def test_word_boundaries_match_the_audio_energy(tmp_path: Path) -> None:
    bank = bank_for(SMALL, tmp_path, "test", 6)
    frame = 160  # 10 ms
    for index in range(6):
        plan = plan_clip(SMALL, "test", index)
        wave, words = render_clip(plan, bank)
        frames = wave.shape[0] // frame
        power = (wave[: frames * frame].reshape(frames, frame) ** 2).mean(1)
        noise = power[: words[0].onset // frame].median()  # the lead-in holds noise only
        loud = torch.nonzero(power > 3 * noise).flatten().tolist()
        inside = torch.zeros(frames, dtype=torch.bool)
        for word in words:
            first, last = word.onset // frame, (word.onset + word.length - 1) // frame
            inside[first : last + 1] = True
            # sound starts within 40 ms of the onset; it lasts until 150 ms before the end at the
            # latest (a final stop consonant's closure is silent, its release burst faint)
            assert any(first <= f <= first + 4 for f in loud), (index, word)
            assert any(last - 15 <= f <= last for f in loud), (index, word)
        assert all(inside[f] for f in loud), f"loud frames outside every word in clip {index}"


def test_answers_follow_the_words(tmp_path: Path) -> None:
    recipe = get_recipe("spoken-words")
    config = {**recipe.defaults, "data.questions": "both", "data.train_size": 16}
    config |= {"data.eval_size": 4, "data.accents": "en", "data.variants": "m1,f1"}
    config |= {"data.unseen_variants": "m2", "data.pitch": "50-50", "data.rate": "170-170"}
    config |= {"data.slow_rate": "90-90", "data.fast_rate": "330-330"}
    bundle = recipe.build_data(config, tmp_path, download=False)
    settings = WordSettings.from_config(config)
    for index in range(16):
        item, plan = bundle.train[index], plan_clip(settings, "train", index)
        question = int(item["question"])
        if question < settings.max_n:
            assert item["targets"] == plan.words[question]
        else:
            count = plan.words.count(question - settings.max_n)
            assert item["targets"] == settings.kinds + count
    assert set(bundle.splits) == {name for name in SPLITS if name != "train"}
    assert (tmp_path / "spoken-words").is_dir()
    assert any((tmp_path / "spoken-words").glob("words-*.pt"))
    model = recipe.build_model(config, bundle.info)
    batch = bundle.collate([bundle.splits["more-words"].dataset[i] for i in range(4)])
    logits = model(batch["inputs"], batch.get("padding_mask"))
    assert logits.shape == (4, bundle.info["num_classes"])


def test_speech_commands_tree_is_read_back_with_the_right_counts(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        SMALL, variants=("m1", "m2", "f1", "klatt"), unseen_variants=("f4",)
    )
    words = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "cat", "dog")
    root = write_speech_commands_tree(
        tmp_path, settings, words=words, per_speaker=1, val_variants=("m2",)
    )
    assert sorted(p.name for p in (root / "_background_noise_").iterdir()) == [
        "brown_noise.wav", "pink_noise.wav", "white_noise.wav",
    ]  # fmt: skip
    testing = (root / "testing_list.txt").read_text().split()
    validation = (root / "validation_list.txt").read_text().split()
    everything = {p.relative_to(root).as_posix() for p in root.glob("*/*.wav")}
    training = (
        everything
        - set(testing)
        - set(validation)
        - {p for p in everything if p.startswith("_background_noise_")}
    )
    speakers = [{path.split("/")[1].split("_")[0] for path in part} for part in
                (training, validation, testing)]  # fmt: skip
    assert speakers[0].isdisjoint(speakers[1]) and speakers[0].isdisjoint(speakers[2])
    assert speakers[1].isdisjoint(speakers[2])
    assert speakers[2] == {speaker_id(f"{a}+f4") for a in settings.accents}
    # 2 accents x (3 training, 1 validation, 1 test variants) x 1 utterance per word
    assert (len(training), len(validation), len(testing)) == (12 * 6, 12 * 2, 12 * 2)

    recipe = get_recipe("speech-commands")
    bundle = recipe.build_data(dict(recipe.defaults), tmp_path, download=False)
    assert bundle.info["num_classes"] == 12
    # per split: 10 keywords x speakers, as many _unknown_ as a keyword has, as many _silence_
    for split, speakers_per_word in (("train", 6), ("val", 2), ("test", 2)):
        dataset = bundle.train if split == "train" else bundle.splits[split].dataset
        labels = torch.bincount(torch.tensor(dataset.labels), minlength=12)
        assert labels.tolist() == [speakers_per_word] * 12, split


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("data.variants=m1,zz9", "unknown voice 'en+zz9'"),
        ("data.accents=en,xx-yy", "unknown voice 'xx-yy+m1'"),
        ("data.vocabulary=,", "data.vocabulary is empty"),
        ("data.vocabulary=yes,n0", "not a word"),
        ("data.slow_rate=40-60", "data.slow_rate must lie within 80-450"),
        ("data.pitch=20-120", "data.pitch must lie within 0-99"),
        ("data.unseen_variants=m1", "unseen voices must be new"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path: Path, option: str, fragment: str) -> None:
    result = cope(
        "train", "spoken-words", "--steps", "1", "--set", option, "--data-dir", tmp_path,
        "--out", tmp_path / "runs",
    )  # fmt: skip
    assert_user_error(result, fragment)


def test_cope_data_writes_the_layout_or_names_the_one_it_knows(tmp_path: Path) -> None:
    assert_user_error(
        cope("data", "spoken-words", "--root", tmp_path, "--layout", "librispeech"),
        "not 'librispeech'",
    )
    assert_user_error(cope("data", "audio-events", "--layout", "speech-commands"), "cannot write")


def test_settings_reject_a_vocabulary_of_one_word() -> None:
    with pytest.raises(UserError, match="at least two words"):
        WordSettings.from_config({"data.vocabulary": "yes"})
