"""Trustworthy comparisons: exact t intervals, one entry per seed, convergence, tuning on val."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import UserError, get_recipe
from recipes.engine import rundir
from recipes.engine.compare import Job, parse_tune_options, select_by_val
from recipes.engine.config import resolve_config
from recipes.engine.report import (
    build_report,
    encoding_label,
    steps_to_reach,
    t_quantile,
    t_quantile_975,
)
from recipes.engine.runs import evaluate_run
from recipes.engine.trainer import TrainOptions, train

# t_{0.975, df} to 9 decimals (standard tables; e.g. R's qt(0.975, df)).
T_975 = {
    1: 12.706204736,
    2: 4.302652730,
    5: 2.570581836,
    30: 2.042272456,
    31: 2.039513446,
    60: 2.000297822,
    120: 1.979930405,
    1000: 1.962339081,
}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantiles_are_exact_for_every_degree_of_freedom(df):
    assert abs(t_quantile_975(df) - T_975[df]) < 1e-4
    assert abs(t_quantile_975(df) - T_975[df]) < 1e-8  # in fact to the tables' last digit


def test_t_quantiles_match_closed_forms_and_approach_the_normal():
    # df 1: Cauchy, tan(pi (p - 1/2)); df 2: (2p - 1) sqrt(2 / (1 - (2p - 1)^2)).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        a = 2 * p - 1
        assert t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-10)
    assert t_quantile(0.975, 10**7) == pytest.approx(1.959964, abs=1e-5)
    assert math.isnan(t_quantile_975(0))


def tiny_config(recipe: str = "tiny-majority", **options: object) -> dict:
    return resolve_config(get_recipe(recipe), cli_options={"model.pe": "abs"}, set_options=options)


def test_report_keeps_one_run_per_seed_the_newest_finished(tmp_path: Path):
    config = tiny_config(**{"train.steps": 2, "data.eval_size": 8})
    recipe = get_recipe("tiny-majority")
    first = train(recipe, config, TrainOptions(out=tmp_path)).run_dir
    again = train(recipe, config, TrainOptions(out=tmp_path, on_finished="new")).run_dir
    other = train(recipe, {**config, "train.seed": 1}, TrainOptions(out=tmp_path))
    assert first != again
    # Make the repeat's result recognisable: the report must take its value, not the first's.
    evaluation = json.loads((again / rundir.EVAL_FILE).read_text())
    evaluation["splits"]["test"]["accuracy"] = 0.125
    (again / rundir.EVAL_FILE).write_text(json.dumps(evaluation))

    (result,), files = build_report([tmp_path], tmp_path / "report")
    test = result["splits"]["test"]["by_pe"]["abs"]
    assert test["n"] == 2 and sorted(test["seeds"]) == [0, 1]
    assert set(test["runs"]) == {str(again), str(other.run_dir)}
    assert 0.125 in test["values"]
    assert result["left_out"] == [str(first)]
    markdown = files["markdown"].read_text()
    assert "the newest finished one" in markdown and str(first) in markdown
    assert "Command: `cope" in markdown and "; commit " in markdown and "CPUs" in markdown


def test_steps_to_threshold_is_the_first_validation_reaching_it(tmp_path: Path):
    assert steps_to_reach([(10, 0.5), (20, 0.9), (30, 0.8)], 0.85) == 20
    assert steps_to_reach([(10, 0.5)], 0.85) is None
    config = tiny_config(**{"train.steps": 30, "data.eval_size": 8})
    train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    (result,), files = build_report([tmp_path], tmp_path / "report")
    entry = result["convergence"]["by_pe"]["abs"]
    assert entry["n"] == 1 and entry["reached"] == 1 and entry["mean_steps"] in (10, 20, 30)
    assert "steps to val ≥" in files["markdown"].read_text()


def fake_job(pe: str, lr: float, seed: int) -> Job:
    config = {"model.pe": pe, "train.seed": seed, "train.lr": lr}
    return Job("counting", config, None, tuned=(("train.lr", lr),))


def test_tuning_chooses_by_val_only_even_when_test_disagrees():
    jobs, evaluations = [], []
    # cope: lr 1e-3 is best on val but worst on test; abs: 3e-3 best on val.
    table = {
        ("cope", 1e-3): (0.90, 0.50),
        ("cope", 3e-3): (0.80, 0.99),
        ("abs", 1e-3): (0.60, 0.95),
        ("abs", 3e-3): (0.70, 0.40),
    }
    for (pe, lr), (val, test) in table.items():
        for seed in (0, 1):
            jobs.append(fake_job(pe, lr, seed))
            evaluations.append({"splits": {"val": {"accuracy": val}, "test": {"accuracy": test}}})
    chosen, selections = select_by_val(jobs, evaluations)
    picked = {(jobs[index].config["model.pe"], jobs[index].config["train.lr"]) for index in chosen}
    assert picked == {("cope", 1e-3), ("abs", 3e-3)}
    assert len(chosen) == 4  # both seeds of each chosen value
    by_pe = {selection["pe"]: selection for selection in selections}
    assert by_pe["cope"]["chosen"] == "train.lr=0.001"
    assert [c["val"] for c in by_pe["abs"]["candidates"]] == pytest.approx([0.60, 0.70])


def test_tuning_reports_a_cope_gate_under_the_tables_label():
    """The choice for CoPE with a gate variant is listed under its row, e.g. cope[onset]."""
    jobs, evaluations = [], []
    for lr, val in ((1e-3, 0.7), (2e-3, 0.9)):
        config = {"model.pe": "cope", "model.cope_gate": "onset", "train.seed": 0, "train.lr": lr}
        jobs.append(Job("counting", config, None, tuned=(("train.lr", lr),)))
        evaluations.append({"splits": {"val": {"accuracy": val}}})
    _, (selection,) = select_by_val(jobs, evaluations)
    assert selection["pe"] == encoding_label(jobs[0].config) == "cope[onset]"
    assert selection["chosen"] == "train.lr=0.002"


def test_tune_option_parses_values_and_refuses_what_compare_sets():
    assert parse_tune_options(["train.lr=3e-4,1e-3,3e-3"]) == {"train.lr": [3e-4, 1e-3, 3e-3]}
    with pytest.raises(UserError, match="model.pe"):
        parse_tune_options(["model.pe=cope,abs"])
    with pytest.raises(UserError, match="key=value"):
        parse_tune_options(["train.lr"])


def test_compare_with_tune_reports_the_choice_per_encoding(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    args = ["compare", "tiny-majority", "--pe", "abs,nope", "--seeds", "1", "--steps", "2"]
    args += ["--tune", "train.lr=0.001,0.01", "--set", "data.eval_size=8", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(rundir.find_runs(tmp_path, "tiny-majority")) == 4  # 2 encodings x 2 lrs
    assert "tuned on val" in result.output
    (folder,) = (tmp_path / "tiny-majority").glob("compare-*")
    (group,) = json.loads((folder / "results.json").read_text())["groups"]
    assert set(group["tuning"]["by_pe"]) == {"abs", "nope"}
    assert group["splits"]["test"]["by_pe"]["abs"]["n"] == 1  # only the chosen lr's run
    report = (folder / "report.md").read_text()
    assert "Tuned per encoding on val only" in report
    # every candidate's val with the table's digits (accuracy: 3), whatever its value
    assert re.search(r"- abs: chose train\.lr=\S+ \(val accuracy: train\.lr=0\.001: \d\.\d{3}, "
                     r"train\.lr=0\.01: \d\.\d{3}\)", report)  # fmt: skip
    both = CliRunner().invoke(app, [*args, "--set", "train.lr=0.1"])
    assert both.exit_code == 2 and "both tuned" in both.output


def test_runs_saved_when_rel_meant_t5_read_back_as_t5(tmp_path: Path):
    config = tiny_config("tiny-majority-tf", **{"train.steps": 2, "data.eval_size": 8})
    recipe = get_recipe("tiny-majority-tf")
    run = train(recipe, {**config, "model.pe": "t5"}, TrainOptions(out=tmp_path))
    saved = json.loads((run.run_dir / rundir.CONFIG_FILE).read_text())
    saved["config"]["model.pe"] = "rel"  # as written before the paper's rel existed
    for key in ("model.attn_dropout", "model.cope_scale_logits"):
        del saved["config"][key]
    (run.run_dir / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    assert rundir.read_config(run.run_dir)[1]["model.pe"] == "t5"
    evaluation = evaluate_run(run.run_dir, ["test"])  # the T5 weights load under t5
    assert evaluation["pe"] == "t5"
    assert evaluation["splits"]["test"] == run.evaluation["splits"]["test"]
