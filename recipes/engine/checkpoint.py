"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A training checkpoint holds the model, optimiser and scheduler states, the fp16 loss scaler's
state (empty for bf16/fp32), the step, the RNG states of python, numpy and torch (as tensors and
lists, so no pickled objects are needed), the data sampler's position and the early-stopping
state; that is everything a resumed run needs to continue bit for bit. (Batches draw their
random numbers from seeds derived from the sampler position, see ``feeding.py``.)
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.base import UserError

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def load_checkpoint(path: Path, recipe: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely; damaged files and other recipes' checkpoints are UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged or unreadable ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "format" not in state:
        raise UserError(f"{path} is not a cope checkpoint")
    if recipe is not None and state.get("recipe") != recipe:
        raise UserError(
            f"checkpoint {path} belongs to recipe {state.get('recipe')!r}, not {recipe!r}"
        )
    return state


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
