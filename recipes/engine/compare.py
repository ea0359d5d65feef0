"""`cope compare` and `cope sweep`: train a grid of runs under one budget, then one report.

Finished runs with the same configuration are reused and unfinished ones resumed (pass
``force`` to train fresh ones), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError, get_recipe
from recipes.engine.config import (
    flatten_options,
    load_toml,
    preset_options,
    resolve_config,
)
from recipes.engine.report import build_report, make_output_dir
from recipes.engine.trainer import RunResult, TrainObserver, TrainOptions, train


@dataclass
class Job:
    """One run of a grid: recipe, resolved config, and the option set it came from."""

    recipe: str
    config: Config
    preset: str | None
    variant: str = ""


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


def seed_list(count: int, first: int = 0) -> list[int]:
    """Seeds ``first .. first+count-1``."""
    if count < 1:
        raise UserError(f"--seeds must be at least 1, got {count}")
    return list(range(first, first + count))


def run_grid(
    jobs: list[Job],
    *,
    options: TrainOptions,
    observer: TrainObserver,
    output_dir: Path,
    pe_order: list[str],
) -> GridResult:
    """Train every job (reusing/resuming what exists), then write the report."""
    result = GridResult(output_dir)
    for index, job in enumerate(jobs, start=1):
        observer.message(
            f"[{index}/{len(jobs)}] {job.recipe} pe={job.config['model.pe']} "
            + (
                f"gate={job.config['model.cope_gate']} "
                if job.config.get("model.cope_gate", "qk") != "qk"
                else ""
            )
            + f"seed={job.config['train.seed']}"
            + (f" ({job.variant})" if job.variant else "")
        )
        job_options = TrainOptions(**{**options.__dict__, "preset": job.preset})
        run = train(get_recipe(job.recipe), job.config, job_options, observer)
        result.runs.append(run)
        if run.status == "interrupted":
            result.interrupted = True
            return result
    finished = [run.run_dir for run in result.runs if run.status in ("finished", "reused")]
    names = {
        str(run.run_dir): job.variant
        for run, job in zip(result.runs, jobs, strict=False)
        if job.variant
    }
    result.results, result.files = build_report(finished, output_dir, pe_order, names or None)
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
) -> GridResult:
    """Train every encoding x seed under the same budget and compare them on every split."""
    options = options or TrainOptions(on_finished="reuse", resume=True, explain_fresh=False)
    observer = observer or TrainObserver()
    recipe = get_recipe(recipe_name)
    preset_name, _ = preset_options(recipe, preset)
    for key, flag in (("model.pe", "--pe"), ("train.seed", "--seed/--seeds")):
        if key in (set_options or {}):
            raise UserError(f"compare sets {key} itself; use {flag} instead of --set {key}=...")
    jobs = []
    for pe in pes:  # resolve (and so validate) every config before training anything
        for seed in seeds:
            run_options = {**(cli_options or {}), "model.pe": pe, "train.seed": seed}
            if not pe.startswith("cope"):
                # --cope-gate means nothing to the baselines: keep their configs (and so their
                # finished runs) the same whatever gate the CoPE runs use.
                run_options.pop("model.cope_gate", None)
            config = resolve_config(
                recipe,
                preset=preset,
                file_options=file_options,
                cli_options=run_options,
                set_options=set_options,
            )
            jobs.append(Job(recipe_name, config, preset_name))
    output_dir = make_output_dir(Path(options.out) / recipe_name, "compare")
    return run_grid(jobs, options=options, observer=observer, output_dir=output_dir, pe_order=pes)


def load_sweep(
    path: Path, overrides: Mapping[str, Any] | None = None
) -> tuple[list[Job], dict[str, Any]]:
    """Parse a sweep file into jobs; returns the jobs and the file's settings (``out``).

    Format::

        out = "runs/sweep"                 # optional, default runs/
        recipes = ["counting"]             # or recipe = "counting"
        pes = ["cope", "rope", "abs"]
        seeds = 2                          # or a list: [0, 1, 2]
        preset = "small"                   # optional
        [options]                          # applied to every run (dotted or nested keys)
        "train.steps" = 300
        [[variants]]                       # optional option sets; each one is a grid axis
        name = "lr-high"
        "train.lr" = 3e-3
        pes = ["cope"]                     # optional: this variant's encodings (default: pes)

    A variant's own ``pes`` lets options that matter to one encoding (``model.cope_gate``) vary
    without training the other encodings once per value.
    """
    table = load_toml(path)
    known = {"out", "recipes", "recipe", "pes", "seeds", "preset", "options", "variants"}
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
                for seed in seeds:
                    config = resolve_config(
                        recipe,
                        preset=table.get("preset"),
                        file_options={**common, **flatten_options(variant)},
                        cli_options={**(overrides or {}), "model.pe": pe, "train.seed": seed},
                    )
                    jobs.append(Job(recipe_name, config, preset_name, name))
    # Report order: the file's pes, then any a variant added.
    order = list(pes)
    for variant in variants:
        extra = variant.get("pes", [])
        for pe in parse_pe_list(extra) if isinstance(extra, str) else extra:
            if pe not in order:
                order.append(pe)
    return jobs, {"out": table.get("out"), "pes": order}


def sweep(
    path: Path,
    *,
    options: TrainOptions | None = None,
    observer: TrainObserver | None = None,
    out: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GridResult:
    """Run every job of a sweep file (``overrides``: e.g. train.device) and write one report."""
    jobs, settings = load_sweep(path, overrides)
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
    )
