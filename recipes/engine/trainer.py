"""Training: one recipe, one resolved config, one run directory.

:class:`Trainer` is the loop, in plain PyTorch and in small named steps (setup, restore or
start, step, evaluate, checkpoint, finish): a deterministic resumable batch order, AdamW/Adam
with linear warm-up and a cosine (or constant) schedule, gradient clipping, periodic evaluation
on ``val`` with early stopping, atomic checkpoints, and at the end an evaluation of every split
with the best weights. Losses stay on the device between log steps (no host sync per step).
Everything the CLI shows comes through a :class:`TrainObserver`.
"""

from __future__ import annotations

import dataclasses
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
from torch import Tensor, nn

from encoders.transformer import auxiliary_loss
from recipes.base import Config, DataBundle, Recipe, UserError, get_recipe, pad_collate
from recipes.engine import rundir
from recipes.engine.checkpoint import (
    capture_rng_state,
    inference_state,
    load_checkpoint,
    load_for_resume,
    load_model_state,
    preserved_rng,
    restore_rng_state,
    save_checkpoint,
)
from recipes.engine.config import TrainConfig, config_differences
from recipes.engine.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast,
    gather_to_main,
    init_distributed,
    mean_across_ranks,
)
from recipes.engine.evaluate import answer_loss, evaluate, forward_batch
from recipes.engine.feeding import BatchFeeder, auto_workers
from recipes.engine.precision import autocast_context, make_grad_scaler, resolve_precision
from recipes.engine.sampler import ResumableBatchSampler
from recipes.files import remove_stale_temporaries


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainObserver:
    """Receives progress events; the CLI renders them (progress bars, messages). No-ops here."""

    def message(self, text: str) -> None:
        """A line for the user (what was chosen, where files went)."""

    def train_start(self, run_dir: Path, start_step: int, total_steps: int) -> None:
        """Training of ``run_dir`` begins (or resumes) at ``start_step``."""

    def train_step(self, step: int, loss: float | None, lr: float) -> None:
        """One optimiser step finished; ``loss`` (the mean since the last) only on log steps."""

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
    settings = TrainConfig.from_config(config)
    params = [param for param in model.parameters() if param.requires_grad]
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=settings.lr, weight_decay=settings.weight_decay)


def total_steps_of(config: Config, sampler: ResumableBatchSampler) -> int:
    """``train.steps``, or ``train.epochs`` x batches per epoch when epochs are given."""
    settings = TrainConfig.from_config(config)
    if settings.epochs > 0:
        return settings.epochs * sampler.batches_per_epoch
    return settings.steps


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
    extend: bool = False  # continue a finished run to more steps (``--resume --steps N``)


LENGTH_KEYS = ("train.steps", "train.epochs")  # what an extension may change


def extendable(runs: list[Path], recipe_name: str, config: Config) -> Path | None:
    """The newest run differing from ``config`` only in being shorter (steps), or None.

    A finished run its patience stopped early is not extended (it would stop again at once).
    """
    if int(config.get("train.epochs") or 0):
        return None  # an extension is asked in steps
    for run in reversed(runs):
        try:
            recipe, saved = rundir.read_config(run)
        except UserError:
            continue
        same = {key: value for key, value in saved.items() if key not in LENGTH_KEYS}
        wanted = {key: value for key, value in config.items() if key not in LENGTH_KEYS}
        if recipe != recipe_name or config_differences(same, wanted):
            continue
        stopped_early = rundir.is_finished(run) and (
            rundir.read_json(run / rundir.EVAL_FILE).get("step") != saved["train.steps"]
        )
        if int(saved.get("train.epochs") or 0) == 0 and (
            saved["train.steps"] < config["train.steps"]
            and rundir.has_checkpoint(run)
            and not stopped_early
        ):
            return run
    return None


def plan_run(recipe_name: str, config: Config, options: TrainOptions) -> _Plan:
    """Decide between resuming, reusing, refusing and starting a new run directory."""
    pe, seed = config["model.pe"], config["train.seed"]
    runs = rundir.find_runs(options.out, recipe_name, pe, seed)
    matching = [run for run in runs if _same_config(run, recipe_name, config)]
    finished = [run for run in matching if rundir.is_finished(run)]
    resumable = [
        run for run in matching if not rundir.is_finished(run) and rundir.has_checkpoint(run)
    ]
    if options.resume and matching:
        newest = matching[-1]
        if newest in resumable:
            return _Plan(newest, note=f"resuming {newest}")
        if newest in finished:
            return _Plan(newest, reuse=True, note=f"reusing finished run {newest}")
    if options.resume and not matching:
        longer = extendable(runs, recipe_name, config)
        if longer is not None:
            before = rundir.read_config(longer)[1]["train.steps"]
            return _Plan(
                longer,
                extend=True,
                note=f"extending {longer} from {before} to {config['train.steps']} steps",
            )
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


def name_skipped(files: list[str], shown: int = 10) -> str:
    """The first ``shown`` skipped files after a colon, then "and N more"; "" when none."""
    if not files:
        return ""
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return ": " + ", ".join(files[:shown]) + more


def describe_overlap(overlap: dict[str, int]) -> str:
    """One line: how many items of each evaluation split also occur in training."""
    counts = ", ".join(f"{split} {count}" for split, count in overlap.items())
    return f"evaluation items also in training: {counts}"


def build_data_checked(recipe: Recipe, config: Config, options: TrainOptions) -> DataBundle:
    """The recipe's data, checked for the splits the engine needs."""
    bundle = recipe.build_data(config, options.data_dir, options.download)
    if "val" not in bundle.splits:
        raise UserError(f"recipe {recipe.name!r} built no 'val' split (needed for model choice)")
    if len(bundle.train) == 0:  # type: ignore[arg-type]
        raise UserError(f"recipe {recipe.name!r} built an empty training set")
    return bundle


_STOP_PENDING = threading.Event()


def request_stop() -> None:
    """Ask the run in progress in this process to stop after its current step (saving first);
    a run still setting up stops after its first step (``cope ... --jobs`` workers turn a
    Ctrl-C that arrives outside the step loop into this)."""
    _STOP_PENDING.set()


class _StopRequest:
    """Turns the first SIGINT into a request to stop after the current step (saving first)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = _STOP_PENDING.is_set()
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


@dataclass
class Progress:
    """Where training stands: saved in every checkpoint (``progress``) and restored with it."""

    step: int = 0
    best_accuracy: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0

    def patience_spent(self, patience: int) -> bool:
        """Whether ``patience`` evaluations passed without a better val accuracy (0: never)."""
        return patience > 0 and self.evals_since_best >= patience


class LossWindow:
    """The training losses since the last log, kept on the device.

    Adding a step's loss costs no host synchronisation; the window is read (one sync) only when
    the trainer logs, evaluates, checkpoints or may stop. It remembers the first non-finite
    loss, so a divergence is reported with the step where it happened.
    """

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float64 if device.type != "mps" else torch.float32
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: all finite
        self.bad_value = torch.zeros((), dtype=dtype, device=device)
        self.steps = 0

    def add(self, loss: Tensor, step: int) -> None:
        """Add the (rank-averaged) loss of ``step``."""
        loss = loss.detach().to(self.total.dtype)
        first_bad = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_value = torch.where(first_bad, loss, self.bad_value)
        self.total += loss
        self.steps += 1

    def divergence(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss since training began, or None (syncs)."""
        step = int(self.bad_step)
        return (step, float(self.bad_value)) if step else None

    def take_mean(self) -> float:
        """The mean loss of the window (syncs), then an empty window."""
        mean = float(self.total) / max(self.steps, 1)
        self.total.zero_()
        self.steps = 0
        return mean


class Trainer:
    """One run of one recipe: setup, restore (or start), step, evaluate, checkpoint, finish.

    :meth:`run` is the whole life of a run; each step of it is a method, so that a feature lands
    in the step it concerns. State lives here: the model (and its DDP wrapper), optimiser,
    scheduler, sampler, :class:`Progress` and the run directory. Rank 0 alone writes files.
    """

    def __init__(
        self,
        recipe: Recipe,
        config: Config,
        options: TrainOptions | None = None,
        observer: TrainObserver | None = None,
    ) -> None:
        self.recipe, self.config = recipe, config
        self.settings = TrainConfig.from_config(config)
        self.options = options or TrainOptions()
        self.observer = observer or TrainObserver()
        self.progress = Progress()
        device = resolve_device(self.settings.device, config)
        self.context = init_distributed(device)
        self.device = device = self.context.device  # under torchrun on CUDA: this rank's GPU
        self.precision = resolve_precision(self.settings.precision, device)
        configure_threads(device, self.context)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train (or resume, or reuse) the run; what became of it."""
        plan = self.plan()
        if plan.reuse:
            evaluation = rundir.read_json(plan.run_dir / rundir.EVAL_FILE)
            return RunResult(plan.run_dir, "reused", evaluation.get("step", 0), evaluation)
        self.setup()
        if plan.run_dir is not None:
            if plan.extend:
                self.extend(plan.run_dir)
            self.restore(plan.run_dir)
        else:
            self.start()
        status = self.train_loop()
        if status != "finished":
            barrier(self.context)
            return RunResult(self.run_dir, status, self.progress.step, is_main=self.is_main)
        return self.finish()

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    def plan(self) -> _Plan:
        """Rank 0 decides what to do; a refusal reaches every rank, or the others would hang."""
        plan, refusal = None, None
        if self.is_main:
            try:
                plan = plan_run(self.recipe.name, self.config, self.options)
            except UserError as error:
                refusal = str(error)
        plan, refusal = broadcast((plan, refusal), self.context)
        if refusal is not None:
            raise UserError(refusal)
        if plan.note and self.is_main:
            self.observer.message(plan.note)
        return plan

    def setup(self) -> None:
        """Data, model, sampler, optimiser and schedule, before any run directory exists."""
        settings, context = self.settings, self.context
        self.bundle = build_data_checked(self.recipe, self.config, self.options)
        if self.bundle.skipped and self.is_main:
            self.observer.message(
                f"skipped {self.bundle.skipped} unreadable items while building the data"
                + name_skipped(self.bundle.skipped_files)
            )
        overlap = self.bundle.info.get("train_overlap")  # generated recipes: eval items in training
        if overlap is not None and self.is_main:
            self.observer.message(describe_overlap(overlap))
        seed_everything(settings.seed)
        self.model = self.recipe.build_model(self.config, self.bundle.info)
        if context.rank > 0:  # same initial weights, but each rank its own dropout/augmentation
            seed_everything(settings.seed + 7919 * context.rank)
        self.model.to(self.device)
        self.sampler = ResumableBatchSampler(
            len(self.bundle.train),  # type: ignore[arg-type]
            settings.batch_size,
            settings.seed,
            rank=context.rank,
            world_size=context.world_size,
        )
        self.total_steps = total_steps_of(self.config, self.sampler)
        self.optimizer = make_optimizer(self.model, self.config)
        warmup = min(settings.warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(settings.schedule, warmup, self.total_steps)
        )
        self.scaler = make_grad_scaler(self.device, self.precision)  # fp16 only; else pass-through
        self.feeder = BatchFeeder(
            self.bundle.train,
            self.bundle.collate or pad_collate,
            self.sampler,
            self.device,
            workers=auto_workers(settings.workers, self.device, context.world_size),
            seed=settings.seed,
            rank=context.rank,
        )

    def extend(self, run_dir: Path) -> None:
        """Make a (finished) run the longer one asked for: its config's steps, no ``done``.

        The restored checkpoint is the run's last step; the learning-rate schedule is the new
        length's from there on (a constant schedule continues as one uninterrupted run would).
        """
        if self.is_main:
            saved = rundir.read_json(run_dir / rundir.CONFIG_FILE)
            rundir.write_config(
                run_dir,
                self.recipe.name,
                self.config,
                saved.get("preset"),
                rundir.read_data_dir(run_dir),
            )
            (run_dir / rundir.DONE_FILE).unlink(missing_ok=True)
        barrier(self.context)

    def restore(self, run_dir: Path) -> None:
        """Continue ``run_dir`` from its checkpoint: weights, optimiser, sampler, RNG streams."""
        self.run_dir = run_dir
        announce = self.observer.message if self.is_main else None
        state, path = load_for_resume(run_dir / rundir.CHECKPOINT_FILE, self.recipe.name, announce)
        load_model_state(self.model, state, path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            if state.get("scaler"):  # empty when the scaler is off
                self.scaler.load_state_dict(state["scaler"])
            self.progress = Progress(**state["progress"])
            per_rank = state.get("rng_per_rank")
            if per_rank is not None and len(per_rank) == self.context.world_size:
                restore_rng_state(per_rank[self.context.rank])
            else:  # another world size: exact only for rank 0
                restore_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise UserError(
                f"checkpoint {path} cannot be resumed ({type(error).__name__}: {error})"
            ) from None
        if self.is_main:
            remove_stale_temporaries(run_dir)  # left by a run killed while writing
            rundir.note_resumption(run_dir, self.progress.step, str(self.device))
        self.open_metrics()

    def start(self) -> None:
        """A new run directory (rank 0 creates it), its data record and a step-0 checkpoint."""
        run_dir = None
        if self.is_main:
            run_dir = rundir.create_run_dir(
                self.options.out, self.recipe.name, self.config["model.pe"], self.settings.seed
            )
            rundir.write_config(
                run_dir, self.recipe.name, self.config, self.options.preset, self.options.data_dir
            )
            rundir.write_json_atomic(
                run_dir / rundir.ENV_FILE,
                rundir.environment(str(self.device), self.context.world_size),
            )
        self.run_dir = broadcast(run_dir, self.context)
        self.open_metrics()
        self.metrics.log(
            {
                "kind": "data",
                "step": 0,
                "train_size": len(self.bundle.train),  # type: ignore[arg-type]
                "splits": {name: len(split.dataset) for name, split in self.bundle.splits.items()},
                "skipped": self.bundle.skipped,
                "skipped_files": self.bundle.skipped_files,
                "train_overlap": self.bundle.info.get("train_overlap"),
                "total_steps": self.total_steps,
            }
        )
        self.checkpoint()  # step 0: there is always a last good checkpoint

    def open_metrics(self) -> None:
        """metrics.jsonl (and TensorBoard), cut back to the restored step."""
        self.metrics = rundir.MetricsLog(self.run_dir / rundir.METRICS_FILE, enabled=self.is_main)
        self.metrics.truncate_after(self.progress.step)
        self.metrics.open_tensorboard(self.run_dir / "tensorboard")

    # -- the loop --------------------------------------------------------------------------

    def train_loop(self) -> str:
        """Step until done, stopped early, asked to stop or interrupted; the final status."""
        settings, context = self.settings, self.context
        self.trained = self.model
        if context.enabled:
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.eval_every = settings.eval_every or self.total_steps
        self.checkpoint_every = settings.checkpoint_every or self.eval_every
        self.start_step = self.progress.step
        self.window = LossWindow(self.device)
        self.started = time.perf_counter()
        if self.is_main:
            self.observer.train_start(self.run_dir, self.start_step, self.total_steps)
        self.trained.train()
        try:
            # A run killed between its early stop and its final evaluation must not train on.
            if self.progress.patience_spent(settings.patience):
                return "finished"
            with _StopRequest(self.options.handle_sigint) as stop:
                while self.progress.step < self.total_steps:
                    status = self.after_step(self.step(), stop)
                    if status is not None:
                        return status
            return "finished"
        finally:
            self.feeder.close()
            self.metrics.close()
            if self.is_main:
                self.observer.train_end()

    def step(self) -> int:
        """One optimiser step; the loss stays on the device. Returns the new step number."""
        batch, count = self.feeder.next_batch()  # count from the host copy: no device sync
        with autocast_context(self.device, self.precision):
            logits = forward_batch(self.trained, batch)
        loss = answer_loss(logits, batch["targets"], count)
        # Terms a layer adds to what is optimised (CoPE's gate budget); the log keeps the task loss.
        extra = auxiliary_loss(self.model)
        objective = loss if extra is None else loss + extra.to(loss.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.trained.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)  # skipped by fp16's scaler when gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.progress.step += 1
        self.window.add(mean_across_ranks(loss.detach(), self.context), self.progress.step)
        return self.progress.step

    def after_step(self, step: int, stop: _StopRequest) -> str | None:
        """Log, evaluate, checkpoint and decide whether to stop; None: keep training.

        Only here does the host wait for the device, and only on steps that log, evaluate,
        checkpoint or may stop (under DDP the ranks agree on a stop at those steps).
        """
        last = step == self.total_steps
        evaluated = step % self.eval_every == 0 or last
        saved = evaluated or step % self.checkpoint_every == 0
        logged = step % self.settings.log_every == 0 or last
        stop_asked = self.options.stop_after is not None and (
            step - self.start_step >= self.options.stop_after
        )
        may_stop = not self.context.enabled or logged or saved or stop_asked
        interrupted = any_rank(stop.requested, self.context) if may_stop else False
        synced = logged or saved or stop_asked or interrupted
        if synced:
            self.check_finite()
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self.log_train(step, lr) if logged else None
        if self.is_main:
            self.observer.train_step(step, loss, lr)
        early_stop = self.evaluate() if evaluated else False
        if saved:
            self.checkpoint()
        if early_stop:
            if self.is_main:
                self.observer.message(
                    f"early stop at step {step}: no better val accuracy in "
                    f"{self.settings.patience} evaluations"
                )
            return "finished"
        if interrupted or stop_asked:
            if not saved:
                self.checkpoint()
            return "interrupted" if interrupted else "stopped"
        return None

    def check_finite(self) -> None:
        """Stop with the last good checkpoint kept if any loss so far was NaN or infinite."""
        divergence = self.window.divergence()
        if divergence is not None:
            step, value = divergence
            raise TrainingDiverged(
                f"the loss became {value} at step {step}; stopped keeping the last good "
                f"checkpoint in {self.run_dir} (try a lower train.lr or train.grad_clip)"
            )

    def log_train(self, step: int, lr: float) -> float:
        """Write the window's mean loss to metrics.jsonl; returns it."""
        loss = self.window.take_mean()
        elapsed = time.perf_counter() - self.started
        self.metrics.log(
            {
                "kind": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "epoch": self.sampler.epoch,
                "steps_per_s": (step - self.start_step) / max(elapsed, 1e-9),
            }
        )
        return loss

    def evaluate(self) -> bool:
        """Evaluate ``val`` on rank 0 and keep the best weights; returns whether to stop early."""
        stop = False
        if self.is_main:
            model, step = _unwrap(self.model), self.progress.step
            with preserved_rng():  # evaluation must not change the training's random streams
                result = evaluate(
                    model,
                    self.bundle.splits["val"].dataset,
                    self.bundle.collate,
                    batch_size=self.settings.eval_batch_size,
                    device=self.device,
                    on_batch=lambda done, total: self.observer.eval_progress("val", done, total),
                    precision=self.precision,
                )
            self.metrics.log({"kind": "eval", "split": "val", "step": step, **result})
            self.observer.evaluation(step, "val", result)
            if result["accuracy"] > self.progress.best_accuracy:
                self.progress.best_accuracy, self.progress.best_step = result["accuracy"], step
                self.progress.evals_since_best = 0
                save_checkpoint(
                    self.run_dir / rundir.BEST_FILE,
                    {
                        "recipe": self.recipe.name,
                        "model": model.state_dict(),
                        "step": step,
                        "val": result,
                        **inference_state(self.config, self.bundle.info),
                    },
                )
            else:
                self.progress.evals_since_best += 1
            stop = self.progress.patience_spent(self.settings.patience)
        stop, self.progress = broadcast((stop, self.progress), self.context)
        return bool(stop)

    def checkpoint(self) -> None:
        """Save everything a bit-exact resume needs (every rank's RNG streams; rank 0 writes)."""
        rng_states = gather_to_main(capture_rng_state(), self.context)
        if not self.is_main:
            return
        state = {
            "recipe": self.recipe.name,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "rng": rng_states[0],
            **inference_state(self.config, self.bundle.info),
        }
        if self.context.enabled:
            state["rng_per_rank"] = rng_states
        save_checkpoint(self.run_dir / rundir.CHECKPOINT_FILE, state, keep_previous=True)

    def finish(self) -> RunResult:
        """Evaluate every split with the best weights, write eval.json, then ``done``."""
        evaluation = None
        if self.is_main:
            evaluation = final_evaluation(
                self.model,
                self.bundle,
                self.recipe,
                self.config,
                self.run_dir,
                self.progress,
                self.device,
                self.observer,
            )
            self.metrics.log(
                {"kind": "final", "step": self.progress.step, "splits": evaluation["splits"]}
            )
            rundir.mark_done(self.run_dir)
        barrier(self.context)
        return RunResult(self.run_dir, "finished", self.progress.step, evaluation, self.is_main)


def train(
    recipe: Recipe | str,
    config: Config,
    options: TrainOptions | None = None,
    observer: TrainObserver | None = None,
) -> RunResult:
    """Train (or resume, or reuse) one run of ``recipe`` (or the recipe of that name) with a
    resolved ``config``."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    return Trainer(recipe, config, options, observer).run()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def final_evaluation(
    model: nn.Module,
    bundle: DataBundle,
    recipe: Recipe,
    config: Config,
    run_dir: Path,
    progress: Progress,
    device: torch.device,
    observer: TrainObserver,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every split with the best weights and write eval.json."""
    best_path = run_dir / rundir.BEST_FILE
    if best_path.is_file():
        load_model_state(_unwrap(model), load_checkpoint(best_path, recipe.name), best_path)
    question_of = question_namer(recipe, config)
    evaluation = evaluate_splits(
        _unwrap(model), bundle, config, device, observer, splits, question_of=question_of
    )
    questions = {name: split.pop("questions", {}) for name, split in evaluation.items()}
    result = {
        "recipe": recipe.name,
        "pe": config["model.pe"],
        "seed": config["train.seed"],
        "metric": recipe.metric,
        "step": progress.step,
        "best_step": progress.best_step,
        "splits": evaluation,
    }
    if question_of is not None:  # per-question accuracy, cached beside eval.json for reports
        rundir.write_analysis(
            run_dir / rundir.QUESTIONS_FILE, rundir.weights_stamp(result), {"splits": questions}
        )
    rundir.write_json_atomic(run_dir / rundir.EVAL_FILE, result)
    return result


def question_namer(recipe: Recipe, config: Config) -> Callable[[dict[str, Any]], str | None] | None:
    """The recipe's item -> question name under ``config``; None when it asks no questions."""
    if not recipe.asks_questions:
        return None
    return lambda item: recipe.question_of(item, config)


def evaluate_splits(
    model: nn.Module,
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    observer: TrainObserver,
    splits: list[str] | None = None,
    *,
    question_of: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy and loss of ``model`` on the named splits (all when None).

    With ``question_of``, each split's result also has ``questions`` (see :func:`evaluate`).
    """
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
                question_of=question_of,
            )
        observer.evaluation(-1, name, metrics)
        results[name] = {**metrics, "ood": split.ood, "description": split.description}
    return results
