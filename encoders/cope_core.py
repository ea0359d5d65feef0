"""The pieces every CoPE implementation shares: table geometry, dtypes, gate inputs, z = q e^T.

A leaf module: each implementation (:mod:`encoders.cope_reference`, :mod:`encoders.cope_blockwise`,
:mod:`encoders.cope_triton`, :mod:`encoders.cope_cpu`) imports it, none imports another, and
:mod:`encoders.cope` (the public entry point) dispatches between them. The maths is in
:mod:`encoders.cope_reference`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Gate = Literal["qk", "onset", "token", "change", "rise"]
GATES: tuple[str, ...] = ("qk", "onset", "token", "change", "rise")
# Gates that are one value per key, the same for every query, given as logits (B, H, T): they
# differ only in where the logits come from (``token``: each layer's input; ``change``: a change
# detector on the encoder's input; ``rise``: a detector of rising input features; both shared by
# the layers), not in the attention maths.
PER_KEY_GATES: tuple[str, ...] = ("token", "change", "rise")


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
    if gate in PER_KEY_GATES:
        if gate_logits is None or gate_logits.shape != q.shape[:-1]:
            raise ValueError(f"the {gate} gate needs gate_logits of shape {tuple(q.shape[:-1])}")
    elif gate_logits is not None:
        raise ValueError(
            f"gate_logits is only used by the per-key gates (token, change, rise), not {gate!r}"
        )


def position_logits(q: Tensor, pos_emb: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """z_i[n] = q_i . e[n], (B, H, T, rows), in ``dtype`` (default: q's).

    The table is (rows, D), shared by the heads, or (H, rows, D).

    Autocast is off: under it the matmul would run in bf16/fp16 whatever the operands' dtype.
    """
    dtype = dtype or q.dtype
    table = pos_emb.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        if table.dim() == 2:
            return q.to(dtype) @ table.transpose(0, 1)
        return torch.einsum("bhtd,hnd->bhtn", q.to(dtype), table)


def directions(z: Tensor, npos: int, causal: bool) -> list[tuple[bool, Tensor]]:
    """Per direction of attention: (behind, position logits indexed by |position|, (..., npos)).

    ``behind``: keys at or left of the query (the causal half). The rightward half of
    bidirectional CoPE reads the table from row npos-1 (position 0) downwards.
    """
    if causal:
        return [(True, z)]
    left = z[..., npos - 1 :]  # rows npos-1.. hold positions 0..npos-1
    right = z[..., :npos].flip(-1)  # rows npos-1..0 hold positions 0..-(npos-1)
    return [(True, left), (False, right)]


def merge_partials(partials: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge (normalised output (B,H,T,D), log-sum-exp (B,H,T)) partials of one softmax."""
    lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in partials]), dim=0)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    out = torch.zeros_like(partials[0][0])
    for p_out, p_lse in partials:
        out += torch.exp(p_lse - safe).unsqueeze(-1) * p_out
    return out, lse
