"""`cope compare` and `cope sweep`: train a grid of runs under one budget, then one report.

Finished runs with the same configuration are reused and unfinished ones resumed (pass
``force`` to train fresh ones), so an interrupted comparison continues where it stopped.

Tuning (``--tune train.lr=3e-4,1e-3,3e-3``): every encoding is trained at every candidate value
(every combination, for several keys) and every seed; per encoding the value with the best mean
``val`` accuracy over seeds is kept, and only its runs enter the comparison. The choice reads
``val`` alone, never a test split, so the test numbers stay an unbiased estimate; the report
states the chosen values and every candidate's ``val``. One shared learning rate can leave one
encoding unconverged while another trains well, which compares settings, not encodings.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError, get_recipe
from recipes.engine.config import (
    flatten_options,
    load_toml,
    parse_set_option,
    preset_options,
    resolve_config,
)
from recipes.engine.parallel import Task, train_parallel
from recipes.engine.report import build_report, encoding_label, make_output_dir
from recipes.engine.trainer import RunResult, TrainObserver, TrainOptions, train


@dataclass
class Job:
    """One run of a grid: recipe, resolved config, and the option set it came from."""

    recipe: str
    config: Config
    preset: str | None
    variant: str = ""
    tuned: tuple[tuple[str, Any], ...] = ()  # (key, value) of the tuned options, if any

    @property
    def selection_group(self) -> tuple[str, str, str]:
        """The jobs tuning chooses among: one recipe, variant and encoding (as tables label it,
        so that a CoPE gate variant's choice is reported under its row)."""
        return (self.recipe, self.variant, encoding_label(self.config))

    @property
    def tuned_label(self) -> str:
        """``train.lr=0.001`` (several keys joined by commas)."""
        return ", ".join(f"{key}={value}" for key, value in self.tuned)


@dataclass
class GridResult:
    """What a comparison or sweep produced."""

    output_dir: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    interrupted: bool = False


def parse_pe_list(text: str) -> list[str]:
    """``"cope,rope,abs"`` -> ["cope", "rope", "abs"] (duplicates dropped, order kept)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--pe needs at least one position encoding, e.g. --pe cope,rope,abs")
    return list(dict.fromkeys(names))


TUNE_FORBIDDEN = ("model.pe", "train.seed")


def parse_tune_options(texts: list[str] | None) -> dict[str, list[Any]]:
    """``["train.lr=3e-4,1e-3"]`` -> ``{"train.lr": [0.0003, 0.001]}`` (values read as --set)."""
    tune: dict[str, list[Any]] = {}
    for text in texts or []:
        key, sep, raw = text.partition("=")
        key = key.strip()
        parts = [part.strip() for part in raw.split(",") if part.strip()]
        if not sep or not key or not parts:
            raise UserError(f"--tune expects key=value,value,..., got {text!r}")
        if key in TUNE_FORBIDDEN:
            raise UserError(f"--tune cannot choose {key}; compare sets it itself")
        if key in tune:
            raise UserError(f"--tune names {key} twice")
        tune[key] = list(dict.fromkeys(parse_set_option(f"{key}={part}")[1] for part in parts))
    return tune


def tune_combinations(tune: Mapping[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the candidate values, as ((key, value), ...); [()] when none."""
    keys = list(tune)
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*tune.values())]


def select_by_val(
    jobs: list[Job], evaluations: list[dict[str, Any]]
) -> tuple[set[int], list[dict[str, Any]]]:
    """Per recipe, variant and encoding, the tuned values with the best mean val accuracy.

    ``evaluations[i]`` is job i's eval.json. Only the ``val`` split is read; ties keep the
    candidate listed first. Returns the indices of the chosen jobs and, per selection group,
    ``{"recipe", "variant", "pe", "chosen", "candidates": [{"label", "val", "n"}]}``.
    """
    by_group: dict[tuple[str, str, str], dict[str, list[int]]] = {}
    for index, job in enumerate(jobs):
        by_group.setdefault(job.selection_group, {}).setdefault(job.tuned_label, []).append(index)
    chosen: set[int] = set()
    summary = []
    for (recipe, variant, pe), candidates in by_group.items():
        scored = []
        for label, indices in candidates.items():
            values = [evaluations[index]["splits"]["val"]["accuracy"] for index in indices]
            scored.append({"label": label, "val": sum(values) / len(values), "n": len(values)})
        best = max(range(len(scored)), key=lambda position: (scored[position]["val"], -position))
        chosen.update(candidates[scored[best]["label"]])
        summary.append(
            {"recipe": recipe, "variant": variant, "pe": pe, "chosen": scored[best]["label"],
             "candidates": scored}
        )  # fmt: skip
    return chosen, summary


def seed_list(count: int, first: int = 0) -> list[int]:
    """Seeds ``first .. first+count-1``."""
    if count < 1:
        raise UserError(f"--seeds must be at least 1, got {count}")
    return list(range(first, first + count))


def job_label(job: Job) -> str:
    """``counting pe=cope gate=onset seed=0 train.lr=0.001 (variant)``: a grid line's name."""
    gate = job.config.get("model.cope_gate", "qk")
    return (
        f"{job.recipe} pe={job.config['model.pe']} "
        + (f"gate={gate} " if gate != "qk" else "")
        + f"seed={job.config['train.seed']}"
        + (f" {job.tuned_label}" if job.tuned else "")
        + (f" ({job.variant})" if job.variant else "")
    )


def train_jobs(
    jobs: list[Job], options: TrainOptions, observer: TrainObserver, processes: int = 1
) -> list[RunResult | None]:
    """Train every job in order (``processes`` > 1: that many at once, in worker processes).

    A run that never started (the grid was interrupted first) is None.
    """
    tasks = [
        Task(
            get_recipe(job.recipe),
            job.config,
            TrainOptions(**{**options.__dict__, "preset": job.preset}),
        )
        for job in jobs
    ]
    total = len(jobs)
    if processes > 1:

        def on_end(index: int, run: RunResult, seconds: float) -> None:
            observer.message(
                f"[{index + 1}/{total}] {run.status}: {job_label(jobs[index])} "
                f"({seconds / 60:.1f} min) -> {run.run_dir}"
            )

        runs, _ = train_parallel(
            tasks,
            processes,
            on_start=lambda index: observer.message(
                f"[{index + 1}/{total}] started: {job_label(jobs[index])}"
            ),
            on_end=on_end,
        )
        return runs
    runs: list[RunResult | None] = [None] * total
    for index, task in enumerate(tasks):
        observer.message(f"[{index + 1}/{total}] {job_label(jobs[index])}")
        runs[index] = train(task.recipe, task.config, task.options, observer)
        if runs[index].status == "interrupted":  # type: ignore[union-attr]
            break
    return runs


def run_grid(
    jobs: list[Job],
    *,
    options: TrainOptions,
    observer: TrainObserver,
    output_dir: Path,
    pe_order: list[str],
    tune_keys: list[str] | None = None,
    processes: int = 1,
) -> GridResult:
    """Train every job (reusing/resuming what exists), then write the report.

    With ``tune_keys``, only each selection group's best jobs by val enter the report.
    """
    result = GridResult(output_dir)
    runs = train_jobs(jobs, options, observer, processes)
    result.runs = [run for run in runs if run is not None]
    if any(run is None or run.status == "interrupted" for run in runs):
        result.interrupted = True
        return result
    done = [
        (job, run)
        for job, run in zip(jobs, result.runs, strict=True)
        if run.status in ("finished", "reused")
    ]
    tuning = None
    if tune_keys:
        chosen, selections = select_by_val(
            [job for job, _ in done], [run.evaluation for _, run in done]
        )
        for selection in selections:
            observer.message(
                f"tuned on val: {selection['recipe']} pe={selection['pe']}"
                + (f" ({selection['variant']})" if selection["variant"] else "")
                + f" -> {selection['chosen']}"
            )
        tuning = {"keys": list(tune_keys), "groups": selections}
        done = [pair for index, pair in enumerate(done) if index in chosen]
    names = {str(run.run_dir): job.variant for job, run in done if job.variant}
    result.results, result.files = build_report(
        [run.run_dir for _, run in done],
        output_dir,
        pe_order,
        names or None,
        tuning,
        on_message=observer.message,
    )
    return result


def compare(
    recipe_name: str,
    pes: list[str],
    seeds: list[int],
    *,
    preset: str | None = None,
    file_options: Mapping[str, Any] | None = None,
    cli_options: Mapping[str, Any] | None = None,
    set_options: Mapping[str, Any] | None = None,
    options: TrainOptions | None = None,
    observer: TrainObserver | None = None,
    tune: Mapping[str, list[Any]] | None = None,
    processes: int = 1,
) -> GridResult:
    """Train every encoding x seed under the same budget and compare them on every split.

    ``tune``: option -> candidate values, chosen per encoding on val (module docstring).
    ``processes``: runs trained at once (recipes.engine.parallel).
    """
    options = options or TrainOptions(on_finished="reuse", resume=True, explain_fresh=False)
    observer = observer or TrainObserver()
    recipe = get_recipe(recipe_name)
    preset_name, _ = preset_options(recipe, preset)
    for key, flag in (("model.pe", "--pe"), ("train.seed", "--seed/--seeds")):
        if key in (set_options or {}):
            raise UserError(f"compare sets {key} itself; use {flag} instead of --set {key}=...")
    for key in tune or {}:
        if key in (set_options or {}):
            raise UserError(f"{key} is both tuned (--tune) and fixed (--set); give one")
    jobs = []
    for pe in pes:  # resolve (and so validate) every config before training anything
        for tuned in tune_combinations(tune or {}):
            for seed in seeds:
                run_options = {**(cli_options or {}), "model.pe": pe, "train.seed": seed}
                if not pe.startswith("cope"):
                    # --cope-gate means nothing to the baselines: keep their configs (and so
                    # their finished runs) the same whatever gate the CoPE runs use.
                    run_options.pop("model.cope_gate", None)
                config = resolve_config(
                    recipe,
                    preset=preset,
                    file_options=file_options,
                    cli_options=run_options,
                    set_options={**(set_options or {}), **dict(tuned)},
                )
                jobs.append(Job(recipe_name, config, preset_name, tuned=tuned))
    output_dir = make_output_dir(Path(options.out) / recipe_name, "compare")
    return run_grid(
        jobs,
        options=options,
        observer=observer,
        output_dir=output_dir,
        pe_order=pes,
        tune_keys=list(tune or {}),
        processes=processes,
    )


def load_sweep(
    path: Path,
    overrides: Mapping[str, Any] | None = None,
    tune: Mapping[str, list[Any]] | None = None,
) -> tuple[list[Job], dict[str, Any]]:
    """Parse a sweep file into jobs; returns the jobs and the file's settings (``out``, ``pes``,
    ``tune``). ``tune`` (from the command line) replaces the file's ``[tune]`` table.

    Format::

        out = "runs/sweep"                 # optional, default runs/
        recipes = ["counting"]             # or recipe = "counting"
        pes = ["cope", "rope", "abs"]
        seeds = 2                          # or a list: [0, 1, 2]
        preset = "small"                   # optional
        [options]                          # applied to every run (dotted or nested keys)
        "train.steps" = 300
        [tune]                             # optional: chosen per encoding on val
        "train.lr" = [3e-4, 1e-3, 3e-3]
        [[variants]]                       # optional option sets; each one is a grid axis
        name = "lr-high"
        "train.lr" = 3e-3
        pes = ["cope"]                     # optional: this variant's encodings (default: pes)

    A variant's own ``pes`` lets options that matter to one encoding (``model.cope_gate``) vary
    without training the other encodings once per value.
    """
    table = load_toml(path)
    known = {"out", "recipes", "recipe", "pes", "seeds", "preset", "options", "variants", "tune"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(
            f"{path}: unknown sweep key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}"
        )
    recipes = table.get("recipes", [table["recipe"]] if "recipe" in table else None)
    if not recipes or not all(isinstance(name, str) for name in recipes):
        raise UserError(f'{path}: give `recipes = ["name", ...]` (a list of recipe names)')
    pes = table.get("pes", ["cope"])
    if isinstance(pes, str):
        pes = parse_pe_list(pes)
    seeds = table.get("seeds", 1)
    seeds = seed_list(seeds) if isinstance(seeds, int) else list(seeds)
    if not all(isinstance(seed, int) for seed in seeds):
        raise UserError(f"{path}: seeds must be a count or a list of integers")
    common = flatten_options(table.get("options", {}))
    if tune is None:
        tune = _file_tune(path, table.get("tune", {}))
    variants = table.get("variants", [{}])
    if not isinstance(variants, list) or not variants:
        raise UserError(f"{path}: variants must be a list of tables ([[variants]])")
    jobs = []
    for recipe_name in recipes:
        recipe = get_recipe(recipe_name)
        preset_name, _ = preset_options(recipe, table.get("preset"))
        for number, variant in enumerate(variants, start=1):
            variant = dict(variant)
            name = str(variant.pop("name", f"variant{number}" if len(variants) > 1 else ""))
            variant_pes = variant.pop("pes", pes)
            if isinstance(variant_pes, str):
                variant_pes = parse_pe_list(variant_pes)
            for pe in variant_pes:
                for tuned in tune_combinations(tune):
                    for seed in seeds:
                        run_options = {**(overrides or {}), "model.pe": pe, "train.seed": seed}
                        config = resolve_config(
                            recipe,
                            preset=table.get("preset"),
                            file_options={**common, **flatten_options(variant)},
                            cli_options={**run_options, **dict(tuned)},
                        )
                        jobs.append(Job(recipe_name, config, preset_name, name, tuned))
    # Report order: the file's pes, then any a variant added.
    order = list(pes)
    for variant in variants:
        extra = variant.get("pes", [])
        for pe in parse_pe_list(extra) if isinstance(extra, str) else extra:
            if pe not in order:
                order.append(pe)
    return jobs, {"out": table.get("out"), "pes": order, "tune": dict(tune)}


def _file_tune(path: Path, table: Any) -> dict[str, list[Any]]:
    """A sweep file's ``[tune]`` table, checked: option -> list of candidate values."""
    if not isinstance(table, dict):
        raise UserError(f'{path}: tune must be a table, e.g. [tune] "train.lr" = [3e-4, 1e-3]')
    tune = flatten_options(table)
    for key, values in tune.items():
        if key in TUNE_FORBIDDEN:
            raise UserError(f"{path}: tune cannot choose {key}; the sweep sets it itself")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: tune.{key} must be a non-empty list of candidate values")
    return tune


def sweep(
    path: Path,
    *,
    options: TrainOptions | None = None,
    observer: TrainObserver | None = None,
    out: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    tune: Mapping[str, list[Any]] | None = None,
    processes: int = 1,
) -> GridResult:
    """Run every job of a sweep file (``overrides``: e.g. train.device) and write one report.

    ``tune`` (``--tune``) replaces the file's ``[tune]`` table; ``processes``: runs at once.
    """
    jobs, settings = load_sweep(path, overrides, tune)
    options = options or TrainOptions(on_finished="reuse", resume=True, explain_fresh=False)
    root = Path(out or settings["out"] or options.out)
    options = TrainOptions(**{**options.__dict__, "out": root})
    output_dir = make_output_dir(root, "sweep")
    return run_grid(
        jobs,
        options=options,
        observer=observer or TrainObserver(),
        output_dir=output_dir,
        pe_order=settings["pes"],
        tune_keys=list(settings["tune"]),
        processes=processes,
    )
