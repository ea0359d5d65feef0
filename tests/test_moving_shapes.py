"""Specifications of the `moving-shapes` recipe: the generator's rules, its splits, its model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from video_fixtures import kind_from_pixels, question_from_pixels, visible_runs

from encoders.frontends import from_tubelets, to_tubelets
from recipes.base import UserError, get_recipe, pad_collate
from recipes.moving_shapes import (
    KINDS,
    MovingShapes,
    MovingShapesDataset,
    ShapesSpec,
    fast_spec,
    shape_mask,
)

SMALL = {"data.train_size": 64, "data.eval_size": 48, "data.questions": "nth,count"}


@pytest.fixture(scope="module")
def bundle():
    """The recipe's data with small splits (clips are rendered lazily, so this is cheap)."""
    return MovingShapes().build_data(dict(SMALL), None, False)


def all_splits(bundle):
    return {"train": bundle.train, **{name: split.dataset for name, split in bundle.splits.items()}}


def test_recipe_is_registered_with_its_ood_splits(bundle) -> None:
    recipe = get_recipe("moving-shapes")
    assert recipe.modality == "video" and recipe.data_source == "generated"
    assert recipe.split_names() == ["val", "test", "slow", "fast", "long"]
    assert set(bundle.splits) == {"val", "test", "slow", "fast", "long"}
    assert {name for name, split in bundle.splits.items() if split.ood} == {"slow", "fast", "long"}


def test_answers_match_the_event_list_recomputed_independently(bundle) -> None:
    for name, dataset in all_splits(bundle).items():
        spec = dataset.spec
        for index in range(len(dataset)):
            clip = dataset.clip(index)
            ordered = sorted(clip.events, key=lambda event: event.start)
            if clip.question < spec.max_nth:
                expected = ordered[clip.question].kind
            else:
                wanted = clip.question - spec.max_nth
                expected = len([event for event in ordered if event.kind == wanted])
            assert clip.answer == expected == dataset[index]["targets"], (name, index)


def test_each_shape_is_drawn_in_exactly_the_frames_it_claims() -> None:
    spec = ShapesSpec()
    dataset = MovingShapesDataset(spec, seed=3, stream=0, size=40)
    side = spec.shape_size
    for index in range(len(dataset)):
        clip = dataset.clip(index)
        body = clip.frames[clip.question_frames :]
        covered = np.zeros(len(body), bool)
        for event in clip.events:
            assert len(event.positions) == event.end - event.start
            stencil = shape_mask(KINDS[event.kind], side)
            for offset, (row, col) in enumerate(event.positions):
                frame = body[event.start + offset]
                window = frame[row : row + side, col : col + side]
                assert window.shape == (side, side), "a shape left the frame"
                assert (window[stencil] == 255).all()
                assert frame.sum() == 255 * stencil.sum(), "something else is drawn"
                covered[event.start + offset] = True
        assert (body[~covered] == 0).all(), "a frame outside every event is not blank"


def test_answers_can_be_recomputed_from_the_pixels_alone(bundle) -> None:
    for name, dataset in all_splits(bundle).items():
        spec = dataset.spec
        for index in range(0, len(dataset), 3):
            clip = dataset.clip(index)
            question = question_from_pixels(clip.frames[0], spec.question_count)
            runs = visible_runs(clip.frames[clip.question_frames :])
            kinds = [
                kind_from_pixels(clip.frames[clip.question_frames + start], spec.shape_size, 6)
                for start, _ in runs
            ]
            assert len(runs) == len(clip.events), (name, index)
            if question < spec.max_nth:
                expected = kinds[question]
            else:
                expected = kinds.count(question - spec.max_nth)
            assert question == clip.question and expected == clip.answer, (name, index)
            onsets = [clip.question_frames + start for start, _ in runs]
            assert onsets == clip.onsets, (name, index)


def test_events_respect_their_duration_gap_and_count_rules() -> None:
    spec = ShapesSpec(
        min_events=2, max_events=4, min_duration=3, max_duration=5, max_gap=2, max_nth=2
    )
    dataset = MovingShapesDataset(spec, seed=0, stream=0, size=60)
    counts = set()
    for index in range(len(dataset)):
        events = dataset.clip(index).events
        counts.add(len(events))
        for event in events:
            assert 3 <= event.end - event.start <= 5
        for before, after in zip(events[:-1], events[1:], strict=True):
            assert 1 <= after.start - before.end <= 2
    assert counts == {2, 3, 4}


def test_generation_is_deterministic_from_data_seed() -> None:
    first = MovingShapes().build_data(dict(SMALL), None, False)
    again = MovingShapes().build_data(dict(SMALL), None, False)
    other = MovingShapes().build_data({**SMALL, "data.seed": 1}, None, False)
    for index in (0, 5, 17):
        assert torch.equal(first.train[index]["inputs"], again.train[index]["inputs"])
        assert torch.equal(
            first.splits["long"].dataset[index]["inputs"],
            again.splits["long"].dataset[index]["inputs"],
        )
    differ = [
        not torch.equal(first.train[index]["inputs"], other.train[index]["inputs"])
        for index in range(8)
    ]
    assert all(differ)
    # train, val and test are distinct clips, not the same stream
    assert not torch.equal(first.train[0]["inputs"], first.splits["val"].dataset[0]["inputs"])
    assert not torch.equal(
        first.splits["val"].dataset[0]["inputs"], first.splits["test"].dataset[0]["inputs"]
    )


def test_slow_split_shows_every_test_frame_twice(bundle) -> None:
    test, slow = bundle.splits["test"].dataset, bundle.splits["slow"].dataset
    for index in range(len(test)):
        normal, slowed = test.clip(index), slow.clip(index)
        lead = normal.question_frames
        body = normal.frames[lead:]
        length = max(event.end for event in normal.events)  # frames before trailing blanks
        expected = np.repeat(body, 2, axis=0)
        slow_body = slowed.frames[lead:]
        shared = min(len(slow_body), len(expected))  # they differ only in blank tubelet padding
        assert np.array_equal(slowed.frames[:lead], normal.frames[:lead])
        assert np.array_equal(slow_body[:shared], expected[:shared])
        assert not slow_body[shared:].any() and not expected[shared:].any()
        assert shared >= 2 * length
        assert abs(len(slow_body) - 2 * len(body)) <= 2
        assert slowed.answer == normal.answer and slowed.question == normal.question
        assert [o - lead for o in slowed.onsets] == [2 * (o - lead) for o in normal.onsets]


def test_fast_split_keeps_every_other_frame_and_loses_no_event(bundle) -> None:
    fast = bundle.splits["fast"].dataset
    unhurried = MovingShapesDataset(
        fast.spec, seed=fast.seed, stream=fast.stream, size=len(fast), speed="normal"
    )
    for index in range(len(fast)):
        quick, normal = fast.clip(index), unhurried.clip(index)
        lead = quick.question_frames
        kept = normal.frames[lead:][::2]
        assert np.array_equal(quick.frames[lead : lead + len(kept)], kept)
        assert len(visible_runs(quick.frames[lead:])) == len(quick.events)
        for before, after in zip(quick.events[:-1], quick.events[1:], strict=True):
            assert after.start - before.end >= 2  # so a dropped frame never joins two shapes
    assert fast.spec == fast_spec(bundle.train.spec)


def test_long_split_has_more_events_than_training(bundle) -> None:
    train_counts = {len(bundle.train.clip(i).events) for i in range(len(bundle.train))}
    long = bundle.splits["long"].dataset
    long_counts = {len(long.clip(i).events) for i in range(len(long))}
    assert max(train_counts) <= 5 < min(long_counts)
    assert bundle.info["num_classes"] >= max(long_counts) + 1


def test_nth_question_never_depends_on_event_count() -> None:
    dataset = MovingShapesDataset(ShapesSpec(questions=("nth",)), seed=0, stream=0, size=600)
    seen: dict[int, set[int]] = {}
    for index in range(len(dataset)):
        clip = dataset.clip(index)
        seen.setdefault(len(clip.events), set()).add(clip.question)
    assert seen == {3: {0, 1, 2}, 4: {0, 1, 2}, 5: {0, 1, 2}}
    with pytest.raises(UserError, match="max_nth"):
        MovingShapes().build_data({"data.max_nth": 4}, None, False)


def test_question_frames_differ_per_question_and_fill_one_tubelet(bundle) -> None:
    spec = bundle.train.spec
    firsts = {}
    for index in range(len(bundle.train)):
        clip = bundle.train.clip(index)
        assert clip.question_frames == 2
        assert np.array_equal(clip.frames[0], clip.frames[1])
        firsts.setdefault(clip.question, clip.frames[0])
    assert len(firsts) == spec.question_count
    frames = list(firsts.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(frames) for b in frames[i + 1 :])


def test_bad_options_are_user_errors() -> None:
    for options in ({"data.kinds": 9}, {"data.min_gap": 0}, {"data.questions": "colour"}):
        with pytest.raises(UserError):
            MovingShapes().build_data(options, None, False)
    with pytest.raises(UserError, match="tokenizer"):
        MovingShapes().build_model({"model.tokenizer": "pixels"}, {"frame_size": 32})


def test_tubelets_round_trip_and_group_pixels_of_one_patch() -> None:
    clips = torch.randn(2, 6, 1, 32, 32)
    tubelets = to_tubelets(clips, (2, 8, 8))
    assert tubelets.shape == (2, 3, 16, 2 * 8 * 8)
    assert torch.equal(from_tubelets(tubelets, (2, 8, 8), (4, 4), 1), clips)
    # tubelet (step 1, patch row 2, col 3) holds frames 2-3, rows 16-23, cols 24-31
    patch = clips[0, 2:4, 0, 16:24, 24:32].reshape(-1)
    assert torch.equal(tubelets[0, 1, 2 * 4 + 3], patch)


@pytest.mark.parametrize(
    ("pe", "tokenizer"),
    [("cope", "mlp-max"), ("abs", "mlp-max"), ("sin", "mlp-max"), ("rope", "mlp-max"),
     ("rope", "patches"), ("cope", "patches"), ("cope[rise]", "mlp-max"),
     ("cope[rise]", "patches"), ("cope[change]", "patches")],
)  # fmt: skip
def test_model_gives_the_same_logits_alone_and_in_a_padded_batch(
    bundle, pe: str, tokenizer: str
) -> None:
    recipe = MovingShapes()
    pe, _, gate = pe.rstrip("]").partition("[")
    options = {**recipe.presets["tiny"], "model.pe": pe, "model.tokenizer": tokenizer}
    if gate:
        options["model.cope_gate"] = gate
    torch.manual_seed(0)
    if tokenizer == "patches":
        options["model.spatial_pe"] = "learned"
    model = recipe.build_model(options, bundle.info).eval()
    with torch.no_grad():  # CoPE's zero-initialised tables would hide the positions
        for name, parameter in model.named_parameters():
            if name.endswith("pos_emb"):
                parameter.normal_()
    items = [bundle.train[index] for index in range(4)]
    lengths = [item["inputs"].shape[0] for item in items]
    batch = pad_collate(items)
    assert len(set(lengths)) > 1 and batch["padding_mask"].any()
    with torch.no_grad():
        together = model(batch["inputs"], batch["padding_mask"])
        shortest = lengths.index(min(lengths))
        alone = model(items[shortest]["inputs"][None])
    assert together.shape == (4, bundle.info["num_classes"])
    torch.testing.assert_close(together[shortest], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("tokenizer", "leading"), [("mlp-max", 1), ("patches", 16)])
def test_the_question_frames_are_not_signal_for_the_gates(bundle, tokenizer, leading) -> None:
    """The glyph tubelet leads the clip: its tokens are the frontend's leading ones."""
    recipe = MovingShapes()
    options = {**recipe.presets["tiny"], "model.tokenizer": tokenizer, "model.cope_gate": "rise"}
    model = recipe.build_model(options, bundle.info)
    front = model.frontend(bundle.train[0]["inputs"][None])
    assert front.leading == leading and front.lag == leading


def test_example_signal_marks_the_token_where_each_shape_appears(bundle) -> None:
    recipe = MovingShapes()
    item = bundle.train[0]
    clip = bundle.train.clip(0)
    signal = recipe.example_signal(item, bundle.info)
    assert signal["kind"] == "frames" and signal["tokens_per_frame"] == 0.5
    assert signal["image"].shape == (len(clip.frames), 32, 32)
    assert signal["onsets"] == [onset // 2 for onset in clip.onsets]
    assert len(signal["onsets"]) == len(clip.events) and signal["onsets"][0] >= 1


def test_cli_trains_and_evaluates_every_split_end_to_end(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from cope_cli.app import app

    arguments = ["train", "moving-shapes", "--pe", "cope", "--steps", "4", "--preset", "tiny"]
    arguments += ["--out", str(tmp_path)]
    for option in ("data.train_size=32", "data.eval_size=8", "train.batch_size=8"):
        arguments += ["--set", option]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    [run_dir] = list((tmp_path / "moving-shapes" / "cope").iterdir())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    text = json.dumps(evaluation)
    for split in ("val", "test", "slow", "fast", "long"):
        assert f'"{split}"' in text
    questions = json.loads((run_dir / "questions.json").read_text())["splits"]
    assert set(questions["slow"]) <= {"shape n=1", "shape n=2", "shape n=3"}  # nth only
    assert sum(tally["count"] for tally in questions["slow"].values()) == 8


@pytest.mark.slow
def test_a_small_model_learns_the_kind_of_the_first_shape(tmp_path) -> None:
    """Sanity of the task and the tokenizer: "kind of the 1st shape" is learnable in minutes."""
    from recipes.engine.config import resolve_config
    from recipes.engine.trainer import TrainOptions, train

    recipe = get_recipe("moving-shapes")
    options = {"data.max_nth": 1, "data.eval_size": 200, "train.steps": 400}
    config = resolve_config(recipe, set_options={**options, "train.eval_every": 400})
    result = train(
        get_recipe("moving-shapes"), config, TrainOptions(out=tmp_path, handle_sigint=False)
    )
    assert result.evaluation["splits"]["test"]["accuracy"] > 0.6  # chance is 0.25
