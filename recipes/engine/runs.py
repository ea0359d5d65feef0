"""Reopening finished (or unfinished) runs: rebuild data and model, load the best weights.

:func:`load_run` rebuilds the data too (evaluation needs it); :func:`load_model` rebuilds only
the model, from what a self-contained checkpoint carries (prediction and export need no data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.base import Config, DataBundle, Recipe, UserError, get_recipe
from recipes.engine import rundir
from recipes.engine.checkpoint import load_checkpoint, load_model_state
from recipes.engine.config import apply_layer
from recipes.engine.trainer import (
    TrainObserver,
    TrainOptions,
    build_data_checked,
    evaluate_splits,
    resolve_device,
)


@dataclass
class LoadedRun:
    """A run directory reopened: its recipe, config, data and model with loaded weights."""

    run_dir: Path
    recipe: Recipe
    config: Config
    bundle: DataBundle
    model: nn.Module
    weights: Path  # the checkpoint the weights came from
    device: torch.device


def newest_run(
    out: Path, recipe: str | None, pe: str | None, finished_only: bool = True
) -> Path:
    """The newest (finished) run of a recipe (any, when None) and encoding under ``out``.

    A UserError when there is none.
    """
    runs = rundir.find_runs(out, recipe, pe)
    if finished_only:
        runs = [run for run in runs if rundir.is_finished(run)]
    if not runs:
        what = "/".join(part for part in (recipe, pe) if part) or "any recipe"
        raise UserError(f"no finished run of {what} under {out}; train one with `cope train`")
    return runs[-1]


def load_run(
    run_dir: Path,
    *,
    device: str = "auto",
    data_dir: Path | None = None,
    download: bool = False,
    data_options: Mapping[str, Any] | None = None,
) -> LoadedRun:
    """Rebuild a run's data and model and load its best (else latest) weights.

    ``data_options`` change ``data.*`` settings (e.g. a frame rate) for this load only.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {rundir.CONFIG_FILE})")
    recipe_name, config = rundir.read_config(run_dir)
    recipe = get_recipe(recipe_name)
    config = with_data_options(config, data_options or {})
    weights = run_dir / rundir.BEST_FILE
    if not weights.is_file():
        weights = run_dir / rundir.CHECKPOINT_FILE
    state = load_checkpoint(weights, recipe_name)  # validate before the (slower) data build
    options = TrainOptions(
        data_dir=data_dir if data_dir is not None else rundir.read_data_dir(run_dir),
        download=download,
    )
    bundle = build_data_checked(recipe, config, options)
    torch.manual_seed(config["train.seed"])
    model = recipe.build_model(config, bundle.info)
    load_model_state(model, state, weights)
    target = resolve_device(device, config)
    model.to(target).eval()
    return LoadedRun(run_dir, recipe, config, bundle, model, weights, target)


@dataclass
class LoadedModel:
    """A run's model rebuilt from its checkpoint alone, with what inference needs."""

    run_dir: Path
    recipe: Recipe
    config: Config
    info: dict[str, Any]  # the training data's info: class names, feature statistics, sizes
    model: nn.Module
    weights: Path
    device: torch.device


def load_model(
    run_dir: Path, *, device: str = "auto", model_options: Mapping[str, Any] | None = None
) -> LoadedModel:
    """A run's best (else latest) weights in its model, without building any data.

    ``model_options`` change ``model.*`` keys that leave the weights as they are (export picks
    ``model.cope_impl=reference``, the CoPE path without data-dependent control flow).

    Checkpoints written before they carried their config and data info cannot be used so; the
    UserError says to evaluate them with ``cope eval`` or to train again.
    """
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {rundir.CONFIG_FILE})")
    recipe_name, _ = rundir.read_config(run_dir)
    weights = run_dir / rundir.BEST_FILE
    if not weights.is_file():
        weights = run_dir / rundir.CHECKPOINT_FILE
    state = load_checkpoint(weights, recipe_name)
    if "info" not in state or "config" not in state:
        raise UserError(
            f"{weights} predates self-contained checkpoints (no class names or feature "
            "statistics inside); `cope eval` still reads it, train again to predict or export"
        )
    recipe = get_recipe(recipe_name)
    config, info = {**state["config"], **(model_options or {})}, state["info"]
    torch.manual_seed(config["train.seed"])
    model = recipe.build_model(config, info)
    load_model_state(model, state, weights)
    target = resolve_device(device, config)
    model.to(target).eval()
    return LoadedModel(run_dir, recipe, config, info, model, weights, target)


def with_data_options(config: Config, data_options: Mapping[str, Any]) -> Config:
    """A copy of a run's config with ``data.*`` keys changed, type-checked; other keys refused."""
    changed = dict(config)
    for key in data_options:
        if not key.startswith("data."):
            raise UserError(
                f"--set {key}: only data.* options can change at evaluation "
                "(the trained weights fix the model and training options)"
            )
    apply_layer(changed, data_options, "--set")
    return changed


def evaluate_run(
    run_dir: Path,
    splits: list[str] | None = None,
    *,
    device: str = "auto",
    observer: TrainObserver | None = None,
    data_dir: Path | None = None,
    data_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a run's best weights on the named splits (all when None); eval.json's shape."""
    loaded = load_run(run_dir, device=device, data_dir=data_dir, data_options=data_options)
    results = evaluate_splits(
        loaded.model,
        loaded.bundle,
        loaded.config,
        loaded.device,
        observer or TrainObserver(),
        splits,
    )
    return {
        "run_dir": str(loaded.run_dir),
        "recipe": loaded.recipe.name,
        "pe": loaded.config["model.pe"],
        "seed": loaded.config["train.seed"],
        "metric": loaded.recipe.metric,
        "weights": loaded.weights.name,
        "data_options": dict(data_options or {}),
        "splits": results,
    }
