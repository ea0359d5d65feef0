"""audio-events: the generator obeys its rules, the audio matches the event list, caching."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from recipes import _audio, audio_events
from recipes.audio_events import (
    KINDS,
    SPLITS,
    AudioEvents,
    EventSettings,
    generate_split,
    split_events,
)
from recipes.base import UserError, pad_collate

SMALL = EventSettings(train_size=60, eval_size=30)
SMALL_CONFIG = {
    **AudioEvents.defaults,
    "data.seed": 0,
    "data.train_size": 60,
    "data.eval_size": 30,
    "model.pe": "cope",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[AudioEvents, object]:
    recipe = AudioEvents()
    return recipe, recipe.build_data(SMALL_CONFIG, tmp_path_factory.mktemp("ae"), download=False)


@pytest.fixture(scope="module")
def train_split() -> dict:
    return generate_split("train", SMALL)


def event_frames(event, hop: int) -> tuple[int, int]:
    """Feature frames certainly inside an event (centred 25 ms windows, 5 ms ramps)."""
    return event.onset // hop + 3, (event.onset + event.length) // hop - 2


def test_answers_are_recomputed_from_the_event_list(train_split: dict) -> None:
    for index in range(len(train_split["answers"])):
        events = split_events(train_split, index)
        question = int(train_split["questions"][index])
        if question < SMALL.max_n:  # "kind of the n-th event", n = question + 1
            expected = events[question].kind
        else:  # "how many events of kind c": classes after the kinds are counts
            kind = question - SMALL.max_n
            expected = SMALL.kinds + len([e for e in events if e.kind == kind])
        assert int(train_split["answers"][index]) == expected


def test_nth_question_never_depends_on_the_event_count() -> None:
    data = generate_split("train", dataclasses.replace(SMALL, train_size=400))
    pairs = set()
    for index in range(400):
        count = len(split_events(data, index))
        n = int(data["questions"][index]) + 1
        assert SMALL.events[0] <= count <= SMALL.events[1]
        assert n <= count  # every question has an answer
        pairs.add((count, n))
    # every n is asked at every K: "the n-th" is never a synonym of "the last"
    low, high = SMALL.events
    assert pairs == {(k, n) for k in range(low, high + 1) for n in range(1, SMALL.max_n + 1)}


def test_events_are_where_the_audio_is_loud(train_split: dict) -> None:
    features = _audio.Ragged(train_split["features"]["flat"], train_split["features"]["offsets"])
    hop = SMALL.hop_length
    louder = total = 0
    for index in range(len(features)):
        energy = features[index].exp().sum(dim=1)  # mel power per frame
        events = split_events(train_split, index)
        for event, following in zip(events, events[1:], strict=False):
            start, stop = event_frames(event, hop)
            gap_start, gap_stop = (
                (event.onset + event.length) // hop + 3,
                following.onset // hop - 2,
            )
            if stop <= start or gap_stop <= gap_start:
                continue
            total += 1
            louder += bool(energy[start:stop].mean() > 10 * energy[gap_start:gap_stop].mean())
    assert total > 50
    assert louder == total  # every event at least 10 dB above the gap after it


def test_tones_sound_at_their_pitch(train_split: dict) -> None:
    features = _audio.Ragged(train_split["features"]["flat"], train_split["features"]["offsets"])
    peak_band: dict[str, list[float]] = {kind: [] for kind in ("low-tone", "high-tone")}
    for index in range(len(features)):
        for event in split_events(train_split, index):
            name = KINDS[event.kind]
            start, stop = event_frames(event, SMALL.hop_length)
            if name in peak_band and stop > start:
                spectrum = features[index][start:stop].mean(0)
                peak_band[name].append(float(spectrum.argmax()))
    assert peak_band["low-tone"] and peak_band["high-tone"]
    assert max(peak_band["low-tone"]) < min(peak_band["high-tone"])


def test_ood_splits_are_slower_or_have_more_events() -> None:
    settings = dataclasses.replace(SMALL, eval_size=80)
    test, slow, more = (generate_split(name, settings) for name in ("test", "slow", "more-events"))

    def lengths(data: dict) -> torch.Tensor:
        return data["events"][:, 2]

    ratio = float(lengths(slow).mean() / lengths(test).mean())
    assert 1.7 < ratio < 2.3
    counts = more["event_offsets"].diff()
    assert int(counts.min()) >= settings.ood_events[0]
    assert int(counts.max()) <= settings.ood_events[1]
    assert SPLITS["slow"][0] != SPLITS["test"][0]  # different clips, not stretched copies


def test_generation_is_deterministic_in_data_seed() -> None:
    first = generate_split("val", SMALL)
    again = generate_split("val", SMALL)
    other = generate_split("val", dataclasses.replace(SMALL, seed=1))
    assert torch.equal(first["features"]["flat"], again["features"]["flat"])
    assert torch.equal(first["events"], again["events"])
    assert not torch.equal(first["events"][:5], other["events"][:5])


def test_cache_is_reused_and_keyed_by_settings(tmp_path: Path, monkeypatch) -> None:
    recipe = AudioEvents()
    bundle = recipe.build_data(SMALL_CONFIG, tmp_path, download=False)
    files = list((tmp_path / "audio-events").glob("clips-*.pt"))
    assert len(files) == 1
    _audio._MEMORY_CACHE.clear()
    calls = []
    real_generate = audio_events.generate_all
    monkeypatch.setattr(
        audio_events,
        "generate_all",
        lambda settings: calls.append(settings) or real_generate(settings),
    )
    again = recipe.build_data(SMALL_CONFIG, tmp_path, download=False)  # from disk
    assert calls == []
    assert torch.equal(again.train[3]["inputs"], bundle.train[3]["inputs"])
    other = recipe.build_data({**SMALL_CONFIG, "data.seed": 1}, tmp_path, download=False)
    assert len(calls) == 1  # a new seed asked for new clips, in a second cache file
    assert len(list((tmp_path / "audio-events").glob("clips-*.pt"))) == 2
    assert not torch.equal(other.train[3]["inputs"], bundle.train[3]["inputs"])


def test_model_reads_the_question_and_answers_every_split(built) -> None:
    recipe, bundle = built
    assert set(bundle.splits) == {"val", "test", "slow", "more-events"}
    assert [name for name, split in bundle.splits.items() if split.ood] == ["slow", "more-events"]
    model = recipe.build_model(SMALL_CONFIG, bundle.info)
    for split in bundle.splits.values():
        batch = pad_collate([split.dataset[i] for i in range(3)])
        logits = model(batch["inputs"], batch.get("padding_mask"))
        assert logits.shape == (3, bundle.info["num_classes"])
    item = bundle.train[0]
    other_question = item["inputs"].clone()
    other_question[:, SMALL.n_mels :] = torch.roll(other_question[:, SMALL.n_mels :], 1, dims=1)
    with torch.no_grad():
        same = model(item["inputs"][None]), model(other_question[None])
    assert not torch.allclose(*same)  # the answer depends on the question asked


@pytest.mark.parametrize("gate", ["rise", "change", "onset"])
def test_model_gives_the_same_logits_alone_and_in_a_padded_batch(built, gate: str) -> None:
    recipe, bundle = built
    config = {**SMALL_CONFIG, "model.cope_gate": gate, "model.causal": False}
    model = recipe.build_model(config, bundle.info).eval()
    with torch.no_grad():  # CoPE's zero-initialised tables would hide the positions
        for name, parameter in model.named_parameters():
            if name.endswith("pos_emb"):
                parameter.normal_()
    items = [bundle.splits["more-events"].dataset[i] for i in range(4)]
    lengths = [item["inputs"].shape[0] for item in items]
    batch = pad_collate(items)
    assert len(set(lengths)) > 1
    shortest = lengths.index(min(lengths))
    with torch.no_grad():
        together = model(batch["inputs"], batch["padding_mask"])
        alone = model(items[shortest]["inputs"][None])
    torch.testing.assert_close(together[shortest], alone[0], atol=1e-4, rtol=1e-4)


def test_example_signal_marks_event_onsets(built) -> None:
    recipe, bundle = built
    item = bundle.splits["test"].dataset[0]
    signal = recipe.example_signal(item, bundle.info)
    events = split_events(bundle.splits["test"].dataset.data, 0)
    assert signal["kind"] == "spectrogram"
    assert signal["image"].shape == (SMALL.n_mels, item["inputs"].shape[0])
    assert len(signal["onsets"]) == len(events)
    assert signal["onsets"] == sorted(signal["onsets"])


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="max_n"):
        EventSettings.from_config({"data.events": "2-6", "data.max_n": 3})
    with pytest.raises(UserError, match="data.events"):
        EventSettings.from_config({"data.events": "many"})


def test_cli_trains_audio_events_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    arguments = ["train", "audio-events", "--pe", "cope", "--steps", "3"]
    arguments += ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    for option in ("data.train_size=24", "data.eval_size=8", "train.batch_size=4"):
        arguments += ["--set", option]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    (evaluation,) = (tmp_path / "runs" / "audio-events" / "cope").glob("*/eval.json")
    assert {"val", "test", "slow", "more-events"} <= set(evaluation.read_text().split('"'))
    questions = json.loads((evaluation.parent / "questions.json").read_text())["splits"]
    assert set(questions["test"]) <= {"event n=1", "event n=2", "event n=3", "count"}
    assert sum(tally["count"] for tally in questions["test"].values()) == 8
    # the report adds the per-question table and the alignment of the CoPE run on slow
    report = ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]
    result = CliRunner().invoke(app, [*report, "--alignment-examples", "2"])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "### Per question" in markdown and "| cope | event n=1 | 1 |" in markdown
    assert "alignment / onset recall, slow (best layer on val)" in markdown
