"""Training batches, built in the training process or by DataLoader workers, bit-exact on resume.

:class:`BatchFeeder` hands the training loop one batch per step, already on the device. The
order is :class:`~recipes.engine.sampler.ResumableBatchSampler`'s. With ``workers > 0`` the
batches are built ahead by ``torch.utils.data.DataLoader`` worker processes (items made on the
fly, such as augmented audio features or rendered video, then stay off the training process's
critical path), copied into pinned memory and moved to the GPU with non-blocking copies. With
``workers == 0`` they are built in the training process, which is faster when items are cheap
(cached features, small generated sequences) or when the CPU also trains.

Resume stays bit-exact because no random draw of a batch depends on which process built it:
before building batch ``number`` of epoch ``epoch``, the builder seeds python's, numpy's and
torch's CPU generators from ``(train.seed, rank, epoch, number)`` (:func:`batch_seed`). The
worker seeding is therefore fully given by the seed in the config and the sampler position in
the checkpoint, and the same batches come out with any number of workers, including none (in
the training process the generators are restored afterwards, so dropout's stream is untouched).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from recipes.engine.evaluate import answer_count, move_batch
from recipes.engine.sampler import ResumableBatchSampler

Batch = dict[str, Any]
BatchKey = tuple[int, int, list[int]]  # (epoch, batch number in the epoch, dataset indices)
MAX_AUTO_WORKERS = 8


def auto_workers(requested: int, device: torch.device, world_size: int = 1) -> int:
    """``train.workers``: -1 means workers on CUDA (one core left for the training process,
    the rest shared between ranks, at most 8) and none on CPU, where the cores train."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores // world_size - 1))


def batch_seed(seed: int, rank: int, epoch: int, number: int) -> int:
    """The seed of one batch's random draws (64 bits, well mixed by numpy's SeedSequence)."""
    entropy = [seed & 0xFFFF_FFFF_FFFF_FFFF, rank, epoch, number]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def _seed_cpu_generators(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA's dropout stream stays


class _BatchBuilder(Dataset):
    """A map-style dataset of batches: key (epoch, number, indices) -> ((epoch, number), batch)."""

    def __init__(
        self,
        dataset: Dataset,
        collate: Callable[[list[Any]], Batch],
        seed: int,
        rank: int,
        *,
        restore_generators: bool,
    ) -> None:
        self.dataset, self.collate, self.seed, self.rank = dataset, collate, seed, rank
        self.restore_generators = restore_generators

    def __getitem__(self, key: BatchKey) -> tuple[tuple[int, int], Batch]:
        epoch, number, indices = key
        saved = None
        if self.restore_generators:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            _seed_cpu_generators(batch_seed(self.seed, self.rank, epoch, number))
            batch = self.collate([self.dataset[index] for index in indices])
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
        return (epoch, number), batch


class _BatchKeys:
    """The sampler's batches from its current position on, forever, as keys (a private copy,
    so the DataLoader can run ahead of the position the checkpoint records)."""

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = copy.deepcopy(sampler)

    def __iter__(self) -> Iterator[BatchKey]:
        while True:
            indices = self.sampler.next_batch()
            yield self.sampler.epoch, self.sampler.batches_taken - 1, indices


def _as_is(batch: Any) -> Any:
    return batch


class BatchFeeder:
    """The training loop's source of batches; ``sampler`` keeps the consumed position."""

    def __init__(
        self,
        dataset: Dataset,
        collate: Callable[[list[Any]], Batch],
        sampler: ResumableBatchSampler,
        device: torch.device,
        *,
        workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        prefetch: int = 4,
    ) -> None:
        self.sampler, self.device, self.workers, self.prefetch = sampler, device, workers, prefetch
        self._builder = _BatchBuilder(dataset, collate, seed, rank, restore_generators=workers == 0)
        self._batches: Iterator[tuple[tuple[int, int], Batch]] | None = None

    def next_batch(self) -> tuple[Batch, int]:
        """The next training batch on the device, and how many answers it asks (counted on the
        host copy, so the count costs no device sync); advances the sampler by one batch."""
        if self.workers > 0 and self._batches is None:
            self._batches = iter(self._loader())  # starts at the sampler's position
        indices = self.sampler.next_batch()
        position = (self.sampler.epoch, self.sampler.batches_taken - 1)
        if self._batches is None:
            _, batch = self._builder[(*position, indices)]
        else:
            built_at, batch = next(self._batches)
            if built_at != position:  # the workers' copy of the order drifted: a bug
                raise RuntimeError(f"DataLoader batch {built_at} arrived for {position}")
        return move_batch(batch, self.device), answer_count(batch["targets"])

    def _loader(self) -> DataLoader:
        """Worker processes building batches from the sampler's current position on."""
        methods = multiprocessing.get_all_start_methods()
        return DataLoader(
            self._builder,
            batch_size=None,
            sampler=_BatchKeys(self.sampler),  # type: ignore[arg-type]
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch,
            # The loader draws a base seed; its own generator leaves the global stream alone.
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context="fork" if "fork" in methods else None,
        )

    def close(self) -> None:
        """Stop the worker processes (they are started again by the next ``next_batch``)."""
        self._batches = None
