"""The CoPE reference against its formula (encoders/cope_reference.py), looped over i and j."""

from __future__ import annotations

import math

import pytest
import torch

from encoders.cope import CoPE, cope_attention, cope_positions, reference_cope_attention


def loop_cope(q, k, v, table, *, causal, key_padding_mask=None, gate_of=None):
    """The formula term by term: one query i, one key j at a time (float64, autograd-able).

    ``gate_of(b, h, i, j)`` replaces the paper's gate sigmoid(s_ij) (the gate variants' tests).
    """
    batch, heads, length, head_dim = q.shape
    rows = table.shape[-2]
    npos = rows if causal else (rows + 1) // 2
    offset = 0 if causal else npos - 1
    outputs = []
    for b in range(batch):
        for h in range(heads):
            e = table[h] if table.dim() == 3 else table
            for i in range(length):
                allowed = [
                    j
                    for j in range(length)
                    if (not causal or j <= i)
                    and (key_padding_mask is None or not key_padding_mask[b, j])
                ]
                if not allowed:
                    outputs.append(torch.zeros_like(v[b, h, i]))
                    continue
                score = {j: q[b, h, i] @ k[b, h, j] / math.sqrt(head_dim) for j in allowed}
                gate = {
                    j: torch.sigmoid(score[j]) if gate_of is None else gate_of(b, h, i, j)
                    for j in allowed
                }
                logits = []
                for j in allowed:
                    if j <= i:
                        p = sum(gate[m] for m in range(j, i + 1) if m in gate)
                    else:
                        p = -sum(gate[m] for m in range(i + 1, j + 1) if m in gate)
                    p = p.clamp(min=0 if causal else -(npos - 1), max=npos - 1)
                    lower = int(math.floor(p.item()))
                    upper = int(math.ceil(p.item()))
                    fraction = p - lower
                    z_upper = q[b, h, i] @ e[upper + offset]
                    z_lower = q[b, h, i] @ e[lower + offset]
                    logits.append(score[j] + z_upper * fraction + z_lower * (1 - fraction))
                weights = torch.softmax(torch.stack(logits), dim=0)
                outputs.append(sum(w * v[b, h, j] for w, j in zip(weights, allowed, strict=True)))
    return torch.stack(outputs).reshape(batch, heads, length, -1)


def _inputs(batch, heads, length, head_dim, rows, per_head, scale=1.5):
    generator = torch.Generator().manual_seed(7)

    def draw(*shape, std=1.0):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
        return values.requires_grad_()

    q, k, v = (draw(batch, heads, length, head_dim, std=scale) for _ in range(3))
    table = draw(*((heads,) if per_head else ()), rows, head_dim, std=0.7)
    return q, k, v, table


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared-table", "per-head-table"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_reference_equals_loop_in_values_and_gradients(causal, per_head, padded):
    batch, heads, length, head_dim, npos = 2, 2, 7, 4, 3
    rows = npos if causal else 2 * npos - 1
    q, k, v, table = _inputs(batch, heads, length, head_dim, rows, per_head)
    mask = None
    if padded:
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[1, 4:] = True  # second sequence: 4 real tokens of 7
    expected = loop_cope(q, k, v, table, causal=causal, key_padding_mask=mask)
    actual = reference_cope_attention(q, k, v, table, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v, table))
    actual_grads = torch.autograd.grad((actual * upstream).sum(), (q, k, v, table))
    for name, got, want in zip("qkve", actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_positions_are_capped_and_do_not_increase_towards_the_query():
    q = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    npos = 4
    positions = cope_positions(q, k, causal=True, npos=npos)
    uncapped = cope_positions(q, k, causal=True)
    assert uncapped.max() > npos - 1  # the cap has something to do
    assert positions.max() <= npos - 1
    torch.testing.assert_close(positions, uncapped.clamp(max=npos - 1))
    for i in range(9):
        row = positions[..., i, : i + 1]  # keys 0..i
        assert (row[..., :-1] >= row[..., 1:]).all(), "a key further left got a smaller position"
        assert (row[..., -1] > 0).all() and (row[..., -1] <= 1).all()  # p_ii = g_ii


def _gated_qk(open_keys: list[bool], sharpness: float = 200.0):
    """q, k (1, 1, T, 2) whose scores are +-sharpness: the gate of key j is 1 iff open_keys[j]."""
    length = len(open_keys)
    q = torch.zeros(1, 1, length, 2, dtype=torch.float64)
    q[..., 0] = sharpness
    k = torch.zeros(1, 1, length, 2, dtype=torch.float64)
    k[0, 0, :, 0] = torch.tensor([1.0 if is_open else -1.0 for is_open in open_keys])
    return q, k


def test_positions_count_only_open_gates():
    open_keys = [True, False, False, True, True, False, True, False]
    q, k = _gated_qk(open_keys)
    positions = cope_positions(q, k, causal=True)[0, 0]
    for i in range(len(open_keys)):
        for j in range(i + 1):
            assert positions[i, j].item() == pytest.approx(sum(open_keys[j : i + 1]), abs=1e-9)


def test_bidirectional_positions_count_open_gates_with_a_sign_per_side():
    open_keys = [True, False, True, True, False, False, True]
    q, k = _gated_qk(open_keys)
    positions = cope_positions(q, k, causal=False)[0, 0]
    for i in range(len(open_keys)):
        for j in range(len(open_keys)):
            if j <= i:
                expected = sum(open_keys[j : i + 1])
            else:
                expected = -sum(open_keys[i + 1 : j + 1])
            assert positions[i, j].item() == pytest.approx(expected, abs=1e-9)


def test_gates_open_on_sentence_ends_make_positions_count_sentences():
    # The paper's example (Sec. 3): gates open only on sentence ends, so a key's position is the
    # number of sentences between it and the query: every word of a sentence shares it.
    sentences = [["w", "w", "w", "."], ["w", "."], ["w", "w", "w", "w", "."]]
    tokens = [token for sentence in sentences for token in sentence]
    sentence_of = [n for n, sentence in enumerate(sentences) for _ in sentence]
    q, k = _gated_qk([token == "." for token in tokens])
    last = len(tokens) - 1
    positions = cope_positions(q, k, causal=True)[0, 0, last]
    for j, sentence in enumerate(sentence_of):
        sentences_back = len(sentences) - sentence  # the query's own sentence counts as 1
        assert positions[j].item() == pytest.approx(sentences_back, abs=1e-9)


def test_attention_interpolates_the_table_between_integer_positions():
    # Gates fixed at exactly 1/2 (zero scores) give half-integer positions p_ij = (i-j+1)/2.
    length, head_dim, npos = 5, 2, 4
    q = torch.zeros(1, 1, length, head_dim, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros_like(q)
    k[..., 1] = 1.0  # orthogonal to q: every score is 0, every gate 0.5
    table = torch.zeros(npos, head_dim, dtype=torch.float64)
    table[:, 0] = torch.tensor([0.0, 1.0, 4.0, 9.0])  # z[n] = n^2
    _, weights, positions = reference_cope_attention(
        q, k, q, table, causal=True, return_weights=True
    )
    i = length - 1
    p = torch.tensor([min((i - j + 1) / 2, npos - 1) for j in range(length)], dtype=torch.float64)
    z = table[:, 0]
    bias = z[p.ceil().long()] * (p - p.floor()) + z[p.floor().long()] * (1 - (p - p.floor()))
    torch.testing.assert_close(positions[0, 0, i], p)
    torch.testing.assert_close(weights[0, 0, i], torch.softmax(bias, dim=0))


def test_gates_and_positions_stay_float32_under_bf16_autocast():
    projection = torch.nn.Linear(8, 8)
    x = torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qk = projection(x).reshape(2, 1, 6, 8)
        assert qk.dtype == torch.bfloat16
        positions = cope_positions(qk, qk, causal=True)
        out, weights, capped = reference_cope_attention(
            qk, qk, qk, torch.randn(7, 8), causal=True, return_weights=True
        )
    assert positions.dtype == torch.float32
    assert weights.dtype == torch.float32 and capped.dtype == torch.float32
    assert out.dtype == torch.bfloat16  # the output takes v's dtype
    # Positions computed from the bf16 q, k in float32 equal the autocast ones exactly.
    exact = cope_positions(qk.float(), qk.float(), causal=True)
    torch.testing.assert_close(positions, exact, rtol=0, atol=0)


def test_cope_attention_entry_point_and_module_use_the_reference():
    q, k, v, table = _inputs(1, 2, 6, 4, 5, per_head=False)
    module = CoPE(5, 4, heads=2, causal=True, impl="reference")
    with torch.no_grad():
        module.pos_emb.copy_(table)
    expected = reference_cope_attention(q, k, v, table, causal=True)
    torch.testing.assert_close(
        cope_attention(q, k, v, table, causal=True, impl="reference"), expected
    )
    torch.testing.assert_close(module(q, k, v).double(), expected, rtol=1e-6, atol=1e-6)


def test_bidirectional_table_must_have_an_odd_row_count():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="2\\*npos-1"):
        reference_cope_attention(q, q, q, torch.zeros(4, 4), causal=False)
