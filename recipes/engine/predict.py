"""`cope predict`: the top classes of files, read and featurised exactly as training read them.

The model comes from the run's self-contained checkpoint (:func:`recipes.engine.runs.load_model`),
the inputs from the recipe's own :meth:`recipes.base.Recipe.read_file`, so no training data is
built and no second decoding pipeline exists. A file that cannot be used is reported and
skipped; the caller decides what to do when nothing could be predicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recipes.base import UnreadableFile, UserError, pad_collate
from recipes.engine.evaluate import forward_batch, move_batch
from recipes.engine.precision import autocast_context
from recipes.engine.runs import LoadedModel, load_model


@dataclass
class Prediction:
    """One file's answer: the top classes with probabilities, and the raw logits."""

    file: str
    top: list[tuple[str, float]]
    logits: list[float]


@dataclass
class PredictResult:
    """Every file's prediction, and the files skipped with the reason."""

    run_dir: str
    recipe: str
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "recipe": self.recipe,
            "predictions": [
                {
                    "file": prediction.file,
                    "top": [{"class": name, "probability": p} for name, p in prediction.top],
                }
                for prediction in self.predictions
            ],
            "skipped": [{"file": name, "reason": reason} for name, reason in self.skipped],
        }


def files_to_predict(target: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``target`` itself, or every file under the folder ``target`` with one of ``suffixes``."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise UserError(f"not found: {target} is neither a file nor a folder")
    files = [
        path
        for path in sorted(target.rglob("*"))
        if path.is_file()
        and path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(target).parts)
    ]
    if not files:
        kinds = ", ".join(suffix.lstrip(".") for suffix in suffixes)
        raise UserError(f"{target} holds no files this recipe reads ({kinds})")
    return files


@torch.no_grad()
def logits_of(loaded: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """The model's (classes,) float32 logits for one item's inputs."""
    batch = move_batch(pad_collate([{"inputs": inputs}]), loaded.device)
    with autocast_context(loaded.device, loaded.config.get("train.precision", "auto")):
        logits = forward_batch(loaded.model, batch)
    return logits[0].float().cpu()


def predict_files(
    run_dir: Path,
    target: Path,
    *,
    top_k: int = 5,
    device: str = "auto",
    on_skip: Callable[[str, str], None] | None = None,
) -> PredictResult:
    """Predict every file of ``target`` (a file or a folder) with a run's best weights."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    loaded = load_model(run_dir, device=device)
    recipe = loaded.recipe
    if not recipe.file_suffixes:
        recipe.read_file(Path(target), loaded.config, loaded.info)  # raises its one-line reason
    names = list(loaded.info.get("class_names") or [])
    result = PredictResult(str(loaded.run_dir), recipe.name)
    for path in files_to_predict(target, recipe.file_suffixes):
        try:
            inputs = recipe.read_file(path, loaded.config, loaded.info)
        except UnreadableFile as error:
            result.skipped.append((str(path), str(error)))
            if on_skip is not None:
                on_skip(str(path), str(error))
            continue
        logits = logits_of(loaded, inputs)
        probabilities = logits.softmax(-1)
        values, indices = probabilities.topk(min(top_k, probabilities.numel()))
        top = [
            (names[i] if i < len(names) else str(i), float(p))
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        result.predictions.append(Prediction(str(path), top, logits.tolist()))
    return result
