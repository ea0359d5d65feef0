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

    Narrower than 120 columns (an 80-column terminal), cells drop the interval and the
    steps-to-threshold column (report.md keeps both) and OOD splits are marked with a dagger;
    where mean ± std still does not fit, cells show the mean alone. No cell wraps and the
    encoding names are never cut. CoPE rows of a report with event alignment get its score /
    onset recall.
    """
    width = width or console.width
    wide = width >= 120
    tuning = (result.get("tuning") or {}).get("by_pe", {})
    labels = [f"{pe} ({tuning[pe]['chosen']})" if pe in tuning else pe for pe in result["pes"]]
    headings = [
        split_heading(name, entry) if wide else name + (" †" if entry["ood"] else "")
        for name, entry in result["splits"].items()
    ]
    aligned = alignment_split(result) is not None
    extra = [convergence_heading(result)] * wide + [alignment_heading(result)] * aligned

    def rows(style: str) -> list[list[str]]:
        table_rows = []
        for pe, label in zip(result["pes"], labels, strict=True):
            cells, seeds = [], 0
            for entry in result["splits"].values():
                summary = entry["by_pe"].get(pe)
                seeds = max(seeds, summary["n"] if summary else 0)
                if not summary:
                    cells.append("–")
                elif style == "mean":
                    cells.append(format_cell({**summary, "n": 1}, result["metric"], False, False))
                else:
                    cells.append(format_cell(summary, result["metric"], wide, seeds_note=wide))
            if wide:
                cells.append(convergence_cell(result, pe))
            if aligned:
                cells.append(alignment_cell(result, pe))
            table_rows.append([label, str(seeds), *cells])
        return table_rows

    def needed(table_rows: list[list[str]]) -> int:
        columns = zip(["pe", "seeds", *headings, *extra], *table_rows, strict=True)
        return sum(max(len(text) for text in column) + 3 for column in columns) + 1

    body, note, spread = rows("std"), "intervals in report.md", " ± std"
    if not wide and needed(body) > width:
        body, note, spread = rows("mean"), "means only here; std and intervals in report.md", ""
    seed_counts = {row[1] for row in body}
    seeds_column = wide or needed(body) <= width or len(seed_counts) > 1
    over = "seeds" if seeds_column else f"{seed_counts.pop()} seeds"
    interval = " [95% CI]" if wide else ""
    table = Table(
        title=f"{result['title']} — {result['metric_label']}, mean{spread}{interval} over {over}",
        caption=None if wide else f"† out of distribution; {note}",
        show_lines=False,
    )
    table.add_column("pe", style="bold", no_wrap=True, min_width=max(map(len, labels)))
    if seeds_column:
        table.add_column("seeds", justify="right", no_wrap=True, min_width=5)
    for heading in [*headings, *extra]:
        table.add_column(heading, justify="right", no_wrap=heading in headings)
    for label, seeds, *cells in body:
        table.add_row(escape(label), *([seeds] if seeds_column else []), *cells)  # no markup
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
