"""Training: one recipe, one resolved config, one run directory.

The loop is plain PyTorch: a deterministic resumable batch order, AdamW/Adam with linear
warm-up and a cosine (or constant) schedule, gradient clipping, periodic evaluation on ``val``
with early stopping, atomic checkpoints, and at the end an evaluation of every split with the
best weights. Everything the CLI shows comes through a :class:`TrainObserver`.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recipes.base import Config, DataBundle, Recipe, UserError, get_recipe, pad_collate
from recipes.engine import rundir
from recipes.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    preserved_rng,
    restore_rng_state,
    save_checkpoint,
)
from recipes.engine.config import config_differences
from recipes.engine.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast,
    gather_to_main,
    init_distributed,
    mean_across_ranks,
)
from recipes.engine.evaluate import (
    evaluate,
    forward_batch,
    loss_and_counts,
)
from recipes.engine.feeding import BatchFeeder, auto_workers
from recipes.engine.precision import autocast_context, make_grad_scaler, resolve_precision
from recipes.engine.sampler import ResumableBatchSampler


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainObserver:
    """Receives progress events; the CLI renders them (progress bars, messages). No-ops here."""

    def message(self, text: str) -> None:
        """A line for the user (what was chosen, where files went)."""

    def train_start(self, run_dir: Path, start_step: int, total_steps: int) -> None:
        """Training of ``run_dir`` begins (or resumes) at ``start_step``."""

    def train_step(self, step: int, loss: float, lr: float) -> None:
        """One optimiser step finished."""

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """A split was evaluated (periodic ``val`` or final)."""

    def eval_progress(self, split: str, done: int, total: int) -> None:
        """Evaluation of ``split`` has processed ``done`` of ``total`` items."""

    def train_end(self) -> None:
        """The training loop ended (finished, stopped or interrupted)."""


@dataclass
class TrainOptions:
    """How to run (not what to train: that is the config)."""

    out: Path = Path("runs")
    data_dir: Path | None = None
    download: bool = False
    resume: bool = False  # continue the newest unfinished run with this config (or reuse it)
    on_finished: str = "error"  # a finished run with this config exists: "error"|"reuse"|"new"
    preset: str | None = None  # recorded in config.json
    stop_after: int | None = None  # stop after this many steps, as if killed (tests, budgets)
    handle_sigint: bool = True
    explain_fresh: bool = True  # say so when --resume finds nothing (grids stay quiet)


@dataclass
class RunResult:
    """What became of a training request."""

    run_dir: Path
    status: str  # "finished" | "reused" | "stopped" | "interrupted"
    step: int
    evaluation: dict[str, Any] | None = None
    is_main: bool = True  # False on the other ranks of a torchrun job (they render nothing)


def resolve_device(requested: str, config: Config | None = None) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without a GPU is a UserError.

    With ``config``, options that need a GPU (the Triton CoPE kernel) are checked too, so
    the mistake is caught before a run directory exists rather than in the first forward.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if (
        config is not None
        and config.get("model.cope_impl") == "triton"
        and "cope" in str(config.get("model.pe", ""))
        and device.type != "cuda"
    ):
        raise UserError(
            f"model.cope_impl=triton needs a CUDA GPU but the device is {device.type}; "
            "use model.cope_impl=auto or blockwise"
        )
    return device


def configure_threads(device: torch.device, context: DistContext) -> None:
    """On CPU share the cores between ranks, unless the user fixed OMP_NUM_THREADS."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // context.world_size)))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (initialisation, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up to 1, then cosine to 0 or constant."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 weight decay), as ``train.optimizer`` says."""
    params = [param for param in model.parameters() if param.requires_grad]
    kind = torch.optim.AdamW if config["train.optimizer"] == "adamw" else torch.optim.Adam
    return kind(params, lr=config["train.lr"], weight_decay=config["train.weight_decay"])


def total_steps_of(config: Config, sampler: ResumableBatchSampler) -> int:
    """``train.steps``, or ``train.epochs`` x batches per epoch when epochs are given."""
    if config["train.epochs"] > 0:
        return config["train.epochs"] * sampler.batches_per_epoch
    return config["train.steps"]


def _same_config(run_dir: Path, recipe_name: str, config: Config) -> bool:
    try:
        recipe, saved = rundir.read_config(run_dir)
    except UserError:
        return False
    return recipe == recipe_name and not config_differences(saved, config)


@dataclass
class _Plan:
    run_dir: Path | None  # None: create a new one
    reuse: bool = False
    note: str | None = None


def plan_run(recipe_name: str, config: Config, options: TrainOptions) -> _Plan:
    """Decide between resuming, reusing, refusing and starting a new run directory."""
    pe, seed = config["model.pe"], config["train.seed"]
    runs = rundir.find_runs(options.out, recipe_name, pe, seed)
    matching = [run for run in runs if _same_config(run, recipe_name, config)]
    finished = [run for run in matching if rundir.is_finished(run)]
    resumable = [
        run
        for run in matching
        if not rundir.is_finished(run) and (run / rundir.CHECKPOINT_FILE).is_file()
    ]
    if options.resume and matching:
        newest = matching[-1]
        if newest in resumable:
            return _Plan(newest, note=f"resuming {newest}")
        if newest in finished:
            return _Plan(newest, reuse=True, note=f"reusing finished run {newest}")
    if options.resume and not matching:
        note = "no run with this configuration to resume; starting a new one"
        if not runs and not options.explain_fresh:
            note = None
        elif runs:
            differences = config_differences(rundir.read_config(runs[-1])[1], config)
            note = (
                f"no run with this configuration to resume ({runs[-1]} differs in "
                f"{'; '.join(differences[:4])}); starting a new one"
            )
        return _Plan(None, note=note)
    if finished and options.on_finished == "reuse":
        return _Plan(finished[-1], reuse=True, note=f"reusing finished run {finished[-1]}")
    if finished and options.on_finished == "error":
        raise UserError(
            f"a finished run of {recipe_name}/{pe}/seed{seed} with this configuration exists "
            f"({finished[-1]}); pass --force to train another one or --resume to reuse it"
        )
    return _Plan(None)


def build_data_checked(recipe: Recipe, config: Config, options: TrainOptions) -> DataBundle:
    """The recipe's data, checked for the splits the engine needs."""
    bundle = recipe.build_data(config, options.data_dir, options.download)
    if "val" not in bundle.splits:
        raise UserError(f"recipe {recipe.name!r} built no 'val' split (needed for model choice)")
    if len(bundle.train) == 0:  # type: ignore[arg-type]
        raise UserError(f"recipe {recipe.name!r} built an empty training set")
    return bundle


class _StopRequest:
    """Turns the first SIGINT into a request to stop after the current step (saving first)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: Any = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _StopRequest:
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts at once

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)


def train(
    recipe_name: str,
    config: Config,
    options: TrainOptions | None = None,
    observer: TrainObserver | None = None,
) -> RunResult:
    """Train (or resume, or reuse) one run of ``recipe_name`` with a resolved ``config``."""
    options = options or TrainOptions()
    observer = observer or TrainObserver()
    recipe = get_recipe(recipe_name)
    device = resolve_device(config["train.device"], config)
    context = init_distributed(device)
    device = context.device  # under torchrun on CUDA: this process's own GPU
    precision = resolve_precision(config["train.precision"], device)
    configure_threads(device, context)

    # Rank 0 decides; a refusal must reach every rank, or the others would wait forever.
    plan, refusal = None, None
    if context.is_main:
        try:
            plan = plan_run(recipe_name, config, options)
        except UserError as error:
            refusal = str(error)
    plan, refusal = broadcast((plan, refusal), context)
    if refusal is not None:
        raise UserError(refusal)
    if plan.note and context.is_main:
        observer.message(plan.note)
    if plan.reuse:
        evaluation = rundir.read_json(plan.run_dir / rundir.EVAL_FILE)
        return RunResult(plan.run_dir, "reused", evaluation.get("step", 0), evaluation)

    # Data and model are built (and so validated) before any run directory exists.
    bundle = build_data_checked(recipe, config, options)
    if bundle.skipped and context.is_main:
        observer.message(f"skipped {bundle.skipped} unreadable items while building the data")
    seed_everything(config["train.seed"])
    model = recipe.build_model(config, bundle.info)
    if context.rank > 0:  # same initial weights, but each rank its own dropout/augmentation
        seed_everything(config["train.seed"] + 7919 * context.rank)
    model.to(device)
    sampler = ResumableBatchSampler(
        len(bundle.train),  # type: ignore[arg-type]
        config["train.batch_size"],
        config["train.seed"],
        rank=context.rank,
        world_size=context.world_size,
    )
    total_steps = total_steps_of(config, sampler)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        learning_rate_factor(
            config["train.schedule"], min(config["train.warmup_steps"], total_steps), total_steps
        ),
    )
    scaler = make_grad_scaler(device, precision)  # fp16 only; a pass-through otherwise
    progress = {"step": 0, "best_accuracy": -math.inf, "best_step": -1, "evals_since_best": 0}

    if plan.run_dir is not None:
        run_dir = plan.run_dir
        state = load_checkpoint(run_dir / rundir.CHECKPOINT_FILE, recipe_name)
        load_model_state(model, state, run_dir / rundir.CHECKPOINT_FILE)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            if state.get("scaler"):  # empty when the scaler is off
                scaler.load_state_dict(state["scaler"])
            progress.update(state["progress"])
            per_rank = state.get("rng_per_rank")
            if per_rank is not None and len(per_rank) == context.world_size:
                restore_rng_state(per_rank[context.rank])
            else:  # another world size: exact only for rank 0
                restore_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise UserError(
                f"checkpoint {run_dir / rundir.CHECKPOINT_FILE} cannot be resumed "
                f"({type(error).__name__}: {error})"
            ) from None
        if context.is_main:
            rundir.note_resumption(run_dir, progress["step"], str(device))
    else:
        run_dir = None
        if context.is_main:
            run_dir = rundir.create_run_dir(
                options.out, recipe_name, config["model.pe"], config["train.seed"]
            )
            rundir.write_config(run_dir, recipe_name, config, options.preset, options.data_dir)
            rundir.write_json_atomic(
                run_dir / rundir.ENV_FILE, rundir.environment(str(device), context.world_size)
            )
        run_dir = broadcast(run_dir, context)

    metrics = rundir.MetricsLog(run_dir / rundir.METRICS_FILE, enabled=context.is_main)
    metrics.truncate_after(progress["step"])
    metrics.open_tensorboard(run_dir / "tensorboard")
    if plan.run_dir is None:
        metrics.log(
            {
                "kind": "data",
                "step": 0,
                "train_size": len(bundle.train),  # type: ignore[arg-type]
                "splits": {name: len(split.dataset) for name, split in bundle.splits.items()},
                "skipped": bundle.skipped,
                "total_steps": total_steps,
            }
        )

    def checkpoint() -> None:
        rng_states = gather_to_main(capture_rng_state(), context)  # every rank's streams
        if context.is_main:
            state = {
                "recipe": recipe_name,
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": dict(progress),
                "rng": rng_states[0],
            }
            if context.enabled:
                state["rng_per_rank"] = rng_states
            save_checkpoint(run_dir / rundir.CHECKPOINT_FILE, state)

    if plan.run_dir is None:
        checkpoint()  # step 0: there is always a last good checkpoint

    trained = model
    if context.enabled:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    feeder = BatchFeeder(
        bundle.train,
        bundle.collate or pad_collate,
        sampler,
        device,
        workers=auto_workers(config["train.workers"], device, context.world_size),
        seed=config["train.seed"],
        rank=context.rank,
    )
    eval_every = config["train.eval_every"] or total_steps
    checkpoint_every = config["train.checkpoint_every"] or eval_every
    log_every = config["train.log_every"]
    start_step = progress["step"]
    if context.is_main:
        observer.train_start(run_dir, start_step, total_steps)
    window_loss, window_steps, started = 0.0, 0, time.perf_counter()
    status = "finished"
    trained.train()
    try:
        patience = config["train.patience"]
        # A run killed between its early stop and its final evaluation must not train on.
        stopped_early = patience > 0 and progress["evals_since_best"] >= patience
        with _StopRequest(options.handle_sigint) as stop:
            while progress["step"] < total_steps and not stopped_early:
                batch = feeder.next_batch()
                with autocast_context(device, precision):
                    logits = forward_batch(trained, batch)
                loss, _, _ = loss_and_counts(logits, batch["targets"])
                shared_loss = float(mean_across_ranks(loss.detach(), context))
                if not math.isfinite(shared_loss):
                    raise TrainingDiverged(
                        f"the loss became {shared_loss} at step {progress['step'] + 1}; "
                        f"stopped keeping the last good checkpoint in {run_dir} "
                        "(try a lower train.lr or train.grad_clip)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config["train.grad_clip"] > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(trained.parameters(), config["train.grad_clip"])
                scaler.step(optimizer)  # skipped by fp16's scaler when gradients overflowed
                scaler.update()
                scheduler.step()
                progress["step"] += 1
                step = progress["step"]
                window_loss, window_steps = window_loss + shared_loss, window_steps + 1
                lr = optimizer.param_groups[0]["lr"]
                if context.is_main:
                    observer.train_step(step, shared_loss, lr)
                if step % log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - started
                    metrics.log(
                        {
                            "kind": "train",
                            "step": step,
                            "loss": window_loss / window_steps,
                            "lr": lr,
                            "epoch": sampler.epoch,
                            "steps_per_s": (step - start_step) / max(elapsed, 1e-9),
                        }
                    )
                    window_loss, window_steps = 0.0, 0
                evaluated = step % eval_every == 0 or step == total_steps
                early_stop = False
                if evaluated:
                    early_stop = _validate(
                        model,
                        bundle,
                        config,
                        device,
                        progress,
                        run_dir,
                        recipe_name,
                        metrics,
                        observer,
                        context,
                    )
                if evaluated or step % checkpoint_every == 0 or step == total_steps:
                    checkpoint()
                if early_stop:
                    if context.is_main:
                        observer.message(
                            f"early stop at step {step}: no better val accuracy in "
                            f"{config['train.patience']} evaluations"
                        )
                    break
                interrupted = any_rank(stop.requested, context)
                if interrupted or (
                    options.stop_after is not None and step - start_step >= options.stop_after
                ):
                    if not evaluated and step % checkpoint_every != 0:
                        checkpoint()
                    status = "interrupted" if interrupted else "stopped"
                    break
    finally:
        feeder.close()
        metrics.close()
        if context.is_main:
            observer.train_end()
    if status != "finished":
        barrier(context)
        return RunResult(run_dir, status, progress["step"], is_main=context.is_main)

    evaluation = None
    if context.is_main:
        evaluation = final_evaluation(
            model, bundle, recipe, config, run_dir, progress, device, observer
        )
        metrics.log({"kind": "final", "step": progress["step"], "splits": evaluation["splits"]})
        (run_dir / rundir.DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    barrier(context)
    return RunResult(run_dir, "finished", progress["step"], evaluation, context.is_main)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _validate(
    model: nn.Module,
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    progress: dict[str, Any],
    run_dir: Path,
    recipe_name: str,
    metrics: rundir.MetricsLog,
    observer: TrainObserver,
    context: DistContext,
) -> bool:
    """Evaluate ``val`` on rank 0, keep the best weights; returns whether to stop early."""
    stop = False
    if context.is_main:
        with preserved_rng():  # evaluation must not change the training's random streams
            result = evaluate(
                _unwrap(model),
                bundle.splits["val"].dataset,
                bundle.collate,
                batch_size=config["train.eval_batch_size"],
                device=device,
                on_batch=lambda done, total: observer.eval_progress("val", done, total),
                precision=config.get("train.precision", "auto"),
            )
        step = progress["step"]
        metrics.log({"kind": "eval", "split": "val", "step": step, **result})
        observer.evaluation(step, "val", result)
        if result["accuracy"] > progress["best_accuracy"]:
            progress.update(best_accuracy=result["accuracy"], best_step=step, evals_since_best=0)
            save_checkpoint(
                run_dir / rundir.BEST_FILE,
                {
                    "recipe": recipe_name,
                    "model": _unwrap(model).state_dict(),
                    "step": step,
                    "val": result,
                },
            )
        else:
            progress["evals_since_best"] += 1
        patience = config["train.patience"]
        stop = patience > 0 and progress["evals_since_best"] >= patience
    synced = broadcast((stop, dict(progress)), context)
    progress.update(synced[1])
    return bool(synced[0])


def final_evaluation(
    model: nn.Module,
    bundle: DataBundle,
    recipe: Recipe,
    config: Config,
    run_dir: Path,
    progress: dict[str, Any],
    device: torch.device,
    observer: TrainObserver,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every split with the best weights and write eval.json."""
    best_path = run_dir / rundir.BEST_FILE
    if best_path.is_file():
        load_model_state(_unwrap(model), load_checkpoint(best_path, recipe.name), best_path)
    evaluation = evaluate_splits(_unwrap(model), bundle, config, device, observer, splits)
    result = {
        "recipe": recipe.name,
        "pe": config["model.pe"],
        "seed": config["train.seed"],
        "metric": recipe.metric,
        "step": progress["step"],
        "best_step": progress["best_step"],
        "splits": evaluation,
    }
    rundir.write_json_atomic(run_dir / rundir.EVAL_FILE, result)
    return result


def evaluate_splits(
    model: nn.Module,
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    observer: TrainObserver,
    splits: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy and loss of ``model`` on the named splits (all when None)."""
    names = list(bundle.splits) if splits is None else splits
    unknown = [name for name in names if name not in bundle.splits]
    if unknown:
        raise UserError(
            f"unknown split {unknown[0]!r}; this recipe has: {', '.join(bundle.splits)}"
        )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        split = bundle.splits[name]
        with preserved_rng():
            metrics = evaluate(
                model,
                split.dataset,
                bundle.collate,
                batch_size=config["train.eval_batch_size"],
                device=device,
                on_batch=lambda done, total, name=name: observer.eval_progress(name, done, total),
                precision=config.get("train.precision", "auto"),
            )
        observer.evaluation(-1, name, metrics)
        results[name] = {**metrics, "ood": split.ood, "description": split.description}
    return results
