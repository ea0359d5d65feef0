"""Checkpoints: written atomically with a content digest, loaded with ``weights_only=True``.

A training checkpoint holds the model, optimiser and scheduler states, the fp16 loss scaler's
state (empty for bf16/fp32), the step, the RNG states of python, numpy and torch (as tensors and
lists, so no pickled objects are needed), the data sampler's position and the early-stopping
state; that is everything a resumed run needs to continue bit for bit. Both ``best.pt`` and
``checkpoint.pt`` also carry what inference needs without the training data
(:func:`inference_state`): the resolved config and the data's ``info`` (class names, feature
statistics, feature sizes), so ``cope predict`` and ``cope export`` rebuild the model from the
checkpoint alone. (Batches draw their
random numbers from seeds derived from the sampler position, see ``feeding.py``.)
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.base import UserError
from recipes.files import DamagedFile, load_verified, save_verified

FORMAT_VERSION = 2  # 2: a sha256 content digest inside the file (1: none)


def inference_state(config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The config and data info a model is rebuilt from, reduced to what loads weights-only."""
    return {"config": _portable(dict(config)), "info": _portable(dict(info))}


def _portable(value: Any) -> Any:
    """``value`` with what ``torch.load(weights_only=True)`` cannot read left out (or None)."""
    if isinstance(value, dict):
        kept = {str(key): _portable(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_portable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool | torch.Tensor):
        return value
    return None


def previous_of(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Save atomically with a content digest; the new file is read back and verified first.

    With ``keep_previous`` the file it replaces survives as :func:`previous_of` ``path``, so a
    checkpoint found damaged later still has a verified predecessor to resume from.
    """
    path = Path(path)
    previous = previous_of(path) if keep_previous else None
    save_verified(path, {"format": FORMAT_VERSION, **state}, previous=previous)


def load_checkpoint(path: Path, recipe: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely; damaged files and other recipes' checkpoints are UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = load_verified(path, predates_digests=lambda value: value.get("format") != 2)
    except DamagedFile as error:
        raise DamagedFile(f"checkpoint {error}") from None
    if "model" not in state or "format" not in state:
        raise UserError(f"{path} is not a cope checkpoint")
    if recipe is not None and state.get("recipe") != recipe:
        raise UserError(
            f"checkpoint {path} belongs to recipe {state.get('recipe')!r}, not {recipe!r}"
        )
    return state


def load_for_resume(
    path: Path, recipe: str, announce: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that verifies: ``path``, else the kept previous one; and its path.

    Only damage (or a missing ``path``) falls back; a checkpoint of another recipe stays an
    error. When it falls back and ``announce`` is given (the writing rank), the damaged file is
    renamed to ``<name>.damaged`` (kept for inspection, and so that the next save does not
    rotate it over the good predecessor) and ``announce`` says what happened. When nothing
    verifies, nothing is changed.
    """
    path, previous = Path(path), previous_of(path)
    try:
        return load_checkpoint(path, recipe), path
    except DamagedFile as error:
        problem = str(error)
    except UserError:
        if path.exists() or not previous.is_file():
            raise
        problem = f"checkpoint {path} is missing"
    if not previous.is_file():
        raise DamagedFile(
            f"{problem}; no earlier checkpoint is kept, so nothing was changed: run the same "
            "command without --resume to start a new run"
        )
    try:
        state = load_checkpoint(previous, recipe)
    except DamagedFile as error:
        raise DamagedFile(
            f"{problem}, and the previous one is too ({error}); nothing was changed: run the "
            "same command without --resume to start a new run"
        ) from None
    if announce is not None:
        kept = ""
        if path.exists():
            damaged = path.with_name(f"{path.name}.damaged")
            os.replace(path, damaged)
            kept = f"; the damaged file is kept as {damaged.name}"
        step = state.get("progress", {}).get("step", "?")
        announce(
            f"{problem}; resuming from the previous checkpoint {previous.name} (step {step}){kept}"
        )
    return state, previous


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load weights into ``model``; a shape or key mismatch is a UserError, not a traceback."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit this model ({detail})") from None


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors and plain lists."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in python_state.tolist()), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class preserved_rng:
    """Context manager: whatever runs inside (evaluation) leaves every RNG as it found it."""

    def __enter__(self) -> None:
        self.state = capture_rng_state()

    def __exit__(self, *exc: object) -> None:
        restore_rng_state(self.state)
