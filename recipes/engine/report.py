"""Tables, files and plots from finished runs: mean +- std and a 95% t-interval per split.

``results.json`` (everything, per run and aggregated), ``results.csv`` (one row per group,
encoding and split), ``plot.png`` (splits x encodings, 95% interval as error bars),
``curves.png`` (learning curves) and ``report.md`` (markdown tables). `cope compare`,
`cope sweep` and `cope report` all end here.

Per question and event alignment: runs of recipes that name their examples' questions get
accuracy per (encoding, question, split); CoPE runs of recipes whose examples carry event
onsets get the alignment statistics per (encoding, split, layer choice), and the main table an
alignment column. Both come from each run's cache (:mod:`recipes.engine.analysis`), computed
where missing; the statistics over seeds are the main table's (:func:`summarise`).

Replicates: one entry per (configuration, encoding, seed), the newest finished run; repeats of
a seed (a ``--force`` rerun) are listed as left out, never averaged as further seeds.

Convergence: beside the final metric, each table gives the steps a run took to first reach
``THRESHOLD_FRACTION`` of the best validation accuracy any run of its group reached (from the
runs' periodic ``val`` evaluations), so an encoding that did not converge shows as such.

Tuning: when a comparison chose options per encoding on ``val`` (``--tune``), the runs of the
chosen values form the table, the chosen values are stated, and every candidate's mean ``val``
is listed (the test splits are never consulted).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.base import Config, UserError
from recipes.engine import rundir
from recipes.engine.analysis import (
    ALIGNMENT_EXAMPLES,
    ALIGNMENT_STATISTICS,
    analyse_run,
    nanmean,
)
from recipes.engine.config import VOLATILE_KEYS
from recipes.engine.evaluate import metric_label, metric_value, natural_key
from recipes.files import write_atomic, write_text_atomic

# Keys that name a run within a group rather than distinguish groups (a CoPE gate variant is
# shown as an encoding of its own, e.g. "cope[onset]", beside the baselines).
_RUN_KEYS = ("model.pe", "train.seed", "model.cope_gate")


def encoding_label(config: Config) -> str:
    """An encoding as tables show it: model.pe, with a non-default CoPE gate in brackets."""
    pe = config["model.pe"]
    gate = config.get("model.cope_gate", "qk")
    return f"{pe}[{gate}]" if pe.startswith("cope") and gate not in (None, "qk") else pe


# Convergence: steps to first reach this fraction of the group's best validation accuracy.
THRESHOLD_FRACTION = 0.95


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), to double precision.

    The fraction converges fast for x < (a + 1) / (a + b + 2); beyond it the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) is used (Numerical Recipes, Sec. 6.4).
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * fraction / a


def student_t_upper_tail(t: float, degrees_of_freedom: float) -> float:
    """P(T > t) for t >= 0: I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    df = degrees_of_freedom
    return 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, degrees_of_freedom: float) -> float:
    """Student's t quantile t_{p, df} for p in [0.5, 1), exact to ~1e-12 for every df > 0.

    Bisection on the exact tail (monotone in t), bracketed by doubling.
    """
    if degrees_of_freedom <= 0 or not 0.5 <= probability < 1.0:
        return math.nan
    tail = 1.0 - probability
    low, high = 0.0, 1.0
    while student_t_upper_tail(high, degrees_of_freedom) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_upper_tail(middle, degrees_of_freedom) > tail:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


def t_quantile_975(degrees_of_freedom: int) -> float:
    """t_{0.975, df}, the half-width factor of a two-sided 95% interval (NaN below df 1)."""
    if degrees_of_freedom < 1:
        return math.nan
    return t_quantile(0.975, degrees_of_freedom)


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
    # From recipes.engine.analysis (filled by build_report): split -> question -> counts, and
    # split -> per-layer alignment statistics; None where they do not apply.
    questions: dict[str, dict[str, dict[str, int]]] | None = None
    alignment: dict[str, dict[str, Any]] | None = None

    @property
    def pe(self) -> str:
        """The encoding's label: model.pe, with a non-default CoPE gate appended in brackets."""
        return encoding_label(self.config)

    @property
    def seed(self) -> int:
        return self.config["train.seed"]

    def finished_at(self) -> tuple[float, tuple[str, int]]:
        """When the run finished (its ``done`` marker), then its directory's stamp order."""
        done = self.run_dir / rundir.DONE_FILE
        return (done.stat().st_mtime if done.exists() else 0.0, rundir.run_order(self.run_dir))

    def val_curve(self) -> list[tuple[int, float]]:
        """(step, val accuracy) of the run's periodic validations, in step order."""
        return sorted(
            (record["step"], record["accuracy"])
            for record in rundir.read_metrics(self.run_dir)
            if record.get("kind") == "eval" and record.get("split") == "val"
        )


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


def _signature(record: RunRecord, tuned: tuple[str, ...] = ()) -> str:
    shared = {
        key: value
        for key, value in record.config.items()
        if key not in _RUN_KEYS and key not in VOLATILE_KEYS and key not in tuned
    }
    return json.dumps([record.recipe, shared], sort_keys=True, default=str)


def newest_per_seed(records: list[RunRecord]) -> tuple[list[RunRecord], list[RunRecord]]:
    """One record per (configuration, encoding, seed): the newest finished run.

    Returns (kept, left out). A repeated run of a seed (``--force``) is the same replicate
    measured again, not another seed: averaging both would shrink the interval falsely.
    """
    newest: dict[tuple[str, str, Any], RunRecord] = {}
    for record in records:
        key = (_signature(record), record.pe, record.seed)
        if key not in newest or record.finished_at() > newest[key].finished_at():
            newest[key] = record
    kept = [record for record in records if record in newest.values()]
    return kept, [record for record in records if record not in kept]


@dataclass
class Group:
    """Runs that differ only in position encoding and seed: one comparison table."""

    recipe: str
    metric: str
    title: str
    records: list[RunRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what sets it apart from siblings


def group_runs(
    records: list[RunRecord],
    names: dict[str, str] | None = None,
    tuned: tuple[str, ...] = (),
) -> list[Group]:
    """Group runs by recipe and every option except encoding, seed and the ``tuned`` keys."""
    by_signature: dict[str, list[RunRecord]] = {}
    for record in records:
        by_signature.setdefault(_signature(record, tuned), []).append(record)
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
            and key not in tuned
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
    ordered = sorted(splits, key=lambda name: (splits[name]["ood"], split_rank(name)))
    return {
        "recipe": group.recipe,
        "title": group.title,
        "metric": group.metric,
        "metric_label": metric_label(group.metric),
        "settings": group.settings,
        "pes": pes,
        "splits": {name: splits[name] for name in ordered},
        "convergence": convergence(group, pes),
        "questions": aggregate_questions(group, pes, ordered),
        "alignment": aggregate_alignment(group, pes, ordered),
    }


def _summaries(
    by_key: dict[str, dict[str, Any]], bounds: tuple[float, float]
) -> dict[str, dict[str, Any]]:
    """summarise() of each entry's per-seed ``values``, kept beside its seeds (and runs)."""
    return {key: {**entry, **summarise(entry["values"], bounds)} for key, entry in by_key.items()}


def aggregate_questions(
    group: Group, pes: list[str], split_order: list[str]
) -> dict[str, Any] | None:
    """Per encoding, question and split: the metric over seeds from each run's per-question
    counts (``answers``: the questions asked per seed); None when no run has questions."""
    bounds = (0.0, 100.0) if group.metric == "error" else (0.0, 1.0)
    collected: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for record in group.records:
        for split, counts in (record.questions or {}).items():
            for question, tally in counts.items():
                if not tally["count"]:
                    continue
                entry = (
                    collected.setdefault(record.pe, {})
                    .setdefault(question, {})
                    .setdefault(split, {"seeds": [], "values": [], "answers": []})
                )
                entry["seeds"].append(record.seed)
                entry["values"].append(
                    metric_value(tally["correct"] / tally["count"], group.metric)
                )
                entry["answers"].append(tally["count"])
    if not collected:
        return None
    names = {question for by_question in collected.values() for question in by_question}
    asked_in = {
        split
        for by_question in collected.values()
        for by_split in by_question.values()
        for split in by_split
    }
    names = sorted(names, key=natural_key)
    return {
        "names": names,
        "splits": [split for split in split_order if split in asked_in],
        "by_pe": {
            pe: {
                question: _summaries(collected[pe][question], bounds)
                for question in names
                if question in collected[pe]
            }
            for pe in pes
            if pe in collected
        },
    }


# Alignment: which layer's figures a table shows. Each run's layer is chosen on val (the split
# every report has), by the F1 of score and onset recall, and shown on every split; beside it,
# the mean over layers.
LAYER_CHOICES = {
    "best": "the layer with the best F1 of alignment score and onset recall on val, per run",
    "mean": "mean over layers",
}
ALIGNMENT_LABELS = {
    "score": "alignment score",
    "recall": "onset recall",
    "steps": "position steps per clip",
    "events": "events per clip",
}


def best_layer(alignment: dict[str, dict[str, Any]]) -> int:
    """The layer whose readout positions best count events on val (else the first split
    scored): the highest F1 of alignment score and onset recall (undefined scores count 0)."""
    layers = (alignment.get("val") or next(iter(alignment.values())))["layers"]

    def f1(layer: dict[str, Any]) -> float:
        score, recall = (_number(layer.get(key)) for key in ("score", "recall"))
        score, recall = (0.0 if math.isnan(value) else value for value in (score, recall))
        return 2 * score * recall / (score + recall) if score + recall > 0 else 0.0

    return max(range(len(layers)), key=lambda index: f1(layers[index]))


def _number(value: Any) -> float:
    """A statistic read back from JSON (NaN is stored as null)."""
    return math.nan if value is None else float(value)


def aggregate_alignment(
    group: Group, pes: list[str], split_order: list[str]
) -> dict[str, Any] | None:
    """Per encoding, split and layer choice (LAYER_CHOICES): each alignment statistic over
    seeds; runs whose statistic is undefined (no position step) are left out of its mean.
    None when no run of the group has alignment figures."""
    collected: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    chosen: dict[str, list[int]] = {}
    for record in group.records:
        if not record.alignment:
            continue
        layer = best_layer(record.alignment)
        chosen.setdefault(record.pe, []).append(layer)
        for split, entry in record.alignment.items():
            layers = entry["layers"]
            views = {
                "best": layers[layer],
                "mean": {
                    key: nanmean([row.get(key) for row in layers]) for key in ALIGNMENT_STATISTICS
                },
            }
            for choice, statistics in views.items():
                for key in ALIGNMENT_STATISTICS:
                    value = _number(statistics.get(key))
                    if math.isnan(value):
                        continue
                    runs = (
                        collected.setdefault(record.pe, {})
                        .setdefault(split, {})
                        .setdefault(choice, {})
                        .setdefault(key, {"seeds": [], "values": []})
                    )
                    runs["seeds"].append(record.seed)
                    runs["values"].append(value)
    if not collected:
        return None
    unbounded = (0.0, math.inf)  # position steps and events per clip
    for by_split in collected.values():
        for by_choice in by_split.values():
            for by_key in by_choice.values():
                for key, runs in by_key.items():
                    bounds = (0.0, 1.0) if key in ("score", "recall") else unbounded
                    runs.update(summarise(runs["values"], bounds))
    scored = {split for by_split in collected.values() for split in by_split}
    splits = [split for split in split_order if split in scored]
    return {
        "layer_choices": LAYER_CHOICES,
        "best_layers": {pe: chosen[pe] for pe in pes if pe in chosen},
        "splits": splits,
        "by_pe": {
            pe: {split: collected[pe][split] for split in splits if split in collected[pe]}
            for pe in pes
            if pe in collected
        },
    }


def alignment_split(result: dict[str, Any]) -> str | None:
    """The split of the main table's alignment column: ``slow`` where scored (the tempo shift
    the project asks about), else the first OOD split scored, else val."""
    alignment = result.get("alignment")
    if not alignment or not alignment["splits"]:
        return None
    splits = alignment["splits"]
    ood = [split for split in splits if result["splits"].get(split, {}).get("ood")]
    return "slow" if "slow" in splits else (ood or splits)[0]


def alignment_heading(result: dict[str, Any]) -> str:
    """Title of the main table's alignment column."""
    return f"alignment / onset recall, {alignment_split(result)} (best layer on val)"


def alignment_cell(result: dict[str, Any], pe: str) -> str:
    """``score / recall`` (means over seeds, best layer) on the alignment split; "-" for an
    encoding without contextual positions."""
    split = alignment_split(result)
    entry = (result.get("alignment") or {}).get("by_pe", {}).get(pe, {}).get(split or "", {})
    best = entry.get("best", {})
    if not best:
        return "-"
    return " / ".join(
        f"{best[key]['mean']:.2f}" if key in best else "–" for key in ("score", "recall")
    )


def steps_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first step whose val accuracy reaches ``threshold``; None if none did."""
    return next((step for step, accuracy in curve if accuracy >= threshold), None)


def convergence(group: Group, pes: list[str]) -> dict[str, Any]:
    """Per encoding: steps each seed took to reach THRESHOLD_FRACTION of the group's best val."""
    curves = {str(record.run_dir): record.val_curve() for record in group.records}
    best = max((accuracy for curve in curves.values() for _, accuracy in curve), default=None)
    if best is None:
        return {}
    threshold = THRESHOLD_FRACTION * best
    by_pe: dict[str, Any] = {}
    for pe in pes:
        steps = [
            steps_to_reach(curves[str(record.run_dir)], threshold)
            for record in group.records
            if record.pe == pe
        ]
        reached = [step for step in steps if step is not None]
        by_pe[pe] = {
            "steps": steps,
            "reached": len(reached),
            "n": len(steps),
            "mean_steps": sum(reached) / len(reached) if reached else None,
        }
    return {
        "fraction": THRESHOLD_FRACTION,
        "threshold_accuracy": threshold,
        "threshold": metric_value(threshold, group.metric),
        "by_pe": by_pe,
    }


def convergence_heading(result: dict[str, Any]) -> str:
    """Column title of the steps-to-threshold column, in the metric's terms."""
    entry = result.get("convergence") or {}
    if not entry:
        return "steps to threshold"
    relation = "≤" if result["metric"] == "error" else "≥"
    digits = 1 if result["metric"] == "error" else 3
    return f"steps to val {relation} {entry['threshold']:.{digits}f}"


def convergence_cell(result: dict[str, Any], pe: str) -> str:
    """``mean steps (reached/seeds)`` of one encoding, ``never (0/n)`` when no seed reached it."""
    entry = (result.get("convergence") or {}).get("by_pe", {}).get(pe)
    if not entry:
        return "–"
    reached = f"({entry['reached']}/{entry['n']})"
    if entry["mean_steps"] is None:
        return f"never {reached}"
    return f"{entry['mean_steps']:.0f} {reached}"


def split_rank(name: str) -> tuple[int, str]:
    """Sort key of splits: val, test, then the others by name."""
    return ({"val": 0, "test": 1}.get(name, 2), name)


def format_cell(
    summary: dict[str, Any], metric: str, with_ci: bool = True, seeds_note: bool = True
) -> str:
    """``mean ± std [ci_low, ci_high]`` in the metric's units; one seed: the mean alone."""
    digits = 1 if metric == "error" else 3
    mean = f"{summary['mean']:.{digits}f}"
    if summary["n"] < 2:
        return f"{mean} (1 seed)" if seeds_note else mean
    text = f"{mean} ± {summary['std']:.{digits}f}"
    if with_ci:
        text += f" [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"
    return text


def split_heading(name: str, entry: dict[str, Any]) -> str:
    """A split's column title, with OOD marked."""
    return f"{name} (OOD)" if entry["ood"] else name


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def plot_group(result: dict[str, Any], path: Path) -> Path:
    """One grouped bar chart: splits along x, a bar per encoding in each, the seeds as dots;
    error bars (95% t-interval) only where an encoding has more than one seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits, pes = list(result["splits"]), list(result["pes"])
    width = 0.8 / max(len(pes), 1)
    figure, axes = plt.subplots(figsize=(2.4 + 0.35 * len(splits) * len(pes), 3.4))
    for index, pe in enumerate(pes):
        positions, means, low, high = [], [], [], []
        for column, split in enumerate(splits):
            summary = result["splits"][split]["by_pe"].get(pe)
            if summary is None:
                continue
            x = column - 0.4 + width * (index + 0.5)
            spread = summary["n"] > 1  # the interval may be clipped at the metric's range
            positions.append(x)
            means.append(summary["mean"])
            low.append(summary["mean"] - summary["ci_low"] if spread else 0.0)
            high.append(summary["ci_high"] - summary["mean"] if spread else 0.0)
            values = summary.get("values", [])
            axes.scatter([x] * len(values), values, color="black", s=6, zorder=3)
        axes.bar(positions, means, width * 0.92, label=pe)
        if any(low) or any(high):
            axes.errorbar(positions, means, yerr=[low, high], fmt="none", ecolor="black",
                          capsize=3, linewidth=1)  # fmt: skip
    axes.set_xticks(range(len(splits)))
    axes.set_xticklabels([split_heading(split, result["splits"][split]) for split in splits])
    axes.set_ylabel(result["metric_label"])
    if result["metric"] != "error":
        axes.set_ylim(0, 1.05)
    axes.set_title(result["title"], fontsize=9)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, dpi=110, format="png"))
    plt.close(figure)
    return path


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's learning curves from metrics.jsonl: train loss and val accuracy against step."""
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "val": []}
    for record in rundir.read_metrics(run_dir):
        if record.get("kind") == "train" and record.get("loss") is not None:
            curves["loss"].append((record["step"], record["loss"]))
        elif record.get("kind") == "eval" and record.get("split") == "val":
            curves["val"].append((record["step"], record["accuracy"]))
    return curves


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Learning curves of a group: train loss and val metric against step, one colour per
    encoding, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, val_axes) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first_split = next(iter(result["splits"].values()))
    for index, pe in enumerate(result["pes"]):
        colour = colours[index % len(colours)]
        for number, run in enumerate(first_split["by_pe"].get(pe, {}).get("runs", [])):
            curves = read_curves(Path(run))
            label = pe if number == 0 else None
            for axes, name in ((loss_axes, "loss"), (val_axes, "val")):
                if curves[name]:
                    steps, values = zip(*curves[name], strict=True)
                    if name == "val":
                        values = tuple(metric_value(value, result["metric"]) for value in values)
                    axes.plot(steps, values, color=colour, alpha=0.8, linewidth=1, label=label)
    loss_axes.set(xlabel="step", ylabel="train loss", yscale="log")
    val_axes.set(xlabel="step", ylabel=f"val {result['metric_label']}")
    val_axes.legend(fontsize=8, frameon=False)
    figure.suptitle(result["title"], fontsize=9)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, dpi=110, format="png"))
    plt.close(figure)
    return path


def provenance() -> dict[str, Any]:
    """What made this report: the command line, the code's git commit and the machine."""
    import os
    import platform
    import sys

    return {
        "command": " ".join(["cope", *sys.argv[1:]]),
        "git_commit": rundir.git_commit(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    }


def write_results(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write results.json, results.csv, one grouped PNG per group, and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made_by = provenance()
    rundir.write_json_atomic(out_dir / "results.json", {"groups": results, "provenance": made_by})
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(
        ["group", "recipe", "split", "ood", "pe", "question", "metric", "n", "mean", "std",
         "ci95_low", "ci95_high", "seeds", "values"]
    )  # fmt: skip
    for result in results:
        for split, pe, question, metric, summary in csv_rows(result):
            writer.writerow(
                [result["title"], result["recipe"], split, result["splits"][split]["ood"], pe,
                 question, metric, summary["n"], summary["mean"], summary["std"],
                 summary["ci_low"], summary["ci_high"], " ".join(map(str, summary["seeds"])),
                 " ".join(f"{value:.6g}" for value in summary["values"])]
            )  # fmt: skip
    write_text_atomic(out_dir / "results.csv", table.getvalue())
    plots: list[Path] = []
    for result in results:
        suffix = "_" + _file_safe(result["title"]) if len(results) > 1 else ""
        path = out_dir / f"plot{suffix}.png"
        plots.append(plot_group(result, path))
        result["plot"] = path.name
        curves = out_dir / f"curves{suffix}.png"
        plots.append(plot_curves(result, curves))
        result["curves"] = curves.name
    write_text_atomic(out_dir / "report.md", markdown_report(results, made_by))
    return {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "report.md",
        "plots": plots,
    }


def csv_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, dict[str, Any]]]:
    """(split, pe, question, metric, summary) of a group: the main metric per split, then per
    question (``question`` set), then each alignment statistic per layer choice."""
    rows = [
        (split, pe, "", result["metric_label"], summary)
        for split, entry in result["splits"].items()
        for pe, summary in entry["by_pe"].items()
    ]
    questions = result.get("questions") or {"by_pe": {}}
    for pe, by_question in questions["by_pe"].items():
        for question, by_split in by_question.items():
            rows += [
                (split, pe, question, result["metric_label"], by_split[split])
                for split in questions["splits"]
                if split in by_split
            ]
    alignment = result.get("alignment") or {"by_pe": {}}
    for pe, by_split in alignment["by_pe"].items():
        for split, by_choice in by_split.items():
            for choice, by_key in by_choice.items():
                rows += [
                    (split, pe, "", f"{ALIGNMENT_LABELS[key]} ({choice_label(choice)})", summary)
                    for key, summary in by_key.items()
                ]
    return rows


def choice_label(choice: str) -> str:
    """How tables name a layer choice of LAYER_CHOICES."""
    return "best layer on val" if choice == "best" else "mean over layers"


def markdown_report(results: list[dict[str, Any]], made_by: dict[str, Any] | None = None) -> str:
    """One markdown table per group: rows = encodings, columns = splits (OOD marked)."""
    lines = ["# cope results", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if made_by:
        lines += [
            f"Command: `{made_by['command']}`; commit {made_by['git_commit']}; "
            f"machine: {made_by['machine']}.",
            "",
        ]
    lines.append(
        "Cells: mean ± sample std over seeds [95% t-interval (exact Student t quantile), "
        "clipped to the metric's range]. OOD = out-of-distribution split. Seeds: one run per "
        "(configuration, encoding, seed), the newest finished one; older repeats of a seed are "
        f"left out, not counted as seeds. Steps to threshold: mean steps to first reach "
        f"{THRESHOLD_FRACTION:g} x the group's best val accuracy (seeds that reached it / seeds)."
    )
    for result in results:
        splits = result["splits"]
        lines += ["", f"## {result['title']}", "", f"Metric: {result['metric_label']}.", ""]
        aligned = alignment_split(result) is not None
        lines.append(
            "| pe | seeds | "
            + " | ".join(split_heading(s, e) for s, e in splits.items())
            + f" | {convergence_heading(result)} |"
            + (f" {alignment_heading(result)} |" if aligned else "")
        )
        lines.append("|---|---|" + "---|" * (len(splits) + 1 + aligned))
        for pe in result["pes"]:
            cells, seeds = [], 0
            for entry in splits.values():
                summary = entry["by_pe"].get(pe)
                cells.append(format_cell(summary, result["metric"]) if summary else "–")
                seeds = max(seeds, summary["n"] if summary else 0)
            cells.append(convergence_cell(result, pe))
            if aligned:
                cells.append(alignment_cell(result, pe))
            lines.append(f"| {pe} | {seeds} | " + " | ".join(cells) + " |")
        lines += tuning_lines(result)
        lines += question_lines(result)
        lines += alignment_lines(result)
        if result.get("not_analysed"):
            lines += ["", "Not analysed (no per-question accuracy or alignment):"]
            lines += [f"- {run}: {why}" for run, why in result["not_analysed"].items()]
        if result.get("left_out"):
            lines += [
                "",
                f"Left out as older repeats of a seed: {', '.join(result['left_out'])}.",
            ]
        descriptions = [f"{s}: {e['description']}" for s, e in splits.items() if e["description"]]
        if descriptions:
            lines += ["", "Splits: " + "; ".join(descriptions) + "."]
        for figure in (result.get("plot"), result.get("curves")):
            if figure:
                lines += ["", f"![{figure}]({figure})"]
    return "\n".join(lines) + "\n"


def question_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the per-question table: rows = encoding x question, columns = splits."""
    questions = result.get("questions")
    if not questions:
        return []
    splits = questions["splits"]
    lines = [
        "",
        "### Per question",
        "",
        f"{result['metric_label'].capitalize()} per question asked, from each run's best weights "
        "(cells as above; questions per split and seed in results.json).",
        "",
        "| pe | question | seeds | "
        + " | ".join(split_heading(split, result["splits"][split]) for split in splits)
        + " |",
        "|---|---|---|" + "---|" * len(splits),
    ]
    for pe, by_question in questions["by_pe"].items():
        for question, by_split in by_question.items():
            cells = [
                format_cell(by_split[split], result["metric"]) if split in by_split else "–"
                for split in splits
            ]
            seeds = max(summary["n"] for summary in by_split.values())
            lines.append(f"| {pe} | {question} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def alignment_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the event-alignment table: rows = encoding x layer choice x split."""
    alignment = result.get("alignment")
    if not alignment:
        return []
    lines = [
        "",
        "### Event alignment (CoPE)",
        "",
        f"Readout query's positions over the first {alignment.get('examples', '?')} examples of "
        "each split (`cope positions` scores one): alignment score = share of position steps "
        "within one token of a true onset, onset recall = share of onsets with a step within one "
        "token, position steps and events per clip. Best layer: "
        f"{LAYER_CHOICES['best']} (chosen per seed: "
        + "; ".join(
            f"{pe}: {', '.join(map(str, layers))}"
            for pe, layers in alignment["best_layers"].items()
        )
        + "). Cells: mean ± std [95% t-interval] over seeds; a seed whose positions never "
        "stepped has no score and is left out of it.",
        "",
        "| pe | layers | split | seeds | "
        + " | ".join(ALIGNMENT_LABELS[key] for key in ALIGNMENT_STATISTICS)
        + " |",
        "|---|---|---|---|" + "---|" * len(ALIGNMENT_STATISTICS),
    ]
    for pe, choice, split, by_key, seeds in alignment_rows(alignment):
        cells = [
            _statistic_cell(by_key[key], key) if key in by_key else "–"
            for key in ALIGNMENT_STATISTICS
        ]
        heading = split_heading(split, result["splits"][split])
        lines.append(
            f"| {pe} | {choice_label(choice)} | {heading} | {seeds} | " + " | ".join(cells) + " |"
        )
    return lines


def alignment_rows(
    alignment: dict[str, Any],
) -> Iterator[tuple[str, str, str, dict[str, Any], int]]:
    """The rows of an alignment table, in order: (pe, layer choice, split, statistic ->
    summary, seeds); combinations without figures are skipped."""
    for pe, by_split in alignment.get("by_pe", {}).items():
        for choice in LAYER_CHOICES:
            for split in alignment["splits"]:
                by_key = by_split.get(split, {}).get(choice)
                if by_key:
                    yield (
                        pe,
                        choice,
                        split,
                        by_key,
                        max(summary["n"] for summary in by_key.values()),
                    )


def _statistic_cell(summary: dict[str, Any], key: str) -> str:
    """An alignment statistic: shares as accuracies (3 digits), counts with one decimal."""
    if key in ("score", "recall"):
        return format_cell(summary, "accuracy")
    if summary["n"] < 2:
        return f"{summary['mean']:.1f}"
    return (
        f"{summary['mean']:.1f} ± {summary['std']:.1f} "
        f"[{summary['ci_low']:.1f}, {summary['ci_high']:.1f}]"
    )


def tuning_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines stating what ``--tune`` chose per encoding and every candidate's val."""
    tuning = result.get("tuning")
    if not tuning:
        return []
    lines = [
        "",
        f"Tuned per encoding on val only ({', '.join(tuning['keys'])}; best mean val accuracy "
        "over seeds, test splits never consulted):",
        "",
    ]
    digits = 1 if result["metric"] == "error" else 3  # as the table's cells
    for pe in result["pes"]:
        entry = tuning["by_pe"].get(pe)
        if not entry:
            continue
        candidates = ", ".join(
            f"{candidate['label']}: {metric_value(candidate['val'], result['metric']):.{digits}f}"
            for candidate in entry["candidates"]
        )
        label = result["metric_label"]
        lines.append(f"- {pe}: chose {entry['chosen']} (val {label}: {candidates})")
    return lines


def analyse_records(
    records: list[RunRecord],
    *,
    alignment_examples: int = ALIGNMENT_EXAMPLES,
    device: str = "cpu",
    on_message: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Fill each record's per-question counts and alignment (cached, else computed and cached;
    see :mod:`recipes.engine.analysis`). Returns run dir -> why it could not be analysed."""
    failures: dict[str, str] = {}
    for record in records:
        try:
            analysis = analyse_run(
                record.run_dir,
                alignment_examples=alignment_examples,
                device=device,
                on_message=on_message,
            )
        except UserError as error:  # its data or recipe is not available here
            failures[str(record.run_dir)] = str(error)
            if on_message is not None:
                on_message(f"not analysed: {record.run_dir}: {error}")
            continue
        record.questions, record.alignment = analysis.questions, analysis.alignment
    return failures


def build_report(
    paths: list[Path],
    out_dir: Path,
    pe_order: list[str] | None = None,
    names: dict[str, str] | None = None,
    tuning: dict[str, Any] | None = None,
    *,
    alignment_examples: int = ALIGNMENT_EXAMPLES,
    device: str = "cpu",
    on_message: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Collect finished runs below ``paths``, aggregate them and write every file.

    ``tuning`` (from a tuned comparison): ``{"keys": [...], "groups": [{"recipe", "variant",
    "pe", "chosen", "candidates"}]}`` (see ``compare.select_by_val``); the tuned keys then do
    not split groups, and each group states what was chosen for its encodings.

    Per-question accuracy and event alignment (``alignment_examples`` per split; 0: none) come
    from each run's cache, computed on ``device`` where missing; ``on_message`` hears about it.
    """
    records = collect_runs(paths)
    if not records:
        raise UserError(f"no finished runs under {', '.join(map(str, paths))}")
    records, left_out = newest_per_seed(records)
    failures = analyse_records(
        records, alignment_examples=alignment_examples, device=device, on_message=on_message
    )
    tuned = tuple(tuning["keys"]) if tuning else ()
    results = []
    for group in group_runs(records, names, tuned):
        result = aggregate(group, pe_order)
        if result["alignment"]:
            result["alignment"]["examples"] = alignment_examples
        result["not_analysed"] = {
            run: why
            for run, why in failures.items()
            if any(str(record.run_dir) == run for record in group.records)
        }
        signatures = {_signature(record, tuned) for record in group.records}
        result["left_out"] = [
            str(record.run_dir) for record in left_out if _signature(record, tuned) in signatures
        ]
        if tuning:
            variants = {(names or {}).get(str(record.run_dir), "") for record in group.records}
            result["tuning"] = {
                "keys": tuning["keys"],
                "by_pe": {
                    selection["pe"]: selection
                    for selection in tuning["groups"]
                    if selection["recipe"] == group.recipe and selection["variant"] in variants
                },
            }
        results.append(result)
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
