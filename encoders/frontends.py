"""Frontends: turn raw inputs into the encoder's tokens (B, T', dim).

A frontend is an ``nn.Module`` with an attribute ``dim`` whose
``forward(inputs, padding_mask=None)`` returns a :class:`FrontendOutput`: tokens (B, T', dim),
the padding mask (B, T') subsampled to the tokens (True = pad) or None, and coordinates
(T', n_axes) long for axial encodings, or None for 1-D sequences (None = arange(T')).

:class:`AudioFeatures` is not a frontend: data pipelines use it to compute and cache log-mel or
MFCC features, which :class:`FeatureFrontend` then embeds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class FrontendOutput(NamedTuple):
    """Tokens (B, T', dim), padding mask (B, T') or None, coordinates (T', n_axes) or None.

    ``leading``: tokens before the signal (a question token or question frames); CoPE's change
    gate measures no change into the signal's first token, its rise gate compares that token
    with the clip's mean.
    ``cues`` (B, T', cue_dim): each token's raw input features (stacked log-mel frames, tubelet
    pixels), which CoPE's rise gate compares with those ``lag`` tokens earlier: the same place
    one time step before (1 for a sequence of steps, the patches per step for patch tokens);
    None where the frontend has no input features (text tokens).
    """

    tokens: Tensor
    padding_mask: Tensor | None
    coords: Tensor | None
    leading: int = 0
    cues: Tensor | None = None
    lag: int = 1


def subsample_mask(padding_mask: Tensor | None, group: int) -> Tensor | None:
    """Mask of groups of ``group`` steps: a group is padding only when all its steps are.

    (B, T) -> (B, ceil(T / group)); missing steps past T count as padding.
    """
    if padding_mask is None or group == 1:
        return padding_mask
    extra = -padding_mask.shape[1] % group
    padded = F.pad(padding_mask, (0, extra), value=True)
    return rearrange(padded, "b (t g) -> b t g", g=group).all(dim=-1)


class TokenFrontend(nn.Module):
    """Token ids (B, T) -> embeddings (B, T, dim); no cues (ids are not features)."""

    cue_dim = 0

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(vocab_size, dim)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FrontendOutput:
        return FrontendOutput(self.embedding(inputs), padding_mask, None)


class FeatureFrontend(nn.Module):
    """Precomputed features (B, T, F) -> (B, ceil(T / stack), dim).

    ``stack`` consecutive frames are concatenated (a shorter sequence and a wider context per
    token; the tail is zero-padded), then projected linearly to ``dim``; the stacked frames are
    the tokens' cues.
    """

    def __init__(self, feature_dim: int, dim: int, stack: int = 1) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"stack must be at least 1, got {stack}")
        self.dim, self.feature_dim, self.stack = dim, feature_dim, stack
        self.cue_dim = feature_dim * stack
        self.projection = nn.Linear(self.cue_dim, dim)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FrontendOutput:
        if inputs.shape[-1] != self.feature_dim:
            raise ValueError(f"expected {self.feature_dim} features, got {inputs.shape[-1]}")
        extra = -inputs.shape[1] % self.stack
        if extra:
            inputs = F.pad(inputs, (0, 0, 0, extra))
        stacked = rearrange(inputs, "b (t s) f -> b t (s f)", s=self.stack)
        return FrontendOutput(
            self.projection(stacked),
            subsample_mask(padding_mask, self.stack),
            None,
            cues=stacked,
        )


class AudioFeatures(nn.Module):
    """Waveform (..., samples) -> features (..., frames, output_dim): log-mel or MFCC.

    A ``win_ms`` window every ``hop_ms`` (25/10 ms by default; FFT size the next power of two),
    centred frames, so frames = samples // hop + 1. With ``deltas`` the first and second
    differences (torchaudio ``compute_deltas``) follow the static features: output_dim = 3 *
    n_features.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        kind: str = "logmel",
        n_features: int = 40,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        deltas: bool = False,
    ) -> None:
        super().__init__()
        import torchaudio

        if kind not in ("logmel", "mfcc"):
            raise ValueError(f"kind must be 'logmel' or 'mfcc', got {kind!r}")
        self.sample_rate, self.kind, self.n_features, self.deltas = (
            sample_rate,
            kind,
            n_features,
            deltas,
        )
        self.win_length = round(sample_rate * win_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        n_fft = 1 << (self.win_length - 1).bit_length()
        mel_options = {
            "n_fft": n_fft,
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "n_mels": n_features if kind == "logmel" else max(n_features, 40),
        }
        if kind == "logmel":
            self.transform = torchaudio.transforms.MelSpectrogram(sample_rate, **mel_options)
        else:
            self.transform = torchaudio.transforms.MFCC(
                sample_rate, n_mfcc=n_features, log_mels=True, melkwargs=mel_options
            )
        self.output_dim = n_features * (3 if deltas else 1)

    def num_frames(self, samples: int) -> int:
        """Frames produced for a waveform of ``samples`` samples."""
        return samples // self.hop_length + 1

    def forward(self, waveform: Tensor) -> Tensor:
        import torchaudio

        features = self.transform(waveform.float())  # (..., n_features, frames)
        if self.kind == "logmel":
            features = torch.log(features + 1e-6)
        if self.deltas:
            first = torchaudio.functional.compute_deltas(features)
            second = torchaudio.functional.compute_deltas(first)
            features = torch.cat((features, first, second), dim=-2)
        return features.transpose(-1, -2)


def to_tubelets(clips: Tensor, tubelet: tuple[int, int, int]) -> Tensor:
    """Clips (B, T, C, H, W) -> tubelets (B, T/pt, (H/ph)(W/pw), pt*ph*pw*C).

    Tubelet (pt, ph, pw): pt frames x ph x pw pixels; the sizes must divide T, H and W.
    """
    frames, height, width = tubelet
    return rearrange(
        clips,
        "b (nt pt) c (nh ph) (nw pw) -> b nt (nh nw) (pt ph pw c)",
        pt=frames,
        ph=height,
        pw=width,
    )


def from_tubelets(
    tubelets: Tensor, tubelet: tuple[int, int, int], grid: tuple[int, int], channels: int
) -> Tensor:
    """The inverse of :func:`to_tubelets`; ``grid`` = (H/ph, W/pw) patches per frame."""
    frames, height, width = tubelet
    return rearrange(
        tubelets,
        "b nt (nh nw) (pt ph pw c) -> b (nt pt) c (nh ph) (nw pw)",
        nh=grid[0],
        nw=grid[1],
        pt=frames,
        ph=height,
        pw=width,
        c=channels,
    )


def tubelet_coords(steps: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    """(t, h, w) coordinates, (steps*nh*nw, 3), of tubelets in row-major order."""
    t, h, w = torch.meshgrid(
        torch.arange(steps, device=device),
        torch.arange(grid[0], device=device),
        torch.arange(grid[1], device=device),
        indexing="ij",
    )
    return torch.stack((t, h, w), dim=-1).reshape(-1, 3)


class VideoFrontend(nn.Module):
    """Clips (B, T, C, H, W) -> tokens from tubelets of (pt frames, ph, pw pixels).

    Tokenizers:
    - ``"mlp-max"``: a small MLP on each spatial patch of a tubelet step, then the max over the
      patches: one token per tubelet step (B, T/pt, dim), coords None (the prototype's winner).
    - ``"patches"``: the same MLP, one token per tubelet (B, T/pt*nh*nw, dim) in (t, h, w)
      row-major order, coords (T', 3) for axial RoPE.
    - ``"linear"``: one linear projection per tubelet (ViViT's tubelet embedding), tokens and
      coords as ``"patches"``.
    A clip whose length is not a multiple of pt is zero-padded at the end; the frame padding
    mask (B, T) is subsampled like :class:`FeatureFrontend`'s. Cues: each patch token's tubelet
    pixels (lag: the patches per step, so a patch is compared with itself one step earlier);
    for ``"mlp-max"`` the max over the patches of the tubelet pixels, like its token.
    ``question_steps``: leading tubelet steps that pose a question (moving-shapes' glyph frames),
    not signal: their tokens are the output's ``leading`` ones.
    """

    TOKENIZERS = ("mlp-max", "patches", "linear")

    def __init__(
        self,
        channels: int,
        dim: int,
        tubelet: tuple[int, int, int] = (2, 8, 8),
        tokenizer: str = "mlp-max",
        question_steps: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer not in self.TOKENIZERS:
            raise ValueError(
                f"unknown video tokenizer {tokenizer!r}; choose one of {', '.join(self.TOKENIZERS)}"
            )
        self.channels, self.dim, self.tokenizer = channels, dim, tokenizer
        self.question_steps = question_steps
        self.tubelet = tuple(int(size) for size in tubelet)
        patch = channels * self.tubelet[0] * self.tubelet[1] * self.tubelet[2]
        self.cue_dim = patch
        if tokenizer == "linear":
            self.embed = nn.Linear(patch, dim)
        else:
            self.embed = nn.Sequential(nn.Linear(patch, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> FrontendOutput:
        batch, frames, channels, height, width = inputs.shape
        step, patch_h, patch_w = self.tubelet
        if channels != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {channels}")
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"frame size {height}x{width} is not divisible by the patch {patch_h}x{patch_w}"
            )
        extra = -frames % step
        if extra:
            inputs = F.pad(inputs, (0, 0, 0, 0, 0, 0, 0, extra))
        mask = subsample_mask(padding_mask, step)
        pixels = to_tubelets(inputs, self.tubelet)  # (B, steps, nh*nw, pt*ph*pw*C)
        patches = self.embed(pixels)  # (B, steps, nh*nw, dim)
        if self.tokenizer == "mlp-max":
            return FrontendOutput(
                patches.max(dim=2).values,
                mask,
                None,
                leading=self.question_steps,
                cues=pixels.max(dim=2).values,
            )
        steps, per_step = patches.shape[1], patches.shape[2]
        grid = (height // patch_h, width // patch_w)
        if mask is not None:
            mask = mask.repeat_interleave(per_step, dim=1)
        coords = tubelet_coords(steps, grid, inputs.device)
        return FrontendOutput(
            rearrange(patches, "b t p d -> b (t p) d"),
            mask,
            coords,
            leading=self.question_steps * per_step,
            cues=rearrange(pixels, "b t p c -> b (t p) c"),
            lag=per_step,
        )
