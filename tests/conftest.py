"""Shared test setup: every test starts from the same torch seed, so failures reproduce."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global generator before each test (tests stay independent of order)."""
    torch.manual_seed(0)
