"""Encoder blocks and heads: hand-written equivalents, masks, readouts, recording."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from encoders.frontends import FeatureFrontend, TokenFrontend
from encoders.positions import sinusoidal_table
from encoders.transformer import (
    Encoder,
    EncoderConfig,
    SequenceClassifier,
    TokenClassifier,
    grid_coords,
    recorded_layers,
    set_recording,
)

ALL_ENCODINGS = ["nope", "abs", "sin", "rope", "alibi", "t5", "rel", "cope", "cope+rope"]


def small_config(**options) -> EncoderConfig:
    values = {"dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "max_len": 16}
    return EncoderConfig(**{**values, **options})


def hand_written_block(block, x, mask, causal):
    """One pre-norm block written out with F.scaled_dot_product_attention."""
    attention = block.attention
    heads = attention.heads
    h = block.norm_attention(x)
    q, k, v = attention.qkv(h).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    allowed = ~mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    x = x + attention.out(out.transpose(1, 2).flatten(2))
    return x + block.feed_forward(block.norm_feed_forward(x))


@pytest.mark.parametrize("pe", ["nope", "abs", "sin"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_input_encodings_match_hand_written_sdpa_attention(pe, causal):
    encoder = Encoder(small_config(pe=pe, causal=causal)).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    expected = x
    if pe == "abs":
        expected = x + encoder.input_positions.table[:7]
    elif pe == "sin":
        expected = x + sinusoidal_table(7, 16)
    for block in encoder.blocks:
        expected = hand_written_block(block, expected, mask, causal)
    expected = encoder.final_norm(expected)
    torch.testing.assert_close(encoder(x, mask)[~mask], expected[~mask], rtol=1e-5, atol=1e-5)


def test_sinusoidal_table_is_the_transformer_formula():
    table = sinusoidal_table(6, 8)
    position, pair = 5, 1
    angle = position / 10000 ** (2 * pair / 8)
    assert table[position, 2 * pair].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[position, 2 * pair + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize(("with_table", "without_table"), [("cope", "nope"), ("cope+rope", "rope")])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cope_with_zero_table_equals_attention_without_it(with_table, without_table, causal):
    reference = Encoder(small_config(pe=without_table, causal=causal)).eval()
    cope = Encoder(small_config(pe=with_table, causal=causal)).eval()
    missing, unexpected = cope.load_state_dict(reference.state_dict(), strict=False)
    assert all("pos_emb" in name for name in missing) and not unexpected
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    torch.testing.assert_close(cope(x, mask)[~mask], reference(x, mask)[~mask])
    with torch.no_grad():  # and a non-zero table does change the output
        for layer in cope.blocks:
            layer.attention.positions.cope.pos_emb.normal_()
    assert not torch.allclose(cope(x, mask)[~mask], reference(x, mask)[~mask], atol=1e-3)


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_recording_path_equals_the_fused_path(pe, causal):
    encoder = Encoder(small_config(pe=pe, causal=causal)).eval()
    x = torch.randn(2, 8, 16)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 6:] = True
    fused = encoder(x, mask)
    set_recording(encoder, True)
    explicit = encoder(x, mask)
    layers = recorded_layers(encoder)
    set_recording(encoder, False)
    torch.testing.assert_close(explicit[~mask], fused[~mask], rtol=1e-5, atol=1e-5)
    assert len(layers) == 2 and recorded_layers(encoder) == []
    weights = layers[0]["attention"]
    assert weights.shape == (2, 2, 8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 8))
    assert (weights[1, ..., 6:] == 0).all()  # padded keys get no attention
    if causal:
        assert (weights.triu(1) == 0).all()
    positions = layers[0]["positions"]
    if pe.startswith("cope"):
        assert positions.shape == (2, 2, 8, 8) and positions.dtype == torch.float32
    else:
        assert positions is None


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_does_not_change_the_real_tokens(pe, causal):
    encoder = Encoder(small_config(pe=pe, causal=causal)).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat((x, torch.randn(1, 3, 16)), dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    torch.testing.assert_close(encoder(padded, mask)[:, :5], encoder(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
def test_causal_outputs_do_not_see_the_future(pe):
    encoder = Encoder(small_config(pe=pe, causal=True)).eval()
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(encoder(changed)[:, :5], encoder(x)[:, :5])
    assert not torch.allclose(encoder(changed)[:, 5:], encoder(x)[:, 5:])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_readout_sees_the_whole_sequence_and_ignores_padding(causal, pooling):
    config = small_config(pe="cope", causal=causal, pooling=pooling)
    model = SequenceClassifier(FeatureFrontend(5, 16), config, num_classes=3).eval()
    x = torch.randn(1, 6, 5)
    logits = model(x)
    assert logits.shape == (1, 3)
    first_changed = x.clone()
    first_changed[:, 0] += 1.0
    assert not torch.allclose(model(first_changed), logits)  # the first token reaches the readout
    padded = torch.cat((x, torch.randn(1, 4, 5)), dim=1)
    mask = torch.tensor([[False] * 6 + [True] * 4])
    torch.testing.assert_close(model(padded, mask), logits, rtol=1e-5, atol=1e-5)


def test_token_classifier_is_a_causal_language_model_head():
    config = small_config(pe="cope", causal=True)
    model = TokenClassifier(TokenFrontend(11, 16), config, num_classes=11).eval()
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)
    assert logits.shape == (2, 9, 11)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])


def test_frontend_width_is_projected_to_the_model_width():
    model = SequenceClassifier(FeatureFrontend(5, 24), small_config(pe="rope"), num_classes=2)
    assert isinstance(model.project, torch.nn.Linear)
    assert (model.project.in_features, model.project.out_features) == (24, 16)
    model(torch.randn(2, 4, 5)).sum().backward()  # the projection is on the gradient's path
    assert model.project.weight.grad is not None and model.project.weight.grad.abs().sum() > 0
    same_width = SequenceClassifier(FeatureFrontend(5, 16), small_config(pe="rope"), num_classes=2)
    assert isinstance(same_width.project, torch.nn.Identity)  # nothing to project


def test_post_norm_blocks_normalise_after_the_residual_sum():
    encoder = Encoder(small_config(pe="nope", norm="post", depth=1)).eval()
    out = encoder(torch.randn(2, 5, 16) * 10)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_dropout_is_active_only_in_training():
    encoder = Encoder(small_config(pe="cope", dropout=0.5))
    x = torch.randn(2, 6, 16)
    assert not torch.allclose(encoder(x), encoder(x))
    encoder.eval()
    torch.testing.assert_close(encoder(x), encoder(x))


def test_grid_coords_lay_tokens_out_row_major():
    coords = grid_coords(10, (2, 2, 2), torch.device("cpu"))
    assert coords[:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert coords[9].tolist() == [2, 0, 1]  # the first axis runs past its nominal size
    encoder = Encoder(small_config(pe="rope", grid=[2, 2, 2]))
    assert encoder.config.grid == (2, 2, 2)
    assert encoder(torch.randn(1, 10, 16)).shape == (1, 10, 16)


def test_cope_gates_stay_float32_in_a_bf16_autocast_model():
    model = SequenceClassifier(FeatureFrontend(5, 16), small_config(pe="cope"), num_classes=3)
    set_recording(model, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 6, 5))
    logits.float().sum().backward()
    layers = recorded_layers(model)
    assert logits.dtype == torch.bfloat16
    assert all(layer["positions"].dtype == torch.float32 for layer in layers)
    assert all(layer["attention"].dtype == torch.float32 for layer in layers)


def test_learned_absolute_table_refuses_sequences_past_max_len():
    encoder = Encoder(small_config(pe="abs", max_len=4))
    encoder(torch.randn(1, 5, 16))  # max_len + 1 rows: room for a CLS token
    with pytest.raises(ValueError, match="max_len"):
        encoder(torch.randn(1, 6, 16))


def test_encoders_import_nothing_from_recipes_or_the_cli():
    package = Path(__file__).resolve().parents[1] / "encoders"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("recipes", "cope_cli")), f"{path.name} imports {name}"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_every_classifier_parameter_gets_a_gradient(pooling, causal):
    # DistributedDataParallel fails on parameters that never receive a gradient.
    config = small_config(pe="abs", causal=causal, pooling=pooling)
    model = SequenceClassifier(FeatureFrontend(5, 16, stack=2), config, num_classes=3)
    model(torch.randn(2, 7, 5)).sum().backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert unused == []


@pytest.mark.slow
@pytest.mark.parametrize("pe", [pe for pe in ALL_ENCODINGS if pe != "nope"])
def test_position_aware_encodings_learn_to_copy_the_previous_token(pe):
    # A task only position information solves cleanly; a causal NoPE reached 0.85 here.
    vocab, length = 8, 24
    config = small_config(dim=32, heads=2, mlp_dim=64, pe=pe, causal=True, max_len=length)
    model = TokenClassifier(TokenFrontend(vocab, 32), config, num_classes=vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        tokens = torch.randint(0, vocab, (32, length), generator=generator)
        logits = model(tokens)[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens = torch.randint(0, vocab, (256, length), generator=generator)
    with torch.no_grad():
        accuracy = (model(tokens)[:, 1:].argmax(-1) == tokens[:, :-1]).float().mean().item()
    assert accuracy > 0.9


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
@pytest.mark.parametrize("record", [False, True], ids=["fused", "recording"])
def test_an_all_padding_sequence_does_not_poison_the_batch_gradients(pe, record):
    encoder = Encoder(small_config(pe=pe, causal=False))
    set_recording(encoder, record)
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True  # an empty item, e.g. a clip whose features all failed to load
    encoder(x, mask)[0].sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, parameter in encoder.named_parameters():
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("pe", ALL_ENCODINGS)
def test_a_saved_state_dict_loads_with_weights_only_and_gives_the_same_outputs(pe, tmp_path):
    config = small_config(pe=pe, causal=True, pooling="cls")
    model = SequenceClassifier(FeatureFrontend(5, 16), config, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)  # a fresh model with other weights
    restored = SequenceClassifier(FeatureFrontend(5, 16), config, num_classes=3).eval()
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(restored(x), model(x))
