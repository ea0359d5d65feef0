"""train.precision: bf16 by default on CUDA, fp32 on CPU, fp16 with a checkpointed scaler."""

from __future__ import annotations

import math
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
import torch
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import UserError, get_recipe
from recipes.engine.checkpoint import load_checkpoint
from recipes.engine.config import resolve_config
from recipes.engine.precision import autocast_context, make_grad_scaler, resolve_precision
from recipes.engine.trainer import TrainOptions, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu() -> None:
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp16", CUDA) == "fp16"


def test_fp16_without_cuda_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_unknown_precision_is_a_one_line_cli_error() -> None:
    result = CliRunner().invoke(
        app, ["train", "tiny-majority", "--pe", "abs", "--precision", "fp8"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.precision must be one of auto, bf16, fp16, fp32" in lines[0]


def test_precision_and_workers_are_documented_in_train_help() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--precision" in result.output and "--workers" in result.output


def test_cpu_bf16_autocast_runs_matrix_products_in_bfloat16() -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast_context(CPU, "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_context(CPU, "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_the_scaler_is_a_pass_through_except_for_fp16() -> None:
    assert not make_grad_scaler(CPU, "fp32").is_enabled()
    assert not make_grad_scaler(CPU, "bf16").is_enabled()


def test_training_in_cpu_bf16_learns_and_checkpoints_the_scaler(tmp_path: Path) -> None:
    config = resolve_config(
        get_recipe("tiny-majority"),
        cli_options={"model.pe": "abs", "train.precision": "bf16"},
    )
    result = train("tiny-majority", config, TrainOptions(out=tmp_path))
    assert result.status == "finished"
    accuracy = result.evaluation["splits"]["test"]["accuracy"]
    assert math.isfinite(accuracy) and accuracy > 0.7
    assert "scaler" in load_checkpoint(result.run_dir / "checkpoint.pt")
