"""Per-question accuracy and event alignment in `cope report` (recipes/engine/analysis.py)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
import torch
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import get_recipe, pad_collate
from recipes.engine import analysis, rundir
from recipes.engine.config import resolve_config
from recipes.engine.evaluate import natural_key
from recipes.engine.report import best_layer, build_report, summarise
from recipes.engine.runs import load_run
from recipes.engine.tables import markdown_table, read_results
from recipes.engine.trainer import TrainOptions, train

QUESTIONS = ["bit n=1", "bit n=2", "count"]
SMALL = {"data.train_size": 48, "data.eval_size": 12, "train.steps": 4, "train.eval_every": 2}


def train_run(out: Path, recipe: str = "tiny-questions-tf", pe: str = "abs", seed: int = 0) -> Path:
    config = resolve_config(
        get_recipe(recipe),
        cli_options={"model.pe": pe, "train.seed": seed},
        set_options=SMALL,
    )
    return train(get_recipe(recipe), config, TrainOptions(out=out)).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished runs: abs seed 0 and CoPE seeds 0 and 1 of tiny-questions-tf."""
    out = tmp_path_factory.mktemp("runs")
    return {
        "abs": train_run(out, pe="abs"),
        "cope0": train_run(out, pe="cope", seed=0),
        "cope1": train_run(out, pe="cope", seed=1),
    }


def copy_runs(runs: dict[str, Path], names: list[str], out: Path) -> dict[str, Path]:
    """The named runs copied below ``out`` (a test may then change their files)."""
    copies = {}
    for name in names:
        target = out / runs[name].relative_to(runs[name].parents[2])
        shutil.copytree(runs[name], target)
        copies[name] = target
    return copies


def direct_counts(run_dir: Path) -> dict[str, dict[str, list[int]]]:
    """Per split and question, [correct, asked], one item at a time through the best weights."""
    loaded = load_run(run_dir, device="cpu")
    counts: dict[str, dict[str, list[int]]] = {}
    for name, split in loaded.bundle.splits.items():
        for index in range(len(split.dataset)):
            item = split.dataset[index]
            batch = pad_collate([item])
            with torch.no_grad():
                predicted = int(loaded.model(batch["inputs"]).argmax(-1))
            tally = counts.setdefault(name, {}).setdefault(
                loaded.recipe.question_of(item, loaded.config), [0, 0]
            )
            tally[0] += int(predicted == item["targets"])
            tally[1] += 1
    return counts


def test_training_counts_answers_per_question_as_a_direct_count_does(runs):
    cached = json.loads((runs["abs"] / rundir.QUESTIONS_FILE).read_text())
    evaluation = json.loads((runs["abs"] / rundir.EVAL_FILE).read_text())
    assert cached["weights"] == rundir.weights_stamp(evaluation)
    direct = direct_counts(runs["abs"])
    assert set(cached["splits"]) == {"val", "test", "long"}
    for split, by_question in cached["splits"].items():
        assert list(by_question) == QUESTIONS
        assert {q: [t["correct"], t["count"]] for q, t in by_question.items()} == direct[split]
        # the split's accuracy is the same forward passes, summed over questions
        correct = sum(tally["correct"] for tally in by_question.values())
        assert correct / evaluation["splits"][split]["count"] == pytest.approx(
            evaluation["splits"][split]["accuracy"]
        )
        assert "questions" not in evaluation["splits"][split]  # eval.json keeps its shape


def test_report_computes_missing_analyses_once_then_reads_the_cache(runs, tmp_path, monkeypatch):
    copies = copy_runs(runs, ["abs", "cope0"], tmp_path / "runs")
    for run_dir in copies.values():  # as a run trained before per-question counts existed
        (run_dir / rundir.QUESTIONS_FILE).unlink()
    messages: list[str] = []
    build_report([tmp_path / "runs"], tmp_path / "first", alignment_examples=4,
                 on_message=messages.append)  # fmt: skip
    assert sum("computing" in message for message in messages) == 2
    written = {
        path: path.read_text()
        for run_dir in copies.values()
        for path in run_dir.glob("*.json")
        if path.name in (rundir.QUESTIONS_FILE, rundir.ALIGNMENT_FILE)
    }
    assert len(written) == 3  # questions x 2, alignment for the CoPE run only
    assert json.loads(written[copies["abs"] / rundir.QUESTIONS_FILE])["splits"]["val"]

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached analysis was computed again")

    monkeypatch.setattr(analysis, "load_run", no_loading)
    messages.clear()
    (second,), _ = build_report([tmp_path / "runs"], tmp_path / "second", alignment_examples=4,
                                on_message=messages.append)  # fmt: skip
    assert messages == [] and second["questions"] and second["alignment"]
    assert all(path.read_text() == text for path, text in written.items())


def test_a_cache_of_other_weights_or_examples_is_computed_again(runs, tmp_path):
    (run_dir,) = copy_runs(runs, ["cope0"], tmp_path / "runs").values()
    build_report([tmp_path / "runs"], tmp_path / "report", alignment_examples=2)
    stale = json.loads((run_dir / rundir.QUESTIONS_FILE).read_text())
    stale["weights"]["best_step"] = -7  # as after the run was extended by more steps
    stale["splits"] = {}
    (run_dir / rundir.QUESTIONS_FILE).write_text(json.dumps(stale))
    messages: list[str] = []
    build_report([tmp_path / "runs"], tmp_path / "report", alignment_examples=3,
                 on_message=messages.append)  # fmt: skip
    assert messages == [f"computing per-question accuracy and event alignment of {run_dir}"]
    assert json.loads((run_dir / rundir.QUESTIONS_FILE).read_text())["splits"]
    assert json.loads((run_dir / rundir.ALIGNMENT_FILE).read_text())["examples"] == 3


def test_a_recipe_without_questions_gets_no_per_question_section(tmp_path):
    run_dir = train_run(tmp_path / "runs", recipe="tiny-majority-tf", pe="cope")
    (result,), files = build_report([tmp_path / "runs"], tmp_path / "report")
    assert not (run_dir / rundir.QUESTIONS_FILE).exists()
    assert result["questions"] is None
    markdown = files["markdown"].read_text()
    assert "### Per question" not in markdown
    # and no alignment: tiny-majority-tf's example signal has no event onsets
    assert result["alignment"] is None and "### Event alignment" not in markdown
    assert json.loads((run_dir / rundir.ALIGNMENT_FILE).read_text())["splits"] == {}


def test_alignment_is_computed_for_cope_runs_only(runs, tmp_path):
    copies = copy_runs(runs, ["abs", "cope0"], tmp_path / "runs")
    (result,), files = build_report([tmp_path / "runs"], tmp_path / "report", alignment_examples=4)
    assert not (copies["abs"] / rundir.ALIGNMENT_FILE).exists()
    cached = json.loads((copies["cope0"] / rundir.ALIGNMENT_FILE).read_text())
    assert cached["examples"] == 4 and set(cached["splits"]) == {"val", "long"}  # val + OOD
    layers = cached["splits"]["val"]["layers"]
    assert len(layers) == 1 and layers[0]["events"] == 2.0  # the recipe's two onsets per clip
    assert list(result["alignment"]["by_pe"]) == ["cope"]
    table = files["markdown"].read_text().split("### Per question")[0]
    (abs_row,) = [line for line in table.splitlines() if line.startswith("| abs |")]
    (cope_row,) = [line for line in table.splitlines() if line.startswith("| cope |")]
    assert "alignment / onset recall, long (best layer on val)" in table
    assert abs_row.endswith("| - |")
    assert re.search(r"\| \d\.\d\d / \d\.\d\d \|$", cope_row)  # score / recall


def test_report_statistics_over_two_seeds_are_the_main_tables(runs, tmp_path):
    copies = copy_runs(runs, ["cope0", "cope1"], tmp_path / "runs")
    (result,), files = build_report([tmp_path / "runs"], tmp_path / "report", alignment_examples=4)
    cached = [json.loads((copies[name] / rundir.QUESTIONS_FILE).read_text()) for name in copies]
    values = [c["splits"]["long"]["count"]["correct"] / c["splits"]["long"]["count"]["count"]
              for c in cached]  # fmt: skip
    summary = result["questions"]["by_pe"]["cope"]["count"]["long"]
    expected = summarise(values, (0.0, 1.0))
    assert summary["n"] == 2 and sorted(summary["seeds"]) == [0, 1]
    for key in ("mean", "std", "ci_low", "ci_high"):
        assert summary[key] == pytest.approx(expected[key], nan_ok=True)
    assert result["questions"]["names"] == QUESTIONS
    assert result["questions"]["splits"] == ["val", "test", "long"]
    recall = result["alignment"]["by_pe"]["cope"]["val"]["mean"]["recall"]
    per_seed = [
        json.loads((copies[name] / rundir.ALIGNMENT_FILE).read_text())["splits"]["val"]["layers"]
        for name in copies
    ]
    assert recall["n"] == 2
    assert recall["mean"] == pytest.approx(sum(layers[0]["recall"] for layers in per_seed) / 2)
    rows = list(csv_rows(files["csv"]))
    question_rows = [row for row in rows if row["question"]]
    assert len(question_rows) == 3 * 3  # 3 questions x 3 splits, one encoding
    assert any(row["metric"] == "onset recall (mean over layers)" for row in rows)
    markdown = files["markdown"].read_text()
    assert "| cope | count | 2 |" in markdown and "### Event alignment (CoPE)" in markdown


def csv_rows(path: Path):
    import csv

    with path.open(newline="") as stream:
        yield from csv.DictReader(stream)


def test_cope_table_prints_each_part_from_results_json_alone(runs, tmp_path):
    copy_runs(runs, ["abs", "cope0", "cope1"], tmp_path / "runs")
    build_report([tmp_path / "runs"], tmp_path / "report", alignment_examples=2)
    shutil.rmtree(tmp_path / "runs")  # the table needs the report's files only
    runner = CliRunner()
    main = runner.invoke(app, ["table", str(tmp_path / "report")])
    assert main.exit_code == 0, main.output
    header, rule, *rows = main.output.strip().splitlines()
    assert header.startswith("| options | pe | seeds | val | test | long (OOD) |")
    assert [row.split(" | ")[1] for row in rows] == ["abs", "cope"]
    assert rows[0].endswith("| - |")
    cope = read_results(tmp_path / "report")["groups"][0]["splits"]["val"]["by_pe"]["cope"]
    with_std = runner.invoke(app, ["table", str(tmp_path / "report"), "--std"]).output
    assert f"{cope['mean']:.3f} ± {cope['std']:.3f} [{cope['ci_low']:.3f}," in with_std
    assert f"{cope['mean']:.3f} ± " not in main.output
    questions = runner.invoke(app, ["table", str(tmp_path / "report" / "results.json"),
                                    "--part", "questions"])  # fmt: skip
    assert questions.exit_code == 0, questions.output
    assert len(questions.output.strip().splitlines()) == 2 + 2 * 3  # 2 encodings x 3 questions
    results = read_results(tmp_path / "report")
    alignment = markdown_table(results, "alignment").splitlines()
    assert len(alignment) == 2 + 2 * 2  # cope x (best, mean) x (val, long)
    assert alignment[2].startswith("| defaults | cope | best layer on val | val | 2 |")
    bad = runner.invoke(app, ["table", str(tmp_path / "report"), "--part", "heads"])
    assert bad.exit_code == 2 and "main, questions, alignment" in bad.output


def test_cope_table_refuses_a_part_an_older_report_lacks(tmp_path):
    results = {"groups": [{"recipe": "r", "settings": {}, "pes": [], "splits": {},
                           "metric": "accuracy"}]}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    result = CliRunner().invoke(app, ["table", str(tmp_path), "--part", "questions"])
    assert result.exit_code == 2 and "run `cope report`" in result.output


def test_best_layer_is_chosen_on_val_by_score_and_recall():
    layers = [
        {"score": 1.0, "recall": 0.1, "steps": 1, "events": 4},  # one lucky step
        {"score": 0.7, "recall": 0.8, "steps": 5, "events": 4},
        {"score": None, "recall": 0.0, "steps": 0, "events": 4},  # never stepped
    ]
    other = [{"score": 1.0, "recall": 1.0}, {"score": 0.0, "recall": 0.0}] + [{"score": 0}]
    assert best_layer({"slow": {"layers": other}, "val": {"layers": layers}}) == 1


def test_question_recipes_name_their_questions():
    config = {"data.max_n": 2, "data.max_nth": 3}
    assert get_recipe("audio-events").question_of({"question": 1}, config) == "event n=2"
    assert get_recipe("audio-events").question_of({"question": 2}, config) == "count"
    assert get_recipe("spoken-words").question_of({"question": 0}, config) == "word n=1"
    assert get_recipe("moving-shapes").question_of({"question": 2}, config) == "shape n=3"
    assert not get_recipe("counting").asks_questions
    assert sorted(["count", "n=10", "n=2"], key=natural_key) == ["count", "n=2", "n=10"]
    assert math.isnan(analysis.nanmean([None, math.nan]))


def test_no_alignment_for_video_patch_tokens():
    from types import SimpleNamespace

    from recipes.engine.analysis import run_alignment

    # the signals count one token per tubelet: with patch tokens nothing is scored (bundle unread)
    loaded = SimpleNamespace(config={"model.tokenizer": "patches"}, bundle=None)
    assert run_alignment(loaded, 8) == {}  # type: ignore[arg-type]
