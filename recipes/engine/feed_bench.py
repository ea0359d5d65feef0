"""Training throughput with the real data feeding in the loop, and how busy it keeps the device.

``cope bench train ... --workers N`` measures this instead of stepping over batches prepared
beforehand: every step takes its batch from a :class:`~recipes.engine.feeding.BatchFeeder`
(N DataLoader workers, or the training process for N = 0) and runs forward and backward under
``train.precision``'s autocast, as ``cope train`` does. The timed steps are not synchronised one
by one, so data loading can overlap the GPU's work as it does in training. Reported:

- ``data_wait_fraction``: share of the wall time the loop spent waiting for ``next_batch``;
- ``gpu_busy`` (CUDA): summed GPU time of the steps (CUDA events around each step's work)
  over the wall time of all steps; a starved GPU idles between steps and scores low;
- ``gpu_utilization`` (CUDA, when NVML answers): mean of ``torch.cuda.utilization()`` sampled
  every 50 ms during the timed steps.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch
from torch import nn

from recipes.engine.evaluate import forward_batch, loss_and_counts
from recipes.engine.feeding import BatchFeeder
from recipes.engine.precision import autocast_context


class _UtilizationSampler:
    """Samples NVML's GPU utilisation in a thread; ``mean`` is None where NVML is missing."""

    def __init__(self, device: torch.device, period_s: float = 0.05) -> None:
        self.device, self.period_s, self.samples = device, period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # no pynvml / NVML: the figure is simply not available
                return

    def __enter__(self) -> _UtilizationSampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) / 100.0 if self.samples else None


def measure_fed_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    feeder: BatchFeeder,
    *,
    steps: int,
    warmup: int,
    precision: str,
) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` training steps fed by ``feeder``; times and busy shares."""
    device = feeder.device
    cuda = device.type == "cuda"

    def step() -> None:
        batch, _ = feeder.next_batch()
        waited = time.perf_counter() - asked
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        if start is not None:
            start.record()
        with autocast_context(device, precision):
            logits = forward_batch(model, batch)
        loss, _, _ = loss_and_counts(logits, batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if end is not None:
            end.record()
            events.append((start, end))
        waits.append(waited)

    model.train()
    events: list[tuple[Any, Any]] = []
    waits: list[float] = []
    try:
        for _ in range(warmup):
            asked = time.perf_counter()
            step()
        if cuda:
            torch.cuda.synchronize(device)
        events.clear()
        waits.clear()
        with _UtilizationSampler(device) as utilization:
            began = time.perf_counter()
            for _ in range(steps):
                asked = time.perf_counter()
                step()
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - began
    finally:
        feeder.close()
    result: dict[str, Any] = {
        "wall_s": wall,
        "step_ms": wall / steps * 1e3,
        "data_wait_fraction": sum(waits) / wall,
        "workers": feeder.workers,
    }
    if cuda:
        busy_ms = sum(start.elapsed_time(end) for start, end in events)
        result["gpu_busy"] = min(1.0, busy_ms / (wall * 1e3))
        result["gpu_utilization"] = utilization.mean
    return result
