"""Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719): the reference.

The paper's formula (Sec. 3, Eq. 3-5 and the Appendix code) written for clarity; the oracle every
faster implementation is tested against. It keeps several (B, H, T, T) tensors per call.

Causal CoPE (the paper), for query i and key j <= i::

    s_ij = q_i . k_j / sqrt(d)                 (masked entries -inf)
    g_ij = sigmoid(s_ij)                       (masked keys: g = 0)
    p_ij = min(sum_{k=j..i} g_ik, npos - 1)    (Eq. 3; the query itself counts)
    z_i[n] = q_i . e[n]                        (Eq. 4; e: learned table, npos x d)
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
  Callers pass the differenced keys as ``gate_keys`` (:func:`encoders.cope_core.onset_keys`).
- ``"token"``: a query-independent gate g_ij = sigmoid(l_j) from per-key logits ``gate_logits``
  (B, H, T), e.g. a small linear head w_h . x_j + b_h on each token's layer input.
- ``"change"``: the same per-key gate g_ij = sigmoid(l_j); its logits come from a change
  detector on the encoder's input, shared by every layer
  (:class:`encoders.positions.ChangeGate`): l_jh = a_h . phi(x_j - x_{j-L}) + b_h (L: 1, or
  the patches per step for video patch tokens), with no change at the first token of the
  signal. This function takes the logits as inputs, like the token gate's.
- ``"rise"``: the same per-key gate; its logits come from what rose in the frontend's raw input
  features since the same place one time step earlier (:class:`encoders.positions.RiseGate`):
  l_jh = a_h . [relu(d_j), relu(mean_c d_jc)] + b_h, d_j = c_j - c_{j-L} on clip-standardised
  features c, so an onset opens it and an offset does not.

Masked keys get g = 0 in every variant; attention scores stay q_i . k_j / sqrt(d).

Gates, positions and interpolation weights are computed in float32 (or float64 when the inputs
are float64), also under autocast; the output has v's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from encoders.cope_core import (
    Gate,
    check_gate_inputs,
    compute_dtype,
    npos_of_table,
    position_logits,
)
from encoders.masking import attention_mask


def scaled_scores(q: Tensor, k: Tensor, dtype: torch.dtype) -> Tensor:
    """q_i . k_j / sqrt(d) in ``dtype``, (B, H, T, T).

    Autocast is off: under it the matmul would run in bf16/fp16 whatever the operands' dtype.
    """
    with torch.autocast(q.device.type, enabled=False):
        return q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])


def gate_values(
    scores: Tensor,
    allowed: Tensor,
    q: Tensor,
    gate: str = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """The gates g_ij (B, H, T, T) of a variant (module docstring); 0 where not allowed."""
    if gate == "qk":
        return torch.sigmoid(scores)  # sigmoid(-inf) = 0: masked keys do not count
    if gate == "onset":
        change = scaled_scores(q, gate_keys, scores.dtype)
        gates = (2 * torch.sigmoid(change) - 1).abs()
    else:  # "token", "change", "rise": one gate per key, the same for every query
        gates = torch.sigmoid(gate_logits.to(scores.dtype))[..., None, :].expand_as(scores)
    return gates.masked_fill(~allowed, 0.0)


def contextual_positions(gates: Tensor, *, causal: bool) -> Tensor:
    """p_ij from gates (B, H, T, T), uncapped: Eq. 3 and, when not causal, its signed twin."""
    queries, keys = gates.shape[-2:]
    lower = torch.ones(queries, keys, dtype=torch.bool, device=gates.device).tril()
    # sum_{k=j..i} g_ik: a suffix sum along keys of the gates at or left of the query.
    behind = gates.masked_fill(~lower, 0).flip(-1).cumsum(-1).flip(-1)
    if causal:
        return behind
    # sum_{k=i+1..j} g_ik: a prefix sum along keys of the gates right of the query.
    ahead = gates.masked_fill(lower, 0).cumsum(-1)
    return torch.where(lower, behind, -ahead)


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
    length = q.shape[-2]
    allowed = attention_mask(
        length, length, causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    scores = scaled_scores(q, k, dtype).masked_fill(~allowed, float("-inf"))  # s_ij
    gates = gate_values(scores, allowed, q, gate, gate_keys, gate_logits)  # g_ij
    # Eq. 3: p_ij = sum of the gates between key and query, capped.
    positions = contextual_positions(gates, causal=causal)
    positions = positions.clamp(min=0 if causal else -(npos - 1), max=npos - 1)
    # Eq. 4: one logit per table row, z_i[n] = q_i . e[n].
    z = position_logits(q, pos_emb, dtype)  # (B, H, T, rows)
    # Eq. 5: interpolate z between the rows around p (signed positions shifted by npos - 1).
    offset = 0 if causal else npos - 1
    floor = positions.floor()
    weight_ceil = positions - floor
    z_ceil = z.gather(-1, positions.ceil().long() + offset)
    z_floor = z.gather(-1, floor.long() + offset)
    bias = z_ceil * weight_ceil + z_floor * (1 - weight_ceil)
    # A query with no allowed key (a fully padded row) attends to nothing and outputs 0. Its
    # logits are all -inf: zero them first, or the softmax's NaN reaches every gradient.
    has_key = allowed.any(-1, keepdim=True)
    logits = (scores + bias).masked_fill(~has_key, 0.0)
    weights = torch.softmax(logits, dim=-1).masked_fill(~has_key, 0.0)
    out = (weights @ v.to(dtype)).to(v.dtype)
    if return_weights:
        return out, weights, positions.masked_fill(~allowed, 0)
    return out


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
    length = q.shape[-2]
    allowed = attention_mask(
        length, length, causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    scores = scaled_scores(q, k, compute_dtype(q, k)).masked_fill(~allowed, float("-inf"))
    return gate_values(scores, allowed, q, gate, gate_keys, gate_logits)


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
    gates = cope_gates(
        q,
        k,
        causal=causal,
        key_padding_mask=key_padding_mask,
        gate=gate,
        gate_keys=gate_keys,
        gate_logits=gate_logits,
    )
    positions = contextual_positions(gates, causal=causal)
    if npos is not None:
        positions = positions.clamp(min=0 if causal else -(npos - 1), max=npos - 1)
    length = q.shape[-2]
    allowed = attention_mask(
        length, length, causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    return positions.masked_fill(~allowed, 0)
