"""`cope bench`: time and peak memory of the attention paths, and training throughput per encoding.

The commands only parse options, call :mod:`recipes.engine.bench` and render its results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recipes.errors import UserError

bench_app = typer.Typer(
    help="Benchmark CoPE: attention paths (time, peak memory) and training throughput.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    """One red error line and exit code 2 (the CLI's convention for user errors)."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _int_list(text: str, option: str) -> list[int]:
    """'256,1024' -> [256, 1024]; a user error for anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _fail(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise _fail(f"{option} takes positive integers, got {text!r}")
    return values


def _provenance() -> dict[str, Any]:
    """What a saved benchmark records about itself: the command, the commit, the machine."""
    import shlex
    import subprocess
    import sys

    from recipes.engine.bench import environment

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = None
    command = "cope " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    return {"command": command, "commit": commit, "environment": environment()}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def attention_table(document: dict[str, Any]) -> Table:
    """Rich table of an attention benchmark document (see recipes.engine.bench.results_json)."""
    setting = document["setting"]
    title = (
        f"CoPE attention, forward+backward: B={setting['batch']} H={setting['heads']} "
        f"D={setting['dim']} npos={setting['npos']} "
        f"{'causal' if setting['causal'] else 'bidirectional'} {setting['dtype']} "
        f"on {setting['device']}"
    )
    table = Table(title=title)
    for column in ("T", "path", "time ms", "x SDPA", "peak MiB", "x SDPA"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for case in document["cases"]:
        ratios = case.get("ratios_to_sdpa") or {}
        if case["skipped"]:
            table.add_row(str(case["length"]), case["name"], case["skipped"], "", "", "")
            continue
        table.add_row(
            str(case["length"]),
            case["name"],
            _fmt(case["time_ms"]),
            _ratio(ratios.get("time")),
            _fmt(case["peak_mib"]),
            _ratio(ratios.get("memory")),
        )
    return table


def train_table(document: dict[str, Any]) -> Table:
    """Rich table of a training benchmark document."""
    setting = document["setting"]
    baseline = document["baseline"]
    title = (
        f"Training throughput: {setting['recipe']} (preset {setting['preset'] or 'default'}), "
        f"{setting['steps']} steps after {setting['warmup']} warm-up, on {setting['device']}"
    )
    table = Table(title=title)
    columns = ("pe", "examples/s", f"x {baseline}", "step ms", "CPU ms/step",
               f"CPU ms x {baseline}", "peak MiB", f"x {baseline} memory")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "pe" else "right")
    for case in document["cases"]:
        ratios = case.get(f"ratios_to_{baseline}") or {}
        if case["skipped"]:
            table.add_row(case["name"], case["skipped"], *[""] * (len(columns) - 2))
            continue
        table.add_row(
            case["name"],
            _fmt(case["examples_per_s"]),
            _ratio(ratios.get("throughput")),
            _fmt(case["time_ms"]),
            _fmt((case.get("extra") or {}).get("cpu_ms")),
            _ratio(ratios.get("cpu_time")),
            _fmt(case["peak_mib"]),
            _ratio(ratios.get("memory")),
        )
    return table


def markdown(table: Table, document: dict[str, Any]) -> str:
    """A saved benchmark as README markdown: its command and provenance, then the table."""
    environment = document.get("environment") or {}
    load = environment.get("load_average") or []
    where = ", ".join(
        part
        for part in (
            f"commit {document['commit']}" if document.get("commit") else "",
            f"{environment.get('machine')}, {environment.get('cpus')} CPUs" if environment else "",
            f"torch {environment.get('torch')}" if environment.get("torch") else "",
            f"load average at the end {load[0]:.1f}" if load else "",
        )
        if part
    )
    headers = [str(column.header) for column in table.columns]
    rows = zip(*(list(column.cells) for column in table.columns), strict=True)
    lines = [f"`{document.get('command', '')}` ({where})", "", f"{table.title}:", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


@bench_app.command("show")
def show(
    files: Annotated[
        list[Path], typer.Argument(help="JSON documents written by --save.", show_default=False)
    ],
    as_markdown: Annotated[
        bool, typer.Option("--markdown", help="Markdown for README.md, with each command.")
    ] = False,
) -> None:
    """Print saved benchmarks again, as tables or as README markdown (nothing is re-measured).

    Example: cope bench show results/bench/train-*.json --markdown
    """
    for index, path in enumerate(files):
        try:
            document = json.loads(path.read_text())
            table = (
                train_table(document)
                if "baseline" in document and document["setting"].get("recipe")
                else attention_table(document)
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            message = f"{path} is not a benchmark saved by `cope bench ... --save` ({error})"
            raise _fail(message) from None
        if as_markdown:
            typer.echo(("\n" if index else "") + markdown(table, document), nl=False)
        else:
            console.print(table)


@bench_app.command("attention")
def attention(
    seq: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = "256,1024,4096",
    impl: Annotated[
        str,
        typer.Option(
            help="Paths, comma-separated: sdpa, reference, blockwise, fused, triton, flash "
            "(SDPA's FlashAttention backend; CUDA, bfloat16/float16)."
        ),
    ] = "sdpa,reference,blockwise,fused,triton",
    batch: Annotated[int, typer.Option(help="Batch size B.")] = 1,
    heads: Annotated[int, typer.Option(help="Heads H.")] = 4,
    dim: Annotated[int, typer.Option(help="Head dimension D.")] = 64,
    npos: Annotated[int, typer.Option(help="CoPE position cap.")] = 64,
    causal: Annotated[bool, typer.Option("--causal/--bidirectional")] = True,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    repeats: Annotated[int, typer.Option(help="Timed runs per case (median).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs per case first.")] = 2,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--in-process",
            help="A fresh process per case (exact peak memory) or all in this one (faster).",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    save: Annotated[
        Path | None, typer.Option(help="Also write the JSON document (with the command) here.")
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            help="Write the times into this calibration table for impl='auto' "
            "(encoders/cope_calibration.json; other direction kept)."
        ),
    ] = None,
) -> None:
    """Forward+backward time and peak memory of each attention path at each length."""
    from recipes.engine.bench import (
        AttentionSetting,
        bench_attention,
        calibration_table,
        results_json,
    )

    if dtype not in ("float32", "bfloat16", "float16"):
        raise _fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if min(batch, heads, dim, npos, repeats) < 1 or warmup < 0:
        raise _fail("--batch, --heads, --dim, --npos and --repeats must be positive")
    lengths = _int_list(seq, "--seq")
    setting = AttentionSetting(
        batch=batch, heads=heads, dim=dim, npos=npos, causal=causal, dtype=dtype,
        device=device, repeats=repeats, warmup=warmup, threads=threads,
    )  # fmt: skip

    def progress(case: Any) -> None:
        if not as_json:
            state = case.skipped or f"{case.time_ms:.1f} ms, {case.peak_mib:.1f} MiB"
            error_console.print(f"  T={case.length} {case.name}: {state}", highlight=False)

    try:
        results = bench_attention(
            lengths, _names(impl), setting, isolate=isolate and device == "cpu", on_case=progress
        )
    except UserError as error:
        raise _fail(str(error)) from None
    from dataclasses import asdict

    document = results_json(results, "sdpa", {"setting": asdict(setting), **_provenance()})
    if save:
        save.write_text(json.dumps(document, indent=2) + "\n")
    if calibrate:
        previous = json.loads(calibrate.read_text()) if calibrate.exists() else {}
        table = calibration_table(document, previous)
        calibrate.write_text(json.dumps(table, indent=2) + "\n")
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        console.print(attention_table(document))


@bench_app.command("train")
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe name (see `cope recipes`).")],
    pe: Annotated[str, typer.Option(help="Position encodings, comma-separated.")] = "abs,cope",
    preset: Annotated[str | None, typer.Option(help="Recipe preset (default: the recipe's).")] = (
        None
    ),
    steps: Annotated[int, typer.Option(help="Timed training steps per encoding.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    batch_size: Annotated[int | None, typer.Option(help="Override train.batch_size.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    set_options: Annotated[
        list[str] | None, typer.Option("--set", help="key=value config overrides.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data root of folder recipes (e.g. speech-commands).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Feed each step as `cope train` does, with N DataLoader workers (0: in process), "
            "and report data-wait and GPU-busy shares. Default: batches prepared beforehand.",
            min=0,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    save: Annotated[
        Path | None, typer.Option(help="Also write the JSON document (with the command) here.")
    ] = None,
) -> None:
    """Training throughput (examples/s) and peak memory of the whole model per encoding."""
    from dataclasses import asdict

    from recipes.engine.bench import TrainSetting, bench_train, results_json
    from recipes.engine.config import parse_set_option

    if steps < 1 or warmup < 0:
        raise _fail("--steps must be positive and --warmup not negative")
    pes = _names(pe)
    if not pes:
        raise _fail("--pe needs at least one position encoding")
    try:
        overrides = dict(parse_set_option(item) for item in set_options or [])
        setting = TrainSetting(
            recipe=recipe, preset=preset, steps=steps, warmup=warmup, batch_size=batch_size,
            device=device, threads=threads, set_options=overrides,
            data_dir=str(data_dir) if data_dir else None, workers=workers,
        )  # fmt: skip

        def progress(case: Any) -> None:
            if not as_json:
                state = case.skipped or f"{case.examples_per_s:.1f} examples/s"
                fed = case.extra if "data_wait_fraction" in case.extra else None
                if fed and not case.skipped:  # --workers: how well the feeding keeps up
                    state += f", data wait {fed['data_wait_fraction']:.0%}"
                    if fed.get("gpu_busy") is not None:
                        state += f", GPU busy {fed['gpu_busy']:.0%}"
                    if fed.get("gpu_utilization") is not None:
                        state += f", NVML utilisation {fed['gpu_utilization']:.0%}"
                error_console.print(f"  {case.name}: {state}", highlight=False)

        results = bench_train(pes, setting, on_case=progress)
    except UserError as error:
        raise _fail(str(error)) from None
    baseline = "abs" if "abs" in pes else pes[0]
    document = results_json(results, baseline, {"setting": asdict(setting), **_provenance()})
    if save:
        save.write_text(json.dumps(document, indent=2) + "\n")
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        console.print(train_table(document))
