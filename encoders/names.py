"""The names the registries answer to, without importing torch: the CLI's help and a shell's
completion list them in a fraction of a second. tests/test_public_api.py checks that they equal
the registries (encoders.positions, encoders.cope_core)."""

from __future__ import annotations

POSITION_ENCODINGS: tuple[str, ...] = (
    "nope", "abs", "sin", "rope", "alibi", "t5", "rel", "cope", "cope+rope"
)  # fmt: skip
GATES: tuple[str, ...] = ("qk", "onset", "token", "change", "rise")
