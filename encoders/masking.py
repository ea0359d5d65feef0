"""Which (query, key) pairs attention may use: causality and key padding, for every kernel."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mask(
    queries: int,
    keys: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Boolean mask of allowed (query, key) pairs, broadcastable to (B, H, T, T).

    ``key_padding_mask`` is (B, T) with True marking padding (PyTorch's convention).
    """
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]  # (1, 1, queries, keys)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed
