"""The committed issue-17 sweep files parse and hold the ablation they promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.engine.compare import load_sweep

SWEEPS = Path(__file__).parent.parent / "sweeps"


@pytest.mark.parametrize("name", ["audio-events", "moving-shapes", "spoken-words"])
def test_ablation_sweep_has_every_baseline_and_gate_over_three_seeds(name: str) -> None:
    jobs, _ = load_sweep(SWEEPS / f"{name}.toml")
    labels = {
        job.config["model.pe"]
        if job.config["model.pe"] != "cope"
        else f"cope[{job.config['model.cope_gate']}]"
        for job in jobs
    }
    assert {"abs", "rope", "rel", "nope", "cope[qk]", "cope[onset]", "cope[token]"} <= labels
    assert "cope[rise]" in labels
    if name != "moving-shapes":
        assert "cope[change]" in labels
    assert {job.config["train.seed"] for job in jobs} == {0, 1, 2}
    assert all(job.recipe == name for job in jobs)
