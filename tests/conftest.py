"""Shared test setup: every test starts from the same torch seed, so failures reproduce.

Without CUDA, Triton runs in its interpreter (TRITON_INTERPRET=1, set here before anything
imports Triton, which reads it at import), so tests/test_cope_triton.py can check the kernels
on the CPU. With CUDA it is never set: the CUDA tests must compile the real kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global generator before each test (tests stay independent of order)."""
    torch.manual_seed(0)
