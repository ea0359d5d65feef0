"""The event-alignment score of `cope positions` (recipes/engine/alignment.py) and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
import torch
from engine_helpers import TinyMajorityTransformer
from typer.testing import CliRunner

from cope_cli.app import app
from recipes.base import register_recipe
from recipes.engine import rundir
from recipes.engine.alignment import (
    event_alignment,
    layer_alignment,
    position_increments,
    readout_query,
)

ONSETS = [2, 6, 9]


def _counts_events(length: int, onsets: list[int]) -> torch.Tensor:
    """A CLS query's positions (left of every token) whose gates open exactly at the onsets."""
    gates = torch.zeros(length)
    gates[onsets] = 1.0
    return -gates.cumsum(0)


def test_alignment_is_one_when_positions_step_exactly_at_the_onsets():
    positions = _counts_events(12, ONSETS)
    assert position_increments(positions) == ONSETS
    score = event_alignment(positions, ONSETS)
    assert score["precision"] == 1.0 and score["recall"] == 1.0 and score["increments"] == 3


def test_alignment_is_lower_when_positions_count_frames():
    positions = -torch.arange(1, 13, dtype=torch.float32)  # every token steps: frames counted
    score = event_alignment(positions, ONSETS)
    # increments at 1..11; within one token of 2, 6 or 9: 1,2,3,5,6,7,8,9,10 -> 9 of 11
    assert score["precision"] == pytest.approx(9 / 11)
    assert score["recall"] == 1.0


def test_alignment_is_lower_when_steps_miss_the_onsets_by_more_than_a_token():
    positions = _counts_events(12, [4, 11])
    score = event_alignment(positions, ONSETS)
    assert score["precision"] == 0.0 and score["recall"] == 0.0
    assert event_alignment(_counts_events(12, [3, 6]), ONSETS)["precision"] == 1.0  # tolerance 1


def test_fractional_gates_step_when_the_count_crosses_an_integer():
    gates = torch.full((8,), 0.5)  # half-open gates everywhere: a step every second token
    assert position_increments(-gates.cumsum(0)) == [1, 3, 5, 7]


def test_a_row_without_increments_has_no_score():
    score = event_alignment(torch.zeros(6), ONSETS)
    assert math.isnan(score["precision"]) and score["recall"] == 0.0


def test_a_causal_readout_attributes_each_step_to_the_key_whose_gate_opened():
    # keys left of the query: p_j = sum_{k=j..i} g_k, so an open gate at j steps between j and j+1
    length = 12
    gates = torch.zeros(length + 1)  # the readout (index 12) is the query, its gate closed
    gates[ONSETS] = 1.0
    positions = gates.flip(0).cumsum(0).flip(0)  # suffix sums: the causal CoPE positions
    assert position_increments(positions[:length], query=length) == ONSETS
    layer = torch.zeros(1, length + 1, length + 1)
    layer[0, length] = positions
    (score,) = layer_alignment(layer, ONSETS, offset=0, signal_tokens=length, causal=True)
    assert score["precision"] == 1.0 and readout_query(length + 1, causal=True) == length


def test_layer_alignment_reads_the_cls_row_over_the_signal_tokens_only():
    length, offset = 10, 2  # CLS and a question token before the signal
    row = torch.cat((torch.tensor([0.0, -5.0]), _counts_events(length, ONSETS)))
    layer = torch.zeros(2, length + offset, length + offset)
    layer[:, 0] = row
    scores = layer_alignment(layer, ONSETS, offset=offset, signal_tokens=length, causal=False)
    assert [score["precision"] for score in scores] == [1.0, 1.0]


@register_recipe
class TinyOnsets(TinyMajorityTransformer):
    """tiny-majority-tf whose example signal marks onsets (for the alignment print and plot)."""

    name = "tiny-onsets-tf"

    def example_signal(self, item: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        labels = [str(int(t)) for t in item["inputs"]]
        return {"kind": "tokens", "labels": labels, "onsets": [0, 2]}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_cope_positions_prints_the_alignment_and_draws_gates_over_time(tmp_path: Path, causal):
    runner = CliRunner()
    args = ["train", "tiny-onsets-tf", "--pe", "cope", "--cope-gate", "onset", "--steps", "2"]
    args += ["--set", f"model.causal={str(causal).lower()}", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = rundir.find_runs(tmp_path, "tiny-onsets-tf", "cope")
    result = runner.invoke(app, ["positions", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "layer 0 event alignment" in result.output
    assert (run_dir / "positions" / "val-0-gates.png").stat().st_size > 0
