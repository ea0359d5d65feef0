"""The CUDA path: compiled Triton kernels, AMP training steps, NCCL collectives (GPU only).

Skipped without CUDA. Never run under Triton's interpreter: with TRITON_INTERPRET=1 they fail,
since they exist to compile the real kernels. Run them all with ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes.base import get_recipe, list_recipes
from recipes.engine import rundir
from recipes.engine.checkpoint import load_checkpoint
from recipes.engine.config import resolve_config
from recipes.engine.trainer import TrainOptions, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _compiled_kernels_only() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: the CUDA "
    "tests compile the real kernels"


def cope_inputs(length: int, *, causal: bool, dtype: torch.dtype, batch: int = 2, heads: int = 2):
    """q, k, v (B, H, T, 64) and a table with npos 64, on the GPU in ``dtype``."""
    generator = torch.Generator().manual_seed(length)
    shape = (batch, heads, length, 64)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    table = torch.randn(64 if causal else 127, 64, generator=generator) * 0.5
    return [x.to(CUDA, dtype) for x in (q, k, v, table)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def outputs_and_grads(fn: Any, inputs: list[torch.Tensor], grad_out: torch.Tensor, **kw: Any):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def reference(*args: Any, **kw: Any) -> torch.Tensor:
    from encoders.cope import reference_cope_attention

    return reference_cope_attention(*args, **kw)


def triton(*args: Any, **kw: Any) -> torch.Tensor:
    from encoders.cope import cope_attention

    return cope_attention(*args, impl="triton", **kw)


# T = 16k keeps B = H = 1: the reference holds several (T, T) float32 tensors.
CASES = [(256, 2), (1000, 2), (4096, 2), (16384, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("length", "batch"), CASES)
def test_compiled_triton_matches_the_reference(length, batch, causal, dtype) -> None:
    inputs = cope_inputs(length, causal=causal, dtype=dtype, batch=batch, heads=batch)
    mask = None
    if batch == 2:  # padding: the second sequence ends early (and, bidirectional, starts late)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=CUDA)
        mask[1, length - length // 5 :] = True
        if not causal:
            mask[1, :3] = True
    grad_out = torch.randn_like(inputs[0], dtype=torch.float32)
    truth_dtype = torch.float64 if length <= 4096 else torch.float32
    truth = outputs_and_grads(
        reference, [x.to(truth_dtype) for x in inputs], grad_out, causal=causal,
        key_padding_mask=mask,
    )  # fmt: skip
    got = outputs_and_grads(triton, inputs, grad_out, causal=causal, key_padding_mask=mask)
    # fp32: tl.dot rounds its inputs to TF32 (10-bit mantissa) by default on Ampere and later,
    # so ~1e-3 relative is expected; a wrong kernel is off by O(1).
    limit = 5e-3 if dtype == torch.float32 else 3e-2
    for name, want, have in zip(("out", "dq", "dk", "dv", "dtable"), truth, got, strict=True):
        if mask is not None and name == "out":
            want, have = want[:, :, : length - length // 5], have[:, :, : length - length // 5]
        error = relative_error(have, want)
        assert error <= limit, f"{name}: relative error {error:.2e} > {limit:.0e}"


GENERATED = [name for name in list_recipes() if get_recipe(name).data_source == "generated"]


def small_config(recipe: str, precision: str, **extra: Any) -> dict:
    config = resolve_config(
        get_recipe(recipe),
        cli_options={"model.pe": "cope", "train.device": "cuda", "train.precision": precision},
        set_options={"train.steps": 2, "train.eval_every": 2, "train.log_every": 1, **extra},
    )
    for key, small in (("data.train_size", 64), ("data.eval_size", 16)):
        if key in config:
            config[key] = small
    return config


def one_step(recipe: str, config: dict, out: Path, data_dir: Path | None = None) -> dict:
    """Train one step (then stop, checkpointed); the checkpoint, after a finite loss."""
    result = train(recipe, config, TrainOptions(out=out, data_dir=data_dir, stop_after=1))
    assert result.status == "stopped" and result.step == 1
    losses = [r["loss"] for r in rundir.read_metrics(result.run_dir) if r["kind"] == "train"]
    state = load_checkpoint(result.run_dir / rundir.CHECKPOINT_FILE)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    return state


@pytest.mark.parametrize("recipe", GENERATED)
def test_one_bf16_training_step_per_generated_recipe(recipe: str, tmp_path: Path) -> None:
    state = one_step(recipe, small_config(recipe, "bf16"), tmp_path)
    assert state["progress"]["step"] == 1


def test_fp16_training_checkpoints_the_grad_scaler(tmp_path: Path) -> None:
    state = one_step("counting", small_config("counting", "fp16"), tmp_path)
    assert state["scaler"]["scale"] > 0  # an active scaler's state, restored on resume


def test_speech_commands_kwt1_step_with_dataloader_workers(tmp_path: Path, monkeypatch) -> None:
    from audio_fixtures import speech_commands_tree

    speech_commands_tree(tmp_path / "data" / "speech_commands_v0.02")
    monkeypatch.setenv("COPE_CACHE_DIR", str(tmp_path / "cache"))
    config = resolve_config(
        get_recipe("speech-commands"),
        preset="kwt1",
        cli_options={"model.pe": "cope", "train.device": "cuda", "train.workers": 2},
        set_options={
            "train.batch_size": 32,
            "train.steps": 2,
            "train.eval_every": 2,
            "train.log_every": 1,
        },  # fmt: skip
    )
    one_step("speech-commands", config, tmp_path / "runs", tmp_path / "data")


def test_collectives_accept_the_process_device_under_nccl(tmp_path: Path) -> None:
    import torch.distributed as dist

    from recipes.engine.distributed import (
        DistContext,
        any_rank,
        barrier,
        broadcast,
        mean_across_ranks,
    )

    store = f"file://{tmp_path / 'store'}"
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=store, rank=0, world_size=1)
    try:  # a one-process group, with a context that runs every collective
        context = DistContext(rank=0, world_size=2, device=torch.device("cuda", 0))
        assert any_rank(True, context) is True
        assert float(mean_across_ranks(torch.tensor(4.0), context)) == 2.0  # sum / 2
        assert broadcast("run", context) == "run"
        barrier(context)
    finally:
        dist.destroy_process_group()
