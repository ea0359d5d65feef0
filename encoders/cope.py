"""CoPE attention's public entry point: :func:`cope_attention`, the :class:`CoPE` layer, dispatch.

Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719); the maths is in
:mod:`encoders.cope_reference`. Interchangeable implementations, all equal to the reference:

- ``"reference"``: the paper's formula written for clarity (:mod:`encoders.cope_reference`);
  the oracle every faster path is tested against. It keeps several (B, H, T, T) tensors.
- ``"blockwise"``: memory-linear, FlashAttention-style walk over key blocks
  (:mod:`encoders.cope_blockwise`).
- ``"triton"``: the blockwise algorithm as a fused GPU kernel (:mod:`encoders.cope_triton`).

Only the reference computes the gate variants ``"onset"`` and ``"token"``:
:func:`cope_attention` routes them there whatever ``impl`` says. This module imports the
implementations; they import only :mod:`encoders.cope_core`, never each other.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from encoders.cope_blockwise import blockwise_cope_attention
from encoders.cope_core import (
    GATES,
    Gate,
    check_gate_inputs,
    compute_dtype,
    npos_of_table,
    onset_keys,
    table_size,
)
from encoders.cope_reference import cope_gates, cope_positions, reference_cope_attention
from encoders.cope_triton import triton_available, triton_cope_attention

__all__ = [
    "GATES",
    "IMPLS",
    "CoPE",
    "Gate",
    "Impl",
    "compute_dtype",
    "cope_attention",
    "cope_gates",
    "cope_positions",
    "npos_of_table",
    "onset_keys",
    "reference_cope_attention",
    "select_impl",
    "table_size",
]

Impl = Literal["auto", "reference", "blockwise", "triton"]
IMPLS: tuple[str, ...] = ("auto", "reference", "blockwise", "triton")


# When the blockwise path beats the reference (forward + backward, CPU, measured on 2 CPUs):
# from T=64 once the batch holds enough (query, key) pairs for its per-tile overhead to pay
# off, e.g. B*H=128 at T=64 (1.1x faster), B*H=8 at T=256 (1.2x), B*H=4 at T=512 (2x).
BLOCKWISE_MIN_LENGTH_CPU = 64
BLOCKWISE_MIN_PAIRS_CPU = 1 << 19
# On CUDA without Triton the reference's fused kernels win until its (B, H, T, T) tensors
# get large.
BLOCKWISE_MIN_LENGTH_GPU = 2048


def select_impl(q: Tensor, impl: str) -> str:
    """Resolve ``impl="auto"``: Triton on CUDA when installed, else blockwise for long inputs.

    The reference stays the choice for short sequences, where its few large operations cost
    less than the blockwise path's per-tile overhead.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown CoPE implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    length = q.shape[-2]
    if q.is_cuda:
        if triton_available():
            return "triton"
        return "blockwise" if length >= BLOCKWISE_MIN_LENGTH_GPU else "reference"
    pairs = q[..., 0].numel() * length  # B * H * T * T
    if length >= BLOCKWISE_MIN_LENGTH_CPU and pairs >= BLOCKWISE_MIN_PAIRS_CPU:
        return "blockwise"
    return "reference"


def cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    impl: Impl = "auto",
    gate: Gate = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """CoPE attention, (B, H, T, D).

    q, k, v: (B, H, T, D); pos_emb: (npos, D) shared by heads or (H, npos, D) per head, with
    2*npos-1 rows when ``causal=False``; key_padding_mask: (B, T), True marks padding.
    ``gate``: "qk" (the paper's), "onset" (needs ``gate_keys``, e.g. :func:`onset_keys` of k)
    or "token" (needs ``gate_logits`` (B, H, T)); the last two always run the reference.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k, v must be (B, H, T, D) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if pos_emb.shape[-1] != q.shape[-1] or pos_emb.dim() not in (2, 3):
        raise ValueError(f"pos_emb must be (rows, {q.shape[-1]}) or (H, rows, {q.shape[-1]})")
    check_gate_inputs(q, gate, gate_keys, gate_logits)
    if gate != "qk":
        # Only the reference knows the gate variants (the fast paths fuse the qk gate); still
        # validate impl so a typo fails the same way for every gate.
        select_impl(q, impl)
        return reference_cope_attention(
            q,
            k,
            v,
            pos_emb,
            causal=causal,
            key_padding_mask=key_padding_mask,
            gate=gate,
            gate_keys=gate_keys,
            gate_logits=gate_logits,
        )
    chosen = select_impl(q, impl)
    if chosen == "reference":
        return reference_cope_attention(
            q, k, v, pos_emb, causal=causal, key_padding_mask=key_padding_mask
        )
    if chosen == "blockwise":
        return blockwise_cope_attention(
            q, k, v, pos_emb, causal=causal, key_padding_mask=key_padding_mask
        )
    return triton_cope_attention(q, k, v, pos_emb, causal=causal, key_padding_mask=key_padding_mask)


class CoPE(nn.Module):
    """A layer's CoPE position table and options; call it like attention on (q, k, v).

    The authors' conventions: one table per layer shared by the heads (``per_head=True`` gives
    each head its own), zero initialisation, npos rows (2*npos-1 when bidirectional).
    """

    def __init__(
        self,
        npos: int,
        head_dim: int,
        *,
        heads: int = 1,
        per_head: bool = False,
        causal: bool = True,
        impl: Impl = "auto",
        gate: Gate = "qk",
    ) -> None:
        super().__init__()
        if npos < 1:
            raise ValueError(f"npos must be at least 1, got {npos}")
        if gate not in GATES:
            raise ValueError(f"unknown CoPE gate {gate!r}; choose one of {', '.join(GATES)}")
        self.npos, self.causal, self.impl, self.gate = npos, causal, impl, gate
        rows = table_size(npos, causal)
        shape = (heads, rows, head_dim) if per_head else (rows, head_dim)
        self.pos_emb = nn.Parameter(torch.zeros(shape))

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        gate_logits: Tensor | None = None,
    ) -> Tensor:
        """Attention with this layer's gate; ``gate_logits`` (B, H, T) for the token gate."""
        return cope_attention(
            q,
            k,
            v,
            self.pos_emb,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            impl=self.impl,
            gate=self.gate,
            gate_keys=onset_keys(k) if self.gate == "onset" else None,
            gate_logits=gate_logits,
        )

    def extra_repr(self) -> str:
        gate = "" if self.gate == "qk" else f", gate={self.gate}"
        return f"npos={self.npos}, causal={self.causal}, table={tuple(self.pos_emb.shape)}{gate}"
