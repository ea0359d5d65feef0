"""CoPE attention as a fused C++ CPU kernel (``impl="fused"``), forward and backward.

The kernel (``encoders/csrc/cope_cpu.cpp``) takes the query rows of one (batch, head) 32 at a
time: scores, the table logits z = q e^T, the output and every gradient are small matrix products,
and gates, positions (running sums from the query outwards), the interpolated table logits and
the softmax are vector passes across the block's rows; no (T, T) tensor is stored, and the
backward recomputes each block from the output and the log-sum-exp. It is registered as the
``torch.ops.cope`` custom ops with the autograd formula below; the op takes the position table
itself and returns its gradient (only the onset gate's differenced keys are an ordinary torch op
in front of it). It handles every gate variant (:data:`KERNEL_GATES`), causal and bidirectional
attention and key padding.

The kernel is compiled ahead of time by the install step (``make install``, or
``python -m encoders.cope_cpu``) into ``encoders/csrc/build/``; the library name carries a hash of
the source, so an edited kernel is never loaded stale. Without a compiler, or before it is built,
:func:`kernel_available` is False and :func:`encoders.cope.cope_attention` uses the PyTorch paths.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from encoders.cope_core import compute_dtype, npos_of_table

# The kernel's gate codes (kQK, kOnset, kToken in cope_cpu.cpp). The change gate is a per-key
# gate like the token gate: only where its logits come from differs, so it runs as kToken.
KERNEL_GATES: dict[str, int] = {"qk": 0, "onset": 1, "token": 2, "change": 2, "rise": 2}

SOURCE = Path(__file__).parent / "csrc" / "cope_cpu.cpp"
# Where the install step puts the library; COPE_KERNEL_DIR overrides it (tests, read-only trees).
BUILD_DIR = Path(os.environ.get("COPE_KERNEL_DIR", Path(__file__).parent / "csrc" / "build"))
# -fno-trapping-math lets the compiler vectorise loops with selects (results unchanged).
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-trapping-math"]


def library_name() -> str:
    """The extension's name: it carries a hash of the source and flags, so stale builds miss."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:10]
    return f"cope_cpu_{digest}"


def library_path(build_dir: Path = BUILD_DIR) -> Path:
    return build_dir / library_name() / f"{library_name()}.so"


def build_kernel(build_dir: Path = BUILD_DIR, verbose: bool = False) -> Path:
    """Compile the kernel (needs a C++ compiler and ninja; about a minute) and load it."""
    from torch.utils.cpp_extension import load

    target = build_dir / library_name()
    target.mkdir(parents=True, exist_ok=True)
    load(
        name=library_name(),
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(target),
        is_python_module=False,
        verbose=verbose,
    )
    kernel_available.cache_clear()
    return library_path(build_dir)


@functools.cache
def kernel_available() -> bool:
    """Whether the compiled kernel is loaded (loading a prebuilt library; never compiles)."""
    if not hasattr(torch.ops.cope, "forward"):
        path = library_path()
        if not path.exists():
            return False
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError):  # built against another torch, or a broken file
            return False
    _register_autograd()
    return True


@functools.cache
def _register_autograd() -> None:
    """Attach the backward kernel to the forward op (once per process)."""

    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        q, k, v, table, gate_keys, gate_logits, valid, gate, causal, npos = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, table, gate_keys, gate_logits, valid, out, lse)
        ctx.options = (gate, causal, npos)

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):  # type: ignore[no-untyped-def]
        q, k, v, table, gate_keys, gate_logits, valid, out, lse = ctx.saved_tensors
        dq, dk, dv, dtable, dgk, dgl = torch.ops.cope.backward(
            grad_out.contiguous(), q, k, v, table, gate_keys, gate_logits, valid, out, lse,
            *ctx.options,
        )  # fmt: skip
        return (
            dq, dk, dv, dtable,
            dgk if gate_keys is not None else None,
            dgl if gate_logits is not None else None,
            None, None, None, None,
        )  # fmt: skip

    torch.library.register_autograd("cope::forward", backward, setup_context=setup_context)

    @torch.library.register_fake("cope::forward")
    def _(q, k, v, table, gate_keys, gate_logits, valid, gate, causal, npos):  # type: ignore[no-untyped-def]
        return torch.empty_like(q), q.new_empty(q.shape[:-1])


def fused_cope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_emb: Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    gate: str = "qk",
    gate_keys: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> Tensor:
    """CoPE attention by the fused CPU kernel, equal to the reference; (B, H, T, D) in v's dtype.

    Arguments as :func:`encoders.cope.cope_attention` (gate inputs already checked).
    """
    if not kernel_available():
        raise RuntimeError(
            "impl='fused' needs the compiled CPU kernel: run `make install` or "
            "`python -m encoders.cope_cpu` (needs a C++ compiler), or use impl='auto'"
        )
    if q.device.type != "cpu":
        raise RuntimeError("impl='fused' runs on CPU tensors; use impl='auto' on other devices")
    dtype = compute_dtype(q, k, v, pos_emb)
    npos = npos_of_table(pos_emb, causal)
    valid = None if key_padding_mask is None else (~key_padding_mask).to(torch.uint8)
    # Under autocast the matmuls would run in bf16: CoPE keeps gates and positions in float32.
    with torch.autocast(q.device.type, enabled=False):
        out, _ = torch.ops.cope.forward(
            q.to(dtype), k.to(dtype), v.to(dtype), pos_emb.to(dtype),
            None if gate_keys is None else gate_keys.to(dtype),
            None if gate_logits is None else gate_logits.to(dtype),
            valid, KERNEL_GATES[gate], causal, npos,
        )  # fmt: skip
    return out.to(v.dtype)


def main() -> None:
    """``python -m encoders.cope_cpu``: build the kernel; without a compiler, say so and go on."""
    try:
        path = build_kernel(verbose="-v" in sys.argv)
    except Exception as error:  # noqa: BLE001 (any build failure means: use the fallback)
        print(f"cope: CPU kernel not built ({type(error).__name__}: {error}); "
              "CoPE will use its PyTorch implementations", file=sys.stderr)  # fmt: skip
        return
    print(f"cope: CPU kernel built: {path}")


if __name__ == "__main__":
    main()
