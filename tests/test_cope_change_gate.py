"""CoPE's change gate: a change detector on the encoder input, shared by the layers (and the
fused-kernel check of both shared gates, change and rise).

Specification (docs/cope-maths.md, "The change gate"): per-key gate logits from the differences
of neighbouring input tokens, no change at the signal's first token or next to a non-signal
token, closed gates on a steady input at initialisation, and the same attention maths as the
token gate on every path (reference and fused kernel).
"""

from __future__ import annotations

import pytest
import torch
from shared_gates import readout_gates

from encoders.cope import cope_attention, cope_gates
from encoders.cope_cpu import kernel_available
from encoders.frontends import FeatureFrontend, FrontendOutput
from encoders.positions import ChangeGate, RiseGate
from encoders.transformer import (
    EncoderConfig,
    SequenceClassifier,
    TokenClassifier,
)

needs_kernel = pytest.mark.skipif(
    not kernel_available(), reason="CPU kernel not built (run make install)"
)


def steady_then_step(length: int, step_at: int, dim: int = 64, noise: float = 0.0) -> torch.Tensor:
    """(1, length, dim): one token repeated, then another from ``step_at`` on (plus noise)."""
    generator = torch.Generator().manual_seed(5)
    before, after = torch.randn(2, dim, generator=generator)
    x = torch.where(torch.arange(length)[:, None] < step_at, before, after)[None].clone()
    return x + noise * torch.randn(x.shape, generator=generator)


def test_untrained_gate_opens_at_a_step_change_and_stays_closed_on_a_steady_input():
    gate = ChangeGate(dim=64, heads=3)
    gates = torch.sigmoid(gate(steady_then_step(12, step_at=7)))[0]  # (heads, T)
    assert gates.shape == (3, 12)
    assert (gates[:, 7] > 0.5).all(), gates[:, 7]
    steady = torch.cat((gates[:, :7], gates[:, 8:]), dim=1)
    assert (steady < 1e-4).all(), steady.max()


def test_untrained_gate_ignores_small_fluctuations_but_not_the_step():
    gate = ChangeGate(dim=64, heads=2)
    gates = torch.sigmoid(gate(steady_then_step(40, step_at=25, noise=0.05)))[0]
    others = torch.cat((gates[:, :25], gates[:, 26:]), dim=1)
    assert (gates[:, 25] > 0.5).all() and others.sum(-1).max() < 0.5


def test_a_step_back_opens_the_gate_too_and_the_two_signs_are_weighted_apart():
    gate = ChangeGate(dim=64, heads=1)
    up = steady_then_step(10, step_at=4)
    assert torch.sigmoid(gate(up.flip(1)))[0, 0, 6] > 0.5  # the same step the other way round
    with torch.no_grad():  # weights the two halves [relu(d), relu(-d)] differently
        gate.head.weight.normal_()
    assert gate(up)[0, 0, 4] != gate(-up)[0, 0, 4]


def test_first_token_and_non_signal_neighbours_measure_no_change():
    gate = ChangeGate(dim=8, heads=2)
    x = torch.randn(2, 6, 8)
    closed = gate.head.bias[:, None]  # logit of d = 0
    torch.testing.assert_close(gate(x)[:, :, 0], closed.T.expand(2, 2))
    signal = torch.ones(2, 6, dtype=torch.bool)
    signal[:, 0] = False  # a CLS token
    signal[1, 4:] = False  # padding of the second sequence
    logits = gate(x, signal)
    for b, t in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 4), (1, 5)]:
        torch.testing.assert_close(logits[b, :, t], closed[:, 0], msg=f"token {t} of {b}")
    assert (logits[0, :, 2:] != closed).all()


def test_padded_keys_have_zero_gates():
    gate = ChangeGate(dim=8, heads=2)
    x = torch.randn(1, 7, 8)
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, 5:] = True
    logits = gate(x, ~mask)
    q = torch.randn(1, 2, 7, 4)
    gates = cope_gates(q, q, causal=False, key_padding_mask=mask, gate="change", gate_logits=logits)
    assert (gates[..., 5:] == 0).all() and (gates[..., :5] > 0).all()


def shared_gate_case(
    kind: str, causal: bool, padded: bool, length: int = 21, dim: int = 8, heads: int = 2
):
    """The gate's input (encoder input x, or cues for ``rise``), q, k, v, table, the change or
    rise gate and a padding mask (float64)."""
    torch.manual_seed(7 + causal + 2 * padded + 4 * (kind == "rise"))
    npos = 5
    x = torch.randn(2, length, heads * dim, dtype=torch.float64)
    x[:, 8:14] = x[:, 8:9]  # a steady stretch: gates near 0 there, near 1 at its start
    x[:, 14:, :3] += 3.0  # then a rise
    q, k, v = (torch.randn(2, heads, length, dim, dtype=torch.float64) for _ in "qkv")
    table = torch.randn(npos if causal else 2 * npos - 1, dim, dtype=torch.float64) * 0.5
    gate = (ChangeGate if kind == "change" else RiseGate)(heads * dim, heads).double()
    mask = None
    if padded:
        mask = torch.zeros(2, length, dtype=torch.bool)
        mask[0, -6:] = True
        mask[1, 3] = True  # a hole inside the sequence
    return [x, q, k, v, table], gate, mask


@needs_kernel
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("kind", ["change", "rise"])
def test_fused_kernel_equals_the_reference_through_the_shared_gates(kind, causal, padded):
    leaves, gate, mask = shared_gate_case(kind, causal, padded)
    params = list(gate.parameters())
    grad_out = torch.randn(2, 2, 21, 8, dtype=torch.float64)
    results = {}
    for impl in ("reference", "fused"):
        inputs = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        source, q, k, v, table = inputs
        signal = None if mask is None else ~mask
        out = cope_attention(
            q, k, v, table, causal=causal, key_padding_mask=mask, impl=impl, gate=kind,
            gate_logits=gate(source, signal, source),
        )  # fmt: skip
        results[impl] = [out.detach(), *torch.autograd.grad(out, inputs + params, grad_out)]
    names = ["out", "dsource", "dq", "dk", "dv", "dtable"]
    names += [f"d{name}" for name, _ in gate.named_parameters()]
    for name, want, got in zip(names, results["reference"], results["fused"], strict=True):
        err = (want - got).abs().max().item()
        assert err <= 1e-10, f"{name}: max abs error {err:.2e}"
    assert results["fused"][1].abs().sum() > 0, f"the {kind} gate must pass gradients to its input"
    assert results["fused"][-1].abs().sum() > 0, f"the {kind} gate's bias must learn"


class _QuestionFirst(torch.nn.Module):
    """A frontend with one leading (question) token before the signal's tokens."""

    dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.question = torch.nn.Parameter(torch.randn(8) * 5)

    def forward(self, inputs, padding_mask=None):
        question = self.question.expand(inputs.shape[0], 1, -1)
        tokens = torch.cat((question, inputs), dim=1)
        if padding_mask is not None:
            padding_mask = torch.cat((padding_mask[:, :1] & False, padding_mask), dim=1)
        return FrontendOutput(tokens, padding_mask, None, leading=1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_classifier_gates_count_the_signals_changes_only_in_every_layer(causal):
    config = EncoderConfig(
        dim=8, depth=2, heads=2, mlp_dim=16, causal=causal, pe="cope", cope_gate="change"
    )
    model = SequenceClassifier(_QuestionFirst(), config, num_classes=3).eval()
    signal = torch.cat((torch.full((1, 5, 8), 2.0), torch.full((1, 6, 8), -2.0)), dim=1)
    signal[..., ::2] *= -1  # two unrelated steady tokens: one change, at index 5
    gates = readout_gates(model, signal, signal_tokens=11)
    assert (gates[:, 5] > 0.5).all()
    others = torch.cat((gates[:, :5], gates[:, 6:]), dim=1)
    assert (others < 1e-3).all(), "the CLS/question/readout steps must not count as changes"


def test_change_gate_parameters_learn_through_a_classifier():
    config = EncoderConfig(dim=16, depth=1, heads=2, mlp_dim=32, pe="cope", cope_gate="change")
    model = SequenceClassifier(FeatureFrontend(5, 16), config, num_classes=3)
    assert model.encoder.blocks[0].attention.positions.gate_head is None
    with torch.no_grad():  # the zero-initialised table gives the gates no gradient yet
        model.encoder.blocks[0].attention.positions.cope.pos_emb.normal_()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    model(torch.randn(2, 9, 5) * 3, mask).sum().backward()
    gate = model.encoder.shared_gate
    assert isinstance(gate, ChangeGate)
    assert gate.head.weight.grad.abs().sum() > 0 and gate.project.weight.grad.abs().sum() > 0


def test_token_classifier_and_rope_variant_run_with_the_change_gate():
    for pe in ("cope", "cope+rope"):
        config = EncoderConfig(dim=8, depth=1, heads=2, mlp_dim=16, causal=True, pe=pe,
                               cope_gate="change")  # fmt: skip
        model = TokenClassifier(FeatureFrontend(3, 8), config, num_classes=4)
        assert model(torch.randn(2, 6, 3)).shape == (2, 6, 4)


def test_other_encodings_build_no_shared_gate():
    for gate in ("qk", "onset", "token"):
        config = EncoderConfig(dim=8, depth=1, heads=2, mlp_dim=16, cope_gate=gate)
        assert SequenceClassifier(FeatureFrontend(3, 8), config, 2).encoder.shared_gate is None
    config = EncoderConfig(dim=8, depth=1, heads=2, mlp_dim=16, pe="rope", cope_gate="change")
    assert SequenceClassifier(FeatureFrontend(3, 8), config, 2).encoder.shared_gate is None
