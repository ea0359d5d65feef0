"""The blockwise (memory-linear) CoPE path equals the reference, and stays linear in memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from encoders.cope import cope_attention, reference_cope_attention, select_impl
from encoders.cope_blockwise import BlockwiseCoPE, blockwise_cope_attention


def make_inputs(
    batch: int = 2,
    heads: int = 2,
    length: int = 37,
    dim: int = 8,
    npos: int = 5,
    *,
    causal: bool = True,
    per_head: bool = False,
    dtype: torch.dtype = torch.float64,
    score_scale: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """Random q, k, v and a non-zero position table (zero tables hide interpolation bugs)."""
    q = torch.randn(batch, heads, length, dim, dtype=dtype) * score_scale
    k = torch.randn(batch, heads, length, dim, dtype=dtype) * score_scale
    v = torch.randn(batch, heads, length, dim, dtype=dtype)
    rows = npos if causal else 2 * npos - 1
    table = torch.randn(*((heads,) if per_head else ()), rows, dim, dtype=dtype) * 0.5
    return q, k, v, table


def values_and_grads(fn, inputs, grad_out, **kwargs) -> list[torch.Tensor]:
    """Output and the gradients of q, k, v and the table for one upstream gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out.detach(), *grads]


def assert_matches_reference(inputs, *, causal, key_padding_mask=None, atol=1e-10, **kwargs):
    """Blockwise output and all four gradients equal the reference's within ``atol``."""
    q = inputs[0]
    grad_out = torch.randn_like(q)
    expected = values_and_grads(
        reference_cope_attention, inputs, grad_out, causal=causal, key_padding_mask=key_padding_mask
    )
    actual = values_and_grads(
        blockwise_cope_attention,
        inputs,
        grad_out,
        causal=causal,
        key_padding_mask=key_padding_mask,
        **kwargs,
    )
    for name, want, got in zip(("out", "dq", "dk", "dv", "dtable"), expected, actual, strict=True):
        err = (want - got).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [37, 64, 5])
@pytest.mark.parametrize("npos", [3, 9, 80])
def test_blockwise_equals_reference_values_and_gradients(causal, length, npos):
    # 37 and 5 are not multiples of the block (8); npos 80 > T keeps every key in the band.
    inputs = make_inputs(length=length, npos=npos, causal=causal)
    assert_matches_reference(inputs, causal=causal, block=8)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_per_head_tables_match_reference(causal):
    inputs = make_inputs(heads=3, length=41, npos=6, causal=causal, per_head=True)
    assert_matches_reference(inputs, causal=causal, block=8)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_padding_mask_matches_reference(causal):
    inputs = make_inputs(length=45, npos=7, causal=causal)
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[0, 40:] = True  # right padding
    if not causal:
        mask[1, :3] = True  # left padding leaves no causal row empty only when bidirectional
        mask[1, 20:23] = True
    assert_matches_reference(inputs, causal=causal, key_padding_mask=mask, block=8)


def test_blockwise_rows_without_keys_output_zero_with_finite_gradients():
    # Causal attention with left padding: the first rows see no key at all.
    q, k, v, table = make_inputs(length=20, npos=4)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, :5] = True
    leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    out = blockwise_cope_attention(*leaves, key_padding_mask=mask, block=8)
    out.square().sum().backward()
    assert out[1, :, :5].abs().max() == 0
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    expected = reference_cope_attention(q, k, v, table, key_padding_mask=mask)
    torch.testing.assert_close(out.detach(), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_saturated_gates_cross_the_cap_inside_a_tile(causal):
    # Large scores make gates 0 or 1, so positions jump by whole steps and reach the cap
    # part-way through a tile; integer positions also exercise the zero-slope convention.
    inputs = make_inputs(length=50, npos=4, causal=causal, score_scale=4.0)
    assert_matches_reference(inputs, causal=causal, block=16, atol=1e-9)


def test_blockwise_band_stops_once_every_row_passed_the_cap():
    # Open gates (large positive scores) saturate after npos-1 keys: one or two tiles suffice,
    # the rest of the sequence goes to the fused far region.
    q = torch.ones(1, 1, 256, 4, dtype=torch.float64) * 3
    k = torch.ones(1, 1, 256, 4, dtype=torch.float64) * 3
    v = torch.randn(1, 1, 256, 4, dtype=torch.float64)
    table = torch.randn(4, 4, dtype=torch.float64)
    result = BlockwiseCoPE.apply(q.clone().requires_grad_(), k, v, table, None, True, 16)
    tiles = [state.tiles for state in result.grad_fn.states]  # type: ignore[attr-defined]
    assert tiles[0] <= 2  # of 16 tiles a full walk would need
    expected = reference_cope_attention(q, k, v, table)
    torch.testing.assert_close(result.detach(), expected, rtol=0, atol=1e-10)


def test_blockwise_float32_output_within_1e5_and_gradients_as_accurate_as_reference():
    torch.manual_seed(1)
    exact_inputs = make_inputs(batch=1, heads=4, length=200, dim=32, npos=16)
    single_inputs = [x.float() for x in exact_inputs]
    grad_out = torch.randn_like(exact_inputs[0])
    exact = values_and_grads(reference_cope_attention, exact_inputs, grad_out)
    reference = values_and_grads(reference_cope_attention, single_inputs, grad_out.float())
    blockwise = values_and_grads(blockwise_cope_attention, single_inputs, grad_out.float())
    assert (blockwise[0].double() - exact[0]).abs().max() <= 1e-5
    assert (blockwise[0] - reference[0]).abs().max() <= 2e-5  # two float32 roundings apart
    for name, want, ref, got in zip(
        ("out", "dq", "dk", "dv", "dtable"), exact, reference, blockwise, strict=True
    ):
        reference_err = (ref.double() - want).abs().max().item()
        blockwise_err = (got.double() - want).abs().max().item()
        # float32 rounding of gradients of magnitude ~20: the reference itself is off by 2e-5;
        # the blockwise path (flash-style Delta = dO . O, carried sums) stays within 10x of it.
        assert blockwise_err <= max(1e-5, 10 * reference_err), (name, blockwise_err, reference_err)


def test_blockwise_bfloat16_error_no_larger_than_reference_bfloat16_error():
    exact_inputs = make_inputs(batch=1, heads=2, length=120, dim=16, npos=12)
    half_inputs = [x.to(torch.bfloat16) for x in exact_inputs]
    exact = reference_cope_attention(*exact_inputs)
    reference_err = (reference_cope_attention(*half_inputs).double() - exact).abs().max()
    blockwise = blockwise_cope_attention(*half_inputs)
    assert blockwise.dtype == torch.bfloat16
    blockwise_err = (blockwise.double() - exact).abs().max()
    # Both compute in float32 from the same bf16 inputs and round the output to bf16.
    assert blockwise_err <= reference_err * 1.5 + 1e-3


class _AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_never_allocates_a_time_by_time_tensor(causal):
    length = 1024
    q, k, v, table = make_inputs(batch=1, heads=1, length=length, dim=8, npos=8, causal=causal)
    q, k, v, table = (x.float().requires_grad_() for x in (q, k, v, table))
    recorder = _AllocationRecorder()
    with recorder:
        out = blockwise_cope_attention(q, k, v, table)
        out.sum().backward()
    # A (T, T) matrix has 1M elements; a band tile is T x block (32) complex values at most.
    assert recorder.largest <= length * 32 * 2, recorder.largest
    with _AllocationRecorder() as reference_recorder:
        reference_cope_attention(q.detach(), k.detach(), v.detach(), table.detach(), causal=causal)
    assert reference_recorder.largest >= length * length  # the recorder does see (T, T) tensors


def test_cope_attention_dispatches_to_blockwise():
    q, k, v, table = make_inputs(length=30, npos=5)
    out = cope_attention(q, k, v, table, impl="blockwise")
    torch.testing.assert_close(out, reference_cope_attention(q, k, v, table), rtol=0, atol=1e-10)


def test_select_impl_keeps_an_explicit_choice_and_rejects_unknown_names():
    tiny_q = torch.zeros(1, 1, 16, 8)
    assert select_impl(tiny_q, "blockwise") == "blockwise"
    with pytest.raises(ValueError, match="reference"):
        select_impl(tiny_q, "fast")


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_portable_far_region_matches_reference(causal, monkeypatch):
    # Off CPU there is no flash kernel returning the log-sum-exp: the far region then runs as
    # chunked plain attention. Force that path on CPU, with chunks smaller than the sequence.
    import encoders.cope_blockwise as blockwise

    monkeypatch.setattr(blockwise, "_use_flash_kernel", lambda q: False)
    monkeypatch.setattr(blockwise, "FAR_ROWS", 16)
    inputs = make_inputs(length=70, npos=3, causal=causal)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0, 60:] = True
    assert_matches_reference(inputs, causal=causal, key_padding_mask=mask, block=8)


def test_blockwise_under_bfloat16_autocast_keeps_float32_inside():
    q, k, v, table = (x.float() for x in make_inputs(batch=1, length=80, npos=6))
    expected = reference_cope_attention(q, k, v, table)
    leaf = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blockwise_cope_attention(leaf, k, v, table)
        out.sum().backward()
    assert out.dtype == torch.float32
    # bf16 matmuls would be off by ~1e-2; float32 inside stays at float32 rounding.
    assert (out - expected).abs().max() <= 1e-5
    assert torch.isfinite(leaf.grad).all()
