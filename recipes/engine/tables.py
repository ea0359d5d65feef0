"""README tables from a report's results.json (`cope table`): every number as the report has it.

One markdown table over every group of a report (the report's own report.md has one per group,
with standard deviations): ``main`` (encodings x splits, with the alignment column),
``questions`` (per-question accuracy) and ``alignment`` (event-alignment statistics). Nothing
is recomputed, so a table pasted into README.md traces to a committed results.json.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipes.base import UserError
from recipes.engine import rundir
from recipes.engine.analysis import ALIGNMENT_STATISTICS
from recipes.engine.report import (
    ALIGNMENT_LABELS,
    alignment_cell,
    alignment_rows,
    alignment_split,
    choice_label,
    split_heading,
    split_rank,
)

TABLE_PARTS = ("main", "questions", "alignment")


def read_results(path: Path) -> dict[str, Any]:
    """A report's results.json, given as the file or the folder holding it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no results.json at {path}; make one with `cope report RUNS_DIR --out`")
    results = rundir.read_json(file)
    if not isinstance(results, dict) or "groups" not in results:
        raise UserError(f"{file} is not a report's results.json (it has no groups)")
    return results


def readme_cell(summary: dict[str, Any], digits: int, std: bool = False) -> str:
    """``mean [ci_low, ci_high]`` (``mean ± std [ci_low, ci_high]`` with ``std``), or the mean
    alone with one seed."""
    mean = f"{summary['mean']:.{digits}f}"
    if summary["n"] < 2:
        return mean
    spread = f" ± {summary['std']:.{digits}f}" if std else ""
    return f"{mean}{spread} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"


def markdown_table(results: dict[str, Any], part: str = "main", std: bool = False) -> str:
    """One markdown table over every group of a report's results (results.json's content).

    ``main``: rows = (options, encoding), columns = splits (in-distribution first), and the
    alignment column where the report has one; ``questions``: rows = (options, encoding,
    question); ``alignment``: rows = (options, encoding, layer choice, split), a column per
    statistic. Cells: mean [95% t-interval] over seeds (with ``std``: mean ± std [interval]),
    exactly as the report computed them.
    """
    summary_cell = functools.partial(readme_cell, std=std)
    if part not in TABLE_PARTS:
        raise UserError(f"unknown table {part!r}; choose one of: {', '.join(TABLE_PARTS)}")
    groups = results["groups"]
    if part != "main" and not any(group.get(part) for group in groups):
        raise UserError(
            f"these results have no {part} figures (the report predates them, or no run "
            "has any); run `cope report` on the runs again"
        )
    several = len({group["recipe"] for group in groups}) > 1
    lead = ["recipe"] * several + ["options", "pe"]

    def row_start(group: dict[str, Any], pe: str) -> list[str]:
        options = ", ".join(f"{key}={value}" for key, value in group["settings"].items())
        return [group["recipe"]] * several + [options or "defaults", pe]

    if part == "questions":
        return _questions_table(groups, lead, row_start, summary_cell)
    if part == "alignment":
        return _alignment_table(groups, lead, row_start, summary_cell)
    order: dict[str, tuple[bool, tuple[int, str]]] = {}
    for group in groups:
        for split, entry in group["splits"].items():
            order.setdefault(split, (entry["ood"], split_rank(split)))
    splits = sorted(order, key=lambda split: order[split])
    headings = [f"{split} (OOD)" if order[split][0] else split for split in splits]
    aligned = {alignment_split(group) for group in groups} - {None}
    on = f" on {next(iter(aligned))}" if len(aligned) == 1 else ""  # else named in the cells
    extra = [f"alignment / onset recall{on} (best layer on val)"] if aligned else []
    lines = _table_head([*lead, "seeds", *headings, *extra])
    for group in groups:
        digits = 1 if group["metric"] == "error" else 3
        for pe in group["pes"]:
            summaries = [
                group["splits"][split]["by_pe"].get(pe) if split in group["splits"] else None
                for split in splits
            ]
            seeds = max((summary["n"] for summary in summaries if summary), default=0)
            cells = [summary_cell(summary, digits) if summary else "–" for summary in summaries]
            if aligned:
                cell = alignment_cell(group, pe)
                if len(aligned) > 1 and cell != "-":
                    cell += f" ({alignment_split(group)})"
                cells.append(cell)
            lines.append(_table_row([*row_start(group, pe), str(seeds), *cells]))
    return "\n".join(lines) + "\n"


def _table_head(columns: list[str]) -> list[str]:
    return [_table_row(columns), "|" + "---|" * len(columns)]


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _questions_table(
    groups: list[dict[str, Any]], lead: list[str], row_start: Callable, summary_cell: Callable
) -> str:
    splits: list[str] = []
    for group in groups:
        for split in (group.get("questions") or {}).get("splits", []):
            if split not in splits:
                splits.append(split)
    ood = {split for group in groups for split, entry in group["splits"].items() if entry["ood"]}
    headings = [f"{split} (OOD)" if split in ood else split for split in splits]
    lines = _table_head([*lead, "question", "seeds", *headings])
    for group in groups:
        digits = 1 if group["metric"] == "error" else 3
        for pe, by_question in (group.get("questions") or {"by_pe": {}})["by_pe"].items():
            for question, by_split in by_question.items():
                seeds = max(summary["n"] for summary in by_split.values())
                cells = [
                    summary_cell(by_split[split], digits) if split in by_split else "–"
                    for split in splits
                ]
                lines.append(_table_row([*row_start(group, pe), question, str(seeds), *cells]))
    return "\n".join(lines) + "\n"


def _alignment_table(
    groups: list[dict[str, Any]], lead: list[str], row_start: Callable, summary_cell: Callable
) -> str:
    labels = [ALIGNMENT_LABELS[key] for key in ALIGNMENT_STATISTICS]
    lines = _table_head([*lead, "layers", "split", "seeds", *labels])
    for group in groups:
        for pe, choice, split, by_key, seeds in alignment_rows(group.get("alignment") or {}):
            cells = [
                summary_cell(by_key[key], 2 if key in ("score", "recall") else 1)
                if key in by_key
                else "–"
                for key in ALIGNMENT_STATISTICS
            ]
            heading = split_heading(split, group["splits"][split])
            start = row_start(group, pe)
            lines.append(_table_row([*start, choice_label(choice), heading, str(seeds), *cells]))
    return "\n".join(lines) + "\n"
