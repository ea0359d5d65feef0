"""Event alignment of finished CoPE runs, averaged over examples of a split (JSON on stdout).

    python results/audio-events/alignment.py SPLIT N RUN_DIR [RUN_DIR ...]

Per run and layer: mean over the first N examples and over heads of the readout query's
alignment score (share of position steps within one token of an onset), onset recall,
position steps per clip and events per clip, as `cope positions` computes them for one example
(recipes.engine.alignment, recipes.engine.heatmaps).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from recipes.base import pad_collate
from recipes.engine.alignment import mean_score
from recipes.engine.evaluate import move_batch
from recipes.engine.heatmaps import _readout_trailing, alignment_of_layers, record_example
from recipes.engine.runs import load_run


def nanmean(values: list[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan


def run_alignment(run_dir: Path, split: str, count: int) -> dict:
    loaded = load_run(run_dir, device="cpu")
    dataset = loaded.bundle.splits[split].dataset
    causal = bool(loaded.config.get("model.causal"))
    trailing = _readout_trailing(loaded)
    per_layer: dict[int, dict[str, list[float]]] = {}
    for example in range(count):
        item = dataset[example]
        batch = move_batch((loaded.bundle.collate or pad_collate)([item]), loaded.device)
        layers = record_example(loaded.model, batch)
        signal = loaded.recipe.example_signal(item, loaded.bundle.info)
        alignment = alignment_of_layers(layers, signal, causal=causal, trailing=trailing) or []
        for index, heads in enumerate(alignment):
            row = per_layer.setdefault(
                index, {"score": [], "recall": [], "steps": [], "events": []}
            )
            row["score"].append(mean_score(heads))
            row["recall"].append(mean_score(heads, "recall"))
            row["steps"].append(sum(head["increments"] for head in heads) / len(heads))
            row["events"].append(heads[0]["onsets"])
    return {
        "run": str(run_dir),
        "pe": loaded.config["model.pe"],
        "gate": loaded.config.get("model.cope_gate", "qk"),
        "split": split,
        "examples": count,
        "layers": [
            {key: round(nanmean(values), 3) for key, values in row.items()}
            for _, row in sorted(per_layer.items())
        ],
    }


def main() -> None:
    split, count, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    print(json.dumps([run_alignment(Path(run), split, count) for run in runs], indent=1))


if __name__ == "__main__":
    main()
