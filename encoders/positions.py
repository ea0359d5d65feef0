"""The position-encoding zoo behind one interface, and its registry.

Every encoding is one :class:`PositionEncoding` subclass plus one registry line. It says where it
acts through five hooks that :mod:`encoders.attention` and :mod:`encoders.transformer` call for
every encoding alike:

- ``input_encoding(spec)`` (class method): a model-level module added to the encoder's input
  (``abs``, ``sin``), built once per model; None for the others.
- ``shared_gate(spec)`` (class method): a model-level module that turns the encoder's input
  (or the frontend's cues) into gate logits (B, H, T) every layer's ``attend`` receives (CoPE's
  ``change`` and ``rise`` gates, :class:`ChangeGate`, :class:`RiseGate`); None for the others.
- ``rotate(q, k, coords)``: rotates queries and keys before the scores (``rope``).
- ``score_bias(coords, q)``: an additive bias on the scaled scores, (heads, T, T) or, when it
  depends on the queries, (B, heads, T, T) (``alibi``, ``t5``, ``rel``).
- ``replaces_kernel`` / ``attend(...)``: the encoding computes attention itself (``cope``,
  ``cope+rope``, which rotates inside its kernel: see :class:`ContextualRotaryPositions`).

An instance is built per attention layer and holds that layer's state (a CoPE table, the
relative table, the T5 bucket biases); model-level state (the learned absolute table) lives in
the input module.

Two relative baselines: ``rel`` is the CoPE paper's (a learned vector per clipped distance,
q_i . r[i-j], as in the authors' code), ``t5`` is T5's bucketed scalar bias per head. Runs saved
before ``t5`` existed called T5's biases ``rel``; :mod:`recipes.engine.rundir` reads them back as
``t5``.

Coordinates: ``coords`` is (T, n_axes) long, the position of each token along each axis (1-D
sequences: (T, 1) = arange). Only ``rope`` uses several axes (axial: the head dimension is split
evenly across the axes); ``alibi``, ``t5`` and ``rel`` use the single axis of 1-D coordinates and
the flat token index otherwise; ``abs`` and ``sin`` always use the flat token index.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.cope import (
    PER_KEY_GATES,
    CoPE,
    compute_dtype,
    cope_attention,
    cope_gates,
    onset_keys,
    reference_cope_attention,
    table_size,
)


@dataclass(frozen=True)
class PositionSpec:
    """What an encoding needs to know about the model it is built for."""

    dim: int
    heads: int
    causal: bool
    max_len: int
    npos: int  # CoPE position cap (its table has npos rows, 2*npos-1 when bidirectional)
    cope_per_head: bool = False
    cope_impl: str = "auto"
    cope_gate: str = "qk"  # CoPE gate: qk (paper), onset, token, change, rise (encoders.cope)
    # The authors' code divides CoPE's position logits by sqrt(head_dim) along with the scores
    # (its default; --cope-nodiv gives the paper's formula, our default False).
    cope_scale_logits: bool = False
    attn_dropout: float = 0.0  # dropout on attention weights (the authors' run script: 0.1)
    # Gate-sum regulariser (0 = off): while training, CoPE adds
    # weight * mean relu(sum_j g_ij - budget)^2 as an auxiliary loss (:func:`gate_budget_penalty`).
    cope_gate_budget: float = 0.0
    cope_gate_weight: float = 0.01
    cue_dim: int = 0  # the frontend's cues per token (the rise gate's input); 0: none

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class PositionEncoding(nn.Module):
    """Base class: one attention layer's position encoding; by itself it does nothing (NoPE)."""

    name: str = ""  # set by the registry decorator
    acts_on: str = "nothing"  # where it acts, for listings: input, q/k, scores, kernel
    replaces_kernel: bool = False

    def __init__(self, spec: PositionSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def input_encoding(cls, spec: PositionSpec) -> nn.Module | None:
        """A model-level module ``forward(x, coords) -> x`` applied to the input, or None."""
        return None

    @classmethod
    def shared_gate(cls, spec: PositionSpec) -> nn.Module | None:
        """A model-level module ``forward(x, signal_mask, cues, lag) -> gate logits (B, H, T)``
        (:class:`ChangeGate`'s arguments) whose output every layer's ``attend`` gets as
        ``gate_logits``, or None."""
        return None

    def rotate(self, q: Tensor, k: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, H, T, D) after any rotation; identity by default."""
        return q, k

    def score_bias(self, coords: Tensor, q: Tensor) -> Tensor | None:
        """An additive bias (H, T, T) or (B, H, T, T) on the scaled scores, or None.

        ``q`` (B, H, T, D): the layer's queries, for biases that depend on them (``rel``).
        """
        return None

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        record: bool,
        layer_input: Tensor | None = None,
        coords: Tensor | None = None,
        gate_logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Attention computed by the encoding: (output, weights if record, positions if record).

        ``layer_input`` (B, T, dim) is what the layer's q/k/v were projected from (for gates
        computed from the tokens themselves); ``coords`` (T, n_axes) the tokens' coordinates;
        ``gate_logits`` (B, H, T) the output of the model's :meth:`shared_gate` module, if any.
        """
        raise NotImplementedError(f"{type(self).__name__} does not replace the attention kernel")


POSITION_ENCODINGS: dict[str, type[PositionEncoding]] = {}


def register_position_encoding(name: str):
    """Class decorator: make an encoding resolvable by ``name`` (``--pe NAME``)."""

    def register(cls: type[PositionEncoding]) -> type[PositionEncoding]:
        POSITION_ENCODINGS[name] = cls
        cls.name = name
        return cls

    return register


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_position_encodings(pattern: str = "*") -> list[str]:
    """Registered encoding names matching a shell-style wildcard, naturally sorted."""
    names = [name for name in POSITION_ENCODINGS if fnmatch.fnmatch(name, pattern)]
    return sorted(names, key=_natural_key)


def get_position_encoding(name: str) -> type[PositionEncoding]:
    """The encoding class registered as ``name``; unknown names raise with the valid ones."""
    if name not in POSITION_ENCODINGS:
        raise ValueError(
            f"unknown position encoding {name!r}; choose one of: "
            f"{', '.join(list_position_encodings())}"
        )
    return POSITION_ENCODINGS[name]


def describe_position_encodings(pattern: str = "*") -> dict[str, tuple[str, str]]:
    """Name -> (where it acts, one-line summary) of the matching encodings, for listings."""
    return {
        name: (
            POSITION_ENCODINGS[name].acts_on,
            (POSITION_ENCODINGS[name].__doc__ or "").strip().splitlines()[0],
        )
        for name in list_position_encodings(pattern)
    }


def flat_positions(coords: Tensor) -> Tensor:
    """1-D positions (T,): the single axis of 1-D coordinates, else the flat token index."""
    if coords.shape[1] == 1:
        return coords[:, 0]
    return torch.arange(coords.shape[0], device=coords.device)


# --------------------------------------------------------------------------- input encodings


class LearnedAbsolute(nn.Module):
    """A learned vector per token index, added to the input (max_len + 1 rows: room for a CLS)."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len + 1, dim) * 0.02)

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        length = x.shape[1]
        if length > self.table.shape[0]:
            raise ValueError(
                f"sequence of {length} tokens is longer than the learned absolute table "
                f"({self.table.shape[0]} rows); raise model.max_len"
            )
        return x + self.table[:length].to(x.dtype)


def sinusoidal_table(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The Transformer's fixed sin/cos table (length, dim) (Vaswani et al. 2017, Sec. 3.5)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


class Sinusoidal(nn.Module):
    """The fixed sinusoidal table added to the input; works at any length."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, coords: Tensor | None = None) -> Tensor:
        return x + sinusoidal_table(x.shape[1], self.dim, x.device).to(x.dtype)


# --------------------------------------------------------------------------- rotary


def rotary_split(head_dim: int, axes: int) -> int:
    """Head dimensions rotated per axis (even); any remainder is left unrotated."""
    per_axis = 2 * (head_dim // (2 * axes))
    if per_axis == 0:
        raise ValueError(f"head dim {head_dim} is too small for axial RoPE over {axes} axes")
    return per_axis


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, coords: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate (B, H, T, D) by coordinates (T, n_axes): axis a rotates its own slice of D.

    RoPE (Su et al. 2021) with the GPT-NeoX half-split pairing, axial when n_axes > 1.
    """
    head_dim = x.shape[-1]
    axes = coords.shape[1]
    per_axis = rotary_split(head_dim, axes)
    dtype = compute_dtype(x)  # angles in float32 at least: bf16 angles lose whole turns
    frequency = base ** (
        -torch.arange(0, per_axis, 2, device=x.device, dtype=dtype) / per_axis
    )  # (per_axis / 2,)
    pieces = []
    for axis in range(axes):
        part = x[..., axis * per_axis : (axis + 1) * per_axis].to(dtype)
        angle = coords[:, axis, None].to(dtype) * frequency  # (T, per_axis / 2)
        angle = torch.cat((angle, angle), dim=-1)  # (T, per_axis)
        pieces.append(part * angle.cos() + _rotate_half(part) * angle.sin())
    pieces.append(x[..., axes * per_axis :].to(dtype))
    return torch.cat(pieces, dim=-1).to(x.dtype)


# --------------------------------------------------------------------------- the zoo


@register_position_encoding("nope")
class NoPositions(PositionEncoding):
    """No position information at all (a causal mask still leaks some)."""


@register_position_encoding("abs")
class AbsolutePositions(PositionEncoding):
    """Learned absolute positions added to the input (one table for the model)."""

    acts_on = "input"

    @classmethod
    def input_encoding(cls, spec: PositionSpec) -> nn.Module:
        return LearnedAbsolute(spec.max_len, spec.dim)


@register_position_encoding("sin")
class SinusoidalPositions(PositionEncoding):
    """Fixed sinusoidal positions added to the input."""

    acts_on = "input"

    @classmethod
    def input_encoding(cls, spec: PositionSpec) -> nn.Module:
        return Sinusoidal(spec.dim)


@register_position_encoding("rope")
class RotaryPositions(PositionEncoding):
    """RoPE on queries and keys; axial (head dim split across axes) for multi-axis coords."""

    acts_on = "q/k"

    def rotate(self, q: Tensor, k: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(q, coords), apply_rope(k, coords)


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from 2^(-8/heads)."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(power_of_two_slopes(heads))
    # The authors' recipe for other head counts: the closest power of two, then every other
    # slope of the next one.
    closest = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2]
    return torch.tensor(slopes[:heads])


@register_position_encoding("alibi")
class AlibiPositions(PositionEncoding):
    """ALiBi: a per-head linear penalty on distance (symmetric |i-j| when bidirectional)."""

    acts_on = "scores"

    def __init__(self, spec: PositionSpec) -> None:
        super().__init__(spec)
        self.register_buffer("slopes", alibi_slopes(spec.heads), persistent=False)

    def score_bias(self, coords: Tensor, q: Tensor) -> Tensor:
        positions = flat_positions(coords)
        distance = (positions[:, None] - positions[None, :]).float()  # i - j, (T, T)
        if not self.spec.causal:
            distance = distance.abs()
        return -self.slopes[:, None, None] * distance  # (heads, T, T)


def t5_relative_buckets(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's log-spaced bucket of each key-minus-query offset (Raffel et al. 2020, Mesh TF code)."""
    bucket = torch.zeros_like(relative_position)
    distance = -relative_position  # query - key: positive for keys in the past
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance < 0).long() * num_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)
    exact = num_buckets // 2
    is_small = distance < exact
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


@register_position_encoding("rel")
class RelativePositions(PositionEncoding):
    """The CoPE paper's relative baseline: q_i . r[i-j], a learned vector per clipped distance.

    As the authors' code (``RelPosEmb`` in facebookresearch/RAM projects/cope): one table of
    head_dim vectors shared by the heads, randn / sqrt(head_dim) init, and the logit added to
    q_i . k_j before the division by sqrt(head_dim). Distances are clipped at npos - 1 (the CoPE
    cap, so both encodings see the same range); bidirectionally the signed distance i - j has
    2*npos-1 rows. One difference, to keep every learned position state per layer like CoPE's:
    each layer has its own table (the authors' code shares one across layers).
    """

    acts_on = "scores"

    def __init__(self, spec: PositionSpec) -> None:
        super().__init__(spec)
        rows = table_size(spec.npos, spec.causal)
        self.table = nn.Parameter(torch.randn(rows, spec.head_dim) * spec.head_dim**-0.5)

    def score_bias(self, coords: Tensor, q: Tensor) -> Tensor:
        positions = flat_positions(coords)
        distance = positions[:, None] - positions[None, :]  # i - j, (T, T)
        cap = self.spec.npos - 1
        # Causal: future keys are masked anyway, so their (clamped) row does not matter.
        rows = distance.clamp(0, cap) if self.spec.causal else distance.clamp(-cap, cap) + cap
        logits = q @ self.table.to(q.dtype).transpose(0, 1)  # q_i . r[n], (B, H, T, rows)
        index = rows.expand(*q.shape[:-2], *rows.shape)  # (B, H, T, T)
        return logits.gather(-1, index) / math.sqrt(q.shape[-1])


@register_position_encoding("t5")
class T5RelativePositions(PositionEncoding):
    """T5 bucketed relative bias: a learned scalar per (bucket, head), one table per layer."""

    acts_on = "scores"
    num_buckets = 32
    max_distance = 128

    def __init__(self, spec: PositionSpec) -> None:
        super().__init__(spec)
        # Zero init: the layer starts as NoPE and learns which offsets matter.
        self.bias = nn.Parameter(torch.zeros(self.num_buckets, spec.heads))

    def score_bias(self, coords: Tensor, q: Tensor) -> Tensor:
        positions = flat_positions(coords)
        relative = positions[None, :] - positions[:, None]  # key - query, (T, T)
        buckets = t5_relative_buckets(
            relative,
            bidirectional=not self.spec.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        # F.embedding rather than indexing: its backward is a dense sum per bucket, not a scatter.
        return F.embedding(buckets, self.bias).permute(2, 0, 1)  # (heads, T, T)


def gate_sums(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    gate: str = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """sum_j g_ij over each query's allowed keys, (B, H, T): what the gate budget bounds.

    Equal to ``cope_gates(...).sum(-1)`` but leaner, so the regulariser costs little beside a
    kernel that keeps no gates: one (B, H, T, T) product for qk and onset (whose gate
    |2 sigmoid(x) - 1| is |tanh(x / 2)|), and O(B H T) for the per-key gates (token, change, rise).
    """
    if gate in PER_KEY_GATES:
        gates = torch.sigmoid(gate_logits.float())
        if key_padding_mask is not None:
            gates = gates.masked_fill(key_padding_mask[:, None, :], 0.0)
        return gates.cumsum(-1) if causal else gates.sum(-1, keepdim=True).expand_as(gates)
    keys = gate_keys if gate == "onset" else k
    with torch.autocast(q.device.type, enabled=False):
        logits = q.float() @ keys.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    gates = torch.sigmoid(logits) if gate == "qk" else torch.tanh(logits / 2).abs()
    length = q.shape[-2]
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        gates = gates.masked_fill(future, 0.0)
    if key_padding_mask is not None:
        gates = gates.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    return gates.sum(-1)


def gate_budget_penalty(
    sums: Tensor, budget: float, key_padding_mask: Tensor | None = None
) -> Tensor:
    """mean over real queries of relu(sum_j g_ij - budget)^2, from the gate sums (B, H, T).

    A soft cap on how many position steps a query counts over the whole sequence: gates that
    count events should open about once per event, not on every token.
    """
    excess = F.relu(sums - budget).square()
    if key_padding_mask is None:
        return excess.mean()
    real = (~key_padding_mask)[:, None, :].to(excess.dtype).expand_as(excess)
    return (excess * real).sum() / real.sum().clamp(min=1)


def lagged_difference(values: Tensor, signal_mask: Tensor | None, lag: int = 1) -> Tensor:
    """values_j - values_{j-lag}, (B, T, C): 0 for the first ``lag`` tokens and wherever token j
    or j-lag is not a signal token (``signal_mask`` (B, T): no CLS, question, readout or pad)."""
    change = values[:, lag:] - values[:, :-lag]
    if signal_mask is not None:
        counted = signal_mask[:, lag:] & signal_mask[:, :-lag]
        change = change * counted[..., None].to(change.dtype)
    return torch.cat((torch.zeros_like(values[:, :lag]), change), dim=1)


class SharedGate(nn.Module):
    """A model-level gate: per-key logits (B, H, T) computed once from the encoder input x or the
    frontend's cues, shared by every layer; subclasses say which (``reads_cues``) and how."""

    reads_cues = False

    def forward(
        self,
        x: Tensor,
        signal_mask: Tensor | None = None,
        cues: Tensor | None = None,
        lag: int = 1,
    ) -> Tensor:
        """Gate logits (B, H, T); x (B, T, dim), ``signal_mask`` (B, T), ``cues`` (B, T, C),
        ``lag``: the tokens between a token and its place one time step earlier."""
        source = cues if self.reads_cues else x
        if source is None:
            raise ValueError(f"{type(self).__name__} needs the frontend's cues (Encoder(cues=))")
        return self.logits(source, signal_mask, lag).transpose(1, 2)

    @classmethod
    def from_spec(cls, spec: PositionSpec) -> SharedGate:
        """The gate for a model described by ``spec``."""
        raise NotImplementedError

    def logits(self, source: Tensor, signal_mask: Tensor | None, lag: int) -> Tensor:
        """Gate logits (B, T, H) of x or the cues."""
        raise NotImplementedError


class ChangeGate(SharedGate):
    """CoPE's ``change`` gate: per-head gate logits from a change detector on the encoder input.

    One module per model, shared by every layer, query-independent; for token j and head h::

        n_j    = LayerNorm(x_j)                      (no affine: the frontend cannot rescale it)
        d_j    = W (n_j - n_{j-lag})                 (W learned, initialised to the identity)
        l_jh   = a_h . [relu(d_j), relu(-d_j)] + b_h (rising and falling changes apart)

    and the gate is g_jh = sigmoid(l_jh) (:mod:`encoders.cope_reference`). ``lag`` is the
    frontend's: 1 for a sequence of steps, the patches per step for video patch tokens (a patch
    against itself one step earlier). d_j = 0 at the first token of the signal and wherever
    token j or j-lag is not a signal token (``signal_mask``: a CLS, question or readout token,
    padding), so those steps never count as a change.

    Initialisation (a_h = SHARPNESS / dim everywhere, b_h = -SHARPNESS * THRESHOLD):
    l_jh = SHARPNESS * (mean_c |d_jc| - THRESHOLD), a gate that opens where the normalised
    features change by more than THRESHOLD per channel on average (two unrelated tokens differ
    by about 1.13, and their gate is about 0.94) and is sigmoid(-SHARPNESS * THRESHOLD) < 1e-4
    on a steady input, so that positions start out counting changes, not tokens.
    """

    THRESHOLD = 0.9
    SHARPNESS = 12.0

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.project = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(2 * dim, heads)
        with torch.no_grad():
            self.project.weight.copy_(torch.eye(dim))
            self.head.weight.fill_(self.SHARPNESS / dim)
            self.head.bias.fill_(-self.SHARPNESS * self.THRESHOLD)

    @classmethod
    def from_spec(cls, spec: PositionSpec) -> ChangeGate:
        """A detector over the model width."""
        return cls(spec.dim, spec.heads)

    def changes(self, x: Tensor, signal_mask: Tensor | None = None, lag: int = 1) -> Tensor:
        """d_j = W (n_j - n_{j-lag}), (B, T, dim): 0 at the first token and off the signal."""
        return lagged_difference(self.project(self.norm(x)), signal_mask, lag)

    def logits(self, source: Tensor, signal_mask: Tensor | None, lag: int) -> Tensor:
        """l = a . [relu(d), relu(-d)] + b, (B, T, H), of the encoder input."""
        change = self.changes(source, signal_mask, lag)
        return self.head(torch.cat((F.relu(change), F.relu(-change)), dim=-1))


class RiseGate(SharedGate):
    """CoPE's ``rise`` gate: per-head gate logits from what rose in the raw input features.

    The ``change`` gate opens at onsets and offsets alike (it sees layer-normalised encoder
    inputs, whose level is gone); counting events wants the onsets. This gate reads the
    frontend's cues c (B, T, C): stacked log-mel frames, tubelet pixels; for token j, head h::

        c'_j  = (c_j - mean) / std                  (over the clip's signal tokens and channels)
        d_j   = c'_j - c'_{j-lag}                   (the change since one time step earlier;
                                                     c'_{j-lag} := 0, the clip's mean, where
                                                     token j-lag is not a signal token)
        r_j   = [relu(d_j), relu(mean_c d_jc)]      (what rose per channel; the level's rise)
        l_jh  = a_h . r_j + b_h

    Standardising per clip makes the thresholds scale-free and leaves them unchanged when a clip
    is played slower (the spread of its frames does not change; a per-token one would). d_j = 0
    where token j is not a signal token; the signal's first step is compared with the clip's
    mean, so an event that starts the clip counts (unlike :class:`ChangeGate`). The two kinds of
    rise complement each other: per channel, a shape appearing in a patch; the level, a sound
    starting in noise (frame-to-frame noise averages out in the mean over channels, but not in
    the mean of its rises, ~0.18 clip standard deviations per channel on audio-events), and a
    chirp sliding through the bands does not raise the level. Initialisation::

        l_jh = SHARPNESS * (mean_c relu(d_jc) - THRESHOLD) + LEVEL_SHARPNESS * relu(mean_c d_jc)

    closed without a rise (sigmoid(-SHARPNESS * THRESHOLD) ~ 7e-4); thresholds from rises
    measured on audio-events and moving-shapes (docs/cope-maths.md).
    """

    THRESHOLD = 0.45
    SHARPNESS = 16.0
    LEVEL_SHARPNESS = 40.0
    reads_cues = True

    def __init__(self, cue_dim: int, heads: int) -> None:
        super().__init__()
        if cue_dim < 1:
            raise ValueError(
                "the rise gate reads the frontend's input features, and this model's frontend "
                "has none (text tokens): use another gate"
            )
        self.head = nn.Linear(cue_dim + 1, heads)
        with torch.no_grad():
            self.head.weight[:, :cue_dim].fill_(self.SHARPNESS / cue_dim)
            self.head.weight[:, cue_dim].fill_(self.LEVEL_SHARPNESS)
            self.head.bias.fill_(-self.SHARPNESS * self.THRESHOLD)

    @classmethod
    def from_spec(cls, spec: PositionSpec) -> RiseGate:
        """A detector over the frontend's cues."""
        return cls(spec.cue_dim, spec.heads)

    def rises(self, cues: Tensor, signal_mask: Tensor | None = None, lag: int = 1) -> Tensor:
        """r_j = [relu(d_j), relu(mean_c d_jc)], (B, T, C + 1), of clip-standardised cues."""
        cues = cues.float()
        weight = (
            torch.ones_like(cues[..., :1])
            if signal_mask is None
            else signal_mask[..., None].to(cues.dtype)
        )
        count = (weight.sum(dim=(1, 2)) * cues.shape[-1]).clamp(min=1)[:, None, None]
        mean = (cues * weight).sum(dim=(1, 2), keepdim=True) / count
        spread = (((cues - mean) * weight).square().sum(dim=(1, 2), keepdim=True) / count).sqrt()
        standard = (cues - mean) / spread.clamp(min=1e-5)
        before = F.pad(standard * weight, (0, 0, lag, 0))[:, : cues.shape[1]]  # 0 off the signal
        change = (standard - before) * weight
        return F.relu(torch.cat((change, change.mean(dim=-1, keepdim=True)), dim=-1))

    def logits(self, source: Tensor, signal_mask: Tensor | None, lag: int) -> Tensor:
        """l = a . r + b, (B, T, H), of the cues (in the head's dtype)."""
        return self.head(self.rises(source, signal_mask, lag).to(self.head.weight.dtype))


# The gates whose logits one model-level module computes for every layer, by gate name.
SHARED_GATES: dict[str, type[SharedGate]] = {"change": ChangeGate, "rise": RiseGate}


@register_position_encoding("cope")
class ContextualPositions(PositionEncoding):
    """CoPE: gated, context-dependent positions; replaces the attention kernel.

    One table per layer shared by the heads (or per head), zero-initialised, npos rows when
    causal and 2*npos-1 signed rows when bidirectional (see :mod:`encoders.cope`).

    ``spec.cope_gate`` picks the gate: "qk" (paper), "onset" (differenced keys), "token"
    (``gate_head``: a Linear(dim, heads) on the layer input, one gate logit per key and head) or
    "change" (the model's :class:`ChangeGate` on the encoder input, the same logits in every
    layer, handed to ``attend`` as ``gate_logits``) or "rise" (the model's :class:`RiseGate` on
    the frontend's cues, handed over the same way).
    ``spec.cope_scale_logits`` divides the position logits z_i[n] = q_i . e[n] by sqrt(d), as
    the authors' code does by default; it passes the kernel e / sqrt(d), which is exactly
    (q_i . e[n]) / sqrt(d). ``spec.attn_dropout`` drops attention weights while training (the
    kernels have no dropout, so training with it runs the reference, which keeps the weights).
    While recording, ``last_gates`` keeps the gates (B, H, T, T) for `cope positions`.
    With ``spec.cope_gate_budget > 0``, each training forward leaves ``auxiliary_loss``: the
    weighted gate-sum penalty (:func:`gate_budget_penalty`), the sums recomputed by
    :func:`gate_sums` so it works with every kernel (the fused one keeps no gates).
    """

    acts_on = "kernel"
    replaces_kernel = True

    def __init__(self, spec: PositionSpec) -> None:
        super().__init__(spec)
        self.cope = CoPE(
            spec.npos,
            spec.head_dim,
            heads=spec.heads,
            per_head=spec.cope_per_head,
            causal=spec.causal,
            impl=spec.cope_impl,
            gate=spec.cope_gate,
        )
        # Per head, so heads can count different things; only the token gate has the head (an
        # unused parameter would upset DDP).
        self.gate_head = nn.Linear(spec.dim, spec.heads) if spec.cope_gate == "token" else None
        self.last_gates: Tensor | None = None
        self.auxiliary_loss: Tensor | None = None

    @classmethod
    def shared_gate(cls, spec: PositionSpec) -> nn.Module | None:
        """The model's :class:`ChangeGate` or :class:`RiseGate`; None for the other gates."""
        gate = SHARED_GATES.get(spec.cope_gate)
        return None if gate is None else gate.from_spec(spec)

    def gate_inputs(
        self, k: Tensor, layer_input: Tensor | None, shared_logits: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(gate_keys, gate_logits) the layer's gate variant needs, None where unused."""
        if self.spec.cope_gate == "onset":
            return onset_keys(k), None
        if self.spec.cope_gate == "token":
            if layer_input is None:
                raise ValueError("the token gate needs the layer input (attend(layer_input=x))")
            return None, self.gate_head(layer_input).transpose(1, 2)  # (B, H, T)
        if self.spec.cope_gate in SHARED_GATES:
            if shared_logits is None:
                gate = self.spec.cope_gate
                raise ValueError(f"the {gate} gate needs the model's logits (attend(gate_logits=))")
            return None, shared_logits
        return None, None

    def position_table(self) -> Tensor:
        """The table e the kernel sees: the learned one, divided by sqrt(d) when scaling."""
        table = self.cope.pos_emb
        if self.spec.cope_scale_logits:
            table = table / math.sqrt(self.spec.head_dim)
        return table

    def kernel_inputs(
        self, q: Tensor, k: Tensor, v: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, k, v, table) handed to the CoPE kernel; :class:`ContextualRotaryPositions` adds
        its rotation here."""
        return q, k, v, self.position_table()

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        record: bool,
        layer_input: Tensor | None = None,
        coords: Tensor | None = None,
        gate_logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        head_dim = v.shape[-1]
        q, k, v, table = self.kernel_inputs(q, k, v, coords)
        gate_keys, gate_logits = self.gate_inputs(k, layer_input, gate_logits)
        gate = {"gate": self.spec.cope_gate, "gate_keys": gate_keys, "gate_logits": gate_logits}
        dropout = self.spec.attn_dropout if self.training else 0.0
        self.last_gates = None
        self.auxiliary_loss = None
        if self.training and self.spec.cope_gate_budget > 0:
            sums = gate_sums(
                q, k, causal=self.spec.causal, key_padding_mask=key_padding_mask, **gate
            )
            penalty = gate_budget_penalty(sums, self.spec.cope_gate_budget, key_padding_mask)
            self.auxiliary_loss = self.spec.cope_gate_weight * penalty
        if record or dropout > 0:
            # The reference is the one path that keeps weights (to show, or to drop out).
            out, weights, positions = reference_cope_attention(
                q,
                k,
                v,
                table,
                causal=self.spec.causal,
                key_padding_mask=key_padding_mask,
                return_weights=True,
                **gate,
            )
            if dropout > 0:
                out = (F.dropout(weights, dropout) @ v.to(weights.dtype)).to(v.dtype)
            if record:
                gates = cope_gates(
                    q, k, causal=self.spec.causal, key_padding_mask=key_padding_mask, **gate
                )
                self.last_gates = gates.detach()
            out = out[..., :head_dim]
            return (out, weights, positions) if record else (out, None, None)
        out = cope_attention(
            q,
            k,
            v,
            table,
            causal=self.spec.causal,
            key_padding_mask=key_padding_mask,
            impl=self.spec.cope_impl,
            **gate,
        )
        return out[..., :head_dim], None, None


# RoPE scores through a kernel of twice the head dimension: q' = c R q and k' = c R k with
# c^2 = sqrt(2), so q'.k' / sqrt(2d) = (R q).(R k) / sqrt(d).
_ROTARY_FACTOR = 2**0.25


@register_position_encoding("cope+rope")
class ContextualRotaryPositions(ContextualPositions):
    """RoPE-rotated scores and gates; CoPE's position logits from the unrotated query.

    Choice (a rotated query would break RoPE's shift invariance): the scores and gates use the
    rotated pair, (R_i q_i).(R_j k_j), which depends on i - j only; the position logits use
    z_i[n] = q_i . e[n] with the unrotated query, because e[n] is indexed by a contextual
    position, not rotated with it: (R_i q_i) . e[n] would depend on the query's absolute index.
    Shifting every coordinate therefore leaves the output unchanged.

    The CoPE kernel takes one query for both, so it runs on a concatenated head of 2d dims:
    q' = [c R q, q], k' = [c R k, 0], v' = [v, 0] and table e' = [0, e] (c = 2^(1/4)), which give
    exactly the scores, gates and logits above; the first d dims of the output are the result.
    This costs the kernel twice its head dimension.
    """

    acts_on = "q/k + kernel"

    def kernel_inputs(
        self, q: Tensor, k: Tensor, v: Tensor, coords: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if coords is None:
            coords = torch.arange(q.shape[-2], device=q.device)[:, None]
        rotated_q = apply_rope(q, coords) * _ROTARY_FACTOR
        rotated_k = apply_rope(k, coords) * _ROTARY_FACTOR
        table = self.position_table()
        wide_q = torch.cat((rotated_q, q), dim=-1)
        wide_k = torch.cat((rotated_k, torch.zeros_like(k)), dim=-1)
        wide_v = torch.cat((v, torch.zeros_like(v)), dim=-1)
        wide_table = torch.cat((torch.zeros_like(table), table), dim=-1)
        return wide_q, wide_k, wide_v, wide_table
