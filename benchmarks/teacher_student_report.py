"""Statistics and tables of the teacher–student benchmark (`teacher_student.py`, METHOD.md §7).

Every comparison is paired by seed (the same frozen blocks, teacher update and data): the ratio of two students'
errors is the geometric mean over seeds of their per-seed ratio, pooled over the n grid (the mean over n of the
log-ratio, per seed), with a 95 % t-interval over seeds. Slopes (log-log over n, per seed) only for cells where no
fit was stopped by the cap. `positive control:` lines: each feature layout on the teacher written in its own
structure, against DoRA and LoRA; a ratio whose interval does not exclude 1 below means the benchmark cannot
detect the effect, and the line says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from teacher_student_world import POSITIVE_CONTROLS

MEASURES = {"recovery_error": "teacher-recovery error ‖ΔŴ − ΔW‖_F / ‖ΔW‖_F (both blocks, q and v)",
            "heldout_excess": "held-out excess loss / the frozen network's"}


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its 95 % t-interval over the values (one per seed)."""
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def per_seed(rows: list[dict], measure: str) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{(teacher, student): {seed: {n: value}}}."""
    table: dict[tuple[str, str], dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        table[(row["teacher"], row["student"])][int(row["seed"])][int(row["n"])] = float(row[measure])
    return table


def ratio(data: dict, teacher: str, student: str, other: str) -> tuple[float, float, float]:
    """Geometric-mean ratio student/other over seeds, pooled over n, with its 95 % t-interval (paired by seed)."""
    mine, theirs = data[(teacher, student)], data[(teacher, other)]
    logs = np.array([np.mean([math.log(mine[s][n] / theirs[s][n]) for n in mine[s]]) for s in mine])
    mean, low, high = t_interval(logs)
    return math.exp(mean), math.exp(low), math.exp(high)


def slope(data: dict, teacher: str, student: str) -> tuple[float, float, float]:
    """Mean log-log slope over n with its t-interval over seeds."""
    per = []
    for by_n in data[(teacher, student)].values():
        ns = sorted(by_n)
        per.append(float(np.polyfit(np.log(ns), np.log([by_n[n] for n in ns]), 1)[0]))
    return t_interval(np.array(per))


def _cell(values: tuple[float, float, float], digits: int = 3) -> str:
    return f"{values[0]:.{digits}f} [{values[1]:.{digits}f}, {values[2]:.{digits}f}]"


def positive_controls(rows: list[dict]) -> list[str]:
    """The `positive control:` lines (recovery error, each layout on its own teacher, vs DoRA and vs LoRA)."""
    data = per_seed(rows, "recovery_error")
    lines = []
    for student, teacher in POSITIVE_CONTROLS.items():
        for other in ("dora", "lora"):
            if (teacher, student) not in data or (teacher, other) not in data:
                continue
            value = ratio(data, teacher, student, other)
            verdict = ("" if value[2] < 1 else "  — the interval does not exclude 1 in the layout's favour: "
                       "the benchmark cannot detect the effect")
            lines.append(f"positive control: {student} vs {other.replace('dora', 'DoRA').replace('lora', 'LoRA')} "
                         f"{_cell(value)} (teacher {teacher}, recovery error){verdict}")
    return lines


def tables(rows: list[dict]) -> str:
    """Markdown: per measure, the geometric mean at each n; ratios vs DoRA and LoRA; slopes where no fit was capped."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    students = list(dict.fromkeys(r["student"] for r in rows))
    pairs = [(t, s) for t in teachers for s in students if any(r["teacher"] == t and r["student"] == s for r in rows)]
    ns = sorted({int(r["n"]) for r in rows})
    capped = defaultdict(int)
    for row in rows:
        capped[(row["teacher"], row["student"])] += int(row["capped"])
    lines = []
    for measure, label in MEASURES.items():
        data = per_seed(rows, measure)
        seeds = len(next(iter(data.values())))
        lines += [f"**{label}** — geometric mean over {seeds} seeds at each n, 95 % t-interval", "",
                  "| teacher | student | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
        for teacher, student in pairs:  # only what ran (`--quick` runs each layout on its own teacher alone)
            cells = []
            for n in ns:
                mean, low, high = t_interval(np.log([v[n] for v in data[(teacher, student)].values()]))
                cells.append(f"{math.exp(mean):.4f} [{math.exp(low):.4f}, {math.exp(high):.4f}]")
            lines.append(f"| {teacher} | {student} | " + " | ".join(cells) + " |")
        others = [o for o in ("dora", "lora") if o in students]
        lines += ["", f"Paired by seed, student / other, pooled over n (geometric mean, 95 % t-interval); {measure}; "
                  "slope of log(measure) on log(n) where no fit of the cell was capped:", "",
                  "| teacher | student | " + " | ".join(f"vs {o}" for o in others) + " | slope |",
                  "|---|---|" + "---|" * (len(others) + 1)]
        for teacher, student in pairs:
            cells = [_cell(ratio(data, teacher, student, o)) if (teacher, o) in data else "–" for o in others]
            fitted = (_cell(slope(data, teacher, student)) if len(ns) > 1 and not capped[(teacher, student)]
                      else "– (capped fits)" if capped[(teacher, student)] else "–")
            lines.append(f"| {teacher} | {student} | " + " | ".join(cells) + f" | {fitted} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(rows: list[dict], table_path: Path, header: str) -> None:
    """Print the tables and positive-control lines and write them (with `header`: command, sizes, times)."""
    text = tables(rows) + "\n" + "\n".join(positive_controls(rows))
    print(text)
    table_path.write_text(f"{header}\n\n{text}\n")


def main(argv: list[str] | None = None) -> int:
    """Rewrite <folder>/table.md (keeping its first line: the command and times) from <folder>/runs.csv."""
    import argparse
    import csv

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    runs, table = args.folder / "runs.csv", args.folder / "table.md"
    if not runs.is_file():
        raise SystemExit(f"teacher_student_report: {runs} does not exist; run benchmarks/teacher_student.py --out {args.folder} first")
    with open(runs) as handle:
        rows = list(csv.DictReader(handle))
    header = table.read_text().split("\n", 1)[0] if table.is_file() else f"(from {runs})"
    write_outputs(rows, table, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
