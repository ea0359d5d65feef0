"""CoPE attention as a Triton kernel (placeholder while the kernel is written)."""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether Triton is installed (the kernel then runs on CUDA, or on CPU interpreted)."""
    return importlib.util.find_spec("triton") is not None
