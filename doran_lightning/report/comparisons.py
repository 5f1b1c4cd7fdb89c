"""Methods against a reference method within one comparison group: the table rows, their Markdown and CSV.

Input rows are `analysis.run_stability` rows (or sweep results built from them) of ONE group (`report.groups`).
Per training fraction and method (a method is a setting: the variant with the settings that tell its runs
apart), the lr with the best mean validation metric is chosen — validation only, never test — and its runs
are paired by seed with the reference's runs chosen the same way (`report.statistics`).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from doran_lightning.report.analysis import variant_rank
from doran_lightning.report.groups import GROUP_FIELDS, UNRECORDED
from doran_lightning.report.statistics import (
    CONFIDENCE, POWER, StatisticsError, correctness, minimum_detectable_effect, paired_bootstrap, paired_by_seed,
    same_test_set, seeds_needed, t_interval, verdict,
)
from doran_lightning.stability import mean_std

DEFAULT_REFERENCE = "dora"
# points: issue 29's targets for the MDE of DoRAN − DoRA, at full data and at fraction 0.1
MDE_TARGET_BY_FRACTION = {1.0: 1.0, 0.1: 2.0}
MDE_TARGETS = tuple(sorted(set(MDE_TARGET_BY_FRACTION.values())))
RUN_COLUMNS = (*GROUP_FIELDS, "method", "variant", "lr", "fraction", "seed", "best_val", "test", "n_test", "run")


def method_of(row: dict[str, Any]) -> str:
    """The compared unit: the row's setting label (variant + distinguishing settings), else its variant."""
    return row.get("setting") or row["variant"]


def _validation_score(rows: Sequence[dict[str, Any]], seeds: set[Any] | None) -> float:
    mean = mean_std(r.get("best_val") for r in rows if seeds is None or r.get("seed") in seeds)[0]
    return mean if math.isfinite(mean) else -math.inf


def chosen_by_validation(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    """{(method, fraction): the runs at the lr with the best mean validation metric} (ties: the smaller lr).

    The lrs are scored on the seeds every one of them ran (a sweep's search seeds), so an lr that went on to
    more seeds is not judged on other seeds than the rest; with no seed in common, on all of each lr's runs.
    """
    cells: dict[tuple[str, Any], dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[(method_of(row), row.get("fraction"))][row.get("lr")].append(row)
    chosen = {}
    for cell, by_lr in cells.items():
        lrs = sorted(by_lr, key=lambda lr: math.inf if lr is None else float(lr))  # max keeps the first of ties
        shared = set.intersection(*({r.get("seed") for r in by_lr[lr]} for lr in lrs)) or None
        chosen[cell] = by_lr[max(lrs, key=lambda lr: _validation_score(by_lr[lr], shared))]
    return chosen


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _bootstrap(method_runs: dict[Any, dict[str, Any]], reference_runs: dict[Any, dict[str, Any]],
               seeds: Sequence[Any]) -> tuple[Any, str | None]:
    """The paired bootstrap interval when every paired run saved its test predictions, else (None, why not)."""
    paths = [Path(runs[s]["predictions"]) for s in seeds for runs in (method_runs, reference_runs)
             if runs[s].get("predictions")]
    if len(paths) != 2 * len(seeds):
        return None, "no bootstrap: not every paired run saved predictions.csv"
    if not same_test_set(paths):
        return None, "no bootstrap: the paired runs' predictions.csv hold different test sets"
    try:
        return paired_bootstrap({s: correctness(Path(method_runs[s]["predictions"])) for s in seeds},
                                {s: correctness(Path(reference_runs[s]["predictions"])) for s in seeds}), None
    except StatisticsError as error:
        return None, f"no bootstrap: {error}"


def compare_methods(rows: Sequence[dict[str, Any]], reference: str = DEFAULT_REFERENCE,
                    metric: str | None = "accuracy") -> list[dict[str, Any]]:
    """Every method against every setting of the `reference` variant, per fraction, paired by seed.

    Scores are the test metric when both methods have test scores (seeds without one are left unpaired), else
    the best validation metric (``source`` says which). Differences are in points (100 × the metric). The bootstrap runs for accuracy on test only.
    """
    chosen = chosen_by_validation(rows)
    references = [cell for cell in chosen if cell[0].split(" ")[0] == reference]
    table = []
    for ref_method, fraction in references:
        ref_runs = chosen[(ref_method, fraction)]
        for (method, other_fraction), runs in chosen.items():
            if other_fraction != fraction or method == ref_method:
                continue
            tested = all(any(_finite(r.get("test")) for r in members) for members in (runs, ref_runs))
            source = "test" if tested else "best_val"
            by_seed = {r.get("seed"): r for r in runs}
            ref_by_seed = {r.get("seed"): r for r in ref_runs}
            seeds, diff = paired_by_seed({s: r.get(source) for s, r in by_seed.items() if _finite(r.get(source))},
                                         {s: r.get(source) for s, r in ref_by_seed.items() if _finite(r.get(source))})
            interval = t_interval(diff)
            intervals, note = [interval], None
            boot = None
            if source == "test" and metric == "accuracy" and seeds:
                boot, note = _bootstrap(by_seed, ref_by_seed, seeds)
                intervals += [boot] if boot is not None else []
            sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else math.nan
            n_tests = {r.get("n_test") for s in seeds for r in (by_seed[s], ref_by_seed[s])}
            table.append({
                "fraction": fraction, "method": method, "reference": ref_method, "source": source,
                "lr": runs[0].get("lr"), "reference_lr": ref_runs[0].get("lr"), "seeds": seeds, "n": len(seeds),
                "n_test": n_tests.pop() if len(n_tests) == 1 else None,
                "mean": float(np.mean([by_seed[s][source] for s in seeds])) if seeds else math.nan,
                "reference_mean": float(np.mean([ref_by_seed[s][source] for s in seeds])) if seeds else math.nan,
                "difference": 100 * interval.estimate, "t_interval": [100 * interval.low, 100 * interval.high],
                "bootstrap_interval": [100 * boot.low, 100 * boot.high] if boot is not None else None,
                "sd_difference": 100 * sd, "mde": 100 * minimum_detectable_effect(sd, len(seeds)),
                # seeds an MDE of 1 / 2 points would need at this sd (a planning aid; the sd itself is an estimate)
                "seeds_needed": {f"{points:g}": seeds_needed(sd, points / 100) for points in MDE_TARGETS},
                "verdict": verdict(method, ref_method, intervals), "note": note,
            })
    return sorted(table, key=lambda c: (str(c["fraction"]), c["reference"], variant_rank(c["method"].split(" ")[0]),
                                        c["method"]))


def _num(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "–" if bounds is None or not all(map(math.isfinite, bounds)) else f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"


def comparison_legend(reference: str, metric: str | None) -> str:
    """What the columns of `comparison_markdown` mean (printed once above the groups' tables)."""
    return (f"Paired differences vs `{reference}` in points of {metric or 'the metric'} (100 × method − reference; "
            f"each method at its best-validation lr; paired by seed). {100 * CONFIDENCE:g} % intervals: t over seeds, "
            "and a bootstrap over seeds × test examples where predictions.csv was saved. MDE: the difference a paired "
            f"t-test detects with {100 * POWER:g} % power at this many seeds and the observed sd. A difference whose "
            "interval covers 0 is not distinguishable. n test = test examples per run (– when no predictions.csv says).")


def comparison_markdown(table: Sequence[dict[str, Any]], reference: str) -> list[str]:
    """The paired-differences table of one group (Markdown lines); a line saying why when it is empty."""
    if not table:
        return [f"No paired comparison: no run of the reference method `{reference}` beside another method "
                "(choose one with --reference)."]
    lines = ["| method | vs | fraction | scored on | seeds | n test | method mean | reference mean | Δ | "
             "95 % t-interval | 95 % bootstrap | MDE (80 %) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in table:
        lines.append(
            f"| {c['method']} | {c['reference']} | {c['fraction'] if c['fraction'] is not None else '–'} "
            f"| {c['source']} | {c['n']} | {c['n_test'] if c['n_test'] is not None else '–'} "
            f"| {_num(100 * c['mean'])} | {_num(100 * c['reference_mean'])} | {_num(c['difference'])} "
            f"| {_interval(c['t_interval'])} | {_interval(c['bootstrap_interval'])} | {_num(c['mde'])} "
            f"| {c['verdict']} |")
    notes: dict[str, list[str]] = defaultdict(list)
    for c in table:
        if c.get("note"):
            notes[c["note"]].append(f"{c['method']} vs {c['reference']}")
    lines += [f"- {note} ({', '.join(pairs)})" for note, pairs in notes.items()]
    lines += [f"- {c['method']} ran at lr {float(c['lr']):g}, {c['reference']} at {float(c['reference_lr']):g}: the "
              "difference may be the lrs', not the methods' (compare at every lr: `sweep --search-seeds` = the number "
              "of seeds, or `benchmarks/evidence.py --every-lr`)" for c in table if _different_lrs(c)]
    return lines


def _different_lrs(entry: dict[str, Any]) -> bool:
    lr, reference_lr = entry.get("lr"), entry.get("reference_lr")
    return lr is not None and reference_lr is not None and not math.isclose(float(lr), float(reference_lr))


def run_record(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-run CSV: group fields, method, lr, fraction, seed, best val, test, n test, folder."""
    group = row.get("group") or {}
    return {**{name: group.get(name, UNRECORDED) for name in GROUP_FIELDS}, "method": method_of(row),
            "variant": row["variant"], "lr": row.get("lr"), "fraction": row.get("fraction"), "seed": row.get("seed"),
            "best_val": row.get("best_val"), "test": row.get("test"), "n_test": row.get("n_test"),
            "run": row.get("run_dir") or row.get("path") or row.get("run")}


def write_runs_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per-run results beside a table: one row per run (`RUN_COLUMNS`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RUN_COLUMNS))
        writer.writeheader()
        writer.writerows(run_record(row) for row in rows)
    return path
