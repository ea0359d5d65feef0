"""Multi-head self-attention that takes any position encoding from :mod:`encoders.positions`.

The encoding acts only through its interface: ``rotate`` q/k, add ``score_bias`` to the scores,
or, when it ``replaces_kernel`` (CoPE), compute attention itself. Everything else goes through
``torch.nn.functional.scaled_dot_product_attention`` (a float mask carries ALiBi/T5/rel biases), or,
while recording, through the explicit softmax written beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from encoders.masking import attention_mask
from encoders.positions import PositionEncoding


def line_coords(length: int, device: torch.device) -> Tensor:
    """1-D coordinates (T, 1) = arange(T): what ``coords=None`` means."""
    return torch.arange(length, device=device)[:, None]


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + bias) v written out; returns (output, weights (B, H, T, T)).

    A query with no allowed key outputs zeros (weights 0), as in the CoPE reference.
    """
    allowed = attention_mask(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    has_key = allowed.any(-1, keepdim=True)
    # Rows without keys are zeroed before the softmax: all -inf would give NaN gradients.
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    return weights @ v, weights


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The same attention through PyTorch's fused ``scaled_dot_product_attention``."""
    if bias is None and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    allowed = attention_mask(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    if bias is None:
        mask = allowed
    else:
        # A float mask must have the query's dtype (bf16 under autocast).
        mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Self-attention over (B, T, dim) with a pluggable per-layer position encoding.

    While ``record`` is on, ``last_record`` holds ``{"attention": (B, H, T, T), "positions":
    (B, H, T, T) or None}`` from the latest forward (positions: CoPE's contextual positions),
    and for CoPE also ``"gates"`` (B, H, T, T).
    ``attn_dropout`` drops attention weights while training, for every encoding alike (the
    CoPE paper's run script uses 0.1; CoPE applies it in its own ``attend``). Default 0.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        positions: PositionEncoding,
        *,
        causal: bool,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.heads, self.causal, self.attn_dropout = heads, causal, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.positions = positions
        self.record = False
        self.last_record: dict[str, Tensor | None] | None = None

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        coords: Tensor | None = None,
        gate_logits: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, dim); padding_mask: (B, T) True = pad; coords: (T, n_axes) long or None;
        gate_logits: (B, H, T) from the model's shared gate (CoPE's change or rise gate) or None."""
        if coords is None:
            coords = line_coords(x.shape[1], x.device)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        q, k = self.positions.rotate(q, k, coords)
        positions = None
        if self.positions.replaces_kernel:
            out, weights, positions = self.positions.attend(
                q,
                k,
                v,
                key_padding_mask=padding_mask,
                record=self.record,
                layer_input=x,
                coords=coords,
                gate_logits=gate_logits,
            )
        else:
            bias = self.positions.score_bias(coords, q)
            dropout = self.attn_dropout if self.training else 0.0
            if self.record:
                out, weights = explicit_attention(
                    q, k, v, causal=self.causal, key_padding_mask=padding_mask, bias=bias
                )
                if dropout > 0:
                    out = F.dropout(weights, dropout) @ v
            else:
                out = fused_attention(
                    q,
                    k,
                    v,
                    causal=self.causal,
                    key_padding_mask=padding_mask,
                    bias=bias,
                    dropout_p=dropout,
                )
                weights = None
        if self.record:
            self.last_record = {
                "attention": weights.detach(),
                "positions": None if positions is None else positions.detach(),
            }
            gates = getattr(self.positions, "last_gates", None)
            if gates is not None:  # CoPE's gates g_ij (B, H, T, T), for plots of what it counts
                self.last_record["gates"] = gates
        return self.out(rearrange(out.to(x.dtype), "b h t d -> b t (h d)"))
