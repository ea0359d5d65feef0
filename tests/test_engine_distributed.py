"""`torchrun --nproc-per-node 2 cope train ...`: DDP on CPU with gloo, rank 0 writes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_engine_support  # noqa: F401  (registers the tiny recipes)
import torch

from recipes.base import get_recipe
from recipes.engine import rundir
from recipes.engine.checkpoint import load_checkpoint
from recipes.engine.config import resolve_config
from recipes.engine.trainer import TrainOptions, train

TESTS = Path(__file__).parent
LAUNCHER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import test_engine_support  # the tiny recipes
from cope_cli.app import main
main()
"""


@pytest.mark.slow  # three Python processes importing torch: ~15-40 s on 2 busy CPUs
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_two_processes_train_like_one_with_rank_zero_writing(tmp_path: Path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    options = ["--set", "model.dropout=0.0", "--set", "train.eval_every=4"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(TESTS), "train", "tiny-majority", "--pe", "abs", "--steps", "8",
        "--device", "cpu", "--out", str(tmp_path / "ddp"), *options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = rundir.find_runs(tmp_path / "ddp")
    assert rundir.is_finished(run)
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    steps = [r["step"] for r in rundir.read_metrics(run) if r["kind"] == "eval"]
    assert steps == [4, 8]  # logged once, by rank 0 only
    assert result.stdout.count("run directory:") == 2  # rank 0's start line and final line

    # Two ranks of 8 with averaged gradients take the same steps as one process with 16.
    config = resolve_config(
        get_recipe("tiny-majority"),
        cli_options={"model.pe": "abs", "train.steps": 8},
        set_options={"model.dropout": 0.0, "train.eval_every": 4},
    )
    single = train("tiny-majority", config, TrainOptions(out=tmp_path / "single"))
    expected = load_checkpoint(single.run_dir / "checkpoint.pt")["model"]
    actual = load_checkpoint(run / "checkpoint.pt")["model"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4)
