"""Suite tables in the papers' layout: one row per method, one column per task, group means, mean ± std over seeds.

- VTAB-1K: the 19 tasks, the Natural / Specialized / Structured means and the mean over all 19;
- GLUE: the 8 tasks with their official metric (a metric of two parts, e.g. MRPC's F1 and accuracy, is
  their mean, as GLUE's leaderboard scores it) and the average;
- commonsense: the 8 test sets of one run (``test/accuracy/<set>``) and their average;
- any other tasks (e.g. several configs of a sweep): one column each and their mean.

Values are in percent, every cell of a table from the same split: test scores when every run has its test
score, else every run's last validation score (the title says so). A mean column holds, per seed, the mean over its tasks, then mean ± std over the
seeds that ran every one of them; a task no run of a method covers is shown as missing, and so is
every mean that would need it: nothing is averaged over silently. The best mean per column is bold, unless it is
no better than guessing: a task column's mean at chance (runs that logged their number of classes) is marked
"at chance" and never bold.
Below each table, every method's paired difference from the reference method (DoRA by default) per column:
per seed the column's score, differences paired by seed, their 95 % interval: the crossed bootstrap (seeds, and
each task's test examples) where every paired run saved predictions.csv whose fraction correct is its logged
score, else t over seeds ("seeds only": conditional on the test sets); the minimum detectable effect, the raw and
Holm-adjusted p of a difference and of the TOST (±margin points), and the verdict (`report.statistics`); the
runs go to ``suite_<name>_runs.csv``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from doran_lightning.data.suites import COMMONSENSE_SETS, GLUE_METRICS, GLUE_SUITE, METRIC_PARTS, VTAB_GROUPS
from doran_lightning.report.analysis import mean_std, variant_rank
from doran_lightning.report.comparisons import DEFAULT_REFERENCE, finish_table, write_runs_csv
from doran_lightning.report.statistics import (
    DEFAULT_MARGIN, StatisticsError, correctness, crossed_bootstrap_tasks, difference_p, interval_mde, paired_by_seed,
    t_interval, tost_p,
)
from doran_lightning.stability import at_chance

MISSING = "missing"


@dataclass
class Column:
    name: str
    tasks: tuple[str, ...]  # one task: a task column; several: their mean


@dataclass
class SuiteTable:
    """``cells[method][column] = (mean, std, n seeds)`` in percent, or None where a task is missing."""

    name: str
    title: str
    columns: list[Column]
    cells: dict[str, dict[str, tuple[float, float, int] | None]] = field(default_factory=dict)
    seed_scores: dict[str, dict[str, dict[Any, float]]] = field(default_factory=dict)  # [method][column][seed]
    n_test: dict[str, int] = field(default_factory=dict)  # test examples per task, where predictions.csv says
    runs: list[dict[str, Any]] = field(default_factory=list)  # the runs the table reports
    # Task column -> (metric, num_classes) of its runs: what guessing scores there (`stability.at_chance`).
    chance: dict[str, tuple[str, int]] = field(default_factory=dict)

    def at_chance(self, column: str, mean: float) -> bool:
        """A task column's mean (in %) no better than guessing; never said of a mean over several tasks."""
        metric, num_classes = self.chance.get(column, (None, None))
        return metric is not None and at_chance(metric, mean / 100.0, num_classes)

    def best(self, column: str) -> float | None:
        """The best mean of a column above chance; None unless two or more methods have one (nothing to compare)."""
        means = [cell[0] for cell in (row.get(column) for row in self.cells.values()) if cell is not None]
        above = [mean for mean in means if not self.at_chance(column, mean)]
        return max(above) if len(means) > 1 and above else None


def _suite_layout(name: str, extra_tasks: Sequence[str] = ()) -> tuple[str, list[Column]]:
    if name == "vtab-1k":
        columns = [Column(task, (task,)) for tasks in VTAB_GROUPS.values() for task in tasks]
        columns += [Column(f"{group.capitalize()} mean", tuple(tasks)) for group, tasks in VTAB_GROUPS.items()]
        return "VTAB-1K (top-1 accuracy, %)", columns + [Column("Mean (19 tasks)", tuple(c.name for c in columns[:19]))]
    if name == "glue":
        columns = [Column(task, (task,)) for task in GLUE_SUITE]
        return "GLUE (each task's official metric, %)", columns + [Column("Average", GLUE_SUITE)]
    if name == "commonsense":
        columns = [Column(name, (name,)) for name in COMMONSENSE_SETS]
        return "Commonsense reasoning (accuracy, %)", columns + [Column("Average", COMMONSENSE_SETS)]
    columns = [Column(task, (task,)) for task in extra_tasks]
    return "Tasks (test metric, %)", columns + ([Column("Mean", tuple(extra_tasks))] if len(extra_tasks) > 1 else [])


def _score(row: dict[str, Any], metric_parts: Sequence[str], stage: str) -> float | None:
    """The mean of ``metric_parts`` from the run's `stage` ("test", or "val": its last validation) scalars."""
    scalars = row.get(f"{stage}_scalars") or {}
    values = [scalars.get(f"{stage}/{part}") for part in metric_parts]
    if values and all(v is not None and math.isfinite(v) for v in values):
        return 100.0 * sum(values) / len(values)
    return None


def _per_seed_scores(rows: Sequence[dict[str, Any]], metric: str | None,
                     used: dict[str, list[dict[str, Any]]] | None = None,
                     stages: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, dict[Any, float]]]]:
    """{suite: {method: {task: {seed: score}}}} for every run that names a task (or holds commonsense sets).

    ``used``, when given, collects per suite the runs that entered it; ``stages`` the split each suite scores
    ("test", or "val" when a run lacks its test score; commonsense: test).
    """
    scores: dict[str, dict[str, dict[str, dict[Any, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    used = {} if used is None else used
    stages = {} if stages is None else stages
    pending: dict[str, list[tuple[dict[str, Any], Sequence[str]]]] = defaultdict(list)  # suite -> (run, metric parts)
    for row in _largest_fraction(rows):
        task, method, seed = row.get("task"), row["variant"], row.get("seed")
        tests = row.get("test_scalars") or {}
        sets = [name for name in COMMONSENSE_SETS if f"test/accuracy/{name}" in tests]
        if sets:
            for name in sets:
                scores["commonsense"][method][name][seed] = 100.0 * tests[f"test/accuracy/{name}"]
            used.setdefault("commonsense", []).append(row)
            continue
        if task is None:
            continue
        if task in {t for tasks in VTAB_GROUPS.values() for t in tasks}:
            suite, parts = "vtab-1k", (row.get("metric") or metric or "accuracy",)
        elif task in GLUE_METRICS:
            suite, metric = "glue", GLUE_METRICS[task]
            parts = METRIC_PARTS.get(metric, (metric,))
        else:
            suite, parts = "tasks", (row.get("metric") or metric or "accuracy",)
        scores[suite][method]  # noqa: B018  (a run without its metric still shows its suite, as missing)
        pending[suite].append((row, parts))
    for suite, members in pending.items():
        # One split per table (issue 43): test when every run has its test score, else every run's validation.
        stage = "test" if all(_score(row, parts, "test") is not None for row, parts in members) else "val"
        stages[suite] = stage
        for row, parts in members:
            value = _score(row, parts, stage)
            if value is not None:
                scores[suite][row["variant"]][row.get("task")][row.get("seed")] = value
                used.setdefault(suite, []).append(row)
    return scores


def _chance_by_task(rows: Sequence[dict[str, Any]], metric: str | None) -> dict[str, tuple[str, int]]:
    """Task -> (metric, num_classes) where the runs say how many classes they had and the metric has a chance
    level (accuracy 1/C, Matthews 0); GLUE tasks score their official metric."""
    found = {}
    for row in rows:
        task, num_classes = row.get("task"), row.get("num_classes")
        if task is None or not isinstance(num_classes, int):
            continue
        name = GLUE_METRICS.get(task) or row.get("metric") or metric or "accuracy"
        if name in ("accuracy", "matthews"):
            found[task] = (name, num_classes)
    return found


def _largest_fraction(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Suite tables report the full-data runs: per (method, task), the largest fraction, at its best-val lr."""
    cells: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        cells[(row["variant"], row.get("task"))].append(row)
    chosen = []
    for members in cells.values():
        fraction = max((float(r["fraction"]) for r in members if r.get("fraction") is not None), default=None)
        members = [r for r in members if r.get("fraction") is None or float(r["fraction"]) == fraction]
        by_lr: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for r in members:
            by_lr[r.get("lr")].append(r)
        best = max(by_lr, key=lambda lr: (lambda m: m if math.isfinite(m) else -math.inf)(
            mean_std(r.get("best_val") for r in by_lr[lr])[0]))
        chosen += by_lr[best]
    return chosen


def suite_tables(rows: Sequence[dict[str, Any]], metric: str | None = None) -> list[SuiteTable]:
    """The suite tables the runs in ``rows`` (``run_stability`` rows) fill, in VTAB, GLUE, commonsense, tasks order.

    ``metric``: the metric of VTAB and other tasks when a row names none (GLUE tasks use their official one).
    """
    used: dict[str, list[dict[str, Any]]] = {}
    stages: dict[str, str] = {}
    scores = _per_seed_scores(rows, metric, used, stages)
    chance = _chance_by_task(rows, metric)
    tables = []
    for name in ("vtab-1k", "glue", "commonsense", "tasks"):
        if name not in scores:
            continue
        by_method = scores[name]
        extra = sorted({task for tasks in by_method.values() for task in tasks})
        title, columns = _suite_layout(name, extra)
        if stages.get(name) == "val":  # the title says which split, and it is the same for every cell
            title = title.replace(" (test metric, %)", " (%)") + ": last validation scores (a run has no test score)"
        table = SuiteTable(name, title, columns, runs=used.get(name, []))
        table.chance = {c.name: chance[c.tasks[0]] for c in columns if len(c.tasks) == 1 and c.tasks[0] in chance}
        for task in extra:
            sizes = {r.get("n_test") for r in table.runs if r.get("task") == task}
            if len(sizes) == 1 and None not in sizes:
                table.n_test[task] = sizes.pop()
        for method in sorted(by_method, key=variant_rank):
            tasks = by_method[method]
            row: dict[str, tuple[float, float, int] | None] = {}
            for column in columns:
                if any(task not in tasks for task in column.tasks):
                    row[column.name] = None
                    continue
                seeds = set.intersection(*(set(tasks[task]) for task in column.tasks))
                per_seed = {seed: sum(tasks[task][seed] for task in column.tasks) / len(column.tasks) for seed in seeds}
                table.seed_scores.setdefault(method, {})[column.name] = per_seed
                row[column.name] = mean_std(per_seed.values()) if per_seed else None
            table.cells[method] = row
        tables.append(table)
    return tables


def _cell_text(cell: tuple[float, float, int] | None, column: Column, best: float | None, n_tasks: int,
               chance: bool = False) -> str:
    if cell is None:
        return MISSING if len(column.tasks) == 1 else f"{MISSING} ({n_tasks}/{len(column.tasks)} tasks)"
    mean, std, n = cell
    text = f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"
    if chance:
        return f"{text} (at chance)"
    return f"**{text}**" if best is not None and math.isclose(mean, best) else text


def differences(table: SuiteTable, reference: str = DEFAULT_REFERENCE,
                margin: float = DEFAULT_MARGIN) -> list[dict[str, Any]]:
    """Per method and column: the paired difference from `reference` over the seeds both ran, in points; verdicts
    Holm-adjusted across the table's rows, equivalence by TOST at ±`margin` points."""
    base = table.seed_scores.get(reference, {})
    found = []
    for method, by_column in table.seed_scores.items():
        if method == reference:
            continue
        for column in table.columns:
            if column.name not in by_column or column.name not in base:
                continue
            seeds, diff = paired_by_seed(by_column[column.name], base[column.name])
            interval = t_interval(diff)
            crossed = _crossed(table, method, reference, column, seeds) if len(seeds) > 1 else None
            used = crossed if crossed is not None else interval
            sizes = [table.n_test.get(task) for task in column.tasks]
            sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
            found.append({"method": method, "reference": reference, "column": column.name, "n": len(seeds),
                          "n_test": sum(sizes) if sizes and None not in sizes else None,
                          "difference": interval.estimate, "t_interval": [interval.low, interval.high],
                          "interval": [used.low, used.high], "sd_difference": sd, "mde": interval_mde(used),
                          "margin": margin, "p": difference_p(used), "p_tost": tost_p(used, margin),
                          "basis": "crossed" if crossed is not None else "seeds only"})
    return finish_table(found)


def _crossed(table: SuiteTable, method: str, reference: str, column: Column, seeds: Sequence[Any]) -> Any:
    """The crossed bootstrap (in points) of a column when every paired run of its tasks saved predictions.csv whose
    fraction correct is the run's score there (plain accuracy); else None and the column counts seeds only."""
    paths = {(r["variant"], r.get("task"), r.get("seed")): r.get("predictions") for r in table.runs}
    scores = table.seed_scores
    per_task = []
    for task in column.tasks:
        pair = []
        for who in (method, reference):
            found = {}
            for seed in seeds:
                path = paths.get((who, task, seed))
                if not path:
                    return None
                try:
                    correct = correctness(Path(path))
                except StatisticsError:
                    return None
                logged = scores.get(who, {}).get(task, {}).get(seed)  # the task's own column
                if logged is None or not math.isclose(100 * correct.mean(), logged, abs_tol=1e-3):
                    return None  # the logged score is another metric (or the older macro accuracy)
                found[seed] = 100 * correct
            pair.append(found)
        per_task.append(tuple(pair))
    try:
        return crossed_bootstrap_tasks(per_task)
    except StatisticsError:
        return None


def _differences_markdown(table: SuiteTable, reference: str, margin: float = DEFAULT_MARGIN) -> list[str]:
    found = differences(table, reference, margin)
    if not found:
        return [f"No paired differences: `{reference}` (the reference) and another method share no column."]
    number = lambda value: "–" if not math.isfinite(value) else f"{value:.1f}"  # noqa: E731
    p = lambda raw, adjusted: "–" if not math.isfinite(raw) else f"{raw:.3f} / {adjusted:.3f}"  # noqa: E731
    lines = [f"Paired differences vs `{reference}` (points; per seed the column's score, paired by seed; 95 % t-interval "
             "over seeds (\"seeds only\": conditional on these test sets), or the crossed bootstrap over seeds and "
             "test examples where every paired run saved predictions.csv of plain accuracy; MDE = the difference "
             "detected with 80 % power (t over seeds, or 2.80 × the bootstrap sd); p of a "
             f"difference and TOST p of equivalence within ±{found[0]['margin']:g} points, raw / Holm-adjusted across "
             f"the {len(found)} rows; verdict from the adjusted p at α = 0.05):", "",
             "| method | column | seeds | n test | Δ | 95 % interval | interval from | p (raw / Holm) | TOST p (raw / Holm) "
             "| MDE (80 %) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in found:
        low, high = d["interval"]
        lines.append(f"| {d['method']} | {d['column']} | {d['n']} | {d['n_test'] if d['n_test'] is not None else '–'} "
                     f"| {number(d['difference'])} | {'–' if not math.isfinite(low) else f'[{low:.1f}, {high:.1f}]'} "
                     f"| {d['basis']} | {p(d['p'], d['p_holm'])} | {p(d['p_tost'], d['p_tost_holm'])} | {number(d['mde'])} "
                     f"| {d['verdict']} |")
    return lines


def markdown(table: SuiteTable, reference: str = DEFAULT_REFERENCE, margin: float = DEFAULT_MARGIN) -> str:
    """The table in Markdown: methods as rows; mean ± std over seeds (n in the footnote); best per column bold;
    then the paired differences from `reference`."""
    head = "| method | " + " | ".join(c.name for c in table.columns) + " |"
    lines = [f"### {table.title}", "", head, "|---|" + "---|" * len(table.columns)]
    for method, row in table.cells.items():
        covered = {c.name for c in table.columns if len(c.tasks) == 1 and row.get(c.name) is not None}
        cells = [_cell_text(row.get(c.name), c, table.best(c.name), len(covered & set(c.tasks)),
                            row.get(c.name) is not None and table.at_chance(c.name, row[c.name][0])) for c in table.columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = sorted({cell[2] for row in table.cells.values() for cell in row.values() if cell is not None})
    lines += ["", f"Mean ± std over seeds (n = {', '.join(map(str, seeds)) or '–'}); **bold**: best per column above chance "
                  "(a task's mean no better than guessing is marked at chance); "
                  f"{MISSING}: no finished run of that method (a mean needing it is not computed)."]
    lines += [""] + _differences_markdown(table, reference, margin)
    return "\n".join(lines) + "\n"


def write_csv(table: SuiteTable, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["suite", "method", "column", "mean", "std", "seeds", "best"])
        for method, row in table.cells.items():
            for column in table.columns:
                cell = row.get(column.name)
                best = table.best(column.name)
                writer.writerow([table.name, method, column.name, *(("", "", 0) if cell is None else
                                 (f"{cell[0]:.4f}", f"{cell[1]:.4f}", cell[2])),
                                 cell is not None and best is not None and math.isclose(cell[0], best)])


def plot(table: SuiteTable, path: Path, command: str) -> Path:
    """Grouped bars: one group per column, one bar per method, error bars = std over seeds."""
    from doran_lightning.report.figures import _colors, _figure

    import numpy as np

    methods = list(table.cells)
    fig, axes = _figure(1, 1, max(6.0, 0.55 * len(table.columns) * max(1, len(methods)) / 2 + 2), 4.5, command)
    ax = axes[0, 0]
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(table.columns))
    for index, method in enumerate(methods):
        cells = [table.cells[method].get(c.name) for c in table.columns]
        ax.bar(x + index * width - 0.4 + width / 2, [c[0] if c else np.nan for c in cells], width,
               yerr=[c[1] if c else 0 for c in cells], color=colors[method], label=method, capsize=2)
    ax.set_xticks(x, [c.name for c in table.columns], rotation=60, ha="right", fontsize=7)
    ax.set(title=f"{table.title}: mean ± std over seeds", ylabel="%")
    fig.legend(fontsize=7, loc="outside right upper")  # beside the axes: never over a bar
    fig.savefig(path)
    return path


def write_suites(tables: Sequence[SuiteTable], out: Path, command: str,
                 reference: str = DEFAULT_REFERENCE, margin: float = DEFAULT_MARGIN) -> dict[str, dict[str, str]]:
    """``suite_<name>.md`` / ``.csv`` / ``.png`` and ``_runs.csv`` per table; returns {suite: {kind: file name}}."""
    files = {}
    for table in tables:
        stem = f"suite_{table.name}"
        (out / f"{stem}.md").write_text(f"Made by: `{command}`\n\n" + markdown(table, reference, margin), encoding="utf-8")
        write_csv(table, out / f"{stem}.csv")
        write_runs_csv(table.runs, out / f"{stem}_runs.csv")
        plot(table, out / f"{stem}.png", command)
        files[table.name] = {**{kind: f"{stem}.{kind}" for kind in ("md", "csv", "png")}, "runs_csv": f"{stem}_runs.csv"}
    return files
