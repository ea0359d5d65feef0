"""CoPE's rise gate: gate logits from what rose in the frontend's raw input features.

Specification (docs/cope-maths.md, "The rise gate"): clip-standardised cues, differenced against
the same place one time step earlier (``lag``), only the rises counted; a rise opens the gate
and the matching fall does not; scale-free and unchanged when every frame is shown twice; the
signal's first step compared with the clip's mean; non-signal tokens never open; padding
changes nothing; the
same attention maths as the other per-key gates on every path (reference and fused kernel:
tests/test_cope_change_gate.py checks both shared gates there).
"""

from __future__ import annotations

import pytest
import torch
from shared_gates import readout_gates

from encoders.frontends import FeatureFrontend, FrontendOutput, TokenFrontend, VideoFrontend
from encoders.positions import ChangeGate, RiseGate, lagged_difference
from encoders.transformer import (
    EncoderConfig,
    SequenceClassifier,
)


def event_in_noise(length: int = 30, onset: int = 10, offset: int = 20, channels: int = 12):
    """(1, length, channels): background noise, a loud band from ``onset`` to ``offset``."""
    generator = torch.Generator().manual_seed(3)
    cues = 0.05 * torch.randn(1, length, channels, generator=generator)
    cues[0, onset:offset, : channels // 3] += 4.0
    return cues


def gates_of(gate: torch.nn.Module, cues: torch.Tensor, signal=None, lag: int = 1):
    x = torch.zeros(*cues.shape[:2], 8)  # the encoder input: unused by the rise gate
    return torch.sigmoid(gate(x, signal, cues, lag))


def test_lagged_difference_compares_with_the_token_lag_places_earlier():
    values = torch.arange(12.0).reshape(1, 6, 2)
    torch.testing.assert_close(lagged_difference(values, None, 1)[0, 1:], torch.full((5, 2), 2.0))
    by_two = lagged_difference(values, None, 2)
    assert (by_two[0, :2] == 0).all() and (by_two[0, 2:] == 4).all()
    signal = torch.tensor([[False, True, True, True, False, True]])
    masked = lagged_difference(values, signal, 1)[0, :, 0]
    assert masked.tolist() == [0.0, 0.0, 2.0, 2.0, 0.0, 0.0]  # no change into or out of a gap


def test_untrained_gate_opens_at_the_onset_and_not_at_the_offset():
    gate = RiseGate(cue_dim=12, heads=3)
    gates = gates_of(gate, event_in_noise())[0]  # (heads, T)
    assert gates.shape == (3, 30)
    assert (gates[:, 10] > 0.9).all(), gates[:, 10]
    assert (gates[:, 20] < 0.01).all(), gates[:, 20]  # the offset: a fall, not counted
    others = torch.cat((gates[:, :10], gates[:, 11:]), dim=1)
    assert others.sum(-1).max() < 0.25  # the rest of the clip: well under one step


def test_the_change_gate_counts_the_offset_too():
    """The contrast that motivates the rise gate, on the same clip."""
    cues = event_in_noise()
    gates = torch.sigmoid(ChangeGate(dim=12, heads=1)(cues))[0, 0]
    assert gates[10] > 0.5 and gates[20] > 0.5


def test_the_level_rises_at_a_sound_in_noise_and_not_while_a_chirp_slides():
    generator = torch.Generator().manual_seed(4)
    cues = 0.1 * torch.randn(1, 24, 32, generator=generator)
    for step in range(12):  # a band sliding up one channel per token from token 6
        cues[0, 6 + step, 2 + step] += 5.0
    level = RiseGate(cue_dim=32, heads=1).rises(cues)[0, :, -1]
    assert level[6] > 0.1 and level[7:18].max() < level[6] / 2 and level[18] == 0  # end: a fall
    noise = RiseGate(cue_dim=32, heads=1).rises(0.3 * torch.randn(1, 24, 32, generator=generator))
    assert noise[0, :, -1].mean() < noise[0, :, :-1].mean() / 3  # noise averages out of it


def test_logits_do_not_depend_on_the_features_scale_or_offset():
    gate = RiseGate(cue_dim=12, heads=2)
    cues = event_in_noise()
    x = torch.zeros(1, 30, 8)
    torch.testing.assert_close(gate(x, None, cues * 7.5 - 3.0), gate(x, None, cues))


def test_a_clip_shown_at_half_speed_rises_as_much_at_its_onset():
    gate = RiseGate(cue_dim=12, heads=2)
    cues = event_in_noise()
    slow = cues.repeat_interleave(2, dim=1)  # every frame twice, as the slow splits do
    x = torch.zeros(1, 60, 8)
    closed = gate.head.bias
    fast_logits, slow_logits = gate(x[:, :30], None, cues), gate(x, None, slow)
    torch.testing.assert_close(slow_logits[..., 0::2][..., 1:], fast_logits[..., 1:])
    torch.testing.assert_close(slow_logits[0, :, 1::2], closed[:, None].expand(2, 30))


def test_the_first_signal_step_rises_from_the_clips_mean_and_non_signal_tokens_never_open():
    gate = RiseGate(cue_dim=4, heads=2)
    cues = torch.randn(2, 7, 4)
    x = torch.zeros(2, 7, 8)
    closed = gate.head.bias
    signal = torch.ones(2, 7, dtype=torch.bool)
    signal[:, 0] = False  # a CLS token
    signal[1, 5:] = False  # padding of the second sequence
    logits = gate(x, signal, cues)
    for b, t in [(0, 0), (1, 0), (1, 5), (1, 6)]:
        torch.testing.assert_close(logits[b, :, t], closed, msg=f"token {t} of {b}")
    clip = cues[1, 1:5]  # the second sequence's signal
    first = (clip[0] - clip.mean()) / clip.std(unbiased=False)  # against the mean: 0
    rises = torch.cat((first.relu(), first.mean().relu()[None]))
    torch.testing.assert_close(logits[1, :, 1], gate.head(rises))
    alone = gate(x[:1, :4], None, cues[1:, 1:5])  # the same clip alone, no CLS, no padding
    torch.testing.assert_close(alone[0], logits[1, :, 1:5])
    padded = cues.clone()
    padded[1, 5:] = 1e3  # whatever the padding holds: the clip's statistics skip it
    torch.testing.assert_close(gate(x, signal, padded), logits)


def test_a_model_without_input_features_gets_a_clear_error():
    config = EncoderConfig(dim=8, depth=1, heads=2, mlp_dim=16, pe="cope", cope_gate="rise")
    with pytest.raises(ValueError, match="rise gate reads the frontend's input features"):
        SequenceClassifier(TokenFrontend(10, 8), config, num_classes=2)


class _QuestionFirst(torch.nn.Module):
    """Feature frames behind one leading (question) token, with the frames as cues."""

    dim, cue_dim = 8, 8

    def forward(self, inputs, padding_mask=None):
        tokens = torch.cat((torch.full_like(inputs[:, :1], 5.0), inputs), dim=1)
        cues = torch.nn.functional.pad(inputs, (0, 0, 1, 0))
        return FrontendOutput(tokens, None, None, leading=1, cues=cues)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_classifier_gates_open_at_the_onset_in_every_layer(causal):
    config = EncoderConfig(
        dim=8, depth=2, heads=2, mlp_dim=16, causal=causal, pe="cope", cope_gate="rise"
    )
    model = SequenceClassifier(_QuestionFirst(), config, num_classes=3).eval()
    assert model.encoder.shared_gate.head.in_features == 8 + 1  # the cues and their level
    clip = event_in_noise(length=16, onset=5, offset=11, channels=8)
    gates = readout_gates(model, clip, signal_tokens=16)
    assert (gates[:, 5] > 0.9).all() and (gates[:, 11] < 0.01).all()
    assert gates.sum(-1).max() < 1.1, "the CLS/question/readout steps must not count"


def test_patch_tokens_compare_a_patch_with_itself_one_step_earlier():
    """A square appears in one patch at step 2: only that patch's token opens its gate."""
    frontend = VideoFrontend(channels=1, dim=8, tubelet=(1, 4, 4), tokenizer="patches")
    clip = torch.zeros(1, 4, 1, 8, 8)
    clip[:, 2:, :, 4:6, 0:4] = 1.0  # half of patch (row 1, col 0), index 2 of 4, from step 2
    front = frontend(clip)
    assert front.lag == 4 and front.cues.shape == (1, 16, 16)
    for gate in (RiseGate(16, 1), ChangeGate(16, 1)):
        logits = gate(front.cues, None, front.cues, front.lag)
        opened = (torch.sigmoid(logits[0, 0]) > 0.5).nonzero().flatten().tolist()
        assert opened == [2 * 4 + 2], (type(gate).__name__, opened)


def test_per_frame_video_and_audio_frontends_hand_over_their_raw_features():
    frames = torch.rand(2, 6, 5)
    front = FeatureFrontend(5, 8, stack=2)(frames)
    assert front.lag == 1 and torch.equal(front.cues, frames.reshape(2, 3, 10))
    video = VideoFrontend(channels=1, dim=8, tubelet=(2, 4, 4), tokenizer="mlp-max")
    clip = torch.rand(1, 4, 1, 8, 8)
    front = video(clip)
    assert front.cues.shape == (1, 2, 32) and video.cue_dim == 32
    first_step = clip[0, :2, 0].reshape(2, 2, 4, 2, 4).permute(1, 3, 0, 2, 4).reshape(4, 32)
    torch.testing.assert_close(front.cues[0, 0], first_step.max(dim=0).values)
