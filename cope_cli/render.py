"""Rendering for the CLI: progress bars for training and evaluation, and result tables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cope_cli.console import console
from recipes.engine.evaluate import metric_label, metric_value
from recipes.engine.report import (
    alignment_cell,
    alignment_heading,
    alignment_split,
    convergence_cell,
    convergence_heading,
    format_cell,
    split_heading,
)
from recipes.engine.trainer import TrainObserver

PLAIN_LINES_PER_RUN = 20  # without a terminal (a batch-job log): a line per 5 % (on log steps)


class RichObserver(TrainObserver):
    """Progress bars on a terminal (loss, step/s, ETA); plain lines otherwise."""

    def __init__(self, out: Console | None = None) -> None:
        self.console = out or console
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.eval_tasks: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.start_step = 0
        self.total_steps = 0
        self.next_line_step = 0

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def train_start(self, run_dir: Path, start_step: int, total_steps: int) -> None:
        self.console.print(f"run directory: [bold]{run_dir}[/]", highlight=False)
        self.started, self.start_step = time.perf_counter(), start_step
        self.total_steps = total_steps
        self.next_line_step = start_step + 1
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} step/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, loss="-", rate="-"
        )

    def train_step(self, step: int, loss: float | None, lr: float) -> None:
        rate = (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, rate=f"{rate:.1f}")
            if loss is not None:  # the loss arrives on log steps (no device sync on the others)
                self.progress.update(self.task, loss=f"{loss:.4f}")
            return
        if loss is None or step < self.next_line_step:
            return
        every = max(1, self.total_steps // PLAIN_LINES_PER_RUN)
        self.next_line_step = (step // every + 1) * every
        left = (self.total_steps - step) / rate if rate > 0 else 0.0
        self.console.print(
            f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
            f"{rate:.1f} step/s eta {left:.0f}s",
            highlight=False,
        )

    def eval_progress(self, split: str, done: int, total: int) -> None:
        if self.progress is None:
            return
        if split not in self.eval_tasks:
            self.eval_tasks[split] = self.progress.add_task(
                f"eval {split}", total=total, loss="", rate=""
            )
        self.progress.update(self.eval_tasks[split], completed=done, visible=done < total)
        if done >= total:
            self.progress.remove_task(self.eval_tasks.pop(split))

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if step >= 0:
            text = (
                f"step {step}: {split} accuracy {metrics['accuracy']:.4f} "
                f"loss {metrics['loss']:.4f}"
            )
            (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def train_end(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.eval_tasks = {}


def evaluation_table(evaluation: dict[str, Any], title: str) -> Table:
    """One run's splits: metric, loss and number of answers, OOD marked."""
    metric = evaluation.get("metric", "accuracy")
    table = Table(title=title)
    table.add_column("split")
    table.add_column("OOD")
    table.add_column(metric_label(metric), justify="right")
    table.add_column("loss", justify="right")
    table.add_column("answers", justify="right")
    table.add_column("description")
    digits = 2 if metric == "error" else 4
    for name, result in evaluation["splits"].items():
        table.add_row(
            name,
            "yes" if result.get("ood") else "",
            f"{metric_value(result['accuracy'], metric):.{digits}f}",
            f"{result['loss']:.4f}",
            str(result["count"]),
            result.get("description", ""),
        )
    return table


def comparison_table(result: dict[str, Any], width: int | None = None) -> Table:
    """Rows: encodings; columns: splits; cells: mean ± std [95% t-interval] over seeds.

    The most detailed layout that fits the terminal: in turn, cells drop the interval and the
    steps-to-threshold column goes (OOD splits then marked with a dagger), cells show the mean
    alone, the alignment column goes, the seed count moves into the title; report.md keeps
    everything. No cell wraps; encoding names are never cut. CoPE rows of a report with event
    alignment get its score / onset recall.
    """
    width = width or console.width
    pes = result["pes"]
    tuning = (result.get("tuning") or {}).get("by_pe", {})
    labels = [f"{pe} ({tuning[pe]['chosen']})" if pe in tuning else pe for pe in pes]
    entries = result["splits"].values()
    seeds = [
        max((e["by_pe"][pe]["n"] for e in entries if pe in e["by_pe"]), default=0) for pe in pes
    ]
    seeds_column = ("seeds", [str(count) for count in seeds])
    convergence = (convergence_heading(result), [convergence_cell(result, pe) for pe in pes])
    aligned = alignment_split(result) is not None
    alignment = [(alignment_heading(result), [alignment_cell(result, pe) for pe in pes])] * aligned

    def split_columns(detail: str) -> list[tuple[str, list[str]]]:
        """detail: "interval" (mean ± std [CI]), "std" or "mean"."""
        columns = []
        for name, entry in result["splits"].items():
            cells = []
            for pe in pes:
                summary = entry["by_pe"].get(pe)
                if not summary:
                    cells.append("–")
                elif detail == "mean":
                    cells.append(format_cell({**summary, "n": 1}, result["metric"], False, False))
                else:
                    wide = detail == "interval"
                    cells.append(format_cell(summary, result["metric"], wide, seeds_note=wide))
            ood = split_heading(name, entry) if detail == "interval" else name + " †" * entry["ood"]
            columns.append((ood, cells))
        return columns

    layouts = [  # (columns, title's spread, caption notes), most detailed first
        (
            [seeds_column, *split_columns("interval"), convergence, *alignment],
            " ± std [95% CI]",
            [],
        ),
        (
            [seeds_column, *split_columns("std"), *alignment],
            " ± std",
            ["intervals, steps to threshold in report.md"],
        ),
        (
            [seeds_column, *split_columns("mean"), *alignment],
            "",
            ["std, intervals, steps to threshold in report.md"],
        ),
    ]
    if aligned:
        columns, _, notes = layouts[-1]
        layouts.append((columns[:-1], "", [*notes, "event alignment in report.md"]))
    if len(set(seeds)) == 1:
        columns, _, notes = layouts[-1]
        layouts.append((columns[1:], "", notes))

    def needed(columns: list[tuple[str, list[str]]]) -> int:
        widths = [max(map(len, [heading, *cells])) for heading, cells in columns]
        return max(map(len, labels)) + sum(widths) + 3 * (len(widths) + 1) + 1

    columns, spread, notes = next(
        (layout for layout in layouts if needed(layout[0]) <= width), layouts[-1]
    )
    over = "seeds" if columns[0] is seeds_column else f"{seeds[0]} seeds"
    daggers = any(heading.endswith(" †") for heading, _ in columns)
    caption = "; ".join(["† out of distribution"] * daggers + notes)
    table = Table(
        title=f"{result['title']} — {result['metric_label']}, mean{spread} over {over}",
        caption=caption or None,
        show_lines=False,
    )
    table.add_column("pe", style="bold", no_wrap=True, min_width=max(map(len, labels)))
    for heading, cells in columns:
        table.add_column(heading, justify="right", no_wrap=True, min_width=max(map(len, cells)))
    for index, label in enumerate(labels):
        table.add_row(escape(label), *(cells[index] for _, cells in columns))  # no rich markup
    return table


def print_files(files: dict[str, Any]) -> None:
    """Say where a comparison's or report's files went."""
    console.print(f"results: [bold]{files['json']}[/], [bold]{files['csv']}[/]", highlight=False)
    console.print(f"report:  [bold]{files['markdown']}[/]", highlight=False)
    if files["plots"]:
        folder = Path(files["plots"][0]).parent
        names = ", ".join(Path(path).name for path in files["plots"])
        console.print(f"plots:   {folder}/ ({names})", highlight=False)


def prediction_table(result: Any) -> Table:
    """One row per file: its top classes with probabilities."""
    table = Table(title=f"{result.recipe} predictions ({result.run_dir})")
    table.add_column("file", overflow="fold")
    table.add_column("top classes (probability)")
    for prediction in result.predictions:
        ranked = ", ".join(f"{name} ({p:.2f})" for name, p in prediction.top)
        table.add_row(prediction.file, ranked)
    return table
