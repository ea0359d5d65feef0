"""The position-encoding zoo: registry, each encoding's maths, and that each one trains."""

from __future__ import annotations

import pytest
import torch

from encoders.positions import (
    POSITION_ENCODINGS,
    PositionEncoding,
    PositionSpec,
    alibi_slopes,
    apply_rope,
    describe_position_encodings,
    get_position_encoding,
    list_position_encodings,
    register_position_encoding,
    t5_relative_buckets,
)
from encoders.transformer import Encoder, EncoderConfig

ALL_ENCODINGS = ["nope", "abs", "sin", "rope", "alibi", "t5", "rel", "cope", "cope+rope"]


def test_registry_holds_the_designed_encodings():
    assert sorted(list_position_encodings()) == sorted(ALL_ENCODINGS)


def test_listing_filters_names_with_wildcards():
    assert list_position_encodings("cope*") == ["cope", "cope+rope"]
    assert list_position_encodings("*rope") == ["cope+rope", "rope"]


def test_unknown_encoding_name_raises_with_the_valid_names():
    with pytest.raises(ValueError) as error:
        get_position_encoding("learned")
    message = str(error.value)
    assert "'learned'" in message
    for name in ALL_ENCODINGS:
        assert name in message


def test_unknown_encoding_name_fails_when_the_config_is_built():
    with pytest.raises(ValueError, match="choose one of"):
        EncoderConfig(pe="rotary")


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_every_encoding_runs_forward_and_backward(pe, causal):
    config = EncoderConfig(dim=16, depth=2, heads=2, mlp_dim=32, pe=pe, causal=causal, max_len=16)
    encoder = Encoder(config)
    x = torch.randn(3, 9, 16)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[2, 5:] = True
    out = encoder(x, mask)
    assert out.shape == (3, 9, 16) and torch.isfinite(out).all()
    alone = encoder(x[2:, :5])  # padding changes nothing at the real tokens
    torch.testing.assert_close(out[2:, :5], alone, atol=1e-5, rtol=1e-5)
    (out[~mask] ** 2).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, f"{pe}: {name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{pe}: {name} has a non-finite gradient"
    position_parameters = [
        parameter
        for name, parameter in encoder.named_parameters()
        if "positions" in name and parameter.grad is not None
    ]
    if pe in ("abs", "t5", "rel", "cope", "cope+rope"):  # encodings with learned state must learn
        assert any(parameter.grad.abs().sum() > 0 for parameter in position_parameters)


def test_learned_state_is_per_layer_for_cope_rel_and_t5_and_per_model_for_abs():
    def count(pe: str, marker: str) -> int:
        encoder = Encoder(EncoderConfig(dim=16, heads=2, depth=3, pe=pe, max_len=8))
        return sum(1 for name, _ in encoder.named_parameters() if marker in name)

    assert count("cope", "pos_emb") == 3
    assert count("t5", "positions.bias") == 3
    assert count("rel", "positions.table") == 3
    assert count("abs", "input_positions.table") == 1


def test_cope_table_rows_follow_the_npos_default():
    def table_shape(**options) -> tuple[int, ...]:
        config = EncoderConfig(dim=16, heads=2, depth=1, pe="cope", max_len=10, **options)
        return tuple(Encoder(config).blocks[0].attention.positions.cope.pos_emb.shape)

    assert table_shape(causal=True) == (11, 8)  # npos = max_len + 1 (the paper's text tasks)
    assert table_shape(causal=False) == (19, 8)  # npos = max_len, 2 * npos - 1 signed rows
    assert table_shape(causal=True, npos=4) == (4, 8)
    assert table_shape(causal=True, npos=4, cope_per_head=True) == (2, 4, 8)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-1, -2)


def test_rope_is_relative_shifting_every_position_keeps_scores():
    q = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    coords = torch.tensor([0, 1, 2, 5, 6, 9, 10])[:, None]
    rotated = _scores(apply_rope(q, coords), apply_rope(k, coords))
    shifted = _scores(apply_rope(q, coords + 37), apply_rope(k, coords + 37))
    torch.testing.assert_close(shifted, rotated)
    assert not torch.allclose(rotated, _scores(q, k))  # the rotation does something


def test_axial_rope_is_relative_on_every_axis():
    q = torch.randn(1, 2, 12, 24, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 24, dtype=torch.float64)
    t, h, w = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(2), indexing="ij")
    coords = torch.stack((t, h, w), dim=-1).reshape(-1, 3)
    rotated = _scores(apply_rope(q, coords), apply_rope(k, coords))
    shift = torch.tensor([[5, -3, 11]])
    torch.testing.assert_close(
        _scores(apply_rope(q, coords + shift), apply_rope(k, coords + shift)), rotated
    )
    # Each axis owns its own slice of the head dimension (24 / 3 axes = 8 dims each).
    moved = coords.clone()
    moved[:, 1] += 4
    changed = apply_rope(q, moved) != apply_rope(q, coords)
    assert changed[..., 8:16].any() and not changed[..., :8].any() and not changed[..., 16:].any()


def test_alibi_penalises_distance_linearly_per_head():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    assert alibi_slopes(6).shape == (6,)
    spec = PositionSpec(dim=16, heads=4, causal=False, max_len=8, npos=8)
    bias = get_position_encoding("alibi")(spec).score_bias(
        torch.arange(5)[:, None], torch.randn(1, 4, 5, 4)
    )
    assert bias.shape == (4, 5, 5)
    torch.testing.assert_close(bias[0, 4, 1], torch.tensor(-3 * 2**-2))
    torch.testing.assert_close(bias[0, 1, 4], bias[0, 4, 1])  # symmetric when bidirectional


def test_t5_buckets_are_exact_near_and_logarithmic_far():
    relative = torch.arange(-200, 201)
    buckets = t5_relative_buckets(relative, bidirectional=True, num_buckets=32, max_distance=128)
    past = buckets[relative <= 0].flip(0)  # distances 0, 1, 2, ... into the past
    future = buckets[relative > 0]
    assert past[:8].tolist() == list(range(8))  # the first num_buckets / 4 offsets are exact
    assert (past.diff() >= 0).all() and past.max() == 15
    assert set(future.tolist()).isdisjoint(past.tolist())  # each side has its own buckets
    causal = t5_relative_buckets(relative, bidirectional=False, num_buckets=32, max_distance=128)
    assert (causal[relative > 0] == 0).all() and causal.max() == 31


def test_a_new_encoding_is_one_class_and_one_registry_line():
    @register_position_encoding("test-halve-scores")
    class HalveScores(PositionEncoding):
        def rotate(self, q, k, coords):
            return q * 0.5, k

    try:
        assert "test-halve-scores" in list_position_encodings()
        encoder = Encoder(EncoderConfig(dim=16, heads=2, pe="test-halve-scores"))
        assert encoder(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    finally:
        del POSITION_ENCODINGS["test-halve-scores"]


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
def test_each_encoding_acts_where_its_description_says(pe):
    acts_on, summary = describe_position_encodings()[pe]
    assert summary
    spec = PositionSpec(dim=16, heads=2, causal=True, max_len=8, npos=8)
    cls = get_position_encoding(pe)
    layer = cls(spec)
    q = torch.randn(1, 2, 5, 8)
    coords = torch.arange(5)[:, None]
    rotated, _ = layer.rotate(q, q, coords)
    assert (cls.input_encoding(spec) is not None) == (acts_on == "input")
    # cope+rope rotates inside its kernel (its position logits need the unrotated query).
    assert (not torch.equal(rotated, q)) == (acts_on == "q/k")
    assert (layer.score_bias(coords, q) is not None) == (acts_on == "scores")
    assert layer.replaces_kernel == acts_on.endswith("kernel")


def _randomise_position_tables(encoder: Encoder) -> None:
    """CoPE tables start at zero (no position effect): give them values so tests can see them."""
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("pos_emb"):
                parameter.normal_()


@pytest.mark.parametrize("pe", ["rope", "t5", "rel", "cope", "cope+rope"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_relative_encodings_are_shift_invariant(pe, causal):
    config = EncoderConfig(dim=16, depth=2, heads=2, mlp_dim=32, pe=pe, causal=causal, max_len=32)
    encoder = Encoder(config).double().eval()
    _randomise_position_tables(encoder)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    coords = torch.arange(7)[:, None]
    torch.testing.assert_close(encoder(x, coords=coords + 11), encoder(x, coords=coords))


def _cope_rope_oracle(q, k, v, table, coords):
    """Causal cope+rope by the formulas: rotated scores and gates, unrotated position logits."""
    rq, rk = apply_rope(q, coords), apply_rope(k, coords)
    scores = rq @ rk.transpose(-1, -2) / q.shape[-1] ** 0.5
    length = q.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    gates = torch.sigmoid(scores).masked_fill(~causal, 0.0)
    positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=table.shape[0] - 1)
    z = q @ table.T  # unrotated query
    floor = positions.floor()
    bias = z.gather(-1, positions.ceil().long()) * (positions - floor) + z.gather(
        -1, floor.long()
    ) * (1 - positions + floor)
    weights = torch.softmax((scores + bias).masked_fill(~causal, float("-inf")), dim=-1)
    return weights @ v


def test_cope_rope_takes_position_logits_from_the_unrotated_query():
    spec = PositionSpec(dim=16, heads=2, causal=True, max_len=8, npos=6)
    layer = get_position_encoding("cope+rope")(spec).double()
    with torch.no_grad():
        layer.cope.pos_emb.normal_()
    q, k, v = (torch.randn(2, 2, 8, 8, dtype=torch.float64) for _ in range(3))
    coords = torch.arange(8)[:, None] + 5
    out, _, _ = layer.attend(q, k, v, key_padding_mask=None, record=False, coords=coords)
    expected = _cope_rope_oracle(q, k, v, layer.cope.pos_emb, coords)
    torch.testing.assert_close(out, expected)
    recorded, weights, positions = layer.attend(
        q, k, v, key_padding_mask=None, record=True, coords=coords
    )
    torch.testing.assert_close(recorded, expected)
    assert weights.shape == positions.shape == (2, 2, 8, 8)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_scaling_cope_logits_equals_a_table_divided_by_sqrt_d(causal):
    def encoder(scale: bool) -> Encoder:
        config = EncoderConfig(
            dim=16, depth=1, heads=2, pe="cope", causal=causal, max_len=8, cope_scale_logits=scale
        )
        torch.manual_seed(0)
        return Encoder(config).double().eval()

    scaled, plain = encoder(True), encoder(False)
    table = torch.randn_like(scaled.blocks[0].attention.positions.cope.pos_emb)
    with torch.no_grad():
        scaled.blocks[0].attention.positions.cope.pos_emb.copy_(table)
        plain.blocks[0].attention.positions.cope.pos_emb.copy_(table / 8**0.5)  # head dim 8
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), plain(x))
    with torch.no_grad():
        plain.blocks[0].attention.positions.cope.pos_emb.copy_(table)
    assert not torch.allclose(scaled(x), plain(x))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_paper_rel_adds_query_times_clipped_distance_vector_over_sqrt_d(causal):
    spec = PositionSpec(dim=8, heads=2, causal=causal, max_len=10, npos=4)
    layer = get_position_encoding("rel")(spec).double()
    assert layer.table.shape == ((4, 4) if causal else (7, 4))
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64)
    bias = layer.score_bias(torch.arange(7)[:, None], q)
    assert bias.shape == (1, 2, 7, 7)
    for i in range(7):
        for j in range(7):
            if causal and j > i:
                continue
            distance = max(-3, min(3, i - j))  # clipped at npos - 1
            row = distance if causal else distance + 3
            expected = q[0, :, i] @ layer.table[row] / 2.0  # sqrt(head_dim 4)
            torch.testing.assert_close(bias[0, :, i, j], expected)


def test_attention_dropout_acts_only_while_training():
    for pe in ("rope", "cope"):
        config = EncoderConfig(dim=16, depth=1, heads=2, pe=pe, causal=True, attn_dropout=0.5)
        encoder = Encoder(config)
        x = torch.randn(2, 6, 16)
        encoder.train()
        assert not torch.allclose(encoder(x), encoder(x)), pe
        encoder.eval()
        torch.testing.assert_close(encoder(x), encoder(x))
    with pytest.raises(ValueError, match="attn_dropout"):
        EncoderConfig(attn_dropout=1.0)
