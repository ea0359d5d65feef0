"""Collectives put their tensors on the process's device: NCCL (CUDA) refuses CPU tensors.

Without a GPU the device rule is checked with spies standing in for ``torch.distributed``
(the context claims a device and every collective must receive exactly that device), and the
helpers themselves run for real in a two-process gloo group.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from recipes.engine import distributed
from recipes.engine.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast,
    gather_to_main,
    init_distributed,
    mean_across_ranks,
)


class _Reached(Exception):
    """Raised by a spy once it has seen the collective's arguments."""


def test_tensor_collectives_receive_tensors_on_the_context_device(monkeypatch) -> None:
    # "meta" stands in for a GPU: a tensor left on the CPU would show up as device "cpu".
    context = DistContext(rank=0, world_size=2, device=torch.device("meta"))
    seen: list[torch.device] = []

    def all_reduce(tensor: torch.Tensor, op: Any = None) -> None:
        seen.append(tensor.device)
        raise _Reached

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(_Reached):
        any_rank(True, context)
    with pytest.raises(_Reached):
        mean_across_ranks(torch.tensor(2.0), context)  # a CPU loss is moved first
    assert seen == [torch.device("meta"), torch.device("meta")]


def test_object_collectives_and_barrier_name_the_cuda_device(monkeypatch) -> None:
    context = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    calls: dict[str, Any] = {}
    monkeypatch.setattr(
        dist, "broadcast_object_list", lambda objects, src, device: calls.update(bcast=device)
    )
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None: calls.update(barrier=device_ids))
    broadcast("run", context)
    barrier(context)
    assert calls == {"bcast": torch.device("cuda", 1), "barrier": [1]}


def test_cuda_ranks_take_their_local_gpu_before_the_group_starts(monkeypatch) -> None:
    events: list[Any] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: events.append(backend))
    monkeypatch.setattr(distributed.atexit, "register", lambda function: None)
    context = init_distributed(torch.device("cuda"))
    assert events == [torch.device("cuda", 1), "nccl"]  # current device first: NCCL needs it
    assert context.device == torch.device("cuda", 1) and context.rank == 1


def test_a_single_process_keeps_the_requested_device() -> None:
    assert init_distributed(torch.device("cpu")).device == torch.device("cpu")


def _rank_main(rank: int, store: str, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    context = DistContext(rank=rank, world_size=2, device=torch.device("cpu"))
    try:
        results.put(
            (
                rank,
                broadcast(f"from {rank}", context),
                gather_to_main(rank * 10, context),
                float(mean_across_ranks(torch.tensor(float(rank)), context)),
                any_rank(rank == 1, context),
            )
        )
        barrier(context)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")
def test_helpers_agree_across_two_gloo_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [
        context.Process(target=_rank_main, args=(rank, str(tmp_path / "store"), results))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    got = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert got == [
        (0, "from 0", [0, 10], 0.5, True),
        (1, "from 0", None, 0.5, True),
    ]
