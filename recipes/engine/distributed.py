"""Process-group helpers: the same `cope train` runs alone or under `torchrun` (DDP).

Only rank 0 writes (run directory, checkpoints, metrics); decisions that every rank must share
(which run directory, whether to stop) are broadcast from rank 0. Every collective gets its
tensors on the process's own device (:attr:`DistContext.device`): NCCL, the backend on CUDA,
refuses CPU tensors, and gloo (CPU) refuses CUDA ones.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and talks to the user."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA), if any.

    On CUDA each process takes GPU ``LOCAL_RANK`` and makes it the current device before the
    group exists, because NCCL's object collectives (``gather_object``) use the current device.
    """
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_shutdown)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=context.device)
    return holder[0]


def gather_to_main(value: Any, context: DistContext) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None on the others)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def mean_across_ranks(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The average of a scalar tensor over ranks (the same number on every rank)."""
    if not context.enabled:
        return value
    reduced = value.detach().to(context.device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


def any_rank(flag: bool, context: DistContext) -> bool:
    """Whether ``flag`` is true on any rank (e.g. Ctrl-C reached only some processes)."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(context: DistContext) -> None:
    """Wait for every rank."""
    if context.enabled:
        # NCCL otherwise guesses the device from the rank (and warns it may hang).
        device_ids = [context.device.index or 0] if context.device.type == "cuda" else None
        dist.barrier(device_ids=device_ids)
