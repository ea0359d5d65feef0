"""Replaying a run (`cope train --from RUN`) and extending a finished one (`--resume --steps`)."""

from __future__ import annotations

from pathlib import Path

import torch
from test_npy_folder import write_folder
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.engine import rundir
from recipes.engine.checkpoint import load_checkpoint

CONSTANT = ["--set", "train.schedule=constant", "--set", "train.warmup_steps=0"]
OPTIONS = ["--pe", "cope", "--set", "model.max_len=64", "--set", "train.batch_size=4"]
OPTIONS += ["--set", "model.dropout=0.1", *CONSTANT]  # dropout: the RNG streams must continue


def cope(*arguments: str) -> str:
    result = CliRunner().invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output


def runs_under(out: Path) -> list[Path]:
    return sorted(out.glob("npy-folder/cope/seed*"))


def test_from_replays_recipe_options_and_data_folder_and_the_command_line_overrides(
    tmp_path: Path,
) -> None:
    root, out = write_folder(tmp_path / "data"), tmp_path / "runs"
    cope(
        "train", "npy-folder", "--steps", "3", "--data-dir", str(root), "--out", str(out), *OPTIONS
    )
    [first] = runs_under(out)
    cope("train", "--from", str(first), "--force", "--out", str(out))  # no --data-dir: the run's
    cope("train", "--from", str(first), "--force", "--out", str(out), "--set", "train.lr=0.01")
    first_config, replay, changed = (rundir.read_config(run)[1] for run in runs_under(out))
    assert replay == first_config
    assert changed == {**first_config, "train.lr": 0.01}


def test_a_run_config_given_as_recipe_file_points_to_from(tmp_path: Path) -> None:
    config = tmp_path / "run" / "config.json"
    config.parent.mkdir()
    config.write_text('{"recipe": "counting", "config": {}}')
    result = CliRunner().invoke(app, ["train", "--recipe-file", str(config)])
    assert result.exit_code == 2 and "--from" in result.output


def test_extending_a_finished_run_with_a_constant_schedule_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    root = write_folder(tmp_path / "data")
    common = ["--data-dir", str(root), *OPTIONS]
    cope("train", "npy-folder", "--steps", "4", "--out", str(tmp_path / "a"), *common)
    output = cope(
        "train", "npy-folder", "--steps", "9", "--resume", "--out", str(tmp_path / "a"), *common
    )
    cope("train", "npy-folder", "--steps", "9", "--out", str(tmp_path / "b"), *common)
    [extended], [direct] = runs_under(tmp_path / "a"), runs_under(tmp_path / "b")
    assert "extending" in output and rundir.is_finished(extended)
    assert rundir.read_config(extended)[1] == rundir.read_config(direct)[1]
    states = [load_checkpoint(run / "checkpoint.pt")["model"] for run in (extended, direct)]
    assert load_checkpoint(extended / "checkpoint.pt")["progress"]["step"] == 9
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
