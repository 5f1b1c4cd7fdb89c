"""Slopes, intervals, tables and the log-log plot of the teacher–student benchmark (`teacher_student.py`).

Per (teacher, method, seed) the slope is the least-squares fit of log(measure) on log(n) over the n grid; the table
gives its mean over seeds with a 95 % t-interval. Differences between methods are paired by seed (the same frozen
block, teacher update and data): DoRAN − LoRA and DoRAN − DoRA of the slope, and the geometric-mean error ratio at
each n, each with its 95 % t-interval. An interval that covers 0 (a ratio interval that covers 1) is printed as
"not distinguishable".
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

MEASURES = {"recovery_error": "teacher-recovery error ‖ΔŴ − ΔW‖_F / ‖ΔW‖_F (q and v)",
            "error_v": "recovery error of ΔW_v alone (well conditioned)",
            "error_q": "recovery error of ΔW_q alone (acts through the softmax: weakly identified)",
            "heldout_excess": "held-out excess loss / the frozen block's"}
PLOTTED = ("recovery_error", "error_v", "heldout_excess")
REFERENCE = "doran"


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its 95 % t-interval over the values (one per seed)."""
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def per_seed(rows: list[dict], measure: str) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{(teacher, method): {seed: {n: value}}}."""
    table: dict[tuple[str, str], dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        table[(row["teacher"], row["method"])][int(row["seed"])][int(row["n"])] = float(row[measure])
    return table


def slopes(series: dict[int, dict[int, float]], smallest: int = 0) -> dict[int, float]:
    """{seed: slope of log(value) on log(n)} over the n ≥ `smallest`."""
    out = {}
    for seed, by_n in series.items():
        ns = sorted(n for n in by_n if n >= smallest)
        out[seed] = float(np.polyfit(np.log(ns), np.log([by_n[n] for n in ns]), 1)[0])
    return out


def verdict(low: float, high: float, null: float = 0.0) -> str:
    """For a slope difference DoRAN − other: a lower (more negative) slope is a faster rate."""
    if low <= null <= high:
        return "not distinguishable"
    return "DoRAN steeper (faster rate)" if high < null else "DoRAN shallower (slower rate)"


def _fmt(mean: float, low: float, high: float, digits: int = 3) -> str:
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def tables(rows: list[dict]) -> str:
    """The markdown tables: slopes per method and teacher, paired slope differences, paired error ratios per n."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for measure, label in MEASURES.items():
        data = per_seed(rows, measure)
        seeds = len(next(iter(data.values())))
        lines += [f"**{label}: log-log slope over n** (mean over {seeds} seeds, 95 % t-interval)", "",
                  "| teacher | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for teacher in teachers:
            cells = [_fmt(*t_interval(np.array(list(slopes(data[(teacher, m)]).values())))) for m in methods]
            lines.append(f"| {teacher} | " + " | ".join(cells) + " |")
        upper = _upper_ns(rows)
        for teacher in teachers:
            cells = [_fmt(*t_interval(np.array(list(slopes(data[(teacher, m)], upper).values())))) for m in methods]
            lines.append(f"| {teacher}, n ≥ {upper} only | " + " | ".join(cells) + " |")
        lines.append("")
        others = [m for m in methods if m != REFERENCE]
        if REFERENCE in methods and others:
            lines += [f"Paired by seed, DoRAN − other: slope difference and geometric-mean ratio of the {measure} "
                      "at the smallest, middle and largest n (95 % t-intervals):", "",
                      "| teacher | vs | Δ slope | verdict | " + " | ".join(f"ratio at n={n}" for n in _picked_ns(rows))
                      + " |", "|---|---|---|---|" + "---|" * len(_picked_ns(rows))]
            for teacher in teachers:
                ref = data[(teacher, REFERENCE)]
                ref_slopes = slopes(ref)
                for other in others:
                    other_slopes = slopes(data[(teacher, other)])
                    diff = np.array([ref_slopes[s] - other_slopes[s] for s in ref_slopes])
                    mean, low, high = t_interval(diff)
                    cells = []
                    for n in _picked_ns(rows):
                        logs = np.array([math.log(ref[s][n] / data[(teacher, other)][s][n]) for s in ref])
                        m, lo, hi = t_interval(logs)
                        cells.append(f"{math.exp(m):.3f} [{math.exp(lo):.3f}, {math.exp(hi):.3f}]")
                    lines.append(f"| {teacher} | {other} | {_fmt(mean, low, high)} | {verdict(low, high)} | "
                                 + " | ".join(cells) + " |")
            lines.append("")
        if {"shared", "independent"} <= set(teachers) and REFERENCE in methods and others:
            lines += [f"Does the teacher change DoRAN's advantage? (Δ slope on shared − Δ slope on independent, "
                      f"paired by seed; {measure})", "", "| vs | difference of Δ slopes | verdict |", "|---|---|---|"]
            for other in others:
                per_teacher = {t: slopes(data[(t, REFERENCE)]) for t in ("shared", "independent")}
                other_teacher = {t: slopes(data[(t, other)]) for t in ("shared", "independent")}
                diff = np.array([(per_teacher["shared"][s] - other_teacher["shared"][s])
                                 - (per_teacher["independent"][s] - other_teacher["independent"][s])
                                 for s in per_teacher["shared"]])
                mean, low, high = t_interval(diff)
                lines.append(f"| {other} | {_fmt(mean, low, high)} | "
                             f"{'not distinguishable' if low <= 0 <= high else 'differs'} |")
            lines.append("")
    return "\n".join(lines)


def _upper_ns(rows: list[dict]) -> int:
    """The smallest n of the upper half of the grid (at least 2 points): the slope there is closer to the asymptote."""
    ns = sorted({int(r["n"]) for r in rows})
    return ns[min(len(ns) // 2, len(ns) - 2)]


def _picked_ns(rows: list[dict]) -> list[int]:
    ns = sorted({int(r["n"]) for r in rows})
    return list(dict.fromkeys([ns[0], ns[len(ns) // 2], ns[-1]]))


def plot(rows: list[dict], path: Path) -> None:
    """Recovery error (top) and held-out excess loss (bottom) vs n, one column per teacher, log-log, geometric mean
    over seeds with its 95 % interval, and each method's fitted line with its slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(len(PLOTTED), len(teachers), figsize=(5.2 * len(teachers), 3.8 * len(PLOTTED)),
                                squeeze=False)
    for row_index, measure in enumerate(PLOTTED):
        label = MEASURES[measure]
        data = per_seed(rows, measure)
        for col, teacher in enumerate(teachers):
            axis = axes[row_index][col]
            for offset, method in enumerate(methods):
                series = data[(teacher, method)]
                ns = sorted(next(iter(series.values())))
                logs = np.array([[math.log(series[s][n]) for n in ns] for s in series])  # [seeds, ns]
                centre = [t_interval(logs[:, i]) for i in range(len(ns))]
                shift = 1.0 + 0.04 * (offset - 1)  # keep the error bars apart
                xs = [n * shift for n in ns]
                axis.errorbar(xs, [math.exp(c[0]) for c in centre],
                              yerr=[[math.exp(c[0]) - math.exp(c[1]) for c in centre],
                                    [math.exp(c[2]) - math.exp(c[0]) for c in centre]], fmt="o", ms=3, capsize=2,
                              color=f"C{offset}")
                mean, low, high = t_interval(np.array(list(slopes(series).values())))
                fit = np.polyfit(np.log(ns), logs.mean(axis=0), 1)
                axis.plot(ns, np.exp(np.polyval(fit, np.log(ns))), color=f"C{offset}",
                          label=f"{method}: slope {mean:.3f} [{low:.3f}, {high:.3f}]")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("training samples n")
            axis.set_title(f"teacher: {teacher}", fontsize=10)
            if col == 0:
                axis.set_ylabel(label, fontsize=8)
            axis.legend(fontsize=7)
            axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(rows: list[dict], table_path: Path, figure_path: Path, header: str) -> None:
    """Print the tables and write them (with `header`: command, sizes, times) as markdown; draw the plot."""
    text = tables(rows)
    print(text)
    table_path.write_text(f"{header}\n\n{text}\n")
    plot(rows, figure_path)


def main(argv: list[str] | None = None) -> int:
    """Rewrite <folder>/table.md (keeping its first line: the command and times) and the plot from <folder>/runs.csv."""
    import argparse
    import csv

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/teacher_student.png"))
    args = parser.parse_args(argv)
    runs, table = args.folder / "runs.csv", args.folder / "table.md"
    if not runs.is_file():
        raise SystemExit(f"teacher_student_report: {runs} does not exist; run benchmarks/teacher_student.py --out {args.folder} first")
    with open(runs) as handle:
        rows = list(csv.DictReader(handle))
    header = table.read_text().split("\n", 1)[0] if table.is_file() else f"(from {runs})"
    write_outputs(rows, table, args.figure, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
