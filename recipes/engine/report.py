"""Tables, files and plots from finished runs: mean +- std and a 95% t-interval per split.

``results.json`` (everything, per run and aggregated), ``results.csv`` (one row per group,
encoding and split), ``plot_<split>.png`` (one bar per encoding, 95% interval as error bars)
and ``report.md`` (markdown tables). `cope compare`, `cope sweep` and `cope report` all end here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError
from recipes.engine import rundir
from recipes.engine.config import VOLATILE_KEYS
from recipes.engine.evaluate import metric_label, metric_value
from recipes.files import write_atomic, write_text_atomic

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (t_{0.975, df}).
_T_975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip

# Keys that name a run within a group rather than distinguish groups (a CoPE gate variant is
# shown as an encoding of its own, e.g. "cope[onset]", beside the baselines).
_RUN_KEYS = ("model.pe", "train.seed", "model.cope_gate")


def t_quantile_975(degrees_of_freedom: int) -> float:
    """t_{0.975} for the given degrees of freedom (normal 1.96 beyond the table)."""
    if degrees_of_freedom < 1:
        return math.nan
    if degrees_of_freedom <= len(_T_975):
        return _T_975[degrees_of_freedom - 1]
    return 1.960 if degrees_of_freedom > 120 else 2.0 - (degrees_of_freedom - 30) * 0.04 / 90


def summarise(
    values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)
) -> dict[str, Any]:
    """Mean, sample standard deviation and 95% t-interval of per-seed values.

    The interval is clipped to ``bounds`` (an accuracy interval beyond 1 says nothing more).
    """
    count = len(values)
    mean = sum(values) / count if count else math.nan
    std = (
        math.sqrt(sum((value - mean) ** 2 for value in values) / (count - 1))
        if count > 1
        else math.nan
    )
    half = t_quantile_975(count - 1) * std / math.sqrt(count) if count > 1 else math.nan
    return {
        "n": count,
        "mean": mean,
        "std": std,
        "ci_low": max(bounds[0], mean - half) if count > 1 else math.nan,
        "ci_high": min(bounds[1], mean + half) if count > 1 else math.nan,
        "values": values,
    }


@dataclass
class RunRecord:
    """A finished run: where it is, its config and final evaluation."""

    run_dir: Path
    recipe: str
    config: Config
    evaluation: dict[str, Any]

    @property
    def pe(self) -> str:
        """The encoding's label: model.pe, with a non-default CoPE gate appended in brackets."""
        pe = self.config["model.pe"]
        gate = self.config.get("model.cope_gate", "qk")
        return f"{pe}[{gate}]" if pe.startswith("cope") and gate not in (None, "qk") else pe

    @property
    def seed(self) -> int:
        return self.config["train.seed"]


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Finished runs in (or below) the given folders; unfinished ones are left out."""
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for root in paths:
        for run_dir in rundir.find_runs_below(Path(root)):
            if run_dir in seen or not rundir.is_finished(run_dir):
                continue
            seen.add(run_dir)
            recipe, config = rundir.read_config(run_dir)
            evaluation = rundir.read_json(run_dir / rundir.EVAL_FILE)
            records.append(RunRecord(run_dir, recipe, config, evaluation))
    return records


def _signature(record: RunRecord) -> str:
    shared = {
        key: value
        for key, value in record.config.items()
        if key not in _RUN_KEYS and key not in VOLATILE_KEYS
    }
    return json.dumps([record.recipe, shared], sort_keys=True, default=str)


@dataclass
class Group:
    """Runs that differ only in position encoding and seed: one comparison table."""

    recipe: str
    metric: str
    title: str
    records: list[RunRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what sets it apart from siblings


def group_runs(records: list[RunRecord], names: dict[str, str] | None = None) -> list[Group]:
    """Group runs by recipe and every option except encoding and seed."""
    by_signature: dict[str, list[RunRecord]] = {}
    for record in records:
        by_signature.setdefault(_signature(record), []).append(record)
    groups: list[Group] = []
    for members in by_signature.values():
        first = members[0]
        groups.append(
            Group(
                recipe=first.recipe,
                metric=first.evaluation.get("metric", "accuracy"),
                title=first.recipe,
                records=members,
            )
        )
    # Name each group by the options that differ from the other groups of its recipe.
    for recipe in {group.recipe for group in groups}:
        siblings = [group for group in groups if group.recipe == recipe]
        if len(siblings) < 2:
            continue
        keys = sorted({key for group in siblings for key in group.records[0].config})
        differing = [
            key
            for key in keys
            if key not in _RUN_KEYS
            and key not in VOLATILE_KEYS
            and len({json.dumps(g.records[0].config.get(key), default=str) for g in siblings}) > 1
        ]
        for group in siblings:
            group.settings = {key: group.records[0].config.get(key) for key in differing}
            described = ", ".join(f"{key}={value}" for key, value in group.settings.items())
            group.title = f"{recipe} ({described})"
    if names:
        for group in groups:
            for record in group.records:
                if str(record.run_dir) in names:
                    group.title = f"{group.recipe} [{names[str(record.run_dir)]}]"
    return sorted(groups, key=lambda group: group.title)


def aggregate(group: Group, pe_order: list[str] | None = None) -> dict[str, Any]:
    """Per split and encoding: the per-seed metric values and their summary."""
    pes = list(dict.fromkeys(pe_order or [])) + sorted(
        {record.pe for record in group.records} - set(pe_order or [])
    )
    pes = [pe for pe in pes if any(record.pe == pe for record in group.records)]
    splits: dict[str, dict[str, Any]] = {}
    for record in group.records:
        for split, result in record.evaluation["splits"].items():
            entry = splits.setdefault(
                split,
                {"ood": bool(result.get("ood")), "description": result.get("description", ""),
                 "by_pe": {}},
            )  # fmt: skip
            runs = entry["by_pe"].setdefault(record.pe, {"seeds": [], "values": [], "runs": []})
            runs["seeds"].append(record.seed)
            runs["values"].append(metric_value(result["accuracy"], group.metric))
            runs["runs"].append(str(record.run_dir))
    for entry in splits.values():
        for runs in entry["by_pe"].values():
            bounds = (0.0, 100.0) if group.metric == "error" else (0.0, 1.0)
            summary = summarise(runs["values"], bounds)
            runs.update({k: v for k, v in summary.items() if k != "values"})
        entry["by_pe"] = {pe: entry["by_pe"][pe] for pe in pes if pe in entry["by_pe"]}
    ordered = sorted(splits, key=lambda name: (splits[name]["ood"], _split_rank(name)))
    return {
        "recipe": group.recipe,
        "title": group.title,
        "metric": group.metric,
        "metric_label": metric_label(group.metric),
        "settings": group.settings,
        "pes": pes,
        "splits": {name: splits[name] for name in ordered},
    }


def _split_rank(name: str) -> tuple[int, str]:
    return ({"val": 0, "test": 1}.get(name, 2), name)


def format_cell(summary: dict[str, Any], metric: str, with_ci: bool = True) -> str:
    """``mean ± std [ci_low, ci_high]`` in the metric's units."""
    digits = 1 if metric == "error" else 3
    mean = f"{summary['mean']:.{digits}f}"
    if summary["n"] < 2:
        return f"{mean} (1 seed)"
    text = f"{mean} ± {summary['std']:.{digits}f}"
    if with_ci:
        text += f" [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"
    return text


def split_heading(name: str, entry: dict[str, Any]) -> str:
    """A split's column title, with OOD marked."""
    return f"{name} (OOD)" if entry["ood"] else name


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def plot_split(result: dict[str, Any], split: str, path: Path) -> Path:
    """A bar per encoding, error bars = 95% t-interval (none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = result["splits"][split]
    pes = list(entry["by_pe"])
    means = [entry["by_pe"][pe]["mean"] for pe in pes]
    # asymmetric error bars: the interval may be clipped at the metric's range
    errors = [
        [0.0, 0.0]
        if entry["by_pe"][pe]["n"] < 2
        else [
            entry["by_pe"][pe]["mean"] - entry["by_pe"][pe]["ci_low"],
            entry["by_pe"][pe]["ci_high"] - entry["by_pe"][pe]["mean"],
        ]
        for pe in pes
    ]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(pes), 3.2))
    yerr = [[low for low, _ in errors], [high for _, high in errors]]
    axes.bar(pes, means, yerr=yerr, capsize=4, color="#4C72B0")
    for index, pe in enumerate(pes):  # the seeds themselves, so a reader sees the spread
        values = entry["by_pe"][pe]["values"] if "values" in entry["by_pe"][pe] else []
        axes.scatter([index] * len(values), values, color="black", s=8, zorder=3)
    axes.set_ylabel(result["metric_label"])
    if result["metric"] != "error":
        axes.set_ylim(0, 1.05)
    axes.set_title(f"{result['title']}: {split_heading(split, entry)}", fontsize=9)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, dpi=110, format="png"))
    plt.close(figure)
    return path


def write_results(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write results.json, results.csv, one PNG per group and split, and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(out_dir / "results.json", {"groups": results})
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(
        ["group", "recipe", "split", "ood", "pe", "metric", "n", "mean", "std",
         "ci95_low", "ci95_high", "seeds", "values"]
    )  # fmt: skip
    for result in results:
        for split, entry in result["splits"].items():
            for pe, summary in entry["by_pe"].items():
                writer.writerow(
                    [result["title"], result["recipe"], split, entry["ood"], pe,
                     result["metric_label"], summary["n"], summary["mean"], summary["std"],
                     summary["ci_low"], summary["ci_high"],
                     " ".join(map(str, summary["seeds"])),
                     " ".join(f"{value:.6g}" for value in summary["values"])]
                )  # fmt: skip
    write_text_atomic(out_dir / "results.csv", table.getvalue())
    plots: list[Path] = []
    for result in results:
        prefix = _file_safe(result["title"]) + "_" if len(results) > 1 else ""
        for split in result["splits"]:
            path = out_dir / f"plot_{prefix}{_file_safe(split)}.png"
            plots.append(plot_split(result, split, path))
            result["splits"][split]["plot"] = path.name
    write_text_atomic(out_dir / "report.md", markdown_report(results))
    return {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "report.md",
        "plots": plots,
    }


def markdown_report(results: list[dict[str, Any]]) -> str:
    """One markdown table per group: rows = encodings, columns = splits (OOD marked)."""
    lines = ["# cope results", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    lines.append(
        "Cells: mean ± sample std over seeds [95% t-interval, clipped to the metric's range]. "
        "OOD = out-of-distribution split."
    )
    for result in results:
        splits = result["splits"]
        lines += ["", f"## {result['title']}", "", f"Metric: {result['metric_label']}.", ""]
        lines.append(
            "| pe | seeds | " + " | ".join(split_heading(s, e) for s, e in splits.items()) + " |"
        )
        lines.append("|---|---|" + "---|" * len(splits))
        for pe in result["pes"]:
            cells, seeds = [], 0
            for entry in splits.values():
                summary = entry["by_pe"].get(pe)
                cells.append(format_cell(summary, result["metric"]) if summary else "–")
                seeds = max(seeds, summary["n"] if summary else 0)
            lines.append(f"| {pe} | {seeds} | " + " | ".join(cells) + " |")
        descriptions = [f"{s}: {e['description']}" for s, e in splits.items() if e["description"]]
        if descriptions:
            lines += ["", "Splits: " + "; ".join(descriptions) + "."]
        plots = [entry.get("plot") for entry in splits.values() if entry.get("plot")]
        if plots:
            lines += [""] + [f"![{plot}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def build_report(
    paths: list[Path],
    out_dir: Path,
    pe_order: list[str] | None = None,
    names: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Collect finished runs below ``paths``, aggregate them and write every file."""
    records = collect_runs(paths)
    if not records:
        raise UserError(f"no finished runs under {', '.join(map(str, paths))}")
    results = [aggregate(group, pe_order) for group in group_runs(records, names)]
    return results, write_results(results, out_dir)


def make_output_dir(parent: Path, prefix: str) -> Path:
    """A fresh ``<parent>/<prefix>-<stamp>`` folder (unique, like run directories)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(10_000):
        path = parent / (f"{prefix}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create an output folder under {parent}")
