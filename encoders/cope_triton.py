"""CoPE attention as Triton kernels: the blockwise algorithm, fused, forward and backward.

One kernel pair handles one *direction* of attention in the frame where the keys lie behind the
query (j <= i - strict); the layer merges directions like :mod:`encoders.cope_blockwise`:
causal CoPE is one call with strict=0; the rightward half of bidirectional CoPE is the same
kernel on the reversed sequence with strict=1 and the table read from row npos-1 downwards.

Forward (one program per query block and batch-head): walk key blocks from the diagonal
leftwards, carrying each row's gate sum; positions of a block are the carried sum plus a
reverse cumulative sum inside the block; z_i[floor p] is read from the (T, npos) table of
position logits z = q e^T computed beforehand; the softmax is accumulated online. Once every row
of the block has passed npos - 1, the remaining blocks take the cheap path: scores plus the
constant bias z_i[npos-1], no gates. The kernel stores the output, the log-sum-exp, the gate
total of the near region and the block where the cheap path began.

Backward (same grid): walk key blocks left to right. Far blocks are plain attention with the
bias; near blocks recompute positions as total_i - (gates of near keys left of j), and carry
the prefix sum of dL/dp, since dL/dg_ik = sum_{j <= k} dL/dp_ij. dQ stays in registers; dK, dV
and dL/dz are accumulated with atomic adds (keys are shared by query blocks).

All arithmetic is float32 (float64 inputs stay float64, for tests). Runs on CUDA, or on CPU
under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch
from torch import Tensor

from encoders.cope_core import (
    compute_dtype,
    directions,
    merge_partials,
    npos_of_table,
    position_logits,
)


def triton_available() -> bool:
    """Whether Triton is installed (the kernel then runs on CUDA, or on CPU interpreted)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile-on-first-use kernels (TRITON_INTERPRET is read when they are defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cope_forward_kernel(
        Q, K, V, Z, VALID, OUT, LSE, TOTAL, STOP,
        T, NPOS, scale,
        HAS_VALID: tl.constexpr, STRICT: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        block_m = tl.program_id(0)
        bh = tl.program_id(1)
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        base = bh * T * D
        q = tl.load(
            Q + base + rows[:, None] * D + dims[None, :],
            mask=row_ok[:, None] & (dims[None, :] < D),
            other=0.0,
        )
        z_rows = Z + bh * T * NPOS + rows * NPOS
        z_cap = tl.load(z_rows + NPOS - 1, mask=row_ok, other=0.0)
        cap = (NPOS - 1) * 1.0
        carry = tl.zeros([BLOCK_M], dtype=q.dtype)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=q.dtype)
        row_sum = tl.zeros([BLOCK_M], dtype=q.dtype)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=q.dtype)
        last_key = tl.minimum((block_m + 1) * BLOCK_M - STRICT, T) - 1
        start = last_key // BLOCK_N
        near = 1
        stop = 0
        for step in range(0, start + 1):
            block_n = start - step
            cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            k = tl.load(
                K + base + cols[:, None] * D + dims[None, :],
                mask=col_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            )
            v = tl.load(
                V + base + cols[:, None] * D + dims[None, :],
                mask=col_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            )
            allowed = (cols[None, :] <= rows[:, None] - STRICT) & col_ok[None, :]
            if HAS_VALID:
                key_valid = tl.load(VALID + bh * T + cols, mask=col_ok, other=0)
                allowed = allowed & (key_valid[None, :] != 0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(allowed, scores, float("-inf"))
            if near != 0:
                gates = tl.where(allowed, tl.sigmoid(scores), 0.0)
                positions = tl.cumsum(gates, axis=1, reverse=True) + carry[:, None]
                carry = carry + tl.sum(gates, axis=1)
                positions = tl.minimum(positions, cap)
                floor = tl.floor(positions)
                fraction = positions - floor
                index = floor.to(tl.int32)
                upper = tl.minimum(index + 1, NPOS - 1)
                z_floor = tl.load(z_rows[:, None] + index, mask=row_ok[:, None], other=0.0)
                z_upper = tl.load(z_rows[:, None] + upper, mask=row_ok[:, None], other=0.0)
                logits = scores + z_floor + fraction * (z_upper - z_floor)
                # Every real row past the cap: the blocks further left take the cheap path.
                lowest = tl.min(tl.where(row_ok, carry, cap), axis=0)
                if lowest >= cap:
                    near = 0
                    stop = block_n
            else:
                logits = scores + z_cap[:, None]
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp(logits - safe_max[:, None])
            rescale = tl.exp(row_max - safe_max)
            row_sum = row_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            row_max = new_max
        empty = row_sum == 0.0
        out = acc / tl.where(empty, 1.0, row_sum)[:, None]
        lse = tl.where(empty, float("-inf"), row_max + tl.log(tl.where(empty, 1.0, row_sum)))
        tl.store(
            OUT + base + rows[:, None] * D + dims[None, :],
            out,
            mask=row_ok[:, None] & (dims[None, :] < D),
        )
        tl.store(LSE + bh * T + rows, lse, mask=row_ok)
        tl.store(TOTAL + bh * T + rows, carry, mask=row_ok)
        tl.store(STOP + bh * tl.num_programs(0) + block_m, stop)

    @triton.jit
    def cope_backward_kernel(
        Q, K, V, Z, VALID, DO, LSE, DELTA, TOTAL, STOP, DQ, DK, DV, DZ,
        T, NPOS, scale,
        HAS_VALID: tl.constexpr, STRICT: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        block_m = tl.program_id(0)
        bh = tl.program_id(1)
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        dim_ok = dims[None, :] < D
        base = bh * T * D
        row_ptrs = base + rows[:, None] * D + dims[None, :]
        q = tl.load(Q + row_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
        grad_out = tl.load(DO + row_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
        # Rows without any key have lse -inf: +inf makes their probabilities 0.
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        total = tl.load(TOTAL + bh * T + rows, mask=row_ok, other=0.0)
        stop = tl.load(STOP + bh * tl.num_programs(0) + block_m)
        z_rows = Z + bh * T * NPOS + rows * NPOS
        dz_rows = DZ + bh * T * NPOS + rows * NPOS
        z_cap = tl.load(z_rows + NPOS - 1, mask=row_ok, other=0.0)
        cap = (NPOS - 1) * 1.0
        grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=q.dtype)
        grad_cap = tl.zeros([BLOCK_M], dtype=q.dtype)
        gates_left = tl.zeros([BLOCK_M], dtype=q.dtype)  # near gates left of the current block
        grad_pos_left = tl.zeros([BLOCK_M], dtype=q.dtype)  # their sum of dL/dp
        last_key = tl.minimum((block_m + 1) * BLOCK_M - STRICT, T) - 1
        end = last_key // BLOCK_N
        for block_n in range(0, end + 1):
            cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            col_ptrs = base + cols[:, None] * D + dims[None, :]
            k = tl.load(K + col_ptrs, mask=col_ok[:, None] & dim_ok, other=0.0)
            v = tl.load(V + col_ptrs, mask=col_ok[:, None] & dim_ok, other=0.0)
            allowed = (cols[None, :] <= rows[:, None] - STRICT) & col_ok[None, :] & row_ok[:, None]
            if HAS_VALID:
                key_valid = tl.load(VALID + bh * T + cols, mask=col_ok, other=0)
                allowed = allowed & (key_valid[None, :] != 0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(allowed, scores, float("-inf"))
            grad_probs = tl.dot(grad_out, tl.trans(v))
            if block_n < stop:
                # Far block: every position is capped, one bias per row, no gate gradient.
                probs = tl.exp(scores + z_cap[:, None] - lse[:, None])
                grad_logits = probs * (grad_probs - delta[:, None])
                grad_cap += tl.sum(grad_logits, axis=1)
                grad_scores = grad_logits
            else:
                gates = tl.where(allowed, tl.sigmoid(scores), 0.0)
                # p_ij = total_i - sum of near gates strictly left of key j.
                left = gates_left[:, None] + tl.cumsum(gates, axis=1) - gates
                positions = tl.minimum(total[:, None] - left, cap)
                positions = tl.maximum(positions, 0.0)
                floor = tl.floor(positions)
                fraction = positions - floor
                index = floor.to(tl.int32)
                upper = tl.minimum(index + 1, NPOS - 1)
                z_floor = tl.load(z_rows[:, None] + index, mask=row_ok[:, None], other=0.0)
                z_upper = tl.load(z_rows[:, None] + upper, mask=row_ok[:, None], other=0.0)
                logits = scores + z_floor + fraction * (z_upper - z_floor)
                probs = tl.exp(logits - lse[:, None])
                grad_logits = probs * (grad_probs - delta[:, None])
                # dL/dz through the interpolation (Eq. 5).
                tl.atomic_add(dz_rows[:, None] + index, grad_logits * (1 - fraction), mask=allowed)
                tl.atomic_add(
                    dz_rows[:, None] + upper, grad_logits * fraction, mask=allowed & (fraction > 0)
                )
                # dL/dp through the slope; 0 at integer (incl. capped) positions, as the reference.
                slope = tl.where(fraction > 0, z_upper - z_floor, 0.0)
                grad_pos = grad_logits * slope
                # dL/dg_ik = sum over near keys j <= k of dL/dp_ij.
                grad_gates = grad_pos_left[:, None] + tl.cumsum(grad_pos, axis=1)
                gates_left += tl.sum(gates, axis=1)
                grad_pos_left += tl.sum(grad_pos, axis=1)
                grad_scores = grad_logits + grad_gates * gates * (1 - gates)
            grad_scores = tl.where(allowed, grad_scores, 0.0)
            probs = tl.where(allowed, probs, 0.0)
            grad_q += tl.dot(grad_scores.to(k.dtype), k) * scale
            col_mask = col_ok[:, None] & dim_ok
            tl.atomic_add(
                DK + col_ptrs, tl.dot(tl.trans(grad_scores).to(q.dtype), q) * scale, mask=col_mask
            )
            tl.atomic_add(
                DV + col_ptrs, tl.dot(tl.trans(probs).to(q.dtype), grad_out), mask=col_mask
            )
        tl.store(DQ + row_ptrs, grad_q, mask=row_ok[:, None] & dim_ok)
        tl.atomic_add(dz_rows + NPOS - 1, grad_cap, mask=row_ok)

    return cope_forward_kernel, cope_backward_kernel


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_sizes(length: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): 16-row tiles when interpreted (speed), 64 on a GPU."""
    import triton

    block = 16 if _interpreting() or length <= 16 else 64
    return block, block, max(16, triton.next_power_of_2(dim))


def _frame(flip: bool, x: Tensor) -> Tensor:
    """A (B, H, T, ...) or (B*H, T) tensor in a direction's frame, contiguous for the kernel."""
    dim = 2 if x.dim() >= 3 else 1
    return (x.flip(dim) if flip else x).contiguous()


class TritonCoPE(torch.autograd.Function):
    """Autograd function around the forward and backward kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q: Tensor, k: Tensor, v: Tensor, table: Tensor, key_padding_mask: Tensor | None,
        causal: bool,
    ) -> Tensor:  # fmt: skip
        forward_kernel, _ = _kernels()
        batch, heads, length, dim = q.shape
        npos = npos_of_table(table, causal)
        scale = 1.0 / math.sqrt(dim)
        block_m, block_n, block_d = _block_sizes(length, dim)
        grid = (-(-length // block_m), batch * heads)
        valid = None
        if key_padding_mask is not None:
            valid = (~key_padding_mask)[:, None, :].expand(batch, heads, length)
            valid = valid.reshape(batch * heads, length).to(torch.int8)
        z = position_logits(q, table)
        partials, saved = [], []
        for behind, z_dir in directions(z, npos, causal):
            flip = not behind
            out = torch.empty_like(q)
            lse = q.new_empty(batch, heads, length)
            total = q.new_empty(batch, heads, length)
            stop = torch.empty(batch * heads, grid[0], dtype=torch.int32, device=q.device)
            frame_valid = _frame(flip, valid) if valid is not None else q
            forward_kernel[grid](
                _frame(flip, q), _frame(flip, k), _frame(flip, v), _frame(flip, z_dir),
                frame_valid, out, lse, total, stop, length, npos, scale,
                HAS_VALID=valid is not None, STRICT=int(flip), D=dim,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            )  # fmt: skip
            saved.append((total, stop))
            if flip:
                out, lse = out.flip(2), lse.flip(2)
            partials.append((out, lse))
        out, lse = merge_partials(partials)
        ctx.save_for_backward(q, k, v, table, z, out, lse)
        ctx.valid, ctx.saved_walks, ctx.causal = valid, saved, causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # Float32 (or float64) throughout, also when backward is called under autocast.
        with torch.autocast(grad_out.device.type, enabled=False):
            return TritonCoPE._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):  # type: ignore[no-untyped-def]
        _, backward_kernel = _kernels()
        q, k, v, table, z, out, lse = ctx.saved_tensors
        valid = ctx.valid
        batch, heads, length, dim = q.shape
        npos = npos_of_table(table, ctx.causal)
        scale = 1.0 / math.sqrt(dim)
        block_m, block_n, block_d = _block_sizes(length, dim)
        grid = (-(-length // block_m), batch * heads)
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # Delta_i = dO_i . O_i
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        grad_z = torch.zeros_like(z)
        walks = zip(directions(z, npos, ctx.causal), ctx.saved_walks, strict=True)
        for (behind, z_dir), (total, stop) in walks:
            flip = not behind
            dq = torch.zeros_like(q)
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            dz = q.new_zeros(batch, heads, length, npos)
            frame_valid = _frame(flip, valid) if valid is not None else q
            backward_kernel[grid](
                _frame(flip, q), _frame(flip, k), _frame(flip, v), _frame(flip, z_dir),
                frame_valid, _frame(flip, grad_out), _frame(flip, lse), _frame(flip, delta),
                total, stop, dq, dk, dv, dz, length, npos, scale,
                HAS_VALID=valid is not None, STRICT=int(flip), D=dim,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            )  # fmt: skip
            if flip:
                dq, dk, dv, dz = dq.flip(2), dk.flip(2), dv.flip(2), dz.flip(2)
            grad_q += dq
            grad_k += dk
            grad_v += dv
            if ctx.causal:
                grad_z += dz
            elif flip:
                grad_z[..., :npos] += dz.flip(-1)
            else:
                grad_z[..., npos - 1 :] += dz
        if table.dim() == 2:
            grad_q += grad_z @ table
            grad_table = torch.einsum("bhtn,bhtd->nd", grad_z, q)
        else:
            grad_q += torch.einsum("bhtn,hnd->bhtd", grad_z, table)
            grad_table = torch.einsum("bhtn,bhtd->hnd", grad_z, q)
        return grad_q, grad_k, grad_v, grad_table, None, None


def triton_cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """CoPE attention by the Triton kernels, equal to the reference; (B, H, T, D) in v's dtype.

    Arguments as :func:`encoders.cope.cope_attention`. Needs Triton, and CUDA tensors unless
    TRITON_INTERPRET=1 (CPU, for tests).
    """
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package; use impl='blockwise'")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(
            "impl='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
            "use impl='blockwise' on CPU"
        )
    dtype = compute_dtype(q, k, v, pos_emb)
    # Under autocast the band's matmuls would run in bf16/fp16: CoPE keeps gates in float32.
    with torch.autocast(q.device.type, enabled=False):
        out = TritonCoPE.apply(
            q.to(dtype).contiguous(),
            k.to(dtype).contiguous(),
            v.to(dtype).contiguous(),
            pos_emb.to(dtype),
            key_padding_mask,
            causal,
        )
    return out.to(v.dtype)
