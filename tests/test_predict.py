"""Self-contained checkpoints and `cope predict`: files are read as training read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_audio_folder import make_folder
from test_npy_folder import write_folder
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import UserError, get_recipe
from recipes.engine.checkpoint import load_checkpoint, save_checkpoint
from recipes.engine.evaluate import evaluate
from recipes.engine.predict import logits_of, predict_files
from recipes.engine.runs import load_model, load_run


def train_run(root: Path, out: Path, recipe: str, *extra: str, pe: str = "rope") -> Path:
    """Train a few steps on a folder; the run directory."""
    arguments = ["train", recipe, "--pe", pe, "--steps", "3", "--data-dir", str(root)]
    arguments += ["--out", str(out), "--set", "train.batch_size=4", *extra]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    return next(out.glob(f"{recipe}/{pe}/*"))


def with_lists(root: Path, val: list[str], test: list[str]) -> Path:
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    return root


def assert_predictions_match_evaluation(run_dir: Path, root: Path, test: list[str]) -> None:
    """Per file: the same logits as the test split's item; together: the same accuracy."""
    loaded = load_run(run_dir, device="cpu")
    dataset = loaded.bundle.splits["test"].dataset
    result = predict_files(run_dir, root, top_k=1, device="cpu")
    by_file = {Path(p.file).relative_to(root).as_posix(): p for p in result.predictions}
    correct = 0
    for position, relative in enumerate(sorted(test)):  # the split keeps listing order
        expected = logits_of(load_model(run_dir, device="cpu"), dataset[position]["inputs"])
        got = torch.tensor(by_file[relative].logits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        correct += by_file[relative].top[0][0] == relative.split("/")[0]
    metrics = evaluate(
        loaded.model, dataset, loaded.bundle.collate, batch_size=8, device=loaded.device
    )
    assert metrics["accuracy"] == pytest.approx(correct / len(test))


def test_best_checkpoint_carries_config_class_names_and_feature_statistics(
    tmp_path: Path,
) -> None:
    root = make_folder(tmp_path / "data")
    run_dir = train_run(root, tmp_path / "runs", "audio-folder")
    for name in ("best.pt", "checkpoint.pt"):
        state = load_checkpoint(run_dir / name, "audio-folder")
        assert state["info"]["class_names"] == ["high", "low"]
        assert len(state["info"]["feature_mean"]) == state["info"]["feature_dim"] == 40
        assert state["config"]["model.pe"] == "rope"
    loaded = load_model(run_dir, device="cpu")  # no data folder needed
    assert loaded.info["num_classes"] == 2


def test_audio_predictions_equal_evaluation_of_the_same_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    test = ["high/clip1.flac", "high/clip2.wav", "low/clip3.flac", "low/clip7.flac"]
    with_lists(root, ["high/clip0.wav", "low/clip0.wav"], test)
    run_dir = train_run(root, tmp_path / "runs", "audio-folder")
    predict_dir = tmp_path / "predict"
    for relative in test:
        (predict_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (predict_dir / relative).write_bytes((root / relative).read_bytes())
    assert_predictions_match_evaluation(run_dir, predict_dir, test)


def test_npy_predictions_equal_evaluation_of_the_same_files(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    test = ["down/item03.npy", "down/item11.npy", "up/item05.npy", "up/item19.npy"]
    with_lists(root, ["down/item00.npy", "up/item00.npy"], test)
    run_dir = train_run(root, tmp_path / "runs", "npy-folder", "--set", "model.max_len=64")
    predict_dir = tmp_path / "predict"
    for relative in test:
        (predict_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (predict_dir / relative).write_bytes((root / relative).read_bytes())
    assert_predictions_match_evaluation(run_dir, predict_dir, test)


def test_cli_reports_and_skips_bad_files_and_fails_only_when_none_predicts(
    tmp_path: Path,
) -> None:
    root = make_folder(tmp_path / "data")
    run_dir = train_run(root, tmp_path / "runs", "audio-folder")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run_dir), str(root / "low"), "--json"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "broken.wav" in result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["predictions"]) == 10 and len(answer["predictions"][0]["top"]) == 2
    assert [item["file"] for item in answer["skipped"]] == [str(root / "low" / "broken.wav")]

    result = runner.invoke(app, ["predict", str(run_dir), str(root / "low" / "broken.wav")])
    assert result.exit_code == 2 and "no file could be predicted" in result.output

    table = runner.invoke(app, ["predict", str(run_dir), str(root / "high"), "--top-k", "1"])
    assert table.exit_code == 0 and "clip0.wav" in table.stdout


def test_generated_recipes_say_in_one_line_that_they_cannot_predict_files() -> None:
    with pytest.raises(UserError, match="cannot predict from files"):
        get_recipe("counting").read_file(Path("x"), {}, {})


def test_checkpoints_without_inference_info_still_evaluate(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    run_dir = train_run(root, tmp_path / "runs", "npy-folder", "--set", "model.max_len=64")
    for name in ("best.pt", "checkpoint.pt"):
        state = load_checkpoint(run_dir / name, "npy-folder")
        old = {k: v for k, v in state.items() if k not in ("info", "config", "format")}
        save_checkpoint(run_dir / name, old)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert np.isfinite(json.loads(result.stdout)["splits"]["test"]["accuracy"])
    with pytest.raises(UserError, match="predates self-contained checkpoints"):
        load_model(run_dir, device="cpu")
