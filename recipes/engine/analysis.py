"""Per-question accuracy and event alignment of finished runs' best weights, for reports.

Both are cached in the run directory (``questions.json``, ``alignment.json``; see
:mod:`recipes.engine.rundir`), tied to the weights by eval.json's step and best step, so each
is computed once per run: per-question accuracy at the end of training (the final evaluation's
own forward passes), or by the first report that finds it missing (runs trained before it
existed); alignment always by the first report that needs it.

Per-question accuracy (recipes that name their examples' questions,
:meth:`recipes.base.Recipe.question_of`): per split and question, correct and asked answers.

Event alignment (CoPE runs of recipes whose examples carry event onsets,
:meth:`recipes.base.Recipe.example_signal`), as `cope positions` scores one example
(:mod:`recipes.engine.alignment`): on ``val`` and every OOD split, over the first N examples,
per layer, the mean over examples of

- ``score``: the readout query's event-alignment score (share of position steps within one
  token of an onset), averaged over heads; heads without steps, and examples where no head
  stepped, are left out of the mean (the score is undefined there);
- ``recall``: the share of onsets with a position step within one token, averaged over heads;
- ``steps``: position steps per clip (increments of floor |p|), averaged over heads;
- ``events``: true events (onsets) per clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError, get_recipe, pad_collate
from recipes.engine import rundir
from recipes.engine.alignment import mean_score
from recipes.engine.evaluate import move_batch
from recipes.engine.heatmaps import alignment_of_layers, readout_trailing, record_example
from recipes.engine.runs import LoadedRun, load_run
from recipes.engine.trainer import TrainObserver, evaluate_splits, question_namer

# Examples per split the alignment averages over: enough for a stable mean, cheap on a CPU.
ALIGNMENT_EXAMPLES = 64
ALIGNMENT_STATISTICS = ("score", "recall", "steps", "events")


def is_cope(config: Config) -> bool:
    """Whether a run's encoding has contextual positions (cope, cope+rope)."""
    return str(config.get("model.pe", "")).startswith("cope")


@dataclass
class RunAnalysis:
    """What a report adds to a run's eval.json; None where it does not apply."""

    questions: dict[str, dict[str, dict[str, int]]] | None  # split -> question -> correct, count
    alignment: dict[str, dict[str, Any]] | None  # split -> {"examples", "layers": [statistics]}


def analyse_run(
    run_dir: Path,
    *,
    alignment_examples: int = ALIGNMENT_EXAMPLES,
    device: str = "cpu",
    on_message: Callable[[str], None] | None = None,
) -> RunAnalysis:
    """A finished run's per-question accuracy and event alignment, from its cache or computed
    (one load of the run for both) and cached. ``alignment_examples`` 0: no alignment."""
    recipe_name, config = rundir.read_config(run_dir)
    recipe = get_recipe(recipe_name)
    stamp = rundir.weights_stamp(rundir.read_json(run_dir / rundir.EVAL_FILE))
    questions_path = run_dir / rundir.QUESTIONS_FILE
    alignment_path = run_dir / rundir.ALIGNMENT_FILE
    wants_alignment = alignment_examples > 0 and is_cope(config) and recipe.may_know_events
    questions = rundir.read_analysis(questions_path, stamp) if recipe.asks_questions else None
    alignment = rundir.read_analysis(alignment_path, stamp) if wants_alignment else None
    if alignment is not None and alignment.get("examples") != alignment_examples:
        alignment = None  # cached over another number of examples
    missing = [
        name
        for name, wanted, cached in (
            ("per-question accuracy", recipe.asks_questions, questions),
            ("event alignment", wants_alignment, alignment),
        )
        if wanted and cached is None
    ]
    if missing:
        if on_message is not None:
            on_message(f"computing {' and '.join(missing)} of {run_dir}")
        loaded = load_run(run_dir, device=device)
        if recipe.asks_questions and questions is None:
            questions = {"splits": question_counts(loaded)}
            rundir.write_analysis(questions_path, stamp, questions)
        if wants_alignment and alignment is None:
            alignment = {
                "examples": alignment_examples,
                "splits": run_alignment(loaded, alignment_examples),
            }
            rundir.write_analysis(alignment_path, stamp, alignment)
    return RunAnalysis(
        questions["splits"] if questions is not None else None,
        alignment["splits"] if alignment is not None else None,
    )


def question_counts(loaded: LoadedRun) -> dict[str, dict[str, dict[str, int]]]:
    """Per split and question: correct and asked answers of the run's loaded weights."""
    question_of = question_namer(loaded.recipe, loaded.config)
    results = evaluate_splits(
        loaded.model,
        loaded.bundle,
        loaded.config,
        loaded.device,
        TrainObserver(),
        question_of=question_of,
    )
    return {name: result.get("questions", {}) for name, result in results.items()}


def nanmean(values: list[float | None]) -> float:
    """Mean of the values that are numbers (NaN and JSON's null left out); NaN when none is."""
    kept = [value for value in values if value is not None and not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan


def run_alignment(loaded: LoadedRun, examples: int) -> dict[str, dict[str, Any]]:
    """Per split (val and the OOD ones): per layer, the alignment statistics averaged over the
    first ``examples`` examples that have onsets; splits without any are left out.

    Video with patch tokens has none: the signals place one token per tubelet, patch tokens are
    several per tubelet, so the score would be measured on the wrong tokens.
    """
    if loaded.config.get("model.tokenizer") == "patches":
        return {}
    bundle = loaded.bundle
    collate = bundle.collate or pad_collate
    causal = bool(loaded.config.get("model.causal"))
    trailing = readout_trailing(loaded)
    names = ["val", *(name for name, split in bundle.splits.items() if split.ood)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        dataset = bundle.splits[name].dataset
        per_layer: list[dict[str, list[float]]] = []
        used = 0
        for index in range(min(examples, len(dataset))):  # type: ignore[arg-type]
            item = dataset[index]
            signal = loaded.recipe.example_signal(item, bundle.info)
            if not signal or "onsets" not in signal:
                return {}  # the recipe's examples carry no events (text tokens, frames)
            try:
                layers = record_example(loaded.model, move_batch(collate([item]), loaded.device))
            except ImportError as error:
                raise UserError(f"the model cannot record attention ({error})") from None
            alignment = alignment_of_layers(layers, signal, causal=causal, trailing=trailing)
            if not alignment:
                continue  # no onsets in this example, or no positions recorded
            used += 1
            for layer, heads in enumerate(alignment):
                if layer == len(per_layer):
                    per_layer.append({key: [] for key in ALIGNMENT_STATISTICS})
                per_layer[layer]["score"].append(mean_score(heads))
                per_layer[layer]["recall"].append(mean_score(heads, "recall"))
                per_layer[layer]["steps"].append(
                    sum(head["increments"] for head in heads) / len(heads)
                )
                per_layer[layer]["events"].append(heads[0]["onsets"])
        if used:
            results[name] = {
                "examples": used,
                "layers": [
                    {key: nanmean(values) for key, values in layer.items()} for layer in per_layer
                ],
            }
    return results
