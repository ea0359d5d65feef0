"""CoPE's gate-sum regulariser: a budget on sum_j g_ij per query, added to the training loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from encoders.cope import cope_gates, onset_keys
from encoders.cope_cpu import kernel_available
from encoders.frontends import FrontendOutput
from encoders.positions import (
    ContextualPositions,
    PositionSpec,
    gate_budget_penalty,
    gate_sums,
)
from encoders.transformer import EncoderConfig, SequenceClassifier, auxiliary_loss
from recipes.base import get_recipe
from recipes.engine.config import resolve_config
from recipes.engine.trainer import TrainOptions, train


class _Tokens(torch.nn.Module):
    """The identity frontend: inputs are already (B, T, dim) tokens."""

    dim = 8

    def forward(self, inputs, padding_mask=None):
        return FrontendOutput(inputs, padding_mask, None)


def test_penalty_matches_a_hand_computation() -> None:
    sums = torch.tensor([[[2.0, 1.5, 0.5]]])
    # budget 1: excesses 1, 0.5, 0 -> squares 1, 0.25, 0
    assert gate_budget_penalty(sums, 1.0).item() == pytest.approx((1 + 0.25 + 0) / 3)
    padded = torch.tensor([[False, False, True]])  # the third query is padding: not counted
    assert gate_budget_penalty(sums, 1.0, padded).item() == pytest.approx((1 + 0.25) / 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gate", ["qk", "onset", "token"])
def test_gate_sums_equal_the_row_sums_of_the_reference_gates(causal: bool, gate: str) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    inputs = {
        "gate": gate,
        "gate_keys": onset_keys(k) if gate == "onset" else None,
        "gate_logits": torch.randn(2, 2, 6) if gate == "token" else None,
    }
    options = {"causal": causal, "key_padding_mask": padding, **inputs}
    expected = cope_gates(q, k, **options).sum(-1)
    torch.testing.assert_close(gate_sums(q, k, **options), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_layer_leaves_the_weighted_penalty_of_its_qk_gates(causal: bool) -> None:
    torch.manual_seed(0)
    spec = PositionSpec(
        dim=8, heads=2, causal=causal, max_len=6, npos=6, cope_gate_budget=1.5, cope_gate_weight=2
    )
    layer = ContextualPositions(spec).train()
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    layer.attend(q, k, v, key_padding_mask=None, record=False)
    gates = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(4))
    if causal:
        gates = gates.tril()
    expected = 2 * torch.relu(gates.sum(-1) - 1.5).square().mean()
    assert layer.auxiliary_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("gate", ["qk", "onset", "token"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_gradient_of_the_budget_reaches_the_attention_weights(gate: str, impl: str) -> None:
    if impl == "fused" and not kernel_available():
        pytest.skip("the fused CPU kernel is not built")
    torch.manual_seed(0)
    config = EncoderConfig(
        dim=8,
        depth=1,
        heads=2,
        pe="cope",
        max_len=12,
        cope_impl=impl,
        cope_gate=gate,
        cope_gate_budget=0.5,
        cope_gate_weight=1.0,
    )
    model = SequenceClassifier(_Tokens(), config, num_classes=3).train()
    model(torch.randn(2, 10, 8))
    extra = auxiliary_loss(model)
    assert extra is not None and extra.item() > 0
    extra.backward()
    attention = model.encoder.blocks[0].attention
    # qk and onset gates come from the queries and keys; the token gate from its own head.
    gated = attention.positions.gate_head if gate == "token" else attention.qkv
    assert gated.weight.grad.abs().sum() > 0


def test_budget_is_off_by_default_and_in_evaluation() -> None:
    model = SequenceClassifier(_Tokens(), EncoderConfig(dim=8, heads=2, pe="cope"), 3).train()
    model(torch.randn(2, 6, 8))
    assert auxiliary_loss(model) is None
    on = EncoderConfig(dim=8, heads=2, pe="cope", cope_gate_budget=1.0)
    model = SequenceClassifier(_Tokens(), on, 3).eval()
    model(torch.randn(2, 6, 8))
    assert auxiliary_loss(model) is None


def _trained_weights(out: Path, **options: object) -> dict[str, torch.Tensor]:
    settings = {
        "train.steps": 3,
        "train.batch_size": 4,
        "train.eval_every": 3,
        "data.train_size": 12,
        "data.eval_size": 4,
        "model.dim": 16,
        "model.depth": 1,
        "model.heads": 2,
        **options,
    }
    config = resolve_config(
        get_recipe("counting"), cli_options={"model.pe": "cope"}, set_options=settings
    )
    result = train(get_recipe("counting"), config, TrainOptions(out=out))
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["model"]
    return {name: tensor.float() for name, tensor in state.items()}


def test_trainer_adds_the_budget_only_when_it_weighs_something(tmp_path: Path) -> None:
    default = _trained_weights(tmp_path / "default")
    weightless = _trained_weights(
        tmp_path / "weightless", **{"model.cope_gate_budget": 0.5, "model.cope_gate_weight": 0.0}
    )
    budgeted = _trained_weights(
        tmp_path / "budgeted", **{"model.cope_gate_budget": 0.5, "model.cope_gate_weight": 1.0}
    )
    assert all(torch.equal(default[name], weightless[name]) for name in default)
    assert any(not torch.equal(default[name], budgeted[name]) for name in default)
