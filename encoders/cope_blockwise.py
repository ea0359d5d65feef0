"""Memory-linear CoPE attention in PyTorch: a band of near keys per row, then one fused call.

The maths is the reference's (:mod:`encoders.cope`); only the order of work differs.

Why a band. For a query i, the contextual position p_ij = sum_{k=j..i} g_ik grows as the key j
moves away from the query, and it is capped at npos - 1. Once a row's running gate sum has
passed the cap, every key further away sees the same capped position, i.e. the same bias
z_i[npos-1]: those keys are ordinary attention with one per-row bias (DESIGN.md §2). So each
direction of attention is split into

- a *band*: the keys at distances [strict, strict + S) from the query, computed in chunks of
  ``chunk`` distances for all query blocks at once (batched, so Python overhead does not grow
  with the number of blocks), carrying each row's gate sum from chunk to chunk and merging
  chunks with an online softmax. S is the smallest multiple of ``chunk`` after which every row
  has passed the cap (or run out of keys); it is decided per call, per row *set*, not per block.
- a *far region*: every key beyond the band, one fused flash-attention call (PyTorch's CPU
  flash kernel, which also returns the log-sum-exp) with the bias z_i[npos-1] added to its
  log-sum-exp afterwards.

Both parts return (normalised output, log-sum-exp) partials that are merged exactly.

Frames. The band is computed in a "look-ahead" frame where a row's keys lie to its right, at
distances 0, 1, 2, ...: then the positions of a chunk are a plain cumulative sum along the
band. Causal attention (keys left of the query) is the look-ahead problem of the reversed
sequence; the rightward half of bidirectional CoPE (p_ij = -sum_{k=i+1..j} g_ik) is the
look-ahead problem of the sequence as it is, with the diagonal excluded (``strict``) and the
table read from row npos-1 downwards. The far region is computed in the opposite frame, where
it is plain causal attention shifted by the band width.

Backward recomputes every band chunk instead of storing it (only each chunk's incoming gate sums,
(B, H, T) each, are kept), walking chunks from the farthest to the nearest while carrying the
sum of dL/dp of the farther keys: dL/dg_ik = sum_{j beyond or at k} dL/dp_ij. The far region's
gradients come from the flash kernel's backward given the merged output and log-sum-exp; its
bias gradient is mass * (dO . o_far - Delta) per row.

Peak memory is O(T * (chunk + block) * groups) plus the flash kernel's own: linear in T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.cope import compute_dtype, npos_of_table

DEFAULT_BLOCK = 32  # rows and keys per band tile: the unit of the batched band matmuls
# Band elements (B * H * rows * block) processed at once: bounds the band's working memory
# (about a dozen tensors of this size are alive inside a step) independently of T.
GROUP_ELEMENTS = 1 << 18

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass
class _DirectionState:
    """What the forward keeps of one direction for the backward."""

    flipped: bool  # the band frame is the reversed sequence (the causal, leftward half)
    strict: bool  # the diagonal key belongs to the other direction
    tiles: int  # full band tiles walked; the band is distances [strict, strict + tiles*block)
    carries: list[Tensor]  # gate sum entering each tile (incl. the final one), band frame
    far_out: Tensor | None  # normalised far-region output, far frame rows F..T-1
    far_lse: Tensor | None  # its log-sum-exp including the bias, (B, H, T - F)
    far_bias: Tensor | None  # the bias z_i[npos-1] of those rows, (B, H, T - F)


def _flip(x: Tensor | None, dim: int = -2) -> Tensor | None:
    return None if x is None else x.flip(dim)


def _merge(partials: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge (normalised output (B,H,T,D), log-sum-exp (B,H,T)) partials of one softmax."""
    lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in partials]), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros_like(partials[0][0])
    for p_out, p_lse in partials:
        out += torch.exp(p_lse - safe).unsqueeze(-1) * p_out
    return out, lse


class _Band:
    """Tile geometry of one direction's band, in the look-ahead frame.

    Rows are cut into blocks of ``block``; tile c pairs query block u with key block u + c, for
    all u at once (one batched matmul, no skewing). Tile 0 holds the keys at and right of the
    diagonal (``m >= r + strict`` for row r, key m of the tile); after n full tiles a final
    tile holds ``m < r + strict``, so that every row's band is exactly the distances
    [strict, strict + n * block): a uniform cut, and the far region is one shifted causal call.
    """

    def __init__(
        self,
        qs: Tensor,
        k: Tensor,
        v: Tensor,
        z: Tensor,
        key_valid: Tensor | None,
        *,
        strict: bool,
        npos: int,
        block: int,
    ) -> None:
        batch, heads, length, dim = qs.shape
        self.batch, self.heads, self.length, self.dim = batch, heads, length, dim
        self.strict, self.npos, self.block = int(strict), npos, block
        self.blocks = -(-length // block)
        self.padded = self.blocks * block  # Tp: rows padded to whole blocks
        key_blocks = 2 * self.blocks + 1  # tiles reach at most blocks + 1 past a query block
        self.q = F.pad(qs, (0, 0, 0, self.padded - length)).view(
            batch, heads, self.blocks, block, dim
        )
        key_rows = key_blocks * block
        self.k = F.pad(k, (0, 0, 0, key_rows - length)).view(batch, heads, key_blocks, block, dim)
        self.v = F.pad(v, (0, 0, 0, key_rows - length)).view(batch, heads, key_blocks, block, dim)
        valid = torch.zeros(batch, key_rows, dtype=torch.bool, device=qs.device)
        valid[:, :length] = True if key_valid is None else key_valid
        self.valid = valid.view(batch, 1, key_blocks, 1, block)
        self.has_padding = key_valid is not None
        z = F.pad(z, (0, 0, 0, self.padded - length))
        # Difference table dz[n] = z[n+1] - z[n] (0 at the cap): interpolation is one gather.
        dz = F.pad(z[..., 1:] - z[..., :-1], (0, 1))
        self.z = z.view(batch, heads, self.blocks, block, npos)
        self.dz = dz.view(batch, heads, self.blocks, block, npos)
        rows = torch.arange(block, device=qs.device)
        # Tile 0 keeps keys at or past the diagonal; the final tile keeps the complement.
        self.first_tile = rows[None, :] >= rows[:, None] + self.strict  # (row, key)
        per_block = batch * heads * block * block
        self.group = max(1, GROUP_ELEMENTS // per_block)

    def groups(self) -> list[tuple[int, int]]:
        """Ranges of query blocks processed together (bounds the working memory)."""
        return [(u, min(u + self.group, self.blocks)) for u in range(0, self.blocks, self.group)]

    def scores(self, tile: int, final: bool, first: int, last: int) -> Tensor:
        """Scores of a tile for query blocks [first, last): (B, H, G, block, block), masked."""
        keys = self.k[:, :, first + tile : last + tile]
        scores = self.q[:, :, first:last] @ keys.transpose(-1, -2)
        past_end = (last + tile) * self.block > self.length
        if tile == 0 or final or past_end or self.has_padding:
            allowed = self.valid[:, :, first + tile : last + tile]  # (B, 1, G, 1, block)
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
        positions = gates.cumsum(-1).add_(carry.unsqueeze(-1))
        new_carry = positions[..., -1].clone()
        positions.clamp_(max=self.npos - 1)
        floor = positions.long()  # positions are >= 0: truncation is floor
        fraction = positions.sub_(floor)  # interpolation weight of the upper row (Eq. 5)
        z_floor = self.z[:, :, first:last].gather(-1, floor)
        dz_floor = self.dz[:, :, first:last].gather(-1, floor)
        return gates, floor, fraction, z_floor, dz_floor, new_carry


def _direction_forward(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    z: Tensor,
    key_valid: Tensor | None,
    far: tuple[Tensor, Tensor, Tensor, Tensor | None],
    *,
    strict: bool,
    npos: int,
    block: int,
    scale: float,
) -> tuple[Tensor, Tensor, list[Tensor], int, tuple[Tensor, Tensor, Tensor] | None]:
    """One direction: band (output, lse) in the band frame, carries, tiles, far partial."""
    band = _Band(qs, k, v, z, key_valid, strict=strict, npos=npos, block=block)
    batch, heads, length, dim = qs.shape
    rows = band.padded
    shape = (batch, heads, band.blocks, block)
    running_max = qs.new_full(shape, float("-inf"))
    running_sum = qs.new_zeros(shape)
    accumulator = qs.new_zeros(*shape, dim)
    carry = qs.new_zeros(shape)
    carries: list[Tensor] = []
    full_tiles = 0
    final = False
    while True:
        tile = full_tiles
        carries.append(carry.clone())
        for first, last in band.groups():
            scores = band.scores(tile, final, first, last)
            _, _, fraction, z_floor, dz_floor, new_carry = band.interpolate(
                scores, carry[:, :, first:last], first, last
            )
            carry[:, :, first:last] = new_carry
            logits = scores.add_(z_floor.addcmul_(fraction, dz_floor))
            old_max = running_max[:, :, first:last]
            new_max = torch.maximum(old_max, logits.amax(-1))
            safe_max = new_max.masked_fill(torch.isinf(new_max), 0.0)
            weights = logits.sub_(safe_max.unsqueeze(-1)).exp_()
            rescale = torch.exp(old_max - safe_max)
            running_sum[:, :, first:last] = running_sum[:, :, first:last] * rescale + weights.sum(
                -1
            )
            accumulator[:, :, first:last] = torch.baddbmm(
                (accumulator[:, :, first:last] * rescale.unsqueeze(-1)).flatten(0, 2),
                weights.flatten(0, 2),
                band.v[:, :, first + tile : last + tile].flatten(0, 2),
            ).view(batch, heads, last - first, block, dim)
            running_max[:, :, first:last] = new_max
        if final:
            break
        full_tiles += 1
        # Query blocks whose next tile still holds real keys.
        open_blocks = -(-(length - full_tiles * block) // block)
        if open_blocks <= 0:
            break  # the band already covers every key
        # Once all of them have passed the cap, one final tile evens the band out to the
        # distances [strict, strict + full_tiles * block) and the rest is the far region.
        final = bool((carry[:, :, :open_blocks] >= npos - 1).all())
    running_max = running_max.view(batch, heads, rows)[:, :, :length]
    running_sum = running_sum.view(batch, heads, rows)[:, :, :length]
    accumulator = accumulator.view(batch, heads, rows, dim)[:, :, :length]
    empty = running_sum == 0
    band_lse = torch.where(empty, float("-inf"), running_max + running_sum.clamp_min(1e-30).log())
    band_out = accumulator / running_sum.clamp_min(1e-30).unsqueeze(-1)
    offset = full_tiles * block + int(strict)
    far_part = _far_forward(far, z, offset, npos=npos, scale=scale)
    return band_out, band_lse, carries, full_tiles, far_part


def _far_mask(key_valid: Tensor | None, keys: int, dtype: torch.dtype) -> Tensor | None:
    """Additive key-padding mask for the flash kernel, (B, 1, 1, keys)."""
    if key_valid is None:
        return None
    mask = torch.zeros(key_valid.shape[0], 1, 1, keys, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~key_valid[:, None, None, :keys], float("-inf"))


def _far_forward(
    far: tuple[Tensor, Tensor, Tensor, Tensor | None],
    z_band: Tensor,
    offset: int,
    *,
    npos: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Keys beyond the band: (output, lse with bias, bias) of far-frame rows offset..T-1."""
    q_far, k_far, v_far, valid_far = far
    length = q_far.shape[-2]
    if offset >= length:
        return None
    keys = length - offset
    mask = _far_mask(valid_far, keys, q_far.dtype)
    out, lse = _flash_forward(
        q_far[:, :, offset:], k_far[:, :, :keys], v_far[:, :, :keys], 0.0, True,
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    if valid_far is not None:
        # The kernel reports lse 0 for rows with no visible key; they have none (-inf).
        seen = valid_far[:, :keys].cumsum(-1)[:, None, :] > 0
        lse = lse.masked_fill(~seen, float("-inf"))
    # Far keys all sit at the capped position: one bias per row, z_i[npos-1].
    bias = z_band[..., npos - 1].flip(-1)[:, :, offset:]
    return out, lse + bias, bias


def _table_views(z: Tensor, npos: int, causal: bool) -> list[tuple[bool, Tensor]]:
    """Per direction: (strict, position logits indexed by |position|) in the original frame."""
    if causal:
        return [(False, z)]
    left = z[..., npos - 1 :]  # rows npos-1.. hold positions 0..npos-1
    right = z[..., :npos].flip(-1)  # rows npos-1..0 hold positions 0..-(npos-1)
    return [(False, left), (True, right)]


def _position_logits(q: Tensor, table: Tensor) -> Tensor:
    """z_i[n] = q_i . e[n]: (B, H, T, rows)."""
    if table.dim() == 2:
        return q @ table.transpose(0, 1)
    return torch.einsum("bhtd,hnd->bhtn", q, table)


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
        z = _position_logits(q, table)
        qs = q * scale
        partials: list[tuple[Tensor, Tensor]] = []
        states: list[_DirectionState] = []
        for strict, z_dir in _table_views(z, npos, causal):
            flipped = not strict  # leftward keys: look-ahead in the reversed sequence
            band_frame = (
                (_flip(qs), _flip(k), _flip(v), _flip(z_dir), _flip(key_valid, -1))
                if flipped
                else (qs, k, v, z_dir, key_valid)
            )
            far_frame = (
                (q, k, v, key_valid)
                if flipped
                else (_flip(q), _flip(k), _flip(v), _flip(key_valid, -1))
            )
            band_out, band_lse, carries, tiles, far_part = _direction_forward(
                *band_frame, far_frame, strict=strict, npos=npos, block=block, scale=scale
            )
            if flipped:
                band_out, band_lse = band_out.flip(-2), band_lse.flip(-1)
            partials.append((band_out, band_lse))
            far_out = far_lse = far_bias = None
            if far_part is not None:
                far_out, far_lse, far_bias = far_part
                offset = tiles * block + int(strict)
                out = F.pad(far_out, (0, 0, offset, 0))
                lse = F.pad(far_lse, (offset, 0), value=float("-inf"))
                if not flipped:
                    out, lse = out.flip(-2), lse.flip(-1)
                partials.append((out, lse))
            states.append(
                _DirectionState(flipped, strict, tiles, carries, far_out, far_lse, far_bias)
            )
        out, lse = _merge(partials)
        ctx.save_for_backward(q, k, v, table, z, out, lse, key_valid)
        ctx.states, ctx.causal, ctx.block = states, causal, block
        ctx.has_mask = key_padding_mask is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, table, z, out, lse, key_valid = ctx.saved_tensors
        if not ctx.has_mask:
            key_valid = None
        npos = npos_of_table(table, ctx.causal)
        block = ctx.block
        length = q.shape[-2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # Delta_i = dO_i . O_i
        qs = q * scale
        grad_qs = torch.zeros_like(q)
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        grad_z = torch.zeros_like(z)
        # Rows with no visible key: exp(s - inf) = 0 keeps their (zero) gradients finite.
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf"))
        for state, (strict, z_dir) in zip(
            ctx.states, _table_views(z, npos, ctx.causal), strict=True
        ):
            flip = state.flipped
            original = (qs, k, v, z_dir, grad_out, lse_safe, delta, key_valid)
            reversed_ = (
                qs.flip(-2), k.flip(-2), v.flip(-2), z_dir.flip(-2), grad_out.flip(-2),
                lse_safe.flip(-1), delta.flip(-1), _flip(key_valid, -1),
            )  # fmt: skip
            band_args = reversed_ if flip else original
            grad_z_dir, band_grads = _band_backward(*band_args, state, npos=npos, block=block)
            if flip:
                grad_z_dir = grad_z_dir.flip(-2)
                band_grads = tuple(x.flip(-2) for x in band_grads)
            grad_qs += band_grads[0]
            grad_k += band_grads[1]
            grad_v += band_grads[2]
            if state.far_out is not None:
                offset = state.tiles * block + int(strict)
                keys = length - offset
                far_args = (
                    (q, k, v, key_valid, grad_out, out, lse_safe, delta)
                    if flip
                    else (
                        q.flip(-2), k.flip(-2), v.flip(-2), _flip(key_valid, -1),
                        grad_out.flip(-2), out.flip(-2), lse_safe.flip(-1), delta.flip(-1),
                    )
                )  # fmt: skip
                dq_far, dk_far, dv_far, dbias = _far_backward(
                    *far_args, state, offset=offset, scale=scale
                )
                if flip:  # far frame = original
                    grad_q[:, :, offset:] += dq_far
                    grad_k[:, :, :keys] += dk_far
                    grad_v[:, :, :keys] += dv_far
                    grad_z_dir[:, :, offset:, npos - 1] += dbias
                else:  # far frame = reversed
                    grad_q[:, :, :keys] += dq_far.flip(-2)
                    grad_k[:, :, offset:] += dk_far.flip(-2)
                    grad_v[:, :, offset:] += dv_far.flip(-2)
                    grad_z_dir[:, :, :keys, npos - 1] += dbias.flip(-1)
            if ctx.causal:
                grad_z += grad_z_dir
            elif strict:
                grad_z[..., :npos] += grad_z_dir.flip(-1)
            else:
                grad_z[..., npos - 1 :] += grad_z_dir
        grad_q += grad_qs * scale
        if table.dim() == 2:
            grad_q += grad_z @ table
            grad_table = torch.einsum("bhtn,bhtd->nd", grad_z, q)
        else:
            grad_q += torch.einsum("bhtn,hnd->bhtd", grad_z, table)
            grad_table = torch.einsum("bhtn,bhtd->hnd", grad_z, q)
        return grad_q, grad_k, grad_v, grad_table, None, None, None


def _far_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    grad_out: Tensor,
    out: Tensor,
    lse: Tensor,
    delta: Tensor,
    state: _DirectionState,
    *,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Far-region gradients (far frame) from the flash kernel, and of its per-row bias."""
    keys = q.shape[-2] - offset
    mask = _far_mask(key_valid, keys, q.dtype)
    far_lse, bias = state.far_lse, state.far_bias
    rows = slice(offset, None)
    # The kernel's probabilities exp(s - lse') must be exp(s + bias - LSE): lse' = LSE - bias.
    kernel_lse = (lse[:, :, rows] - bias).contiguous()
    dq, dk, dv = _flash_backward(
        grad_out[:, :, rows].contiguous(), q[:, :, rows], k[:, :, :keys], v[:, :, :keys],
        out[:, :, rows].contiguous(), kernel_lse, 0.0, True, attn_mask=mask, scale=scale,
    )  # fmt: skip
    # dL/dbias_i = sum_far P_ij (dP_ij - Delta_i) = mass_i (dO_i . o_far_i - Delta_i).
    mass = torch.exp(far_lse - lse[:, :, rows])
    far_dot = (grad_out[:, :, rows] * state.far_out).sum(-1)
    dbias = mass * (far_dot - delta[:, :, rows])
    return dq, dk, dv, dbias


def _band_backward(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    z: Tensor,
    grad_out: Tensor,
    lse: Tensor,
    delta: Tensor,
    key_valid: Tensor | None,
    state: _DirectionState,
    *,
    npos: int,
    block: int,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Band gradients of one direction, all in its band frame.

    Returns dL/dz_dir (B, H, T, npos) and (dL/d(q*scale), dL/dk, dL/dv).
    """
    band = _Band(qs, k, v, z, key_valid, strict=state.strict, npos=npos, block=block)
    batch, heads, length, dim = qs.shape
    rows = band.padded
    shape = (batch, heads, band.blocks, block)
    grad_qs_b = qs.new_zeros(*shape, dim)
    grad_k_b = torch.zeros_like(band.k)
    grad_v_b = torch.zeros_like(band.v)
    grad_z_b = qs.new_zeros(*shape, npos + 1)
    grad_out_b = F.pad(grad_out, (0, 0, 0, rows - length)).view(*shape, dim)
    lse_b = F.pad(lse, (0, rows - length), value=float("inf")).view(shape)
    delta_b = F.pad(delta, (0, rows - length)).view(shape)
    carry_dp = qs.new_zeros(shape)  # sum of dL/dp over the farther tiles of each row
    tiles = len(state.carries)
    for tile in reversed(range(tiles)):
        final = tile == state.tiles  # the extra tile that evens the band out
        carry = state.carries[tile]
        for first, last in band.groups():
            scores = band.scores(tile, final, first, last)
            gates, floor, fraction, z_floor, dz_floor, _ = band.interpolate(
                scores, carry[:, :, first:last], first, last
            )
            logits = z_floor.addcmul_(fraction, dz_floor).add_(scores)
            probs = logits.sub_(lse_b[:, :, first:last].unsqueeze(-1)).exp_()
            grad_out_g = grad_out_b[:, :, first:last]
            keys = band.k[:, :, first + tile : last + tile]
            values = band.v[:, :, first + tile : last + tile]
            grad_probs = grad_out_g @ values.transpose(-1, -2)
            grad_logits = grad_probs.sub_(delta_b[:, :, first:last].unsqueeze(-1)).mul_(probs)
            # dL/dz: the logit c = z[floor] (1 - w) + z[floor + 1] w  (Eq. 5).
            upper = grad_logits * fraction
            grad_z_g = grad_z_b[:, :, first:last]
            grad_z_g.scatter_add_(-1, floor, grad_logits - upper)
            grad_z_g.scatter_add_(-1, floor + 1, upper)
            # dL/dp through the slope z[ceil p] - z[floor p]; 0 at integer p, as the reference.
            grad_pos = dz_floor.masked_fill_(fraction == 0, 0.0).mul_(grad_logits)
            cumulative = grad_pos.cumsum(-1)
            total = cumulative[..., -1:]
            carry_g = carry_dp[:, :, first:last]
            # dL/dg_ik = sum over keys at k or beyond of dL/dp_ij (this tile and farther ones).
            grad_gates = (grad_pos - cumulative).add_(total + carry_g.unsqueeze(-1))
            carry_dp[:, :, first:last] = carry_g + total.squeeze(-1)
            grad_scores = grad_gates.mul_(gates * (1 - gates)).add_(grad_logits)
            grad_qs_b[:, :, first:last] += grad_scores @ keys
            grad_k_b[:, :, first + tile : last + tile] += (
                grad_scores.transpose(-1, -2) @ band.q[:, :, first:last]
            )
            grad_v_b[:, :, first + tile : last + tile] += probs.transpose(-1, -2) @ grad_out_g
    grad_qs_b = grad_qs_b.view(batch, heads, rows, dim)[:, :, :length]
    grad_k_b = grad_k_b.flatten(2, 3)[:, :, :length]
    grad_v_b = grad_v_b.flatten(2, 3)[:, :, :length]
    grad_z_dir = grad_z_b.view(batch, heads, rows, npos + 1)[:, :, :length, :npos]
    return grad_z_dir, (grad_qs_b, grad_k_b, grad_v_b)


def blockwise_cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Memory-linear CoPE attention, equal to the reference; (B, H, T, D) in v's dtype.

    Arguments as :func:`encoders.cope.cope_attention`; ``block`` is the band's tile size (a
    speed/memory trade-off that does not change results).
    """
    dtype = compute_dtype(q, k, v, pos_emb)
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
