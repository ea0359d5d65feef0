"""Event alignment of CoPE positions: do the positions step where events begin?

CoPE counts what its gates open on. On a signal with known event onsets (a recipe's
:meth:`~recipes.base.Recipe.example_signal`), a position that counts events steps by one at
each onset and stays flat inside an event; a position that counts frames steps all along.

Definitions (one query row of one head, over the signal's tokens only):

- positions ``p[j]``, j = 0..n-1: the query's contextual positions of the signal tokens
  (``p_ij`` of :mod:`encoders.cope`; negative right of a bidirectional query);
- an *increment* sits between neighbouring keys j-1 and j where ``floor(|p|)`` differs, i.e. the
  running gate count crosses an integer; it is placed at the key whose gate made the step: j-1
  left of the query (p_{j-1} - p_j = g_{j-1}) and j right of it (|p_j| - |p_{j-1}| = g_j);
- ``precision`` (the *event-alignment score* of issue 10): the share of increments within
  ``tolerance`` tokens (default 1) of a true onset; NaN when the row has no increment;
- ``recall``: the share of onsets with an increment within ``tolerance`` tokens.

The query read is the model's readout: the CLS token (index 0) of a bidirectional classifier,
the readout token (the last one) of a causal one (:func:`readout_query`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor


def position_increments(positions: Tensor, query: int | None = None) -> list[int]:
    """Token indices where floor(|p|) steps between neighbouring keys (see module docstring).

    ``positions``: (n,) one query's positions over the signal tokens; ``query``: the query's
    index counted from the first signal token (negative before it, e.g. a CLS token; n or more
    after it, e.g. a causal readout); None means before every token.
    """
    counts = positions.detach().abs().double().floor()
    steps = (counts[1:] != counts[:-1]).nonzero().flatten().tolist()  # between j-1 and j = k+1
    located = []
    for step in steps:
        right = step + 1
        left_of_query = query is not None and right <= query
        located.append(step if left_of_query else right)
    return located


def event_alignment(
    positions: Tensor,
    onsets: Sequence[int],
    *,
    query: int | None = None,
    tolerance: int = 1,
) -> dict[str, Any]:
    """Precision (the alignment score) and recall of one row's increments against onsets."""
    increments = position_increments(positions, query)
    onsets = [int(onset) for onset in onsets]

    def near(index: int, targets: list[int]) -> bool:
        return any(abs(index - target) <= tolerance for target in targets)

    hits = sum(near(index, onsets) for index in increments)
    found = sum(near(onset, increments) for onset in onsets)
    return {
        "precision": hits / len(increments) if increments else math.nan,
        "recall": found / len(onsets) if onsets else math.nan,
        "increments": len(increments),
        "onsets": len(onsets),
    }


def readout_query(tokens: int, *, causal: bool) -> int:
    """The query whose positions are scored: CLS (0) when bidirectional, the last when causal."""
    return tokens - 1 if causal else 0


def layer_alignment(
    positions: Tensor,
    onsets: Sequence[int],
    *,
    offset: int,
    signal_tokens: int,
    causal: bool,
    tolerance: int = 1,
) -> list[dict[str, Any]]:
    """Per head, the readout query's alignment over the signal tokens of one layer.

    ``positions``: (H, T, T) one example's recorded positions; the signal's tokens are
    ``offset .. offset + signal_tokens - 1`` of the T tokens.
    """
    tokens = positions.shape[-1]
    query = readout_query(tokens, causal=causal)
    end = min(tokens, offset + signal_tokens)
    return [
        event_alignment(head[query, offset:end], onsets, query=query - offset, tolerance=tolerance)
        for head in positions
    ]


def mean_score(scores: Sequence[dict[str, Any]], key: str = "precision") -> float:
    """Mean of ``key`` over heads that have it (NaN rows, e.g. no increments, left out)."""
    values = [score[key] for score in scores if not math.isnan(score[key])]
    return sum(values) / len(values) if values else math.nan
