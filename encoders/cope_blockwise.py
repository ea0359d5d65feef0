"""Memory-linear CoPE attention in PyTorch: a band of near keys per row, then one fused call.

The maths is the reference's (:mod:`encoders.cope`); only the order of work differs.

Why a band. For a query i, the contextual position p_ij = sum_{k=j..i} g_ik grows as the key j
moves away from the query, and it is capped at npos - 1. Once a row's running gate sum has
passed the cap, every key further away sees the same capped position, i.e. the same bias
z_i[npos-1]: those keys are ordinary attention with one per-row bias . So each
direction of attention is split into

- a *band*: the keys at distances [strict, strict + n * block) from the query, walked in
  square tiles (query block u against key block u -/+ c) for **all query blocks at once**, so
  the Python overhead does not grow with T; each row's gate sum is carried from tile to tile
  and tiles are merged with an online softmax. Walking stops as soon as every row has passed
  the cap (or run out of keys); a last, complementary tile makes the cut the same distance for
  every row, which is what lets the far region be one call.
- a *far region*: every key beyond the band, one fused flash-attention call (PyTorch's CPU
  flash kernel, which also returns the log-sum-exp) on the sequence shifted by the band width,
  with the bias z_i[npos-1] added to its log-sum-exp. Off CPU that kernel does not exist; the
  far region then runs as plain attention in chunks of FAR_ROWS query rows (still linear).

The partials (normalised output, log-sum-exp) of band and far region are merged exactly.

Directions. Causal CoPE is the "behind" direction: keys j <= i. Inside a tile the keys are
stored in reverse order, so the positions are a plain cumulative sum along the tile. The
rightward half of bidirectional CoPE (p_ij = -sum_{k=i+1..j} g_ik) is the "ahead" direction,
keys j > i in natural order, with the diagonal excluded (``strict``) and the table read from
row npos-1 downwards; its far region is causal attention of the reversed sequence.

Backward recomputes every band tile instead of storing it (only each tile's incoming gate sums,
(B, H, T) each, are kept); group by group of query blocks it walks the tiles from the farthest
to the nearest while carrying the sum of dL/dp over the farther keys:
dL/dg_ik = sum over keys j at or beyond k of dL/dp_ij. The far region's gradients come from
the flash kernel's backward given the merged output and log-sum-exp; its bias gradient is
mass_i * (dO_i . o_far_i - Delta_i).

Tensors of the band live block-major, (blocks, B, H, block, ...), so that a group of query blocks
is one contiguous slice and every tile is a single batched matmul without copies.
Peak memory: the band's working set is bounded by GROUP_ELEMENTS, everything else is (B, H, T, *):
linear in T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.cope_core import (
    compute_dtype,
    directions,
    merge_partials,
    npos_of_table,
    position_logits,
)

# Rows and keys per band tile, the unit of the batched band matmuls: 16 wastes less of the
# triangle on short sequences (T <= 128), 32 has less per-tile overhead on long ones.
SHORT_BLOCK, LONG_BLOCK, SHORT_LENGTH = 16, 32, 128
# Band elements (B * H * rows * block) processed at once: bounds the band's working memory
# (about a dozen tensors of this size are alive inside a step) independently of T.
GROUP_ELEMENTS = 1 << 17

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass
class _DirectionState:
    """What the forward keeps of one direction for the backward."""

    behind: bool  # keys at or left of the query (causal half); else strictly right of it
    tiles: int  # full band tiles walked; the band is distances [strict, strict + tiles*block)
    carries: list[Tensor]  # gate sum entering each tile (incl. the final one), block-major
    far: tuple[Tensor, Tensor, Tensor] | None  # far frame: (output, lse incl. bias, bias)

    @property
    def strict(self) -> int:
        return 0 if self.behind else 1


class _Band:
    """Tile geometry and block-major tensors of one direction's band.

    Tile c pairs query block u with key block u - c ("behind") or u + c ("ahead"). Within a tile
    the distance of (row r, column m) is c * block + d0[r, m], with d0 = r - (block-1-m) behind
    (keys stored reversed) and m - r ahead. Tile 0 keeps d0 >= strict; after n full tiles a final
    tile keeps the complement d0 < strict, so every row's band is the distances
    [strict, strict + n * block).
    """

    def __init__(
        self,
        qs: Tensor,
        k: Tensor,
        v: Tensor,
        z: Tensor,
        key_valid: Tensor | None,
        *,
        behind: bool,
        npos: int,
        block: int,
    ) -> None:
        batch, heads, length, dim = qs.shape
        self.batch, self.heads, self.length, self.dim = batch, heads, length, dim
        self.behind, self.strict, self.npos, self.block = behind, int(not behind), npos, block
        self.blocks = blocks = -(-length // block)
        self.padded = blocks * block  # rows padded to whole blocks
        self.q = self._rows(qs)
        z = self._rows(z)
        # z[n] and the difference dz[n] = z[n+1] - z[n] (0 at the cap) as one complex table:
        # the interpolation c = z[floor] + w dz[floor] then needs a single gather.
        self.z = torch.complex(z, F.pad(z[..., 1:] - z[..., :-1], (0, 1)))
        self.k = self._keys(k)
        self.v = self._keys(v)
        valid = torch.ones(batch, 1, length, 1, device=qs.device)
        if key_valid is not None:
            valid = key_valid[:, None, :, None].float()
        # (blocks, B, 1, 1, block): broadcasts over heads and rows.
        self.valid = self._keys(valid).transpose(-1, -2).bool()
        self.has_padding = key_valid is not None
        rows = torch.arange(block, device=qs.device)
        d0 = rows[None, :] - rows[:, None]  # ahead: m - r
        if behind:
            d0 = rows[:, None] - (block - 1 - rows[None, :])
        self.first_tile = d0 >= self.strict  # (row, column): kept by tile 0, dropped by final
        # Reverse cumulative sums of gradients along a tile's keys as a small matmul (x @ suffix;
        # 2x faster than cumsum on rows of 32 keys).
        self.suffix = torch.ones(block, block, dtype=qs.dtype, device=qs.device).tril()
        per_block = batch * heads * block * block
        self.group = max(1, GROUP_ELEMENTS // per_block)

    def _rows(self, x: Tensor) -> Tensor:
        """(B, H, T, F) -> block-major (blocks, B, H, block, F), rows padded with zeros."""
        batch, heads, length, features = x.shape
        x = F.pad(x, (0, 0, 0, self.padded - length))
        x = x.view(batch, heads, self.blocks, self.block, features)
        return x.permute(2, 0, 1, 3, 4).contiguous()

    def _keys(self, x: Tensor) -> Tensor:
        """(B, H, T, F) -> block-major keys (blocks, B, H, block, F), reversed if behind."""
        batch, heads, length, features = x.shape
        x = F.pad(x, (0, 0, 0, self.padded - length)).view(
            batch, heads, self.blocks, self.block, -1
        )
        if self.behind:
            x = x.flip(-2)
        return x.permute(2, 0, 1, 3, 4).contiguous()

    def block_view(self, x: Tensor) -> Tensor:
        """(B, H, T, F) with T a multiple of block -> block-major view (blocks, B, H, block, F)."""
        return x.view(self.batch, self.heads, self.blocks, self.block, -1).permute(2, 0, 1, 3, 4)

    def rows_of(self, x: Tensor, rows: slice, first_block: int) -> Tensor:
        """Rows of (B, H, T, F) as block-major blocks from ``first_block`` (zero-padded)."""
        part = x[:, :, rows]
        count = -(-(rows.stop - rows.start) // self.block)
        part = F.pad(part, (0, 0, 0, count * self.block - part.shape[-2]))
        part = part.view(self.batch, self.heads, count, self.block, -1)
        return part.permute(2, 0, 1, 3, 4).contiguous()

    def rows_back(self, x: Tensor) -> Tensor:
        """Block-major rows (blocks, B, H, block, F) -> (B, H, T, F)."""
        x = x.permute(1, 2, 0, 3, 4).reshape(self.batch, self.heads, self.padded, -1)
        return x[:, :, : self.length]

    def keys_back(self, x: Tensor) -> Tensor:
        """Block-major keys -> (B, H, T, F), undoing the padding and the reversal."""
        x = x.permute(1, 2, 0, 3, 4)
        if self.behind:
            x = x.flip(-2)
        x = x.reshape(self.batch, self.heads, self.padded, -1)
        return x[:, :, : self.length]

    def groups(self, tile: int) -> list[tuple[int, int]]:
        """Ranges of query blocks processed together in a tile (bounds the working memory).

        Only blocks whose tile has keys: u >= tile behind, u < blocks - tile ahead.
        """
        start, stop = (tile, self.blocks) if self.behind else (0, self.blocks - tile)
        return [(u, min(u + self.group, stop)) for u in range(start, stop, self.group)]

    def key_slice(self, tile: int, first: int, last: int) -> slice:
        """Key blocks of a tile for query blocks [first, last)."""
        shift = -tile if self.behind else tile
        return slice(first + shift, last + shift)

    def scores(self, tile: int, final: bool, first: int, last: int) -> Tensor:
        """Scores of a tile for query blocks [first, last): (G, B, H, block, block), masked."""
        keys = self.key_slice(tile, first, last)
        scores = self.q[first:last] @ self.k[keys].transpose(-1, -2)
        # Only the last key block can hold keys past the end of the sequence.
        ragged = keys.stop == self.blocks and self.padded > self.length
        if tile == 0 or final or ragged or self.has_padding:
            allowed = self.valid[keys]  # (G, B, 1, 1, block)
            if tile == 0:
                allowed = allowed & self.first_tile
            elif final:
                allowed = allowed & ~self.first_tile
            scores.masked_fill_(~allowed, float("-inf"))
        return scores

    def interpolate(
        self, scores: Tensor, carry: Tensor, first: int, last: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gates, floor rows, fractions, z[floor], dz[floor] and the outgoing gate sums."""
        gates = torch.sigmoid(scores)
        # cumsum, not a matmul: CPU matmuls sum 32 gates with errors up to ~1e-5 (measured),
        # which moves interpolated logits by more than float32 rounding.
        positions = gates.cumsum(-1).add_(carry.unsqueeze(-1))
        new_carry = positions[..., -1].clone()
        positions.clamp_(max=self.npos - 1)
        floor = positions.long()  # positions are >= 0: truncation is floor
        fraction = positions.sub_(floor)  # interpolation weight of the upper row (Eq. 5)
        gathered = torch.view_as_real(self.z[first:last].gather(-1, floor))
        z_floor, dz_floor = gathered[..., 0], gathered[..., 1]
        return gates, floor, fraction, z_floor, dz_floor, new_carry


def _band_forward(
    band: _Band,
) -> tuple[Tensor, Tensor, list[Tensor], int]:
    """Walk the band's tiles: (output, lse) of the band (B,H,T,*), carries, full tiles."""
    block = band.block
    shape = (band.blocks, band.batch, band.heads, block)
    running_max = band.q.new_full(shape, float("-inf"))
    running_sum = band.q.new_zeros(shape)
    accumulator = band.q.new_zeros(*shape, band.dim)
    carry = band.q.new_zeros(shape)
    carries: list[Tensor] = []
    full_tiles = 0
    final = False
    while True:
        tile = full_tiles
        carries.append(carry.clone())
        for first, last in band.groups(tile):
            scores = band.scores(tile, final, first, last)
            _, _, fraction, z_floor, dz_floor, new_carry = band.interpolate(
                scores, carry[first:last], first, last
            )
            carry[first:last] = new_carry
            logits = scores.add_(z_floor).addcmul_(fraction, dz_floor)
            old_max = running_max[first:last]
            new_max = torch.maximum(old_max, logits.amax(-1))
            safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)
            weights = logits.sub_(safe_max.unsqueeze(-1)).exp_()
            rescale = old_max.sub_(safe_max).exp_()
            running_sum[first:last].mul_(rescale).add_(weights.sum(-1))
            accumulator[first:last].mul_(rescale.unsqueeze(-1)).flatten(0, 2).baddbmm_(
                weights.flatten(0, 2), band.v[band.key_slice(tile, first, last)].flatten(0, 2)
            )
            running_max[first:last] = new_max
        if final:
            break
        full_tiles += 1
        # Query blocks whose next tile still holds real keys: the last ones behind, the first
        # ones ahead.
        open_blocks = band.blocks - full_tiles
        if open_blocks <= 0:
            break  # the band already covers every key
        still_open = carry[full_tiles:] if band.behind else carry[:open_blocks]
        # Once all of them have passed the cap, one final tile evens the band out to the
        # distances [strict, strict + full_tiles * block) and the rest is the far region.
        final = bool((still_open >= band.npos - 1).all())
    running_sum = band.rows_back(running_sum.unsqueeze(-1)).squeeze(-1)
    running_max = band.rows_back(running_max.unsqueeze(-1)).squeeze(-1)
    accumulator = band.rows_back(accumulator)
    empty = running_sum == 0
    lse = torch.where(empty, float("-inf"), running_max + running_sum.clamp_min(1e-30).log())
    out = accumulator / running_sum.clamp_min(1e-30).unsqueeze(-1)
    return out, lse, carries, full_tiles


FAR_ROWS = 512  # query rows per chunk of the portable far-region attention


def _use_flash_kernel(q: Tensor) -> bool:
    """PyTorch's flash kernel that returns the log-sum-exp exists for CPU tensors only."""
    return q.device.type == "cpu"


def _chunked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Portable causal attention with its log-sum-exp, in row chunks (memory FAR_ROWS x T)."""
    rows = q.shape[-2]
    outs, lses = [], []
    for start in range(0, rows, FAR_ROWS):
        stop = min(start + FAR_ROWS, rows)
        scores = q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2) * scale
        scores = scores + _causal_bias(start, stop, mask, scores)
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
        outs.append(probs @ v[:, :, :stop])
        lses.append(lse)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def _causal_bias(start: int, stop: int, mask: Tensor | None, like: Tensor) -> Tensor:
    """Additive bias of rows [start, stop) over keys [0, stop): causal, plus key padding."""
    rows = torch.arange(start, stop, device=like.device)[:, None]
    keys = torch.arange(stop, device=like.device)[None, :]
    bias = torch.zeros(stop - start, stop, dtype=like.dtype, device=like.device)
    bias = bias.masked_fill(keys > rows, float("-inf"))
    if mask is not None:
        bias = bias + mask[..., :stop]
    return bias


def _chunked_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    mask: Tensor | None, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`_chunked_attention` given the (merged) output and log-sum-exp."""
    rows = q.shape[-2]
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (grad_out * out).sum(-1, keepdim=True)
    for start in range(0, rows, FAR_ROWS):
        stop = min(start + FAR_ROWS, rows)
        scores = q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2) * scale
        scores = scores + _causal_bias(start, stop, mask, scores)
        probs = torch.exp(scores - lse[:, :, start:stop, None])
        grad_rows = grad_out[:, :, start:stop]
        grad_scores = probs * (
            grad_rows @ v[:, :, :stop].transpose(-1, -2) - delta[:, :, start:stop]
        )
        grad_q[:, :, start:stop] = grad_scores @ k[:, :, :stop] * scale
        grad_k[:, :, :stop] += grad_scores.transpose(-1, -2) @ q[:, :, start:stop] * scale
        grad_v[:, :, :stop] += probs.transpose(-1, -2) @ grad_rows
    return grad_q, grad_k, grad_v


def _far_mask(key_valid: Tensor | None, keys: int, dtype: torch.dtype) -> Tensor | None:
    """Additive key-padding mask for the flash kernel, (B, 1, 1, keys)."""
    if key_valid is None:
        return None
    mask = torch.zeros(key_valid.shape[0], 1, 1, keys, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~key_valid[:, None, None, :keys], float("-inf"))


def _far_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    bias: Tensor,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Far region in its frame: row i sees keys j <= i - offset, all at the capped position.

    Returns (output, lse including the bias, bias) of rows offset..T-1, or None if empty.
    """
    length = q.shape[-2]
    if offset >= length:
        return None
    keys = length - offset
    mask = _far_mask(key_valid, keys, q.dtype)
    if _use_flash_kernel(q):
        out, lse = _flash_forward(
            q[:, :, offset:], k[:, :, :keys], v[:, :, :keys], 0.0, True, attn_mask=mask, scale=scale
        )
    else:
        out, lse = _chunked_attention(q[:, :, offset:], k[:, :, :keys], v[:, :, :keys], mask, scale)
    if key_valid is not None:
        # The kernel reports lse 0 for rows with no visible key; they have none (-inf).
        seen = key_valid[:, :keys].cumsum(-1)[:, None, :] > 0
        lse = lse.masked_fill(~seen, float("-inf"))
    bias = bias[:, :, offset:]
    return out, lse + bias, bias


def _far_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    grad_out: Tensor,
    out: Tensor,
    lse: Tensor,
    delta: Tensor,
    far: tuple[Tensor, Tensor, Tensor],
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Far-region gradients (in its frame) from the flash kernel, and of its per-row bias."""
    keys = q.shape[-2] - offset
    far_out, far_lse, bias = far
    rows = slice(offset, None)
    # The kernel's probabilities exp(s - lse') must be exp(s + bias - LSE): lse' = LSE - bias.
    kernel_lse = (lse[:, :, rows] - bias).contiguous()
    grad_rows = grad_out[:, :, rows].contiguous()
    mask = _far_mask(key_valid, keys, q.dtype)
    far_inputs = (grad_rows, q[:, :, rows], k[:, :, :keys], v[:, :, :keys])
    if _use_flash_kernel(q):
        dq, dk, dv = _flash_backward(
            *far_inputs, out[:, :, rows].contiguous(), kernel_lse, 0.0, True,
            attn_mask=mask, scale=scale,
        )  # fmt: skip
    else:
        dq, dk, dv = _chunked_attention_backward(
            *far_inputs, out[:, :, rows], kernel_lse, mask, scale
        )
    # dL/dbias_i = sum_far P_ij (dP_ij - Delta_i) = mass_i (dO_i . o_far_i - Delta_i).
    mass = torch.exp(far_lse - lse[:, :, rows])
    dbias = mass * ((grad_rows * far_out).sum(-1) - delta[:, :, rows])
    return dq, dk, dv, dbias


def _add_rows(target: Tensor, block_major: Tensor, first_block: int, reverse: bool = False) -> None:
    """target (B, H, T, F)[rows of blocks first_block..] += block-major (G, B, H, block, F).

    ``reverse`` undoes the key reversal inside blocks. Temporaries are one group's size.
    """
    count, batch, heads, block, features = block_major.shape
    if reverse:
        block_major = block_major.flip(-2)
    start = first_block * block
    stop = min(start + count * block, target.shape[-2])
    rows = block_major.permute(1, 2, 0, 3, 4).reshape(batch, heads, count * block, features)
    target[:, :, start:stop] += rows[:, :, : stop - start]


def _band_backward(
    band: _Band,
    grad_out: Tensor,
    lse: Tensor,
    delta: Tensor,
    state: _DirectionState,
    grads: tuple[Tensor, Tensor, Tensor, Tensor],
    scale: float,
) -> None:
    """Add the band's gradients into ``grads`` = (dL/dq, dL/dk, dL/dv, dL/dz_dir), (B, H, T, *).

    Query blocks are taken group by group, and each group walks its tiles from the farthest to
    the nearest (the order dL/dp's carried sum needs), so that the query-side accumulators are
    one group's size; key-side gradients accumulate block-major and are added back at the end.
    """
    grad_q, grad_k, grad_v, grad_z = grads
    # Key-side gradients straight into dL/dk, dL/dv when whole blocks tile the sequence (a
    # block-major view of them); otherwise into padded block-major accumulators.
    direct = band.padded == band.length
    if direct:
        grad_k_b, grad_v_b = (band.block_view(x) for x in (grad_k, grad_v))
    else:
        grad_k_b, grad_v_b = torch.zeros_like(band.k), torch.zeros_like(band.v)
    for group_first, group_last in band.groups(0):
        rows = slice(group_first * band.block, group_last * band.block)
        grad_out_b = band.rows_of(grad_out, rows, group_first)
        lse_b = band.rows_of(lse.unsqueeze(-1), rows, group_first).squeeze(-1)
        delta_b = band.rows_of(delta.unsqueeze(-1), rows, group_first).squeeze(-1)
        grad_q_g = torch.zeros_like(band.q[group_first:group_last])
        # dL/dz accumulates as complex numbers: real dL/dc at z[floor]; imaginary w dL/dc,
        # which belongs to z[floor + 1] and is taken off z[floor] (c = z[floor] + w dz[floor]).
        grad_z_g = torch.zeros_like(band.z[group_first:group_last])
        carry_dp = torch.zeros_like(delta_b)  # sum of dL/dp over the farther tiles
        for tile in reversed(range(len(state.carries))):
            final = tile == state.tiles  # the extra tile that evens the band out
            # Blocks of this group whose tile holds keys (see _Band.groups).
            if band.behind:
                first, last = max(group_first, tile), group_last
            else:
                first, last = group_first, min(group_last, band.blocks - tile)
            if first >= last:
                continue
            local = slice(first - group_first, last - group_first)
            keys = band.key_slice(tile, first, last)
            scores = band.scores(tile, final, first, last)
            gates, floor, fraction, z_floor, dz_floor, _ = band.interpolate(
                scores, state.carries[tile][first:last], first, last
            )
            logits = scores.add(z_floor).addcmul_(fraction, dz_floor)
            probs = logits.sub_(lse_b[local].unsqueeze(-1)).exp_()
            grad_out_g = grad_out_b[local]
            grad_probs = grad_out_g @ band.v[keys].transpose(-1, -2)
            grad_logits = grad_probs.sub_(delta_b[local].unsqueeze(-1)).mul_(probs)
            # dL/dz through the logit c = z[floor] (1 - w) + z[floor + 1] w  (Eq. 5).
            upper = torch.complex(grad_logits, grad_logits * fraction)
            grad_z_g[local].scatter_add_(-1, floor, upper)
            del upper, fraction, floor
            # dL/dp through the slope dz[floor] (0 at the cap). The reference's slope is also 0
            # at integer p below the cap; that only happens when the gates between key and
            # query are exactly 0 or 1, whose sigmoid derivative g (1 - g) is 0, so dL/dg agrees.
            grad_pos = dz_floor.mul_(grad_logits)
            # dL/dg_ik = sum over keys at k or beyond of dL/dp_ij (this tile and farther ones).
            grad_gates = (grad_pos @ band.suffix).add_(carry_dp[local].unsqueeze(-1))
            carry_dp[local] = grad_gates[..., 0]
            sigmoid_slope = torch.addcmul(gates, gates, gates, value=-1)  # g (1 - g)
            grad_scores = grad_gates.mul_(sigmoid_slope).add_(grad_logits)
            del grad_pos, sigmoid_slope, gates, grad_logits
            grad_q_g[local] += grad_scores @ band.k[keys]
            grad_keys = grad_scores.transpose(-1, -2) @ band.q[first:last]
            grad_values = probs.transpose(-1, -2) @ grad_out_g
            if direct and band.behind:  # undo the key reversal inside blocks
                grad_keys, grad_values = grad_keys.flip(-2), grad_values.flip(-2)
            grad_k_b[keys] += grad_keys
            grad_v_b[keys] += grad_values
        _add_rows(grad_q, grad_q_g.mul_(scale), group_first)
        _add_rows(grad_z, _table_gradient(grad_z_g), group_first)
    if not direct:
        for first, last in band.groups(0):
            _add_rows(grad_k, grad_k_b[first:last], first, reverse=band.behind)
            _add_rows(grad_v, grad_v_b[first:last], first, reverse=band.behind)


def _table_gradient(grad_z: Tensor) -> Tensor:
    """Complex accumulator (real: dL/dc at floor, imag: w dL/dc) -> dL/dz per table row."""
    real, imag = grad_z.real, grad_z.imag
    return real - imag + F.pad(imag[..., :-1], (1, 0))


def _far_frame(behind: bool, *tensors: Tensor | None) -> list[Tensor | None]:
    """Tensors in the far region's frame: as they are behind, reversed in time ahead."""
    if behind:
        return list(tensors)
    return [None if x is None else x.flip(-1 if x.dim() <= 3 else -2) for x in tensors]


class BlockwiseCoPE(torch.autograd.Function):
    """Autograd function: band + far-region forward, recomputing backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        table: Tensor,
        key_padding_mask: Tensor | None,
        causal: bool,
        block: int,
    ) -> Tensor:
        npos = npos_of_table(table, causal)
        scale = 1.0 / math.sqrt(q.shape[-1])
        key_valid = None if key_padding_mask is None else ~key_padding_mask
        z = position_logits(q, table)
        qs = q * scale
        partials: list[tuple[Tensor, Tensor]] = []
        states: list[_DirectionState] = []
        for behind, z_dir in directions(z, npos, causal):
            band = _Band(qs, k, v, z_dir, key_valid, behind=behind, npos=npos, block=block)
            band_out, band_lse, carries, tiles = _band_forward(band)
            del band
            partials.append((band_out, band_lse))
            offset = tiles * block + int(not behind)
            q_f, k_f, v_f, valid_f, bias_f = _far_frame(
                behind, q, k, v, key_valid, z_dir[..., npos - 1]
            )
            far = _far_forward(q_f, k_f, v_f, valid_f, bias_f, offset, scale)
            if far is not None:
                out = F.pad(far[0], (0, 0, offset, 0))
                lse = F.pad(far[1], (offset, 0), value=float("-inf"))
                if not behind:
                    out, lse = out.flip(-2), lse.flip(-1)
                partials.append((out, lse))
            states.append(_DirectionState(behind, tiles, carries, far))
        out, lse = merge_partials(partials)
        ctx.save_for_backward(q, k, v, table, z, out, lse, key_valid)
        ctx.states, ctx.causal, ctx.block = states, causal, block
        ctx.has_mask = key_padding_mask is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # Float32 (or float64) throughout, also when backward is called under autocast.
        with torch.autocast(grad_out.device.type, enabled=False):
            return BlockwiseCoPE._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):  # type: ignore[no-untyped-def]
        q, k, v, table, z, out, lse, key_valid = ctx.saved_tensors
        if not ctx.has_mask:
            key_valid = None
        npos = npos_of_table(table, ctx.causal)
        length = q.shape[-2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # Delta_i = dO_i . O_i
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        grad_z = torch.zeros_like(z)
        # Rows with no visible key: exp(s - inf) = 0 keeps their (zero) gradients finite.
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf"))
        walks = zip(ctx.states, directions(z, npos, ctx.causal), strict=True)
        for state, (behind, z_dir) in walks:
            # dL/dz of this direction's rows of the table: a view of grad_z, except for the
            # rightward half whose rows run backwards (accumulated apart, added at the end).
            if ctx.causal:
                grad_z_dir = grad_z
            elif behind:
                grad_z_dir = grad_z[..., npos - 1 :]
            else:
                grad_z_dir = torch.zeros_like(z_dir)
            # The far region first, so its temporaries are gone before the band's exist.
            if state.far is not None:
                offset = state.tiles * ctx.block + state.strict
                keys = length - offset
                far_args = _far_frame(behind, q, k, v, key_valid, grad_out, out, lse_safe, delta)
                far_grads = _far_backward(*far_args, state.far, offset, scale)
                del far_args
                if not behind:  # the far frame was reversed
                    far_grads = tuple(x.flip(-2 if x.dim() == 4 else -1) for x in far_grads)
                dq_far, dk_far, dv_far, dbias = far_grads
                del far_grads
                rows, key_rows = (
                    (slice(offset, None), slice(None, keys))
                    if behind
                    else (slice(None, keys), slice(offset, None))
                )
                grad_q[:, :, rows] += dq_far
                grad_k[:, :, key_rows] += dk_far
                grad_v[:, :, key_rows] += dv_far
                grad_z_dir[:, :, rows, npos - 1] += dbias
                del dq_far, dk_far, dv_far, dbias
            band = _Band(
                q * scale, k, v, z_dir, key_valid, behind=behind, npos=npos, block=ctx.block
            )
            grads = (grad_q, grad_k, grad_v, grad_z_dir)
            _band_backward(band, grad_out, lse_safe, delta, state, grads, scale)
            del band
            if not ctx.causal and not behind:
                grad_z[..., :npos] += grad_z_dir.flip(-1)
        if table.dim() == 2:
            grad_q += grad_z @ table
            grad_table = torch.einsum("bhtn,bhtd->nd", grad_z, q)
        else:
            grad_q += torch.einsum("bhtn,hnd->bhtd", grad_z, table)
            grad_table = torch.einsum("bhtn,bhtd->hnd", grad_z, q)
        return grad_q, grad_k, grad_v, grad_table, None, None, None


def blockwise_cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    block: int | None = None,
) -> Tensor:
    """Memory-linear CoPE attention, equal to the reference; (B, H, T, D) in v's dtype.

    Arguments as :func:`encoders.cope.cope_attention`; ``block`` is the band's tile size (a
    speed/memory trade-off that does not change results; by default chosen from T).
    """
    if block is None:
        block = SHORT_BLOCK if q.shape[-2] <= SHORT_LENGTH else LONG_BLOCK
    dtype = compute_dtype(q, k, v, pos_emb)
    # Under autocast the band's matmuls would run in bf16/fp16: CoPE keeps gates in float32.
    with torch.autocast(q.device.type, enabled=False):
        out = BlockwiseCoPE.apply(
            q.to(dtype).contiguous(),
            k.to(dtype).contiguous(),
            v.to(dtype).contiguous(),
            pos_emb.to(dtype),
            key_padding_mask,
            causal,
            block,
        )
    return out.to(v.dtype)
