"""Run directories: ``<out>/<recipe>/<pe>/seed<N>-<stamp>/`` and the files inside them.

A run directory holds ``config.json`` (resolved config), ``env.json`` (versions, device, git
commit, command line), ``metrics.jsonl`` (one JSON object per logged step or evaluation),
``checkpoint.pt`` (latest), ``checkpoint.prev.pt`` (the one before, kept as a fallback should
the latest be found damaged), ``best.pt`` (best on validation), ``eval.json`` (final evaluation)
and ``done`` (written last: the run finished); reports cache analyses of the best weights beside
them (``questions.json``, ``alignment.json``). Every file is written atomically through
:mod:`recipes.files`; the checkpoints carry a content digest checked on load.
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError
from recipes.files import append_text, write_text_atomic

CONFIG_FILE = "config.json"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # checkpoint.previous_of(CHECKPOINT_FILE)
BEST_FILE = "best.pt"
EVAL_FILE = "eval.json"
DONE_FILE = "done"
# Analyses of the best weights that reports read, cached (written at the end of training or by
# the first report that needs them) and tied to the weights by weights_stamp.
QUESTIONS_FILE = "questions.json"
ALIGNMENT_FILE = "alignment.json"

_RUN_NAME = re.compile(r"^seed(?P<seed>-?\d+)-(?P<stamp>\d{8}-\d{6})(?:-(?P<extra>\d+))?$")


def run_parent(out: Path, recipe: str, pe: str) -> Path:
    """The folder holding every run of one recipe and position encoding."""
    return Path(out) / recipe / pe


def create_run_dir(out: Path, recipe: str, pe: str, seed: int) -> Path:
    """Create a fresh run directory; the name is unique even for runs started in one second."""
    parent = run_parent(out, recipe, pe)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # --out is a file, lies below one, or is not writable
        raise UserError(
            f"cannot create run directories under {out} ({error.strerror or error}); "
            "choose another --out"
        ) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(10_000):
        name = f"seed{seed}-{stamp}" + (f"-{attempt}" if attempt else "")
        try:
            (parent / name).mkdir(exist_ok=False)  # atomic: two processes never share a name
        except FileExistsError:
            continue
        return parent / name
    raise RuntimeError(f"could not create a run directory under {parent}")


def run_order(path: Path) -> tuple[str, int]:
    """Sort key of run directories: their creation stamp, then the same-second counter."""
    match = _RUN_NAME.match(path.name)
    if not match:
        return ("", 0)
    return (match["stamp"], int(match["extra"] or 0))


def is_run_dir(path: Path) -> bool:
    """A folder that looks like a run directory (named seedN-stamp, with a config)."""
    return path.is_dir() and bool(_RUN_NAME.match(path.name)) and (path / CONFIG_FILE).is_file()


def is_finished(run_dir: Path) -> bool:
    """Whether the run wrote its final evaluation and the ``done`` marker."""
    return (run_dir / DONE_FILE).is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run kept a checkpoint to resume from (the latest or the one before)."""
    return any((run_dir / name).is_file() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE))


def mark_done(run_dir: Path) -> None:
    """Write the ``done`` marker (the time), last of all: the run finished."""
    write_text_atomic(Path(run_dir) / DONE_FILE, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))


def find_runs(
    out: Path, recipe: str | None = None, pe: str | None = None, seed: int | None = None
) -> list[Path]:
    """Run directories under ``out``, oldest first, filtered by recipe, encoding and seed."""
    out = Path(out)
    if not out.is_dir():
        return []
    pattern = f"{recipe or '*'}/{pe or '*'}/seed{'*' if seed is None else seed}-*"
    runs = [path for path in out.glob(pattern) if is_run_dir(path)]
    if seed is not None:
        runs = [path for path in runs if _RUN_NAME.match(path.name)["seed"] == str(seed)]
    return sorted(runs, key=run_order)


def find_runs_below(root: Path) -> list[Path]:
    """Every run directory anywhere below ``root`` (or ``root`` itself), oldest first."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(
        (path.parent for path in root.rglob(CONFIG_FILE) if is_run_dir(path.parent)),
        key=run_order,
    )


def strict_json(data: Any) -> Any:
    """``data`` with NaN and infinities as None: strict JSON readers (jq, browsers) reject them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write strict JSON (NaN and infinities as null) atomically, so readers never see half a
    file."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(path, text + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or damaged file is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is damaged (not valid JSON: {error})") from None


def weights_stamp(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What identifies the weights an eval.json describes: its step and best step (a run
    extended by more steps gets new ones)."""
    return {"step": evaluation.get("step"), "best_step": evaluation.get("best_step")}


def write_analysis(path: Path, stamp: dict[str, Any], content: dict[str, Any]) -> None:
    """Cache an analysis of a run's best weights (QUESTIONS_FILE, ALIGNMENT_FILE) atomically."""
    write_json_atomic(path, {"weights": stamp, **content})


def read_analysis(path: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """A cached analysis of the weights ``stamp`` names; None when missing, damaged or stale."""
    try:
        cached = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return cached if isinstance(cached, dict) and cached.get("weights") == stamp else None


# Options added after runs were saved, with the value that reproduces what those runs did ("*":
# every recipe). A saved config without the key gets this value, so older finished runs are
# still found identical (reused) and group with new ones in reports.
ADDED_KEYS: dict[str, Config] = {
    "*": {
        "model.cope_gate": "qk",
        "model.cope_scale_logits": False,
        "model.attn_dropout": 0.0,
        "model.cope_gate_budget": 0.0,
        "model.cope_gate_weight": 0.01,
    },
    "audio-events": {"data.deltas": False},
    "moving-shapes": {"data.frame_diff": False},
    # Text evaluation splits were drawn without removing training items before data.dedup.
    "counting": {"data.dedup": False},
    "selective-copy": {"data.dedup": False},
    "flip-flop": {"data.dedup": False},
}


def read_config(run_dir: Path) -> tuple[str, Config]:
    """The recipe name and resolved config a run directory was started with."""
    data = read_json(Path(run_dir) / CONFIG_FILE)
    if not isinstance(data, dict) or "recipe" not in data or "config" not in data:
        raise UserError(f"{run_dir / CONFIG_FILE} is not a cope run config")
    recipe, config = data["recipe"], data["config"]
    if config.get("model.pe") == "rel" and "model.attn_dropout" not in config:
        # Saved before the paper's `rel` existed (model.attn_dropout came with it): `rel` then
        # named T5's bucketed biases, now `t5`; the weights load under that name.
        config = {**config, "model.pe": "t5"}
    for added in (ADDED_KEYS["*"], ADDED_KEYS.get(recipe, {})):
        config = {**added, **config}
    return recipe, config


def write_config(
    run_dir: Path, recipe: str, config: Config, preset: str | None, data_dir: Path | None
) -> None:
    """Save the resolved config (what `--resume` and `cope eval` rebuild the run from)."""
    write_json_atomic(
        run_dir / CONFIG_FILE,
        {
            "recipe": recipe,
            "preset": preset,
            # Absolute, so `cope eval RUN` works from any folder.
            "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
            "config": config,
        },
    )


def read_data_dir(run_dir: Path) -> Path | None:
    """The data directory a run was trained with (for re-evaluating it), if any."""
    value = read_json(Path(run_dir) / CONFIG_FILE).get("data_dir")
    return Path(value) if value else None


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def environment(device: str, world_size: int = 1) -> dict[str, Any]:
    """Versions, device, git commit and command line: what is needed to reproduce a run."""
    import torch

    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("torchaudio", "torchvision", "numpy", "cope_cli"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "unknown")
        except ImportError:
            pass
    return {
        "versions": versions,
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def note_resumption(run_dir: Path, step: int, device: str) -> None:
    """Record in env.json when, where and how a run was resumed (provenance)."""
    path = Path(run_dir) / ENV_FILE
    try:
        env = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        env = {}
    env.setdefault("resumed", []).append(
        {
            "step": step,
            "device": device,
            "command": sys.argv,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(),
        }
    )
    write_json_atomic(path, env)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.tensorboard: Any = None

    def open_tensorboard(self, folder: Path) -> None:
        """Mirror numeric fields to TensorBoard when it is installed (it is optional)."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(log_dir=str(folder))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (and send its numbers to TensorBoard)."""
        if not self.enabled:
            return
        append_text(self.path, json.dumps(record) + "\n")
        if self.tensorboard is not None and "step" in record:
            prefix = "/".join(str(record[key]) for key in ("kind", "split") if key in record)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard's writer, if any."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a killed run may have logged beyond its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (damaged lines skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
