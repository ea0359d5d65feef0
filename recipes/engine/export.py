"""`cope export`: a trained model as a ``torch.export`` program (``.pt2``) or an ONNX file.

The model is rebuilt from the run's self-contained checkpoint with ``model.cope_impl=reference``:
the blockwise and fused CoPE paths choose by sequence length (data-dependent control flow that
``torch.export`` cannot trace), the reference path computes the same function without that.
The exported program takes one item's ``inputs`` (batch 1, no padding mask) and returns the
logits; its time axis is dynamic (any length up to what the model was built for), except for
video, whose frame count is fixed by the training clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recipes.base import UserError
from recipes.engine.runs import LoadedModel, load_model

FORMATS = {"torch-export": ".pt2", "onnx": ".onnx"}
EXPORT_OPTIONS = {"model.cope_impl": "reference"}


class _InputsOnly(nn.Module):
    """The model called with its inputs alone (an exported program has positional inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)


@dataclass
class ExampleInput:
    """An input the export traces with, and the dynamic size of its time axis (or None)."""

    inputs: Tensor
    longest: int | None  # the most time steps the model takes; None: a fixed length


def example_input(info: dict[str, Any], config: dict[str, Any]) -> ExampleInput:
    """A batch-1 input of the shape the model was trained on, read from the data's info."""
    max_len = int(config.get("model.max_len", 0) or info.get("max_len", 1))
    if "frame_size" in info:  # video: (1, frames, channels, size, size), frames fixed
        size = int(info["frame_size"])
        shape = (1, int(info["max_frames"]), int(info["channels"]), size, size)
        return ExampleInput(torch.zeros(shape), None)
    if "vocab_size" in info:  # tokens: (1, T) ids
        length = min(int(info["max_len"]), max_len)
        return ExampleInput(torch.zeros(1, length, dtype=torch.long), max_len)
    if "feature_dim" in info and "n_questions" not in info:  # (1, frames, features)
        stack = int(info.get("stack", 1))
        longest = stack * max(max_len - 1, 1)  # the CLS token takes one position
        frames = min(longest, stack * max(int(info.get("max_len", 2)) - 1, 2))
        return ExampleInput(torch.randn(1, frames, int(info["feature_dim"])), longest)
    raise UserError("this recipe's model takes inputs `cope export` cannot describe")


def export_program(loaded: LoadedModel) -> tuple[torch.export.ExportedProgram, ExampleInput]:
    """The model as a ``torch.export`` program with a dynamic time axis where it has one."""
    example = example_input(loaded.info, loaded.config)
    wrapped = _InputsOnly(loaded.model).eval()
    dynamic = None
    if example.longest is not None and example.longest > 1:
        time = torch.export.Dim("time", min=1, max=example.longest)
        dynamic = {"inputs": {1: time}}
    with torch.no_grad():
        program = torch.export.export(wrapped, (example.inputs,), dynamic_shapes=dynamic)
    return program, example


def export_run(run_dir: Path, fmt: str, out: Path | None = None) -> Path:
    """Export a run's best weights; the file written (default ``RUN/model.pt2|.onnx``)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    loaded = load_model(run_dir, device="cpu", model_options=EXPORT_OPTIONS)
    path = Path(out) if out is not None else Path(run_dir) / f"model{FORMATS[fmt]}"
    program, example = export_program(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch-export":
        torch.export.save(program, str(path))
        return path
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'cope[onnx]'"
        ) from None
    onnx_program = torch.onnx.export(program, (example.inputs,), dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path
