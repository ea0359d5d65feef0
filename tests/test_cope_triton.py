"""The Triton CoPE kernels equal the reference, checked on CPU with Triton's interpreter.

These run only without CUDA, where tests/conftest.py has set TRITON_INTERPRET=1 before Triton
was first imported (Triton reads it at import and when kernels are defined, so it cannot be
switched on for one module). With a GPU the variable is never set and the compiled kernels
are tested instead (tests/test_cuda.py). Sizes stay small: the interpreter runs the kernels
in NumPy, one program at a time.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from encoders.cope import cope_attention, reference_cope_attention  # noqa: E402
from encoders.cope_triton import triton_cope_attention  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="with CUDA the compiled kernels are tested (test_cuda.py)"
    ),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (conftest)"
    ),
]
DEVICE = "cpu"


def make_inputs(length, npos, *, causal, batch=2, heads=2, dim=8, per_head=False, scale=1.0):
    """float64 q, k, v and a non-zero table (float64 keeps the comparison exact)."""
    shape = (batch, heads, length, dim)
    q = torch.randn(shape, dtype=torch.float64) * scale
    k = torch.randn(shape, dtype=torch.float64) * scale
    v = torch.randn(shape, dtype=torch.float64)
    rows = npos if causal else 2 * npos - 1
    table = torch.randn(*((heads,) if per_head else ()), rows, dim, dtype=torch.float64) * 0.5
    return [x.to(DEVICE) for x in (q, k, v, table)]


def assert_matches_reference(inputs, *, causal, key_padding_mask=None, atol=1e-10):
    """Output and gradients of q, k, v, table equal the reference's."""
    grad_out = torch.randn_like(inputs[0])
    results = []
    for fn in (reference_cope_attention, triton_cope_attention):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = fn(*leaves, causal=causal, key_padding_mask=key_padding_mask)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    for name, want, got in zip(("out", "dq", "dk", "dv", "dtable"), *results, strict=True):
        err = (want - got).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("length", "npos"), [(37, 5), (40, 60), (16, 3)])
def test_triton_equals_reference_values_and_gradients(causal, length, npos):
    # 37 is not a multiple of the 16-row tiles; npos 60 > T never reaches the cap.
    assert_matches_reference(make_inputs(length, npos, causal=causal), causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_per_head_tables_match_reference(causal):
    inputs = make_inputs(33, 4, causal=causal, heads=3, per_head=True)
    assert_matches_reference(inputs, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_padding_mask_matches_reference(causal):
    mask = torch.zeros(2, 37, dtype=torch.bool)
    mask[0, 33:] = True
    if not causal:
        mask[1, :2] = True
    inputs = make_inputs(37, 5, causal=causal)
    assert_matches_reference(inputs, causal=causal, key_padding_mask=mask.to(DEVICE))


@pytest.mark.parametrize("causal", [True, False])
def test_triton_saturated_gates_cross_the_cap_inside_a_block(causal):
    # Gates of 0/1 put the cap crossing mid-block and make the cheap far path kick in.
    inputs = make_inputs(50, 4, causal=causal, scale=4.0)
    assert_matches_reference(inputs, causal=causal, atol=1e-9)


def test_triton_float32_close_to_float64_truth():
    inputs = make_inputs(40, 6, causal=True)
    exact = reference_cope_attention(*inputs)
    single = triton_cope_attention(*[x.float() for x in inputs])
    assert single.dtype == torch.float32
    assert (single.double() - exact).abs().max() <= 1e-5


def test_cope_attention_dispatches_to_triton():
    inputs = make_inputs(20, 4, causal=True)
    out = cope_attention(*inputs, impl="triton")
    torch.testing.assert_close(out, reference_cope_attention(*inputs), rtol=0, atol=1e-10)
