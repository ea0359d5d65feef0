"""Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719).

One public entry point, :func:`cope_attention`, with interchangeable implementations:

- ``"reference"``: the paper's formula (Sec. 3, Eq. 3-5 and the Appendix code), written for
  clarity; the oracle every faster path is tested against. It keeps several (B, H, T, T)
  tensors per call.
- ``"blockwise"``: memory-linear, FlashAttention-style walk over key blocks
  (:mod:`encoders.cope_blockwise`).
- ``"triton"``: the blockwise algorithm as a fused GPU kernel (:mod:`encoders.cope_triton`).

Causal CoPE (the paper), for query i and key j <= i::

    s_ij = q_i . k_j / sqrt(d)                 (masked entries -inf)
    g_ij = sigmoid(s_ij)                       (masked keys: g = 0)
    p_ij = min(sum_{k=j..i} g_ik, npos - 1)    (Eq. 3; the query itself counts)
    z_i[n] = q_i . e[n]                        (e: learned table, npos x d)
    c_ij = z_i[ceil p] (p - floor p) + z_i[floor p] (1 - (p - floor p))   (Eq. 5)
    a_ij = softmax_j(s_ij + c_ij)              (c is not divided by sqrt(d))

Bidirectional CoPE (our extension for non-causal speech and video encoders): gates are counted
from the query outwards in both directions, and the two directions get their own sign::

    p_ij = + sum_{k=j..i} g_ik     for j <= i
    p_ij = - sum_{k=i+1..j} g_ik   for j > i

clamped to [-(npos-1), npos-1], with a table of 2*npos-1 rows (row = p + npos - 1). The causal
case is exactly the paper's.

Gate variants (``gate=``; the maths above is ``"qk"``, the paper's, unchanged):

- ``"qk"``: g_ij = sigmoid(q_i . k_j / sqrt(d)).
- ``"onset"``: gates from the change between neighbouring keys, dk_j = k_j - k_{j-1} with
  k_{-1} := k_0 (so dk_0 = 0), in flat token order::

      g_ij = | 2 sigmoid(q_i . dk_j / sqrt(d)) - 1 | = | tanh(q_i . dk_j / (2 sqrt(d))) |

  A steady input (equal keys) gives g = 0 everywhere; a step opens the gate, in [0, 1), at
  the key where the change happens, whatever its sign (an onset and an offset both count).
  Callers pass the differenced keys as ``gate_keys`` (:func:`onset_keys`).
- ``"token"``: a query-independent gate g_ij = sigmoid(l_j) from per-key logits ``gate_logits``
  (B, H, T), e.g. a small linear head w_h . x_j + b_h on each token's layer input.

Masked keys get g = 0 in every variant; attention scores stay q_i . k_j / sqrt(d). Only the
reference implementation computes ``"onset"`` and ``"token"``: :func:`cope_attention` routes
them there whatever ``impl`` says.

Gates, positions and interpolation weights are computed in float32 (or float64 when the inputs
are float64), also under autocast; the output has v's dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Impl = Literal["auto", "reference", "blockwise", "triton"]
IMPLS: tuple[str, ...] = ("auto", "reference", "blockwise", "triton")
Gate = Literal["qk", "onset", "token"]
GATES: tuple[str, ...] = ("qk", "onset", "token")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype gates and positions are computed in: float32, or wider if an input is wider."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def table_size(npos: int, causal: bool) -> int:
    """Rows of the position table: npos when causal, 2*npos-1 (signed positions) otherwise."""
    return npos if causal else 2 * npos - 1


def npos_of_table(pos_emb: Tensor, causal: bool) -> int:
    """The position cap npos implied by a table's row count (see :func:`table_size`)."""
    rows = pos_emb.shape[-2]
    if causal:
        return rows
    if rows % 2 == 0:
        raise ValueError(f"a bidirectional CoPE table needs 2*npos-1 rows (odd), got {rows}")
    return (rows + 1) // 2


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


def _gates_and_scores(
    q: Tensor,
    k: Tensor,
    allowed: Tensor,
    dtype: torch.dtype,
    gate: str = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled, masked scores s_ij and gates g_ij (0 where masked) of the chosen variant."""
    # Autocast would run this matmul in bf16/fp16 whatever the operands' dtype: turn it off so
    # scores, gates and positions really are float32 (or wider).
    with torch.autocast(q.device.type, enabled=False):
        scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    if gate == "qk":
        gates = torch.sigmoid(scores)  # sigmoid(-inf) = 0: masked keys do not count
        return scores, gates
    if gate == "onset":
        with torch.autocast(q.device.type, enabled=False):
            change = q.to(dtype) @ gate_keys.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])
        gates = (2 * torch.sigmoid(change) - 1).abs()
    else:  # "token": one gate per key, the same for every query
        gates = torch.sigmoid(gate_logits.to(dtype))[..., None, :].expand_as(scores)
    return scores, gates.masked_fill(~allowed, 0.0)


def onset_keys(k: Tensor) -> Tensor:
    """Differenced keys dk_j = k_j - k_{j-1} along time (B, H, T, D), with dk_0 = 0.

    k_{-1} := k_0, so a constant input has no change anywhere and opens no ``"onset"`` gate.
    """
    return torch.cat((torch.zeros_like(k[..., :1, :]), k[..., 1:, :] - k[..., :-1, :]), dim=-2)


def check_gate_inputs(
    q: Tensor, gate: str, gate_keys: Tensor | None, gate_logits: Tensor | None
) -> None:
    """Raise ValueError unless the gate variant got exactly the extra input it needs."""
    if gate not in GATES:
        raise ValueError(f"unknown CoPE gate {gate!r}; choose one of {', '.join(GATES)}")
    if gate == "onset":
        if gate_keys is None or gate_keys.shape != q.shape:
            raise ValueError(f"the onset gate needs gate_keys shaped like q {tuple(q.shape)}")
    elif gate_keys is not None:
        raise ValueError(f"gate_keys is only used by the onset gate, not {gate!r}")
    if gate == "token":
        if gate_logits is None or gate_logits.shape != q.shape[:-1]:
            raise ValueError(f"the token gate needs gate_logits of shape {tuple(q.shape[:-1])}")
    elif gate_logits is not None:
        raise ValueError(f"gate_logits is only used by the token gate, not {gate!r}")


def _positions_from_gates(gates: Tensor, *, causal: bool) -> Tensor:
    """Contextual positions p_ij from gates (B, H, T, T), uncapped (Eq. 3 and its signed twin)."""
    queries, keys = gates.shape[-2:]
    lower = torch.ones(queries, keys, dtype=torch.bool, device=gates.device).tril()
    # sum_{k=j..i} g_ik: a suffix sum along keys of the gates at or left of the query.
    backward = gates.masked_fill(~lower, 0).flip(-1).cumsum(-1).flip(-1)
    if causal:
        return backward
    # sum_{k=i+1..j} g_ik: a prefix sum along keys of the gates right of the query.
    forward = gates.masked_fill(lower, 0).cumsum(-1)
    return torch.where(lower, backward, -forward)


def cope_positions(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    npos: int | None = None,
    key_padding_mask: Tensor | None = None,
    gate: Gate = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """Contextual positions p_ij, (B, H, T, T), capped to npos-1 (signed when not causal).

    Masked pairs (future keys when causal, padded keys) hold 0 positions that no query uses.
    """
    check_gate_inputs(q, gate, gate_keys, gate_logits)
    dtype = compute_dtype(q, k)
    allowed = attention_mask(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    _, gates = _gates_and_scores(q, k, allowed, dtype, gate, gate_keys, gate_logits)
    positions = _positions_from_gates(gates, causal=causal)
    if npos is not None:
        positions = positions.clamp(min=0 if causal else -(npos - 1), max=npos - 1)
    return positions.masked_fill(~allowed, 0)


def cope_gates(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    gate: Gate = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """The gates g_ij, (B, H, T, T), of a gate variant; 0 on masked pairs (for plots, budgets)."""
    check_gate_inputs(q, gate, gate_keys, gate_logits)
    allowed = attention_mask(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    _, gates = _gates_and_scores(q, k, allowed, compute_dtype(q, k), gate, gate_keys, gate_logits)
    return gates


def _position_logits(q: Tensor, pos_emb: Tensor, dtype: torch.dtype) -> Tensor:
    """z_i[n] = q_i . e[n], (B, H, T, rows); the table is (rows, D) shared or (H, rows, D)."""
    table = pos_emb.to(dtype)
    with torch.autocast(q.device.type, enabled=False):  # keep z in dtype (see _gates_and_scores)
        if table.dim() == 2:
            return q.to(dtype) @ table.transpose(0, 1)
        return torch.einsum("bhtd,hnd->bhtn", q.to(dtype), table)


def reference_cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    return_weights: bool = False,
    gate: Gate = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The paper's CoPE attention, materialising every (B, H, T, T) tensor.

    With ``return_weights`` also returns the attention weights and the capped positions.
    ``gate`` picks the gate variant (module docstring); "qk" is the paper's formula.
    """
    check_gate_inputs(q, gate, gate_keys, gate_logits)
    dtype = compute_dtype(q, k, v, pos_emb)
    npos = npos_of_table(pos_emb, causal)
    allowed = attention_mask(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    scores, gates = _gates_and_scores(q, k, allowed, dtype, gate, gate_keys, gate_logits)
    positions = _positions_from_gates(gates, causal=causal)
    positions = positions.clamp(min=0 if causal else -(npos - 1), max=npos - 1)
    # Table rows are indexed from 0: signed positions are shifted by npos - 1.
    offset = 0 if causal else npos - 1
    floor = positions.floor()
    weight_ceil = positions - floor  # interpolation weight of the upper row (Eq. 5)
    floor_row = floor.long() + offset
    ceil_row = positions.ceil().long() + offset
    z = _position_logits(q, pos_emb, dtype)  # (B, H, T, rows)
    bias = z.gather(-1, ceil_row) * weight_ceil + z.gather(-1, floor_row) * (1 - weight_ceil)
    # A query with no allowed key (a fully padded row) attends to nothing and outputs 0. Its
    # logits are all -inf: zero them first, or the softmax's NaN reaches every gradient.
    has_key = allowed.any(-1, keepdim=True)
    logits = (scores + bias).masked_fill(~has_key, 0.0)
    weights = torch.softmax(logits, dim=-1).masked_fill(~has_key, 0.0)
    out = (weights @ v.to(dtype)).to(v.dtype)
    if return_weights:
        return out, weights, positions.masked_fill(~allowed, 0)
    return out


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
        from encoders.cope_triton import triton_available

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
        from encoders.cope_blockwise import blockwise_cope_attention

        return blockwise_cope_attention(
            q, k, v, pos_emb, causal=causal, key_padding_mask=key_padding_mask
        )
    from encoders.cope_triton import triton_cope_attention

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
