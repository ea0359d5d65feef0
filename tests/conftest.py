"""Shared test setup: every test starts from the same torch seed, so failures reproduce, and
every cache the code would keep in the user's cache folder goes to a temporary one.

Without CUDA, Triton runs in its interpreter (TRITON_INTERPRET=1, set here before anything
imports Triton, which reads it at import), so tests/test_cope_triton.py can check the kernels
on the CPU. With CUDA it is never set: the CUDA tests must compile the real kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _temporary_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point COPE_CACHE_DIR (read by the recipes and by CLI subprocesses) at a temporary folder."""
    cache = tmp_path_factory.mktemp("cope-cache")
    before = os.environ.get("COPE_CACHE_DIR")
    os.environ["COPE_CACHE_DIR"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("COPE_CACHE_DIR", None)
    else:
        os.environ["COPE_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global generator before each test (tests stay independent of order)."""
    torch.manual_seed(0)
