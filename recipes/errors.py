"""The one exception type for mistakes a user can fix; a leaf module (no torch), so the CLI can
name it without importing the model stack."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad option, missing data); the CLI prints it as one line."""
