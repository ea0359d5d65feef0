"""CoPE attention's public entry point: :func:`cope_attention`, the :class:`CoPE` layer, dispatch.

Contextual Position Encoding (Golovneva et al. 2024, arXiv:2405.18719); the maths is in
:mod:`encoders.cope_reference`. Interchangeable implementations, all equal to the reference:

- ``"reference"``: the paper's formula written for clarity (:mod:`encoders.cope_reference`);
  the oracle every faster path is tested against. It keeps several (B, H, T, T) tensors.
- ``"blockwise"``: memory-linear, FlashAttention-style walk over key blocks
  (:mod:`encoders.cope_blockwise`).
- ``"triton"``: the blockwise algorithm as a fused GPU kernel (:mod:`encoders.cope_triton`).
- ``"fused"``: one C++ CPU kernel, forward and backward, on blocks of 32 query rows, built by
  the install step (:mod:`encoders.cope_cpu`); the fastest CPU path at the lengths our models
  use.
- ``"auto"``: the cheapest available path by a committed calibration table of measured costs
  (:func:`select_impl`).

The gate variants ``"onset"``, ``"token"``, ``"change"`` and ``"rise"`` run on the reference or
the fused kernel: with ``impl="blockwise"`` or ``"triton"`` they run on the reference. This module
imports the implementations; they import only :mod:`encoders.cope_core`, never each other.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from encoders.cope_blockwise import blockwise_cope_attention
from encoders.cope_core import (
    GATES,
    PER_KEY_GATES,
    Gate,
    check_gate_inputs,
    compute_dtype,
    npos_of_table,
    onset_keys,
    table_size,
)
from encoders.cope_cpu import fused_cope_attention, kernel_available
from encoders.cope_reference import cope_gates, cope_positions, reference_cope_attention
from encoders.cope_triton import triton_available, triton_cope_attention

__all__ = [
    "GATES",
    "IMPLS",
    "PER_KEY_GATES",
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

Impl = Literal["auto", "reference", "blockwise", "triton", "fused"]
IMPLS: tuple[str, ...] = ("auto", "reference", "blockwise", "triton", "fused")


# Where the measured costs of the CPU paths live: written by `cope bench attention --calibrate`
# (README, "Performance"), read by select_impl. Format: {"command", "machine", ...,
# "causal"/"bidirectional": {"lengths": [T, ...], "ms_per_head": {impl: [ms, ...]}}}, the median
# forward+backward time of one (batch, head) slice at each length.
CALIBRATION = Path(__file__).with_name("cope_calibration.json")
# The reference keeps about 40 bytes per (B, H, T, T) element over forward + backward: auto
# never picks it above this estimate, whatever its time.
REFERENCE_BYTES_PER_PAIR = 40
REFERENCE_MAX_BYTES = 1 << 30
# On CUDA without Triton the reference's fused kernels win until its (B, H, T, T) tensors
# get large.
BLOCKWISE_MIN_LENGTH_GPU = 2048


@functools.cache
def calibration() -> dict:
    """The committed calibration table (empty if the file is missing)."""
    if not CALIBRATION.exists():
        return {}
    return json.loads(CALIBRATION.read_text())


def measured_cost(impl: str, length: int, causal: bool) -> float | None:
    """Calibrated ms per (batch, head) slice of ``impl`` at ``length``, or None if unmeasured.

    Log-linear interpolation between the measured lengths; beyond them the time is scaled as
    T^2 from the nearest one.
    """
    table = calibration().get("causal" if causal else "bidirectional")
    if not table or impl not in table["ms_per_head"]:
        return None
    points = [
        (t, ms)
        for t, ms in zip(table["lengths"], table["ms_per_head"][impl], strict=True)
        if ms is not None
    ]
    if not points:
        return None
    if length <= points[0][0] or length >= points[-1][0]:
        t, ms = points[0] if length <= points[0][0] else points[-1]
        return ms * (length / t) ** 2
    for (t0, ms0), (t1, ms1) in zip(points, points[1:], strict=False):
        if t0 <= length <= t1:
            f = math.log(length / t0) / math.log(t1 / t0)
            return math.exp((1 - f) * math.log(ms0) + f * math.log(ms1))
    return None


def cpu_candidates(q: Tensor, gate: str = "qk") -> list[str]:
    """The CPU implementations that can run this call (the fused kernel only when built)."""
    candidates = ["reference"]
    if gate == "qk":
        candidates.append("blockwise")
    if kernel_available():
        candidates.append("fused")
    pairs = q[..., 0].numel() * q.shape[-2]  # B * H * T * T
    if pairs * REFERENCE_BYTES_PER_PAIR > REFERENCE_MAX_BYTES and len(candidates) > 1:
        candidates.remove("reference")
    return candidates


def select_impl(q: Tensor, impl: str, *, causal: bool = True, gate: str = "qk") -> str:
    """Resolve ``impl="auto"`` to the implementation with the lowest calibrated cost.

    On CPU: the fastest of the candidates (:func:`cpu_candidates`) by the committed calibration
    table at this length; uncalibrated paths are tried last (fused, then blockwise). On CUDA:
    Triton when installed, else the reference up to BLOCKWISE_MIN_LENGTH_GPU, then blockwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown CoPE implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    length = q.shape[-2]
    if q.is_cuda:
        if triton_available() and gate == "qk":
            return "triton"
        if gate != "qk":
            return "reference"
        return "blockwise" if length >= BLOCKWISE_MIN_LENGTH_GPU else "reference"
    fallback_order = ["fused", "blockwise", "reference"]

    def cost(candidate: str) -> tuple[float, int]:
        measured = measured_cost(candidate, length, causal)
        return (math.inf if measured is None else measured, fallback_order.index(candidate))

    return min(cpu_candidates(q, gate), key=cost)


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
    or "token" / "change" / "rise" (need ``gate_logits`` (B, H, T)); blockwise and triton know only
    "qk", so the other gates run on the reference when one of them is asked for.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k, v must be (B, H, T, D) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if pos_emb.shape[-1] != q.shape[-1] or pos_emb.dim() not in (2, 3):
        raise ValueError(f"pos_emb must be (rows, {q.shape[-1]}) or (H, rows, {q.shape[-1]})")
    check_gate_inputs(q, gate, gate_keys, gate_logits)
    chosen = select_impl(q, impl, causal=causal, gate=gate)
    mask = key_padding_mask
    gate_inputs = {"gate": gate, "gate_keys": gate_keys, "gate_logits": gate_logits}
    if chosen == "fused":
        return fused_cope_attention(
            q, k, v, pos_emb, causal=causal, key_padding_mask=mask, **gate_inputs
        )
    if chosen == "reference" or gate != "qk":
        return reference_cope_attention(
            q, k, v, pos_emb, causal=causal, key_padding_mask=mask, **gate_inputs
        )
    if chosen == "blockwise":
        return blockwise_cope_attention(q, k, v, pos_emb, causal=causal, key_padding_mask=mask)
    return triton_cope_attention(q, k, v, pos_emb, causal=causal, key_padding_mask=mask)


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
        """Attention with this layer's gate; ``gate_logits`` (B, H, T) for the token, change and
        rise gates."""
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
