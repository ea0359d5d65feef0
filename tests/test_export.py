"""`cope export`: the exported program loads and gives the trained model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_npy_folder import FEATURES, write_folder
from test_predict import train_run
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import UserError
from recipes.engine.export import export_run
from recipes.engine.runs import load_model


@pytest.fixture(scope="module")
def cope_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    root = write_folder(folder / "data")
    return train_run(root, folder / "runs", "npy-folder", "--set", "model.max_len=64", pe="cope")


def lengths_and_logits(run_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs of several lengths (the export's time axis is dynamic) with the model's logits."""
    model = load_model(run_dir, device="cpu").model  # the run's own (auto) CoPE path
    torch.manual_seed(0)
    inputs = [torch.randn(1, length, FEATURES) for length in (3, 14, 40)]
    with torch.no_grad():
        return [(x, model(x)) for x in inputs]


def test_torch_export_round_trips_at_every_length(cope_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(cope_run), "--out", str(tmp_path / "m.pt2")])
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for inputs, expected in lengths_and_logits(cope_run):
        torch.testing.assert_close(program(inputs), expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(
    cope_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'cope[onnx]'")
    runtime = pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    path = export_run(cope_run, "onnx", tmp_path / "m.onnx")
    session = runtime.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    for inputs, expected in lengths_and_logits(cope_run):
        got = torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_formats_are_user_errors(cope_run: Path) -> None:
    with pytest.raises(UserError, match="unknown export format"):
        export_run(cope_run, "tflite")
