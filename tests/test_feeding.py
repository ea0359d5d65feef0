"""Batch feeding: DataLoader workers or the training process give the same batches, resumably.

Items here draw from the global generators (as audio augmentation does), so any dependence on
which process built a batch, or on where a run was resumed, would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import numpy as np
import pytest
import torch
from engine_helpers import ListDataset, TinyMajority, majority_items
from torch.utils.data import Dataset

from recipes.base import DataBundle, get_recipe, pad_collate, register_recipe
from recipes.engine.checkpoint import load_checkpoint
from recipes.engine.config import resolve_config
from recipes.engine.feeding import BatchFeeder, auto_workers, batch_seed
from recipes.engine.sampler import ResumableBatchSampler
from recipes.engine.trainer import TrainOptions, train

CPU = torch.device("cpu")


class NoisyItems(Dataset):
    """Item ``i`` is ``i`` plus draws from torch's, numpy's and python's global generators."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict[str, Any]:
        import random

        noise = [float(torch.rand(())), float(np.random.rand()), random.random()]
        return {"inputs": torch.tensor([float(index), *noise]), "targets": index % 2}


def take(feeder: BatchFeeder, count: int) -> list[torch.Tensor]:
    return [feeder.next_batch()[0]["inputs"] for _ in range(count)]


def noisy_feeder(workers: int, sampler: ResumableBatchSampler | None = None) -> BatchFeeder:
    sampler = sampler or ResumableBatchSampler(10, 4, seed=3)  # 2 batches per epoch
    return BatchFeeder(NoisyItems(), pad_collate, sampler, CPU, workers=workers, seed=3)


def test_workers_and_the_training_process_build_identical_batches() -> None:
    in_process = take(noisy_feeder(0), 5)  # crosses two epoch boundaries
    feeder = noisy_feeder(2)
    try:
        by_workers = take(feeder, 5)
    finally:
        feeder.close()
    assert all(torch.equal(a, b) for a, b in zip(in_process, by_workers, strict=True))
    assert len({tuple(batch[:, 1].tolist()) for batch in in_process}) == 5  # fresh noise


def test_building_in_process_leaves_the_global_generators_alone() -> None:
    torch.manual_seed(1)
    before = torch.get_rng_state()
    take(noisy_feeder(0), 3)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is untouched


def test_a_feeder_restarted_from_a_saved_position_continues_the_same_batches() -> None:
    straight = take(noisy_feeder(0), 6)
    first = noisy_feeder(2)
    take(first, 3)
    first.close()
    sampler = ResumableBatchSampler(10, 4, seed=3)
    sampler.load_state_dict(first.sampler.state_dict())
    resumed = noisy_feeder(2, sampler)
    try:
        rest = take(resumed, 3)
    finally:
        resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], rest, strict=True))


def test_batch_seeds_differ_by_rank_epoch_and_position() -> None:
    seeds = {batch_seed(0, r, e, n) for r in range(2) for e in range(2) for n in range(3)}
    assert len(seeds) == 12


def test_auto_workers_feed_a_gpu_and_leave_the_cpu_to_training() -> None:
    assert auto_workers(-1, CPU) == 0
    assert 1 <= auto_workers(-1, torch.device("cuda")) <= 8
    assert auto_workers(3, CPU) == 3


@register_recipe
class TinyNoisyMajority(TinyMajority):
    """tiny-majority whose training items flip each token with probability 0.1 (augmentation)."""

    name = "tiny-noisy-majority"

    def build_data(self, config: dict[str, Any], data_dir: Path | None, download: bool):
        bundle = super().build_data(config, data_dir, download)
        items = majority_items(config["data.train_size"], 5, 11, config["data.seed"])
        return DataBundle(FlippedTokens(items), bundle.splits, pad_collate, bundle.info)


class FlippedTokens(ListDataset):
    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        flips = (torch.rand(item["inputs"].shape) < 0.1).long()
        return {"inputs": item["inputs"] ^ flips, "targets": item["targets"]}


def noisy_config(workers: int) -> dict:
    return resolve_config(
        get_recipe("tiny-noisy-majority"),
        cli_options={"model.pe": "abs", "train.workers": workers},
    )


def final_weights(result: Any) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.run_dir / "checkpoint.pt")["model"]


@pytest.mark.slow  # three short trainings with worker processes: ~30 s on 2 busy CPUs
def test_training_with_workers_equals_in_process_and_resumes_bit_exact(tmp_path: Path) -> None:
    in_process = train("tiny-noisy-majority", noisy_config(0), TrainOptions(out=tmp_path / "a"))
    workers = noisy_config(2)
    stopped = train("tiny-noisy-majority", workers, TrainOptions(out=tmp_path / "b", stop_after=13))
    assert stopped.status == "stopped"
    resumed = train("tiny-noisy-majority", workers, TrainOptions(out=tmp_path / "b", resume=True))
    assert resumed.status == "finished" and resumed.run_dir == stopped.run_dir
    expected, actual = final_weights(in_process), final_weights(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_changing_workers_is_allowed_on_resume(tmp_path: Path) -> None:
    stopped = train("tiny-majority", _tiny(0), TrainOptions(out=tmp_path, stop_after=4))
    resumed = train("tiny-majority", _tiny(1), TrainOptions(out=tmp_path, resume=True))
    assert resumed.run_dir == stopped.run_dir and resumed.status == "finished"


def _tiny(workers: int) -> dict:
    options = {"model.pe": "abs", "train.workers": workers, "train.steps": 8}
    return resolve_config(get_recipe("tiny-majority"), cli_options=options)
