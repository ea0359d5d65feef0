"""The `cope` command line, through Typer's CliRunner (and one real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.engine import rundir

runner = CliRunner()
COMMANDS = [
    "recipes", "config", "train", "eval", "compare", "sweep", "report", "positions", "data"
]  # fmt: skip


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at the terminal width; a wide one keeps table cells on one line."""
    monkeypatch.setenv("COLUMNS", "250")


def cope(*args: str) -> object:
    """Invoke `cope ARGS` in-process; the result has exit_code, output and exception."""
    return runner.invoke(app, [str(arg) for arg in args])


def assert_user_error(result: object, fragment: str) -> None:
    """Exit code 2, ending with one line `error: ...` containing ``fragment``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output


def test_version_prints_the_package_version() -> None:
    result = cope("--version")
    assert result.exit_code == 0 and result.output.startswith("cope ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = cope(command, "--help")
    assert result.exit_code == 0
    assert "Example: cope " + command in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("command", "text"),
    [("sweep", "[options] for every run; [[variants]]"), ("table", "mean ± std [interval]")],
)
def test_help_keeps_bracketed_words_that_rich_would_take_for_markup(command, text) -> None:
    assert text in " ".join(cope(command, "--help").output.replace("│", " ").split())


def test_bench_is_mounted_as_a_sub_command() -> None:
    result = cope("bench", "--help")
    assert result.exit_code == 0 and "attention" in result.output


def test_train_help_shows_defaults() -> None:
    text = " ".join(cope("train", "--help").output.split())
    assert "[default: runs]" in text and "Default: auto" in text


def test_recipes_lists_name_modality_and_splits() -> None:
    result = cope("recipes", "tiny-*")
    assert result.exit_code == 0
    for text in ("tiny-majority", "tiny-echo", "long", "generated", "text"):
        assert text in result.output


def test_train_creates_a_run_and_eval_finds_the_newest(tmp_path: Path) -> None:
    result = cope("train", "tiny-majority", "--pe", "rope", "--steps", "6", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (first,) = rundir.find_runs(tmp_path, "tiny-majority", "rope")
    assert rundir.is_finished(first) and "long" in result.output
    again = cope("train", "tiny-majority", "--pe", "rope", "--steps", "6", "--out", tmp_path)
    assert_user_error(again, "--force")
    forced = cope(
        "train", "tiny-majority", "--pe", "rope", "--steps", "6", "--out", tmp_path, "--force"
    )
    assert forced.exit_code == 0
    newest = rundir.find_runs(tmp_path, "tiny-majority", "rope")[-1]
    assert newest != first
    evaluated = cope("eval", "tiny-majority", "--pe", "rope", "--out", tmp_path, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["run_dir"] == str(newest) and set(report["splits"]) == {"val", "test", "long"}
    expected = json.loads((newest / "eval.json").read_text())["splits"]["long"]["accuracy"]
    assert report["splits"]["long"]["accuracy"] == expected


def test_eval_of_a_run_directory_and_one_split(tmp_path: Path) -> None:
    cope("train", "tiny-majority", "--pe", "abs", "--steps", "3", "--out", tmp_path)
    (run,) = rundir.find_runs(tmp_path)
    result = cope("eval", run, "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["splits"]) == ["test"]
    assert_user_error(cope("eval", run, "--split", "nope"), "unknown split 'nope'")


def test_eval_without_a_target_picks_the_newest_finished_run_of_the_encoding(
    tmp_path: Path,
) -> None:
    for pe in ("abs", "rope"):
        cope("train", "tiny-majority", "--pe", pe, "--steps", "3", "--out", tmp_path)
    (abs_run,) = rundir.find_runs(tmp_path, "tiny-majority", "abs")
    result = cope("eval", "--pe", "abs", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert f"evaluating the newest run: {abs_run}" in result.output
    assert json.loads(result.output[result.output.index("{") :])["run_dir"] == str(abs_run)
    assert_user_error(cope("eval", "--pe", "alibi", "--out", tmp_path), "no finished run")


def test_eval_set_changes_data_options_and_refuses_model_options(tmp_path: Path) -> None:
    cope("train", "tiny-majority", "--pe", "abs", "--steps", "3", "--out", tmp_path)
    (run,) = rundir.find_runs(tmp_path)
    plain = json.loads(cope("eval", run, "--split", "val", "--json").output)
    fewer = cope("eval", run, "--split", "val", "--json", "--set", "data.eval_size=7")
    assert fewer.exit_code == 0, fewer.output
    changed = json.loads(fewer.output)
    assert changed["data_options"] == {"data.eval_size": 7} and plain["data_options"] == {}
    assert changed["splits"]["val"]["count"] == 7 != plain["splits"]["val"]["count"]
    assert_user_error(cope("eval", run, "--set", "model.depth=4"), "only data.* options")
    assert_user_error(cope("eval", run, "--set", "data.eval_size=many"), "must be an integer")


def test_one_seed_results_json_is_strict_json_with_null_intervals(tmp_path: Path) -> None:
    result = cope(
        "compare", "tiny-majority", "--pe", "abs", "--seeds", "1", "--steps", "2", "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("tiny-majority/compare-*/results.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert "null" in text  # the one-seed std and interval


def test_training_outside_a_terminal_prints_a_plain_progress_line_every_5_percent(
    tmp_path: Path,
) -> None:
    args = ["train", "tiny-majority", "--pe", "abs", "--steps", "40", "--out", tmp_path]
    result = cope(*args, "--set", "train.log_every=1")
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if "/40 loss" in line]
    first_and_every_5_percent = ["1/40"] + [f"{step}/40" for step in range(2, 41, 2)]
    assert [line.split()[1] for line in progress] == first_and_every_5_percent
    result = cope(*args, "--set", "train.log_every=10", "--force")  # the loss comes on log steps
    progress = [line for line in result.output.splitlines() if "/40 loss" in line]
    assert [line.split()[1] for line in progress] == ["10/40", "20/40", "30/40", "40/40"]
    assert all("step/s eta" in line for line in progress)


def test_training_logs_to_tensorboard_by_default(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "tiny-majority", "--pe", "abs", "--steps", "20", "--out", tmp_path]
    assert cope(*args, "--set", "train.log_every=5", "--set", "train.eval_every=10").exit_code == 0
    (run,) = rundir.find_runs(tmp_path)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [event.step for event in events.Scalars("eval/val/accuracy")] == [10, 20]


def test_saved_data_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    rundir.write_config(tmp_path, "tiny-majority", {}, None, Path("mydata"))
    assert rundir.read_data_dir(tmp_path) == tmp_path.resolve() / "mydata"


def test_recipe_file_and_set_override_in_order(tmp_path: Path) -> None:
    recipe_file = tmp_path / "run.toml"
    recipe_file.write_text(
        'recipe = "tiny-majority"\npreset = "wide"\n[train]\nsteps = 4\nlr = 0.02\n'
        "[model]\ndim = 12\n"
    )
    result = cope(
        "train", "--recipe-file", recipe_file, "--steps", "5", "--set", "train.steps=3",
        "--out", tmp_path / "runs",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = rundir.find_runs(tmp_path / "runs")
    _, config = rundir.read_config(run)
    assert config["train.steps"] == 3  # --set beats --steps beats the file
    assert config["train.lr"] == 0.02  # the file beats the preset
    assert config["model.dim"] == 12  # the file beats the preset (32)
    assert json.loads((run / "config.json").read_text())["preset"] == "wide"


def test_config_shows_each_value_and_the_layer_that_set_it() -> None:
    result = cope(
        "config", "tiny-majority", "--preset", "wide", "--steps", "7", "--set", "train.lr=0.5"
    )
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "preset wide" in rows["model.dim"] and "32" in rows["model.dim"]
    assert "option" in rows["train.steps"] and "--set" in rows["train.lr"]
    assert "recipe" in rows["data.train_size"] and "engine" in rows["train.optimizer"]
    data = json.loads(cope("config", "tiny-majority", "--json").output)
    assert data["config"]["train.steps"] == 30


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "no-such-recipe"], "unknown recipe 'no-such-recipe'; choose one of:"),
        (["train", "tiny-majority", "--pe", "copee"], "unknown position encoding 'copee'"),
        (["train", "tiny-majority", "--preset", "huge"], "no preset 'huge'"),
        (["train", "tiny-majority", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
        (["train", "tiny-majority", "--set", "train.steps=many"], "train.steps must be"),
        (["train", "tiny-majority", "--set", "oops"], "--set expects key=value"),
        (["train", "tiny-majority", "--steps", "3", "--epochs", "1"], "not both"),
        (["train", "tiny-majority", "--set", "data.min_len=20"], "min_len"),
        (["train"], "name a recipe"),
        (["compare", "tiny-majority", "--pe", "abs,copee"], "unknown position encoding"),
        (["compare", "tiny-majority", "--set", "model.pe=abs"], "use --pe instead"),
        (["eval", "nothing-here"], "neither a run directory nor a recipe"),
        (["eval", "tiny-majority", "--pe", "alibi"], "no finished run"),
        (["report", "missing-dir"], "runs directory not found"),
        (["positions", "missing-dir"], "run directory not found"),
        (["data", "audio-folder"], "nothing to download"),
        (["sweep", "absent.toml"], "file not found"),
    ],
)
def test_user_mistakes_end_with_one_error_line_and_exit_2(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_user_error(cope(*args), fragment)
    assert not (tmp_path / "runs" / "tiny-majority").exists()  # no damaged run directory


def test_out_of_memory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from recipes.engine import trainer

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "forward_batch", exhausted)
    result = cope("train", "tiny-majority", "--pe", "abs", "--out", tmp_path)
    assert_user_error(result, "out of memory; try a smaller train.batch_size")


def test_eval_of_an_unfinished_run_uses_its_best_weights_so_far(tmp_path: Path) -> None:
    args = ["train", "tiny-majority", "--pe", "abs", "--out", tmp_path]
    assert cope(*args, "--stop-after", "12").exit_code == 0  # val evaluated at step 10
    (run,) = rundir.find_runs(tmp_path)
    assert not rundir.is_finished(run)
    result = cope("eval", run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["weights"] == "best.pt"
    assert_user_error(cope("eval", "tiny-majority", "--out", tmp_path), "no finished run")
    (run / "best.pt").unlink()
    (run / "checkpoint.pt").unlink()
    assert_user_error(cope("eval", run), "checkpoint not found")


def test_malformed_recipe_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('recipe = "tiny-majority"\n[train\n')
    assert_user_error(cope("train", "--recipe-file", bad, "--out", tmp_path), "not valid TOML")


def test_truncated_checkpoint_without_a_previous_one_on_resume_is_a_clear_error(
    tmp_path: Path,
) -> None:
    from recipes.base import get_recipe
    from recipes.engine.config import resolve_config
    from recipes.engine.trainer import TrainOptions, train

    config = resolve_config(get_recipe("tiny-majority"), cli_options={"model.pe": "abs"})
    stopped = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path, stop_after=2))
    checkpoint = stopped.run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:64])
    (stopped.run_dir / "checkpoint.prev.pt").unlink()  # with it, the run would fall back to it
    result = cope("train", "tiny-majority", "--pe", "abs", "--out", tmp_path, "--resume")
    assert_user_error(result, "damaged or unreadable")
    assert "no earlier checkpoint is kept, so nothing was changed" in result.output


def test_checkpoint_of_another_recipe_is_a_clear_error(tmp_path: Path) -> None:
    cope("train", "tiny-majority", "--pe", "abs", "--steps", "2", "--out", tmp_path)
    cope("train", "tiny-echo", "--pe", "abs", "--steps", "2", "--out", tmp_path)
    (majority,) = rundir.find_runs(tmp_path, "tiny-majority")
    (echo,) = rundir.find_runs(tmp_path, "tiny-echo")
    (majority / "best.pt").write_bytes((echo / "best.pt").read_bytes())
    assert_user_error(cope("eval", majority), "belongs to recipe 'tiny-echo'")


def test_compare_two_encodings_two_seeds_writes_table_and_files(tmp_path: Path) -> None:
    args = ["compare", "tiny-majority", "--pe", "abs,rope", "--seeds", "2", "--steps", "4"]
    result = cope(*args, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(rundir.find_runs(tmp_path, "tiny-majority")) == 4
    (folder,) = (tmp_path / "tiny-majority").glob("compare-*")
    data = json.loads((folder / "results.json").read_text())["groups"][0]
    assert data["pes"] == ["abs", "rope"]
    assert data["splits"]["long"]["ood"] is True
    assert data["splits"]["test"]["by_pe"]["abs"]["seeds"] == [0, 1]
    rows = (folder / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + 2 encodings x 3 splits
    assert (folder / "plot.png").stat().st_size > 1000  # one grouped figure
    assert "![plot.png](plot.png)" in (folder / "report.md").read_text()
    output = " ".join(result.output.split())
    assert "long (OOD)" in output and "results.csv" in output and "±" in output
    # a second comparison reuses the four finished runs instead of training again
    again = cope(*args, "--out", tmp_path)
    assert again.exit_code == 0 and again.output.count("reusing finished run") == 4
    assert len(rundir.find_runs(tmp_path, "tiny-majority")) == 4


def test_sweep_runs_the_grid_and_writes_one_report(tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        f'out = "{tmp_path / "sweep"}"\nrecipes = ["tiny-majority"]\npes = ["abs", "nope"]\n'
        'seeds = 1\n[options]\n"train.steps" = 3\n'
        '[[variants]]\nname = "narrow"\n"model.dim" = 8\n'
        '[[variants]]\nname = "wide"\n"model.dim" = 24\n'
    )
    result = cope("sweep", sweep_file)
    assert result.exit_code == 0, result.output
    assert len(rundir.find_runs(tmp_path / "sweep")) == 4
    (folder,) = (tmp_path / "sweep").glob("sweep-*")
    groups = json.loads((folder / "results.json").read_text())["groups"]
    assert sorted(group["title"] for group in groups) == [
        "tiny-majority [narrow]",
        "tiny-majority [wide]",
    ]
    assert "## tiny-majority [wide]" in (folder / "report.md").read_text()


def test_sweep_file_with_an_unknown_key_is_a_clear_error(tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('recipes = ["tiny-majority"]\nseed = 3\n')
    assert_user_error(cope("sweep", sweep_file), "unknown sweep key 'seed'")


def test_report_rebuilds_tables_from_run_directories(tmp_path: Path) -> None:
    for pe in ("abs", "nope"):
        cope("train", "tiny-majority", "--pe", pe, "--steps", "2", "--out", tmp_path)
    result = cope("report", tmp_path)
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| abs | 1 |" in markdown and "| nope | 1 |" in markdown
    assert (tmp_path / "report" / "plot.png").is_file()
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000  # learning curves
    assert "![curves.png](curves.png)" in markdown


def test_positions_draws_heatmaps_of_a_cope_run(tmp_path: Path) -> None:
    train = cope("train", "tiny-majority-tf", "--pe", "cope", "--out", tmp_path)
    assert train.exit_code == 0, train.output
    (run,) = rundir.find_runs(tmp_path)
    result = cope("positions", run, "--example", "2", "--split", "test")
    assert result.exit_code == 0, result.output
    pngs = sorted((run / "positions").glob("*.png"))
    assert [p.name for p in pngs] == ["test-2-layer0.png"]
    assert pngs[0].stat().st_size > 5000
    assert "largest |p_ij|" in result.output
    assert_user_error(cope("positions", run, "--example", "999"), "--example must be")


def test_positions_of_a_non_cope_run_draws_attention_only(tmp_path: Path) -> None:
    cope("train", "tiny-majority-tf", "--pe", "rope", "--out", tmp_path)
    (run,) = rundir.find_runs(tmp_path)
    result = cope("positions", run, "--out", tmp_path / "maps")
    assert result.exit_code == 0, result.output
    assert "attention maps only" in result.output
    assert (tmp_path / "maps" / "val-0-layer0.png").is_file()


def test_counting_end_to_end_train_and_eval(tmp_path: Path) -> None:
    small = [
        "--set", "data.eval_size=8", "--set", "data.max_statements=8",
        "--set", "data.train_size=64",
        "--set", "data.long_min_statements=9", "--set", "data.long_max_statements=12",
        "--set", "model.max_len=80", "--set", "model.npos=16", "--set", "model.dim=16",
        "--set", "model.mlp_dim=32", "--set", "model.heads=2", "--set", "train.batch_size=4",
    ]  # fmt: skip
    result = cope("train", "counting", "--pe", "cope", "--steps", "3", "--out", tmp_path, *small)
    assert result.exit_code == 0, result.output
    (run,) = rundir.find_runs(tmp_path, "counting", "cope")
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["metric"] == "error"
    assert {"val", "test", "long", "more-pass"} <= set(evaluation["splits"])
    assert "error %" in result.output
    assert cope("eval", "counting", "--pe", "cope", "--out", tmp_path).exit_code == 0


LAUNCHER = """
import sys
if __name__ == "__main__":  # --jobs workers import this file again (spawn), without running it
    sys.path.insert(0, sys.argv.pop(1))
    import engine_helpers  # the tiny recipes
    from cope_cli.app import main
    main()
"""


def test_ctrl_c_stops_after_saving_and_the_run_resumes(tmp_path: Path) -> None:
    from recipes.base import get_recipe
    from recipes.engine.checkpoint import load_checkpoint
    from recipes.engine.config import resolve_config
    from recipes.engine.trainer import TrainOptions, train

    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    options = ["--set", "train.eval_every=100000", "--set", "train.checkpoint_every=100000"]
    command = [
        sys.executable, str(script), str(Path(__file__).parent), "train", "tiny-majority",
        "--pe", "abs", "--steps", "100000", "--out", str(tmp_path / "runs"), *options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            runs = rundir.find_runs(tmp_path / "runs")
            if runs and any(r["step"] >= 10 for r in rundir.read_metrics(runs[0])):
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    (run,) = rundir.find_runs(tmp_path / "runs")
    saved = load_checkpoint(run / "checkpoint.pt")["progress"]["step"]
    assert saved >= 10 and not rundir.is_finished(run)
    config = resolve_config(
        get_recipe("tiny-majority"),
        cli_options={"model.pe": "abs", "train.steps": 100000},
        set_options={"train.eval_every": 100000, "train.checkpoint_every": 100000},
    )
    resumed = train(
        get_recipe("tiny-majority"),
        config,
        TrainOptions(out=tmp_path / "runs", resume=True, stop_after=3),
    )
    assert resumed.run_dir == run and resumed.step == saved + 3


def test_installed_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("cope")
    if not script.exists():
        pytest.skip("the cope console script is not installed")
    result = subprocess.run(
        [str(script), "train", "no-such-recipe", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown recipe 'no-such-recipe'")
    assert "Traceback" not in result.stderr + result.stdout


def test_help_does_not_import_torch() -> None:
    """`cope --help` answers fast because the CLI imports torch only inside the commands."""
    code = "import sys, cope_cli.app; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


def test_compare_table_fits_an_80_column_terminal() -> None:
    from rich.console import Console

    from cope_cli.render import comparison_table

    def summary(mean: float, n: int) -> dict:
        return {"mean": mean, "std": 0.0123, "n": n, "ci_low": mean - 0.03, "ci_high": mean + 0.03}

    splits = {
        name: {"ood": ood, "by_pe": {pe: summary(0.953, 3) for pe in ("cope", "rope", "abs")}}
        for name, ood in (("val", False), ("test", False), ("more-events", True), ("slow", True))
    }
    result = {"title": "audio-events", "metric": "accuracy", "metric_label": "accuracy",
              "pes": ["cope", "rope", "abs"], "splits": splits}  # fmt: skip
    narrow = Console(width=80, record=True)
    narrow.print(comparison_table(result, width=80))
    text = narrow.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if line.lstrip("│ ").startswith(("cope", "rope", "abs"))]
    assert len(rows) == 3 and all("0.953 ± 0.012" in row for row in rows)  # one line per encoding
    assert "more-events †" in text
    wide = Console(width=200, record=True)
    wide.print(comparison_table(result, width=200))
    assert "[0.923, 0.983]" in wide.export_text()
    result["pes"] = ["cope[onset]"]  # a gate variant's label is text, not rich markup
    for split in splits.values():
        split["by_pe"] = {"cope[onset]": split["by_pe"]["cope"]}
    narrow.print(comparison_table(result, width=80))
    assert "cope[onset]" in narrow.export_text()


def test_compare_table_with_many_splits_keeps_the_encoding_names_at_80_columns() -> None:
    from rich.console import Console

    from cope_cli.render import comparison_table

    names = ["val", "test", "fast", "more-words", "slow", "unseen-voices"]
    summary = {"mean": 0.947, "std": 0.0301, "n": 3, "ci_low": 0.873, "ci_high": 1.0}
    by_pe = dict.fromkeys(("cope", "nope"), summary)
    splits = {name: {"ood": name not in ("val", "test"), "by_pe": by_pe} for name in names}
    result = {"title": "spoken-words", "metric": "accuracy", "metric_label": "accuracy",
              "pes": ["cope", "nope"], "splits": splits}  # fmt: skip
    narrow = Console(width=80, record=True)
    narrow.print(comparison_table(result, width=80))
    text = narrow.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if line.lstrip("│ ").startswith(("cope", "nope"))]
    assert len(rows) == 2 and all(row.count("0.947") == 6 for row in rows)  # means, unclipped
    assert "std, intervals, steps to threshold in report.md" in text and "mean over 3 seeds" in text
    assert "…" not in text


def test_data_describes_a_generated_text_task_with_its_training_overlap() -> None:
    result = cope("data", "flip-flop", "--set", "data.train_size=50", "--set", "data.eval_size=5")
    assert result.exit_code == 0, result.output
    assert "train 50, val 5, test 5" in result.output
    assert "evaluation items also in training: val 0, test 0, sparse 0, dense 0" in result.output


def test_option_help_lists_what_the_registries_hold() -> None:
    from encoders.cope import GATES
    from encoders.positions import list_position_encodings

    for command in ("train", "compare"):
        text = " ".join(cope(command, "--help").output.split())
        assert all(f" {name}," in text or f" {name}." in text for name in list_position_encodings())
        assert all(gate in text for gate in GATES)


def test_compare_with_jobs_trains_runs_in_parallel_exactly_as_alone(tmp_path: Path) -> None:
    args = ["compare", "tiny-majority", "--pe", "abs,rope", "--seeds", "2", "--steps", "4"]
    serial = cope(*args, "--out", tmp_path / "serial")
    parallel = cope(*args, "--jobs", "2", "--out", tmp_path / "parallel")
    assert parallel.exit_code == 0, parallel.output
    assert parallel.output.count("started:") == 4 and parallel.output.count("finished:") == 4
    for folder in ("serial", "parallel"):
        assert len(rundir.find_runs(tmp_path / folder, "tiny-majority")) == 4

    def evaluations(folder: str) -> list[dict]:
        runs = sorted(
            rundir.find_runs(tmp_path / folder, "tiny-majority"),
            key=lambda run: (
                json.loads((run / "config.json").read_text())["config"]["model.pe"]
                + str(json.loads((run / "config.json").read_text())["config"]["train.seed"])
            ),
        )
        return [json.loads((run / "eval.json").read_text())["splits"] for run in runs]

    assert serial.exit_code == 0 and evaluations("serial") == evaluations("parallel")
    # the parallel grid reuses finished runs like a serial one
    again = cope(*args, "--jobs", "2", "--out", tmp_path / "parallel")
    assert again.exit_code == 0 and again.output.count("reused:") == 4


@pytest.mark.parametrize("moment", ["set-up", "training"])
def test_ctrl_c_stops_every_parallel_run_with_a_checkpoint(tmp_path: Path, moment: str) -> None:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    command = [
        sys.executable, str(script), str(Path(__file__).parent), "compare", "tiny-majority",
        "--pe", "abs,rope,nope", "--seeds", "1", "--steps", "100000", "--jobs", "2",
        "--set", "train.eval_every=100000", "--out", str(tmp_path / "runs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(  # its own process group: Ctrl-C reaches it and its workers
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            runs = rundir.find_runs(tmp_path / "runs")
            ready = len(runs) == 2 and (
                moment == "set-up" or all(rundir.read_metrics(run) for run in runs)
            )
            if ready:
                os.killpg(process.pid, signal.SIGINT)
                break
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and stdout.count("interrupted:") == 2
    runs = rundir.find_runs(tmp_path / "runs")
    assert len(runs) == 2  # the third run never started
    assert all((run / "checkpoint.pt").is_file() and not rundir.is_finished(run) for run in runs)
