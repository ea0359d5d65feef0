"""A deterministic, resumable order of training batches.

Epoch ``e`` visits the training set in the permutation drawn by a torch.Generator seeded from
``(seed, e)``, so the order depends only on the seed and the position (epoch, batches taken)
can be saved in a checkpoint and restored exactly. Under DistributedDataParallel each rank
takes every ``world_size``-th batch row of the same permutation (as DistributedSampler does).
"""

from __future__ import annotations

import torch


class ResumableBatchSampler:
    """Yields lists of dataset indices batch after batch, across epochs, from a saved position."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batches_taken = 0, 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the last partial batch is dropped when there are any)."""
        return max(1, self.size // self.batch_size)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            needed = self.batches_per_epoch * self.batch_size
            while len(order) < needed:  # a training set smaller than one batch repeats
                order += order[: needed - len(order)]
            self._order = order
        return self._order

    def next_batch(self) -> list[int]:
        """Indices of this rank's share of the next global batch; advances the position."""
        if self.batches_taken >= self.batches_per_epoch:
            self.epoch, self.batches_taken, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        start = self.batches_taken * self.batch_size
        batch = order[start : start + self.batch_size]
        self.batches_taken += 1
        return batch[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, int]:
        """The position, for a checkpoint."""
        return {"epoch": self.epoch, "batches_taken": self.batches_taken, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        self.epoch, self.batches_taken = int(state["epoch"]), int(state["batches_taken"])
        self.seed, self._order = int(state["seed"]), None
