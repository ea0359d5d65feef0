"""Numeric precision of training and evaluation: ``train.precision``.

``bf16`` autocasts matrix products to bfloat16 (the default on CUDA: same range as float32, no
loss scaling needed); ``fp16`` autocasts to float16 and scales the loss with a
``torch.amp.GradScaler`` (whose state is checkpointed) so small gradients do not underflow;
``fp32`` runs everything in float32 (the default on CPU). On CPU, ``bf16`` uses CPU autocast;
``fp16`` needs CUDA. Losses are always reduced in float32 (see ``loss_and_counts``), and CoPE
keeps its gate path in float32 itself.
"""

from __future__ import annotations

import contextlib

import torch

from recipes.base import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` becomes bf16 on CUDA and fp32 elsewhere; fp16 without CUDA is a UserError."""
    if requested not in PRECISIONS:
        raise UserError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {requested!r}"
        )
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise UserError(
            f"train.precision=fp16 needs a CUDA GPU but the device is {device.type}; "
            "use bf16 or fp32"
        )
    return requested


def autocast_context(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """The autocast region of a forward pass at ``precision`` (nothing for fp32)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16 (a pass-through otherwise)."""
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)
