"""Train a grid's runs in worker processes (``cope compare/sweep --jobs N``).

A small model's step is many small ops whose Python and dispatch overhead does not split over
threads, so one run rarely keeps many cores busy; N runs at once can. The torch threads of this
process are shared out among the workers (at least one each). On a machine whose cores are
already taken it gains nothing: measured on the shared 2-CPU machine under load ~5, two
one-thread audio-events runs took 165 s against 107 s for the two in turn at two threads.

Each run is the same as it would be alone (same config, same run directory, same seeded data),
so a parallel grid reuses and resumes runs exactly like a serial one.

Ctrl-C: every worker stops after its current step, saving a checkpoint (as ``cope train``
does; a worker still setting its run up stops after its first step, one in its final
evaluation finishes it), runs not yet started are cancelled, and the grid reports itself
interrupted. A second Ctrl-C terminates the workers at once (their last checkpoints stay).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from recipes.base import Config, Recipe, UserError
from recipes.engine.trainer import (
    RunResult,
    TrainObserver,
    TrainOptions,
    request_stop,
    train,
)


@dataclass(frozen=True)
class Task:
    """One run for a worker: what ``train`` needs, all picklable."""

    recipe: Recipe  # the object, not its name: a worker unpickles (so imports) its module
    config: Config
    options: TrainOptions


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """This process's torch threads shared out among ``workers`` (at least one each)."""
    return max(1, (threads or torch.get_num_threads()) // workers)


def _start_worker(threads: int) -> None:
    """Worker set-up: its thread share; a Ctrl-C before or between training steps becomes a
    request to stop at the next step (SIGINT was blocked from the spawn until here)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, lambda signum, frame: request_stop())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stop_children() -> None:
    """Ask every running worker to stop after its current step (as Ctrl-C would)."""
    for child in multiprocessing.active_children():
        if child.pid is not None:
            os.kill(child.pid, signal.SIGINT)


def _train_task(task: Task) -> RunResult:
    return train(task.recipe, task.config, task.options, TrainObserver())


def train_parallel(
    tasks: Sequence[Task],
    workers: int,
    *,
    on_start: Callable[[int], None],
    on_end: Callable[[int, RunResult, float], None],
) -> tuple[list[RunResult | None], bool]:
    """Train ``tasks`` in ``workers`` processes, in order of submission.

    Returns the results in task order (None for a run that never started) and whether the
    grid was interrupted. ``on_start(i)`` and ``on_end(i, result, seconds)`` report progress.
    An error in a run (e.g. a UserError from its data) is raised here, after the other
    workers were told to stop.
    """
    results: list[RunResult | None] = [None] * len(tasks)
    interrupted = False
    started: dict[Future[RunResult], tuple[int, float]] = {}
    pending = list(range(len(tasks)))
    workers = min(workers, len(tasks)) or 1
    previous = signal.getsignal(signal.SIGINT)

    def request_stop_all(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C aborts at once
        _stop_children()

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker,
        initargs=(threads_per_worker(workers),),
    )  # fmt: skip
    signal.signal(signal.SIGINT, request_stop_all)
    try:
        while pending or started:
            while pending and len(started) < workers and not interrupted:
                index = pending.pop(0)
                on_start(index)
                # Workers start with SIGINT blocked (the mask is inherited) until their handler
                # is in place, so a Ctrl-C while one imports torch cannot kill it.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    future = pool.submit(_train_task, tasks[index])
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                started[future] = (index, time.monotonic())
            if not started:
                break
            done, _ = wait(started, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                index, began = started.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as error:
                    if interrupted:  # a worker killed by a second Ctrl-C
                        return results, True
                    _stop_children()
                    raise UserError(
                        "a worker process died (killed, or out of memory?); run the same "
                        "command again: finished runs are reused, unfinished ones resumed"
                    ) from error
                except BaseException:
                    _stop_children()
                    raise
                results[index] = result
                interrupted |= result.status == "interrupted"
                on_end(index, result, time.monotonic() - began)
    except KeyboardInterrupt:  # the second Ctrl-C: stop the workers now, saving nothing more
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    pool.shutdown(wait=True, cancel_futures=True)
    return results, interrupted
