"""Per-question accuracy of finished `spoken-words` (or `audio-events`) runs, as a markdown table.

Run from the repository root: ``python results/spoken-words/breakdown.py RUN_DIR [RUN_DIR ...]``
(e.g. ``runs/spoken-words/*/seed0-*``). Rows: run x question ("word n=1", "word n=2", ...,
"count"); columns: every evaluation split. Uses each run's best weights.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

from recipes.engine.runs import load_run


def question_name(question: int, max_n: int) -> str:
    return f"word n={question + 1}" if question < max_n else "count"


@torch.no_grad()
def breakdown(run_dir: Path) -> tuple[str, dict[str, dict[str, tuple[int, int]]]]:
    """(pe, {question: {split: (correct, total)}}) of one run."""
    loaded = load_run(run_dir, device="cpu")
    max_n = int(loaded.config["data.max_n"])
    table: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for split_name, split in loaded.bundle.splits.items():
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        items = [split.dataset[i] for i in range(len(split.dataset))]
        for start in range(0, len(items), 64):
            batch = loaded.bundle.collate(items[start : start + 64])
            logits = loaded.model(batch["inputs"], batch.get("padding_mask"))
            right = logits.argmax(-1) == batch["targets"]
            for question, correct in zip(batch["question"].tolist(), right.tolist(), strict=True):
                counts[question_name(question, max_n)][0] += int(correct)
                counts[question_name(question, max_n)][1] += 1
        for name, (correct, total) in counts.items():
            table[name][split_name] = (correct, total)
    return str(loaded.config["model.pe"]), table


def main(run_dirs: list[Path]) -> None:
    splits: list[str] = []
    rows = []
    for run_dir in run_dirs:
        pe, table = breakdown(run_dir)
        for question in sorted(table):
            splits = splits or list(table[question])
            rows.append((f"{pe} ({run_dir.name})", question, table[question]))
    print("| run | question | " + " | ".join(splits) + " |")
    print("|---|---|" + "---|" * len(splits))
    for run, question, cells in rows:
        values = [
            f"{c / t:.3f} (n={t})" if t else "-" for c, t in (cells.get(s, (0, 0)) for s in splits)
        ]
        print(f"| {run} | {question} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
