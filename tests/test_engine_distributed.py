"""`torchrun --nproc-per-node 2 cope train ...`: DDP on CPU with gloo, rank 0 writes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
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
import engine_helpers  # the tiny recipes
from cope_cli.app import main
main()
"""


def torchrun_train(tmp_path: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 cope train tiny-majority ARGS` on CPU."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(TESTS), "train", "tiny-majority", "--pe", "abs", "--steps", "8",
        "--device", "cpu", "--out", str(out), "--set", "train.eval_every=4", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # three torchrun jobs of two processes each: ~1-2 minutes on 2 busy CPUs
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_two_processes_train_resume_and_match_one_process(tmp_path: Path) -> None:
    result = torchrun_train(tmp_path, tmp_path / "ddp", "--set", "model.dropout=0.0")
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
    single = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path / "single"))
    expected = load_checkpoint(single.run_dir / "checkpoint.pt")["model"]
    actual = load_checkpoint(run / "checkpoint.pt")["model"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4)

    # With dropout (each rank its own stream), stop at step 3 and resume: bit-exact.
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    torchrun_train(tmp_path, straight_dir)
    torchrun_train(tmp_path, resumed_dir, "--stop-after", "3")
    (stopped,) = rundir.find_runs(resumed_dir)
    assert not rundir.is_finished(stopped)
    assert len(load_checkpoint(stopped / "checkpoint.pt")["rng_per_rank"]) == 2
    torchrun_train(tmp_path, resumed_dir, "--resume")
    (straight,) = rundir.find_runs(straight_dir)
    expected = load_checkpoint(straight / "checkpoint.pt")["model"]
    actual = load_checkpoint(stopped / "checkpoint.pt")["model"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
