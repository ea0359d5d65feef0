"""The fused C++ CPU kernel equals the reference in values and every gradient; auto dispatch
chooses by the calibrated cost and falls back to PyTorch when the kernel is not built."""

from __future__ import annotations

import pytest
import torch
from test_cope_blockwise import _AllocationRecorder

import encoders.cope as cope
from encoders.cope_core import onset_keys, table_size
from encoders.cope_cpu import fused_cope_attention, kernel_available, library_path
from encoders.cope_reference import reference_cope_attention

needs_kernel = pytest.mark.skipif(
    not kernel_available(), reason="CPU kernel not built (run make install)"
)
GATES = ("qk", "onset", "token", "change")
PER_KEY = ("token", "change")  # gates given as per-key logits


def make_case(
    gate: str,
    *,
    causal: bool,
    per_head: bool = False,
    padded: bool = False,
    batch: int = 2,
    heads: int = 3,
    length: int = 23,
    dim: int = 8,
    npos: int = 5,
    score_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    mask: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], dict]:
    """Leaves (q, k, v, table[, gate logits]) and the keyword arguments of one CoPE call."""
    generator = torch.Generator().manual_seed(hash((gate, causal, per_head, padded)) % 2**31)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    shape = (batch, heads, length, dim)
    q, k = randn(*shape) * score_scale, randn(*shape) * score_scale
    rows = table_size(npos, causal)
    table = randn(*((heads,) if per_head else ()), rows, dim) * 0.5
    leaves = [q, k, randn(*shape), table]
    if gate in PER_KEY:
        leaves.append(randn(batch, heads, length) * 2)
    if padded:
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[0, -5:] = True  # trailing padding
        mask[1, 2] = True  # a hole inside the sequence
    return [x.requires_grad_() for x in leaves], {"causal": causal, "key_padding_mask": mask}


def run(fn, leaves: list[torch.Tensor], kwargs: dict, gate: str, grad_out: torch.Tensor):
    """Output and the gradients of every leaf (q, k, v, table, gate logits)."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    q, k, v, table = leaves[:4]
    gate_inputs = {
        "gate": gate,
        "gate_keys": onset_keys(k) if gate == "onset" else None,
        "gate_logits": leaves[4] if gate in PER_KEY else None,
    }
    out = fn(q, k, v, table, **kwargs, **gate_inputs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_matches_reference(gate: str, atol: float = 1e-10, **case) -> None:
    leaves, kwargs = make_case(gate, **case)
    grad_out = torch.randn_like(leaves[0])
    expected = run(reference_cope_attention, leaves, kwargs, gate, grad_out)
    actual = run(fused_cope_attention, leaves, kwargs, gate, grad_out)
    names = ("out", "dq", "dk", "dv", "dtable", "dgate_logits")
    for name, want, got in zip(names, expected, actual, strict=False):
        assert torch.isfinite(got).all(), name
        err = (want.double() - got.double()).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.2e}"


@needs_kernel
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_equals_reference_values_and_all_gradients(gate, causal, per_head, padded):
    assert_matches_reference(gate, causal=causal, per_head=per_head, padded=padded)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("length", "npos"), [(1, 3), (2, 1), (31, 2), (70, 80)])
def test_fused_matches_reference_at_odd_lengths_and_caps(causal, length, npos):
    assert_matches_reference("qk", causal=causal, length=length, npos=npos)


@needs_kernel
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("length", "dim"), [(1, 16), (5, 32), (32, 16), (33, 8), (97, 32)])
def test_fused_blocks_of_rows_across_block_edges_and_compiled_head_dims(gate, causal, length, dim):
    # The kernel takes query rows 32 at a time: lengths below, at and past a block's edge, causal
    # blocks straddling the diagonal, and the head dims it compiles in (16, 32) or not (8).
    assert_matches_reference(gate, causal=causal, length=length, dim=dim, npos=9)


@needs_kernel
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
def test_fused_blocks_whose_rows_have_no_key_match_the_reference(gate, causal):
    # Sequence 0: the first 40 keys are padding, so (causal) the first block of rows and part of
    # the second have no key at all. Sequence 1: only its first 3 keys are real. Sequence 2: all
    # padding, so no row of any block has a key.
    mask = torch.zeros(3, 75, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, 3:] = True
    mask[2] = True
    case = {"length": 75, "dim": 16, "npos": 7, "batch": 3}
    assert_matches_reference(gate, causal=causal, mask=mask, **case)


@needs_kernel
@pytest.mark.parametrize("per_head", [False, True])
def test_fused_sums_the_table_gradients_of_every_thread(per_head):
    # Each thread accumulates its (batch, head) slices' table gradient; the op adds them up.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference("qk", causal=False, per_head=per_head, batch=3, length=40)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_fused_per_head_tables_with_a_compiled_head_dim(causal):
    assert_matches_reference("qk", causal=causal, per_head=True, length=45, dim=32, npos=12)


@needs_kernel
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
def test_fused_saturated_gates_reach_the_cap_inside_the_row(gate, causal):
    # Large scores: gates near 0 or 1, positions at and past the cap, integer positions.
    assert_matches_reference(gate, causal=causal, length=40, npos=6, score_scale=6.0)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_fused_rows_without_keys_output_zero_with_finite_gradients(causal):
    leaves, kwargs = make_case("qk", causal=causal)
    kwargs["key_padding_mask"] = torch.zeros(2, 23, dtype=torch.bool)
    kwargs["key_padding_mask"][1] = True  # the whole second sequence is padding
    out, *grads = run(fused_cope_attention, leaves, kwargs, "qk", torch.ones_like(leaves[0]))
    assert (out[1] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all() and (grads[1][1] == 0).all()


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_fused_float32_as_accurate_as_the_float32_reference(causal):
    exact_leaves, kwargs = make_case("qk", causal=causal, batch=1, heads=4, length=150, dim=16)
    grad_out = torch.randn_like(exact_leaves[0])
    single = [x.detach().float() for x in exact_leaves]
    exact = run(reference_cope_attention, exact_leaves, kwargs, "qk", grad_out)
    reference = run(reference_cope_attention, single, kwargs, "qk", grad_out.float())
    fused = run(fused_cope_attention, single, kwargs, "qk", grad_out.float())
    assert fused[0].dtype == torch.float32
    names = ("out", "dq", "dk", "dv", "dtable")
    for name, want, ref, got in zip(names, exact, reference, fused, strict=True):
        reference_err = (ref.double() - want).abs().max().item()
        fused_err = (got.double() - want).abs().max().item()
        assert fused_err <= max(2e-5, 10 * reference_err), (name, fused_err, reference_err)


@needs_kernel
def test_fused_bfloat16_error_no_larger_than_reference_bfloat16_error():
    exact_leaves, kwargs = make_case("qk", causal=False, batch=1, heads=2, length=120, dim=16)
    exact = reference_cope_attention(*exact_leaves, **kwargs).detach()
    half = [x.detach().to(torch.bfloat16) for x in exact_leaves]
    reference_err = (reference_cope_attention(*half, **kwargs).double() - exact).abs().max()
    fused = fused_cope_attention(*half, **kwargs)
    assert fused.dtype == torch.bfloat16
    # Both compute in float32 from the same bf16 inputs and round the output to bf16.
    assert (fused.double() - exact).abs().max() <= reference_err * 1.5 + 1e-3


@needs_kernel
def test_fused_never_allocates_a_time_by_time_tensor():
    length = 1024
    leaves, kwargs = make_case("qk", causal=False, batch=1, heads=1, length=length, npos=8)
    q, k, v, table = (x.detach().float().requires_grad_() for x in leaves)
    with _AllocationRecorder() as recorder:
        fused_cope_attention(q, k, v, table, causal=False).sum().backward()
    assert recorder.largest < length * length // 8, recorder.largest


@needs_kernel
def test_fused_under_bfloat16_autocast_keeps_float32_inside():
    leaves, kwargs = make_case("qk", causal=True, dtype=torch.float32)
    q, k, v, table = (x.detach() for x in leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cope.cope_attention(q, k, v, table, impl="fused", **kwargs)
    expected = reference_cope_attention(q, k, v, table, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def fake_table(**ms_per_head: list[float]) -> dict:
    entry = {"lengths": [64, 256], "ms_per_head": ms_per_head}
    return {"causal": entry, "bidirectional": entry}


def test_auto_picks_the_path_with_the_lowest_calibrated_cost(monkeypatch):
    monkeypatch.setattr(cope, "kernel_available", lambda: True)
    table = fake_table(reference=[1.0, 30.0], blockwise=[2.0, 10.0], fused=[1.2, 12.0])
    monkeypatch.setattr(cope, "calibration", lambda: table)
    assert cope.select_impl(torch.zeros(8, 4, 64, 16), "auto") == "reference"
    assert cope.select_impl(torch.zeros(8, 4, 256, 16), "auto", causal=False) == "blockwise"
    # Between measured lengths the cost is interpolated: fused is cheapest around T=100.
    assert cope.select_impl(torch.zeros(8, 4, 100, 16), "auto") == "fused"
    # Blockwise does not know the onset and token gates.
    assert cope.select_impl(torch.zeros(8, 4, 256, 16), "auto", gate="onset") == "fused"


def test_auto_never_picks_the_reference_where_its_memory_would_be_too_large(monkeypatch):
    monkeypatch.setattr(cope, "kernel_available", lambda: False)
    monkeypatch.setattr(cope, "calibration", lambda: fake_table(reference=[1.0, 1.0]))
    small, huge = torch.zeros(1, 1, 64, 8), torch.zeros(64, 8, 2048, 8)
    assert cope.select_impl(small, "auto") == "reference"
    assert cope.select_impl(huge, "auto") == "blockwise"


def test_without_the_kernel_auto_falls_back_to_pytorch_and_equals_the_reference(monkeypatch):
    monkeypatch.setattr(cope, "kernel_available", lambda: False)
    leaves, kwargs = make_case("onset", causal=False, padded=True)
    q, k, v, table = (x.detach() for x in leaves)
    assert cope.select_impl(q, "auto", causal=False, gate="onset") == "reference"
    assert cope.select_impl(q, "auto", causal=False) in ("reference", "blockwise")
    for gate in ("qk", "onset"):
        gate_keys = onset_keys(k) if gate == "onset" else None
        out = cope.cope_attention(q, k, v, table, gate=gate, gate_keys=gate_keys, **kwargs)
        gate_inputs = {"gate": gate, "gate_keys": gate_keys}
        expected = reference_cope_attention(q, k, v, table, **gate_inputs, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_asking_for_the_fused_path_without_the_kernel_says_how_to_build_it(monkeypatch):
    import encoders.cope_cpu as cope_cpu

    monkeypatch.setattr(cope_cpu, "kernel_available", lambda: False)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="make install"):
        cope_cpu.fused_cope_attention(q, q, q, torch.zeros(3, 8))


def test_a_kernel_built_from_other_sources_is_not_found(tmp_path):
    # The library's name carries a hash of the source: a tree without that build has no kernel.
    assert not library_path(tmp_path).exists()
    assert library_path(tmp_path).parent.name.startswith("cope_cpu_")


def test_the_committed_calibration_covers_both_directions_and_every_cpu_path():
    table = cope.calibration()
    for direction in ("causal", "bidirectional"):
        entry = table[direction]
        assert entry["lengths"] == sorted(entry["lengths"])
        assert {"reference", "blockwise", "fused"} <= set(entry["ms_per_head"])
    assert table["command"].startswith("cope bench attention")
