"""Transformer encoder blocks and the two heads: a sequence classifier and a token classifier.

``Encoder(config)`` maps (B, T, dim) to (B, T, dim) with the position encoding named by
``config.pe``; ``SequenceClassifier`` and ``TokenClassifier`` put a frontend
(:mod:`encoders.frontends`) in front of it and a linear head behind it.

Readout of ``SequenceClassifier`` with ``pooling="cls"``:

- bidirectional: a learned CLS token is prepended. It sits at coordinate 0 on every axis and
  the frontend's tokens move up by one (1-D: CLS 0, tokens 1..T; with ``coords`` every axis is
  shifted by +1), so relative encodings see the CLS just before the first token on each axis.
- causal: a prepended token would see nothing, so the readout token is placed right after each
  sequence's last real token (index = its length) where it sees the whole sequence; its
  coordinate is that index (1-D). With ``coords`` (shared by the batch, so not per item) it
  takes the coordinates of the slot it fills, and an unpadded sequence's readout gets one past
  the last token on every axis: only 1-D readouts are exactly independent of padding.

``pooling="mean"`` averages the encoder outputs over the real (unpadded) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.attention import MultiHeadAttention
from encoders.cope import GATES
from encoders.frontends import FrontendOutput
from encoders.positions import PositionSpec, get_position_encoding

NORMS: tuple[str, ...] = ("pre", "post")  # where each block's LayerNorms sit
POOLINGS: tuple[str, ...] = ("cls", "mean")  # how SequenceClassifier reads one vector out


@dataclass
class EncoderConfig:
    """Shape and options of an encoder (the ``model.*`` keys of a run's config)."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    norm: str = "pre"  # "pre" | "post"
    causal: bool = False
    pe: str = "cope"
    max_len: int = 512
    npos: int | None = None  # CoPE cap; None -> max_len + 1 when causal, else max_len
    cope_per_head: bool = False
    cope_impl: str = "auto"
    pooling: str = "cls"  # "cls" | "mean"
    grid: tuple[int, ...] | None = None  # row-major token layout for axial coords (see Encoder)
    cope_gate: str = "qk"  # "qk" (paper) | "onset" | "token" | "change" | "rise" (encoders.cope)
    # The paper's formula (False) or the authors' code (True): CoPE's position logits / sqrt(d).
    cope_scale_logits: bool = False
    attn_dropout: float = 0.0  # dropout on attention weights (the authors' run script: 0.1)
    # CoPE's gate-sum regulariser: budget on sum_j g_ij per query (0 = off) and its loss weight.
    cope_gate_budget: float = 0.0
    cope_gate_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.cope_gate not in GATES:
            raise ValueError(f"cope_gate must be one of {', '.join(GATES)}, got {self.cope_gate!r}")
        if self.cope_gate_budget < 0 or self.cope_gate_weight < 0:
            raise ValueError("cope_gate_budget and cope_gate_weight must not be negative")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must lie in [0, 1), got {self.attn_dropout}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.grid is not None:
            self.grid = tuple(int(size) for size in self.grid)  # TOML/JSON give lists
        get_position_encoding(self.pe)  # fail early, listing the valid names

    @property
    def resolved_npos(self) -> int:
        """CoPE's position cap: ``npos`` or its default (paper: max length + 1 when causal)."""
        if self.npos is not None:
            return self.npos
        return self.max_len + 1 if self.causal else self.max_len

    def position_spec(self) -> PositionSpec:
        """What the position encodings need from this config."""
        return PositionSpec(
            dim=self.dim,
            heads=self.heads,
            causal=self.causal,
            max_len=self.max_len,
            npos=self.resolved_npos,
            cope_per_head=self.cope_per_head,
            cope_impl=self.cope_impl,
            cope_gate=self.cope_gate,
            cope_scale_logits=self.cope_scale_logits,
            attn_dropout=self.attn_dropout,
            cope_gate_budget=self.cope_gate_budget,
            cope_gate_weight=self.cope_gate_weight,
        )


def grid_coords(length: int, grid: tuple[int, ...], device: torch.device) -> Tensor:
    """Coordinates (length, len(grid)) of a row-major token layout; axis 0 may run past grid[0]."""
    index = torch.arange(length, device=device)
    coords = []
    for size in reversed(grid[1:]):
        coords.append(index % size)
        index = index // size
    coords.append(index)
    return torch.stack(coords[::-1], dim=1)


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """The sum of the auxiliary losses the model's layers left in their last forward, or None.

    A layer that adds a term to the training loss (CoPE's gate budget) sets its
    ``auxiliary_loss`` attribute during a training forward; the trainer adds this sum.
    """
    terms = [
        term
        for module in model.modules()
        if (term := getattr(module, "auxiliary_loss", None)) is not None
        and isinstance(term, Tensor)
    ]
    return torch.stack(terms).sum() if terms else None


class FeedForward(nn.Sequential):
    """The block's MLP: Linear, GELU, dropout, Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class Block(nn.Module):
    """One encoder layer; pre-norm (norm inside the residual) or post-norm (after the sum)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        positions = get_position_encoding(config.pe)(config.position_spec())
        self.attention = MultiHeadAttention(
            config.dim,
            config.heads,
            positions,
            causal=config.causal,
            attn_dropout=config.attn_dropout,
        )
        self.feed_forward = FeedForward(config.dim, config.mlp_dim, config.dropout)
        self.norm_attention = nn.LayerNorm(config.dim)
        self.norm_feed_forward = nn.LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm == "pre"

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None,
        coords: Tensor | None,
        gate_logits: Tensor | None = None,
    ) -> Tensor:
        """One layer; ``gate_logits`` (B, H, T): the encoder's shared gate logits, if any."""
        if self.pre_norm:
            attended = self.attention(self.norm_attention(x), padding_mask, coords, gate_logits)
            x = x + self.dropout(attended)
            return x + self.dropout(self.feed_forward(self.norm_feed_forward(x)))
        x = self.norm_attention(
            x + self.dropout(self.attention(x, padding_mask, coords, gate_logits))
        )
        return self.norm_feed_forward(x + self.dropout(self.feed_forward(x)))


class Encoder(nn.Module):
    """A stack of blocks over (B, T, dim) with the position encoding ``config.pe``.

    ``coords`` (T, n_axes) long gives each token's position per axis; None means the flat index,
    or, when ``config.grid`` is set, the row-major layout over that grid (:func:`grid_coords`).
    ``shared_gate`` (CoPE's change or rise gate, else None) computes gate logits once from the
    input (or the frontend's ``cues``, compared ``lag`` tokens apart) and hands them to every
    layer; ``signal_mask`` (B, T) tells it which tokens are the signal. ``cue_dim``: the
    frontend's cue width (0: no cues), what the rise gate reads.
    """

    def __init__(self, config: EncoderConfig, cue_dim: int = 0) -> None:
        super().__init__()
        self.config = config
        encoding = get_position_encoding(config.pe)
        spec = replace(config.position_spec(), cue_dim=cue_dim)
        self.input_positions = encoding.input_encoding(spec)
        self.shared_gate = encoding.shared_gate(spec)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.dim) if config.norm == "pre" else nn.Identity()

    def resolve_coords(self, length: int, coords: Tensor | None, device: torch.device):
        """The coordinates the encoder will use: given ones, grid ones, or None (flat index)."""
        if coords is None and self.config.grid is not None:
            return grid_coords(length, self.config.grid, device)
        return coords

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        coords: Tensor | None = None,
        signal_mask: Tensor | None = None,
        cues: Tensor | None = None,
        lag: int = 1,
    ) -> Tensor:
        """x: (B, T, dim); padding_mask: (B, T) True = pad; coords: (T, n_axes) long or None;
        signal_mask: (B, T) True on the signal's tokens (None: every unpadded token);
        cues: (B, T, cue_dim) the frontend's raw features per token (the rise gate's), or None;
        lag: tokens between a token and its place one time step earlier."""
        coords = self.resolve_coords(x.shape[1], coords, x.device)
        gate_logits = None
        if self.shared_gate is not None:
            if signal_mask is None and padding_mask is not None:
                signal_mask = ~padding_mask
            gate_logits = self.shared_gate(x, signal_mask, cues, lag)  # (B, H, T)
        if self.input_positions is not None:
            x = self.input_positions(x, coords)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, padding_mask, coords, gate_logits)
        return self.final_norm(x)


def _project(frontend_dim: int, dim: int) -> nn.Module:
    return nn.Identity() if frontend_dim == dim else nn.Linear(frontend_dim, dim)


def cue_dim(frontend: nn.Module) -> int:
    """The frontend's cue width, what CoPE's rise gate reads (0: no cues)."""
    return int(getattr(frontend, "cue_dim", 0))


def _pad_cues(cues: Tensor | None, before: int, after: int) -> Tensor | None:
    """Cues (B, T, C) with zero rows for non-signal tokens added before and after (CLS, readout);
    the gates never compare them (they are off the signal mask)."""
    return None if cues is None else F.pad(cues, (0, 0, before, after))


def signal_mask(front: FrontendOutput, length: int) -> Tensor:
    """(B, length) True on a frontend's signal tokens: neither padding nor its ``leading`` ones."""
    tokens = front.tokens
    if front.padding_mask is None:
        signal = torch.ones(tokens.shape[0], length, dtype=torch.bool, device=tokens.device)
    else:
        signal = ~front.padding_mask
    signal[:, : front.leading] = False
    return signal


def masked_mean(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean over time of (B, T, dim), ignoring padded steps."""
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


class SequenceClassifier(nn.Module):
    """frontend -> encoder -> one vector per sequence (CLS/readout token or mean) -> logits."""

    def __init__(self, frontend: nn.Module, config: EncoderConfig, num_classes: int) -> None:
        super().__init__()
        self.frontend = frontend
        self.config = config
        self.project = _project(frontend.dim, config.dim)
        self.encoder = Encoder(config, cue_dim(frontend))
        # Only a CLS readout has the token: an unused parameter would upset DDP.
        self.cls_token = (
            nn.Parameter(torch.randn(config.dim) * 0.02) if config.pooling == "cls" else None
        )
        self.head = nn.Linear(config.dim, num_classes)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Logits (B, num_classes)."""
        front = self.frontend(inputs, padding_mask)
        tokens, mask = self.project(front.tokens), front.padding_mask
        coords = self.encoder.resolve_coords(tokens.shape[1], front.coords, tokens.device)
        signal = signal_mask(front, tokens.shape[1])
        if self.config.pooling == "mean":
            encoded = self.encoder(tokens, mask, coords, signal, front.cues, front.lag)
            return self.head(masked_mean(encoded, mask))
        if self.config.causal:
            cues = _pad_cues(front.cues, 0, 1)
            return self._causal_readout(tokens, mask, coords, signal, cues, front.lag)
        batch = tokens.shape[0]
        tokens = torch.cat((self.cls_token.to(tokens.dtype).expand(batch, 1, -1), tokens), dim=1)
        signal = torch.cat((signal.new_zeros(batch, 1), signal), dim=1)  # CLS is no signal
        if mask is not None:
            mask = torch.cat((mask.new_zeros(batch, 1), mask), dim=1)
        if coords is not None:  # CLS at 0 on every axis, tokens shifted by one
            coords = torch.cat((coords.new_zeros(1, coords.shape[1]), coords + 1), dim=0)
        cues = _pad_cues(front.cues, 1, 0)
        return self.head(self.encoder(tokens, mask, coords, signal, cues, front.lag)[:, 0])

    def _causal_readout(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        coords: Tensor | None,
        signal: Tensor,
        cues: Tensor | None,
        lag: int,
    ) -> Tensor:
        """Put the readout token right after each sequence's last real token and read it;
        ``cues`` already have a row for it."""
        batch, length, _ = tokens.shape
        lengths = (
            torch.full((batch,), length, device=tokens.device)
            if mask is None
            else (~mask).sum(dim=1)
        )
        tokens = torch.cat((tokens, tokens.new_zeros(batch, 1, tokens.shape[2])), dim=1)
        rows = torch.arange(batch, device=tokens.device)
        readout = self.cls_token.to(tokens.dtype).expand(batch, -1)
        tokens = tokens.index_put((rows, lengths), readout)
        signal = torch.cat((signal, signal.new_zeros(batch, 1)), dim=1)
        signal = signal.index_put((rows, lengths), signal.new_zeros(batch))  # readout: no signal
        steps = torch.arange(length + 1, device=tokens.device)
        extended_mask = steps[None, :] > lengths[:, None] if mask is not None else None
        if coords is not None:
            coords = torch.cat((coords, coords.max(dim=0, keepdim=True).values + 1), dim=0)
        encoded = self.encoder(tokens, extended_mask, coords, signal, cues, lag)
        return self.head(encoded[rows, lengths])


class TokenClassifier(nn.Module):
    """frontend -> encoder -> logits per token (B, T, num_classes); causal: the LM head."""

    def __init__(self, frontend: nn.Module, config: EncoderConfig, num_classes: int) -> None:
        super().__init__()
        self.frontend = frontend
        self.config = config
        self.project = _project(frontend.dim, config.dim)
        self.encoder = Encoder(config, cue_dim(frontend))
        self.head = nn.Linear(config.dim, num_classes)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T', num_classes) for the frontend's T' tokens."""
        front = self.frontend(inputs, padding_mask)
        tokens = self.project(front.tokens)
        signal = signal_mask(front, tokens.shape[1])
        encoded = self.encoder(
            tokens, front.padding_mask, front.coords, signal, front.cues, front.lag
        )
        return self.head(encoded)


def attention_layers(model: nn.Module) -> list[MultiHeadAttention]:
    """Every attention layer of a model, in forward order."""
    return [module for module in model.modules() if isinstance(module, MultiHeadAttention)]


def set_recording(model: nn.Module, on: bool) -> None:
    """Make every attention layer keep (or stop keeping) its weights and CoPE positions."""
    for layer in attention_layers(model):
        layer.record = on
        if not on:
            layer.last_record = None


def recorded_layers(model: nn.Module) -> list[dict]:
    """Per attention layer, {"attention": (B,H,T,T), "positions": (B,H,T,T) or None}."""
    return [layer.last_record for layer in attention_layers(model) if layer.last_record is not None]
