"""The `cope` command line: commands parse options, call the engine, and render the results.

Errors a user can fix (recipes.base.UserError, missing files, out of memory) end with one red
line ``error: ...`` and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cope_cli.bench import bench_app
from cope_cli.console import console, error_console
from encoders.names import GATES, POSITION_ENCODINGS
from recipes.engine.config import TRAIN_CHOICES

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130

app = typer.Typer(
    help="Contextual Position Encoding (CoPE) experiments: train, evaluate and compare "
    "position encodings on speech, video and text recipes.",
    no_args_is_help=True,
)

Command = TypeVar("Command", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one red error line and return the exit to raise."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(USER_ERROR_EXIT)


def user_errors(command: Command) -> Command:
    """Turn the errors a user can cause into one clear line and exit code 2."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        import torch

        from recipes.errors import UserError

        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise fail(str(error)) from None
        except FileNotFoundError as error:
            raise fail(f"file not found: {error.filename or error}") from None
        except OSError as error:  # a writer without its own message: disk full, read-only
            from recipes.files import is_storage_error, storage_error

            if not is_storage_error(error):
                raise
            if error.filename is None:
                raise fail(f"a write failed ({error.strerror or error})") from None
            raise fail(str(storage_error(Path(error.filename), error))) from None
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (data building, eval)
            error_console.print("[yellow]interrupted[/]", highlight=False)
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except torch.OutOfMemoryError:
            raise fail(
                "out of memory; try a smaller train.batch_size (--set train.batch_size=N), "
                "a smaller model, or --device cpu"
            ) from None

    return guarded  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"cope {version('cope-cli')}")
        except PackageNotFoundError:
            console.print("cope (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Contextual Position Encoding (CoPE) experiments.

    Example: cope train counting --pe cope --steps 300
    """


# Options shared by `train` and `compare` (Annotated so both commands document them alike).
PeOption = Annotated[
    str | None,
    typer.Option(
        help=f"Position encoding (model.pe): {', '.join(POSITION_ENCODINGS)}. "
        "Default: the recipe's."
    ),
]
SeedOption = Annotated[
    int | None, typer.Option(help="Training seed (init, data order). Default: 0.")
]
StepsOption = Annotated[
    int | None,
    typer.Option(help="Optimiser steps (train.steps). Default: the recipe's.", min=1),
]
EpochsOption = Annotated[
    int | None,
    typer.Option(help="Train for N epochs instead of --steps (train.epochs).", min=1),
]
PresetOption = Annotated[
    str | None, typer.Option(help="Model/budget preset of the recipe. Default: the recipe's.")
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        help=f"{', '.join(TRAIN_CHOICES['train.device'])} (auto: cuda when present). Default: auto."
    ),
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        help="train.precision: bf16, fp16 (CUDA, with loss scaling) or fp32. "
        "Default: auto (bf16 on CUDA, fp32 on CPU).",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        help="train.workers: DataLoader worker processes building training batches; "
        "0 builds them in the training process. Default: -1 (auto: workers on CUDA, none on CPU).",
        min=-1,
    ),
]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Root of the recipe's data (downloaded or folder recipes).")
]
DownloadOption = Annotated[
    bool, typer.Option("--download", help="Fetch the recipe's dataset into --data-dir first.")
]
OutOption = Annotated[Path, typer.Option(help="Root of the run directories.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override any option, repeatable: --set train.lr=3e-4 --set model.depth=4 "
        "(highest precedence).",
    ),
]
RecipeFileOption = Annotated[
    Path | None,
    typer.Option(help="TOML file of options (and optionally recipe = ..., preset = ...)."),
]
CopeGateOption = Annotated[
    str | None,
    typer.Option(
        help=f"CoPE gate (model.cope_gate): {', '.join(GATES)}; qk is the paper's, onset opens "
        "at changes between neighbouring keys, token is a per-token head, change opens where "
        "the encoder's input features change (one detector shared by the layers), rise opens "
        "where the raw input features (audio frames, video pixels) rise: onsets, not offsets. "
        "Default: qk."
    ),
]
TuneOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tune",
        help="Choose an option per encoding on val, repeatable: --tune train.lr=3e-4,1e-3,3e-3 "
        "trains every value and keeps, per encoding, the one with the best mean val accuracy "
        "(the test splits are never consulted; the report states the choice).",
    ),
]
JobsOption = Annotated[
    int,
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        help="Runs trained at once, each in its own process with an equal share of the torch "
        "threads (for machines with more cores than one small run keeps busy). Each run is "
        "the same as alone; progress is one line per run.",
    ),
]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Train again even if an identical finished run exists.")
]


def _resolve(
    recipe_arg: str | None,
    *,
    recipe_file: Path | None,
    preset: str | None,
    pe: str | None,
    seed: int | None,
    steps: int | None,
    epochs: int | None,
    device: str | None,
    sets: list[str] | None,
    cope_gate: str | None = None,
    precision: str | None = None,
    workers: int | None = None,
    from_run: Path | None = None,
) -> tuple[str, str | None, dict[str, Any]]:
    """Recipe name, preset and the keyword arguments of resolve_config from CLI options.

    ``from_run``: a run's saved config (recipe, preset, every option) is the file layer.
    """
    from recipes.base import UserError
    from recipes.engine.config import load_recipe_file, parse_set_option

    file_options: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if recipe_file is not None and from_run is not None:
        raise UserError("give --recipe-file or --from, not both")
    if recipe_file is not None:
        file_options, meta = load_recipe_file(recipe_file)
    if from_run is not None:
        from recipes.engine import rundir

        meta["recipe"], file_options = rundir.read_config(from_run)
        preset_saved = rundir.read_json(from_run / rundir.CONFIG_FILE).get("preset")
        if preset_saved is not None:
            meta["preset"] = preset_saved
    recipe_name = recipe_arg or meta.get("recipe")
    if recipe_name is None:
        raise UserError("name a recipe (cope train RECIPE) or set recipe = ... in --recipe-file")
    if recipe_arg and meta.get("recipe") and meta["recipe"] != recipe_arg:
        raise UserError(
            f"the recipe file is for {meta['recipe']!r} but the command names {recipe_arg!r}"
        )
    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    cli_options: dict[str, Any] = {
        "model.pe": pe,
        "model.cope_gate": cope_gate,
        "train.seed": seed,
        "train.steps": steps,
        "train.epochs": epochs if epochs is not None else (0 if steps is not None else None),
        "train.device": device,
        "train.precision": precision,
        "train.workers": workers,
    }
    set_options = dict(parse_set_option(text) for text in sets or [])
    return (
        recipe_name,
        preset if preset is not None else meta.get("preset"),
        {"file_options": file_options, "cli_options": cli_options, "set_options": set_options},
    )


@app.command("recipes")
@user_errors
def recipes_command(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'audio*'.")] = "*",
) -> None:
    """List the recipes: name, modality, task, evaluation splits and data source.

    Example: cope recipes
    """
    from rich.table import Table

    from recipes.base import get_recipe, list_recipes

    table = Table(title="cope recipes", caption="presets: * marks the default")
    table.add_column("name", no_wrap=True, style="bold")
    for column in ("modality", "task", "splits", "data source", "presets"):
        table.add_column(column, overflow="fold")
    for name in list_recipes(pattern):
        recipe = get_recipe(name)
        presets = ", ".join(
            f"{preset}*" if preset == recipe.default_preset else preset for preset in recipe.presets
        )
        table.add_row(
            name,
            recipe.modality,
            recipe.task,
            ", ".join(recipe.split_names()),
            recipe.data_source,
            presets,
        )
    console.print(table)


@app.command("train")
@user_errors
def train_command(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe name (see `cope recipes`).", show_default=False)
    ] = None,
    pe: PeOption = None,
    cope_gate: CopeGateOption = None,
    seed: SeedOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    preset: PresetOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    out: OutOption = Path("runs"),
    set_: SetOption = None,
    recipe_file: RecipeFileOption = None,
    from_run: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Replay a run: its recipe, preset, options and data folder; options given "
            "here still override.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the newest unfinished run with these options (or reuse a finished "
            "one); with more --steps than a finished run had, extend that run.",
        ),
    ] = False,
    force: ForceOption = False,
    stop_after: Annotated[
        int | None,
        typer.Option(
            help="Stop (checkpointed, unfinished) after N steps of this session; "
            "continue later with --resume.",
            min=1,
        ),
    ] = None,
) -> None:
    """Train one model and evaluate it on every split with its best checkpoint.

    Precedence: engine defaults < recipe < preset < --recipe-file < --steps/--pe/... < --set.

    The run goes to OUT/RECIPE/PE/seedN-STAMP/.

    Ctrl-C stops after saving a checkpoint; --resume continues it bit for bit.

    Example: cope train counting --pe cope --steps 500 --set train.lr=3e-3
    """
    from cope_cli.render import RichObserver
    from recipes.base import get_recipe
    from recipes.engine.config import preset_options, resolve_config
    from recipes.engine.trainer import TrainOptions, train

    recipe_name, preset_name, layers = _resolve(
        recipe, recipe_file=recipe_file, preset=preset, pe=pe, seed=seed, steps=steps,
        epochs=epochs, device=device, sets=set_, cope_gate=cope_gate,
        precision=precision, workers=workers, from_run=from_run,
    )  # fmt: skip
    if from_run is not None and data_dir is None:
        from recipes.engine.rundir import read_data_dir

        data_dir = read_data_dir(from_run)
    recipe_obj = get_recipe(recipe_name)
    config = resolve_config(recipe_obj, preset=preset_name, **layers)
    preset_name = preset_options(recipe_obj, preset_name)[0]  # the recipe's default, if none
    options = TrainOptions(
        out=out,
        data_dir=data_dir,
        download=download,
        resume=resume,
        on_finished="new" if force else "error",
        preset=preset_name,
        stop_after=stop_after,
    )
    result = train(recipe_obj, config, options, RichObserver())
    _report_run(result, f"{recipe_name} pe={config['model.pe']} seed={config['train.seed']}")


def _report_run(result: Any, title: str) -> None:
    """What became of a ``cope train``: the evaluation table, or how to continue."""
    from cope_cli.render import evaluation_table

    if not result.is_main:
        return  # other ranks of a torchrun job: rank 0 reports
    if result.status == "interrupted":
        error_console.print(
            f"[yellow]interrupted at step {result.step}[/]; checkpoint saved in {result.run_dir}. "
            "Continue with the same command and --resume.",
            highlight=False,
        )
        raise typer.Exit(INTERRUPTED_EXIT)
    if result.status == "stopped":
        console.print(f"stopped at step {result.step}; continue with --resume", highlight=False)
        return
    console.print(evaluation_table(result.evaluation, title))
    console.print(f"run directory: [bold]{result.run_dir}[/]", highlight=False)


@app.command("config")
@user_errors
def config_command(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe name (see `cope recipes`).", show_default=False)
    ] = None,
    pe: PeOption = None,
    cope_gate: CopeGateOption = None,
    seed: SeedOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    preset: PresetOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    set_: SetOption = None,
    recipe_file: RecipeFileOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Show the config `cope train` would resolve, and which layer set each value.

    Takes the same options as `cope train`; trains nothing.

    Example: cope config counting --preset paper --set train.lr=1e-4
    """
    from rich.table import Table

    from recipes.base import get_recipe
    from recipes.engine.config import preset_options, resolve_config

    recipe_name, preset_name, layers = _resolve(
        recipe, recipe_file=recipe_file, preset=preset, pe=pe, seed=seed, steps=steps,
        epochs=epochs, device=device, sets=set_, cope_gate=cope_gate,
        precision=precision, workers=workers,
    )  # fmt: skip
    sources: dict[str, str] = {}
    recipe_obj = get_recipe(recipe_name)
    config = resolve_config(recipe_obj, preset=preset_name, sources=sources, **layers)
    preset_name = preset_options(recipe_obj, preset_name)[0]
    if json_output:
        print(
            json.dumps({"recipe": recipe_name, "preset": preset_name, "config": config}, indent=2)
        )
        return
    table = Table(title=f"{recipe_name} (preset: {preset_name or 'none'})")
    for column in ("key", "value", "set by"):
        table.add_column(column)
    for key in sorted(config):
        table.add_row(key, repr(config[key]), sources.get(key, ""))
    console.print(table)


def _find_eval_target(target: str | None, pe: str | None, out: Path) -> Path:
    """A run directory, the newest finished run of a recipe, or (no target) of any recipe."""
    from recipes.base import RECIPES, UserError, list_recipes
    from recipes.engine.runs import newest_run

    if target is None:
        run_dir = newest_run(out, None, pe)
        error_console.print(f"evaluating the newest run: {run_dir}", highlight=False)
        return run_dir
    path = Path(target)
    if path.is_dir():
        return path
    list_recipes()  # fills the registry
    if target not in RECIPES:
        raise UserError(
            f"{target!r} is neither a run directory nor a recipe; recipes: "
            f"{', '.join(list_recipes())}"
        )
    return newest_run(out, target, pe)


@app.command("eval")
@user_errors
def eval_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A run directory, or a recipe name (then the newest finished run of it). "
            "Omitted: the newest finished run under --out (of --pe, if given).",
            show_default=False,
        ),
    ] = None,
    pe: Annotated[
        str | None, typer.Option(help="Without a run directory: the encoding of the run to pick.")
    ] = None,
    split: Annotated[str, typer.Option(help="A split name, or 'all'.")] = "all",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    out: OutOption = Path("runs"),
    device: DeviceOption = None,
    data_dir: DataDirOption = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change a data option for this evaluation, repeatable: --set data.fps=12. "
            "Only data.* keys (the weights fix the model).",
        ),
    ] = None,
) -> None:
    """Evaluate a trained run (best checkpoint) on one split or all of them.

    Example: cope eval counting --pe cope --split long

    Example: cope eval --pe cope  (the newest finished cope run under runs/)

    Example: cope eval runs/video-folder/cope/seed0-STAMP --set data.fps=4
    """
    from cope_cli.render import RichObserver, evaluation_table
    from recipes.engine.config import parse_set_option
    from recipes.engine.runs import evaluate_run

    run_dir = _find_eval_target(target, pe, out)
    splits = None if split == "all" else [split]
    observer = RichObserver(error_console) if not json_output else None
    result = evaluate_run(
        run_dir,
        splits,
        device=device or "auto",
        observer=observer,
        data_dir=data_dir,
        data_options=dict(parse_set_option(text) for text in set_ or []),
    )
    if json_output:
        print(json.dumps(result, indent=2))
        return
    console.print(
        evaluation_table(result, f"{result['recipe']} pe={result['pe']} seed={result['seed']}")
    )
    console.print(f"run directory: {run_dir} ({result['weights']})", highlight=False)


@app.command("predict")
@user_errors
def predict_command(
    run: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    target: Annotated[
        Path, typer.Argument(help="A file, or a folder (searched recursively).", show_default=False)
    ],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes shown per file.", min=1)] = 5,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    device: DeviceOption = None,
) -> None:
    """The top classes of each file, read and featurised as training read them.

    Works for the folder recipes (audio-folder, video-folder, npy-folder); only the run's
    checkpoint is read, not its training data. Unreadable files are reported and skipped; the
    exit code is non-zero only when no file could be predicted.

    Example: cope predict runs/audio-folder/cope/seed0-STAMP mysounds/new --top-k 3
    """
    from cope_cli.render import prediction_table
    from recipes.base import UserError
    from recipes.engine.predict import predict_files

    def skipped(path: str, reason: str) -> None:
        error_console.print(f"skipped {path}: {reason}", highlight=False, soft_wrap=True)

    result = predict_files(run, target, top_k=top_k, device=device or "auto", on_skip=skipped)
    if json_output:
        print(json.dumps(result.to_json(), indent=2))
    else:
        console.print(prediction_table(result))
    if not result.predictions:
        raise UserError(f"no file could be predicted ({len(result.skipped)} skipped)")


@app.command("export")
@user_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    fmt: Annotated[
        str, typer.Option("--format", help="torch-export (.pt2) or onnx (needs the onnx extra).")
    ] = "torch-export",
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="File to write; default RUN/model.pt2 or RUN/model.onnx."),
    ] = None,
) -> None:
    """Export a run's best weights for inference outside cope.

    It uses CoPE's reference path (the same function, no length-dependent branches), takes
    one item's inputs (batch 1, any length the model allows) and returns the logits.

    Example: cope export runs/npy-folder/cope/seed0-STAMP --format onnx
    """
    from recipes.engine.export import export_run

    path = export_run(run, fmt, out_file)
    console.print(f"wrote {path}", highlight=False)


@app.command("compare")
@user_errors
def compare_command(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe name (see `cope recipes`).", show_default=False)
    ] = None,
    pe: Annotated[
        str,
        typer.Option(
            help="Comma-separated position encodings to compare, from: "
            f"{', '.join(POSITION_ENCODINGS)}."
        ),
    ] = "cope,rope,abs",
    seeds: Annotated[
        int, typer.Option(help="Seeds per encoding (0..N-1, from --seed).", min=1)
    ] = 3,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    cope_gate: CopeGateOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    preset: PresetOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    out: OutOption = Path("runs"),
    set_: SetOption = None,
    recipe_file: RecipeFileOption = None,
    tune: TuneOption = None,
    jobs: JobsOption = 1,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Train every run afresh instead of reusing/resuming identical ones."
        ),
    ] = False,
) -> None:
    """Train each encoding x seed under the same budget and compare them on every split.

    Identical finished runs under --out are reused and unfinished ones resumed.

    Writes results.json, results.csv, report.md and a grouped bar plot (splits x encodings)
    to OUT/RECIPE/compare-STAMP/.

    With --tune, each encoding is trained at every candidate value and compared at the one
    its val accuracy prefers.

    Example: cope compare audio-events --pe cope,rope,abs --seeds 3 --tune train.lr=3e-4,1e-3
    """
    from cope_cli.render import RichObserver
    from recipes.base import get_recipe
    from recipes.engine.compare import compare, parse_pe_list, parse_tune_options, seed_list
    from recipes.engine.trainer import TrainOptions

    recipe_name, preset_name, layers = _resolve(
        recipe, recipe_file=recipe_file, preset=preset, pe=None, seed=None, steps=steps,
        epochs=epochs, device=device, sets=set_, cope_gate=cope_gate,
        precision=precision, workers=workers,
    )  # fmt: skip
    get_recipe(recipe_name)
    options = TrainOptions(
        out=out,
        data_dir=data_dir,
        download=download,
        resume=not force,
        on_finished="new" if force else "reuse",
        explain_fresh=False,
    )
    result = compare(
        recipe_name,
        parse_pe_list(pe),
        seed_list(seeds, seed),
        preset=preset_name,
        options=options,
        observer=RichObserver(),
        tune=parse_tune_options(tune),
        processes=jobs,
        **layers,
    )
    _finish_grid(result)


def _finish_grid(result: Any) -> None:
    from cope_cli.render import comparison_table, print_files

    if result.interrupted:
        error_console.print(
            "[yellow]interrupted[/]; run the same command again to continue.", highlight=False
        )
        raise typer.Exit(INTERRUPTED_EXIT)
    for group in result.results:
        console.print(comparison_table(group))
    print_files(result.files)


@app.command("sweep")
@user_errors
def sweep_command(
    file: Annotated[Path, typer.Argument(help="Sweep file (TOML).", show_default=False)],
    out: Annotated[
        Path | None,
        typer.Option(help="Root of the run directories. Default: the file's `out`, else runs."),
    ] = None,
    device: DeviceOption = None,
    tune: TuneOption = None,
    jobs: JobsOption = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Train every run afresh instead of reusing them.")
    ] = False,
) -> None:
    """Run a grid of recipes x encodings x seeds x option sets from a TOML file; one report.

    Keys: recipes = ["counting"], pes = ["cope", "abs"], seeds = 2, preset = "..." (optional).

    Tables: \\[options] for every run; \\[\\[variants]] (each with a name,
    optionally its own pes) as option sets; \\[tune] (or --tune, which
    replaces it): options chosen per encoding on val.
    Example file: sweeps/gates.toml (CoPE gate variants vs baselines).

    Example: cope sweep sweep.toml --out runs/sweep1 --tune train.lr=3e-4,1e-3,3e-3
    """
    from cope_cli.render import RichObserver
    from recipes.engine.compare import parse_tune_options, sweep
    from recipes.engine.trainer import TrainOptions

    options = TrainOptions(
        resume=not force, on_finished="new" if force else "reuse", explain_fresh=False
    )
    overrides = {"train.device": device} if device is not None else None
    result = sweep(
        file,
        options=options,
        observer=RichObserver(),
        out=out,
        overrides=overrides,
        tune=parse_tune_options(tune) or None,
        processes=jobs,
    )
    _finish_grid(result)


@app.command("report")
@user_errors
def report_command(
    runs_dir: Annotated[
        Path, typer.Argument(help="Folder with run directories (searched recursively).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the report. Default: RUNS_DIR/report.")
    ] = None,
    alignment_examples: Annotated[
        int | None,
        typer.Option(
            help="Examples per split for CoPE runs' event alignment (0: none). Default: 64.",
            min=0,
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where missing analyses run: auto, cpu or cuda.")
    ] = "cpu",
) -> None:
    """Rebuild the tables, CSV, plots and a markdown report from finished run directories.

    Runs that differ only in encoding and seed form one table.

    Other differences (lr, preset, ...) make separate tables, titled by what differs.

    Question recipes (audio-events, spoken-words, moving-shapes) also get accuracy per question;
    CoPE runs of recipes with event onsets get the event-alignment score, onset recall, position
    steps and events per clip (val and OOD splits, first N examples). Runs that lack these
    (trained before they existed) are analysed once and the result cached in the run directory.

    Example: cope report runs/ --out results/audio-events
    """
    from cope_cli.render import comparison_table, print_files
    from recipes.base import UserError
    from recipes.engine.analysis import ALIGNMENT_EXAMPLES
    from recipes.engine.report import build_report

    if not runs_dir.is_dir():
        raise UserError(f"runs directory not found: {runs_dir}")
    results, files = build_report(
        [runs_dir],
        out or runs_dir / "report",
        alignment_examples=ALIGNMENT_EXAMPLES if alignment_examples is None else alignment_examples,
        device=device,
        on_message=lambda text: console.print(text, highlight=False, soft_wrap=True),
    )
    for group in results:
        console.print(comparison_table(group))
    print_files(files)


@app.command("table")
@user_errors
def table_command(
    results: Annotated[
        Path,
        typer.Argument(
            help="A report's results.json, or the folder holding it.", show_default=False
        ),
    ],
    part: Annotated[
        str, typer.Option(help="main, questions (per question) or alignment (event alignment).")
    ] = "main",
    std: Annotated[
        bool,
        typer.Option("--std", help="Cells mean ± std \\[interval] instead of mean \\[interval]."),
    ] = False,
) -> None:
    """Print one markdown table over every group of a report, for README.md.

    Nothing is recomputed: every cell is results.json's mean [95% t-interval] over seeds.

    Example: cope table results/audio-events --part questions > table.md
    """
    from recipes.engine.tables import markdown_table, read_results

    typer.echo(markdown_table(read_results(results), part, std), nl=False)


@app.command("positions")
@user_errors
def positions_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    example: Annotated[int, typer.Option(help="Index of the example in the split.")] = 0,
    split: Annotated[
        str, typer.Option(help="Split to take the example from (or 'train').")
    ] = "val",
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs. Default: RUN_DIR/positions.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
) -> None:
    """Per-layer heatmaps of CoPE's contextual positions p_ij and of the attention (PNG).

    Above them: the recipe's example signal (spectrogram, frames or tokens; onsets marked).

    With onsets (audio-events, moving-shapes), CoPE runs also get the readout query's gates and
    positions over time, and an event-alignment score per layer: the share of position steps
    (floor |p| changing between neighbouring keys) within one token of a true onset.

    Runs with other encodings get attention maps only.

    Example: cope positions runs/counting/cope/seed0-20250101-120000 --example 3
    """
    from recipes.engine.alignment import mean_score
    from recipes.engine.heatmaps import plot_positions

    paths, summary = plot_positions(
        run_dir, example=example, split=split, out_dir=out, device=device
    )
    if not summary["has_positions"]:
        console.print(f"pe={summary['pe']} has no contextual positions: attention maps only")
    else:
        caps = ", ".join(f"{value:.1f}" for value in summary["max_position"])
        console.print(f"largest |p_ij| per layer: {caps}", highlight=False)
    for index, heads in enumerate(summary.get("alignment") or []):
        per_head = ", ".join(
            f"{head['precision']:.2f} ({head['increments']} steps)" for head in heads
        )
        console.print(
            f"layer {index} event alignment {mean_score(heads):.2f} "
            f"(recall of onsets {mean_score(heads, 'recall'):.2f}); per head: {per_head}",
            highlight=False,
        )
    for path in paths:
        console.print(f"wrote {path}", highlight=False)


@app.command("data")
@user_errors
def data_command(
    recipe: Annotated[str, typer.Argument(help="Recipe name.", show_default=False)],
    root: Annotated[Path, typer.Option(help="Where to put the dataset.")] = Path("data"),
    preset: PresetOption = None,
    set_: SetOption = None,
    layout: Annotated[
        str | None,
        typer.Option(help="Write a generated recipe's data as a folder tree in this layout."),
    ] = None,
) -> None:
    """Fetch a dataset into ROOT, write a generated one as a folder tree, or describe it.

    Download recipes: the dataset goes into ROOT. --layout: a generated recipe's data is
    written as a folder tree in that layout.

    Generated recipes: the size of each split and, for the text tasks, how many of its items
    also occur in training (0 with data.dedup, the default).

    Example: cope data speech-commands --root data/

    Example: cope data spoken-words --layout speech-commands --root sc/

    Example: cope data counting --set data.num_vars=3
    """
    from recipes.base import get_recipe
    from recipes.engine.config import resolve_config
    from recipes.engine.trainer import describe_overlap

    recipe_obj = get_recipe(recipe)
    if layout is not None or recipe_obj.data_source != "generated":
        path = recipe_obj.download(root) if layout is None else recipe_obj.export(root, layout)
        console.print(f"data ready in [bold]{path}[/]", highlight=False)
        return
    _, preset_name, layers = _resolve(
        recipe, recipe_file=None, preset=preset, pe=None, seed=None, steps=None, epochs=None,
        device=None, sets=set_,
    )  # fmt: skip
    config = resolve_config(recipe_obj, preset=preset_name, **layers)
    bundle = recipe_obj.build_data(config, None, False)
    sizes = ", ".join(f"{name} {len(split.dataset)}" for name, split in bundle.splits.items())
    console.print(f"{recipe}: train {len(bundle.train)}, {sizes}", highlight=False)
    overlap = bundle.info.get("train_overlap")
    if overlap is not None:
        console.print(describe_overlap(overlap), highlight=False)


app.add_typer(bench_app, name="bench")  # `cope bench` (cope_cli/bench.py, the performance half)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
