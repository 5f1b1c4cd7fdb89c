"""Methods against a reference method within one comparison group: the table rows, their Markdown and CSV.

Input rows are `analysis.run_stability` rows (or sweep results built from them) of ONE group (`report.groups`).
Per training fraction and method (a method is a setting: the variant with the settings that tell its runs
apart), the lr with the best mean validation metric is chosen — validation only, never test — and its runs
are paired by seed with the reference's runs chosen the same way (`report.statistics`).

Where every paired run saved its test ``predictions.csv``, the scores are plain accuracy read from them and the
interval is the crossed bootstrap (seeds and test examples); otherwise a t-interval over seeds, marked "seeds
only" in the table. The verdicts of one table are Holm-adjusted across its rows (`finish_table`).
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
    CONFIDENCE, DEFAULT_MARGIN, POWER, Interval, StatisticsError, correctness, crossed_bootstrap, decide,
    difference_p, holm, interval_mde, paired_by_seed, same_test_set, seeds_needed, t_interval, tost_p,
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


def _per_example(method_runs: dict[Any, dict[str, Any]], reference_runs: dict[Any, dict[str, Any]],
                 seeds: Sequence[Any]) -> tuple[tuple[dict, dict] | None, str | None]:
    """Per seed, each method's per-example correctness when every paired run saved its test predictions of one
    test set; else (None, why not)."""
    paths = [Path(runs[s]["predictions"]) for s in seeds for runs in (method_runs, reference_runs)
             if runs[s].get("predictions")]
    if len(paths) != 2 * len(seeds):
        return None, "seeds only: not every paired run saved predictions.csv (test examples not counted)"
    if not same_test_set(paths):
        return None, "seeds only: the paired runs' predictions.csv hold different test sets"
    try:
        return ({s: correctness(Path(method_runs[s]["predictions"])) for s in seeds},
                {s: correctness(Path(reference_runs[s]["predictions"])) for s in seeds}), None
    except StatisticsError as error:
        return None, f"seeds only: {error}"


MACRO_NOTE = ("accuracy logged before issue 40 is macro recall (now `balanced_accuracy`); these runs' scores are "
              "that older number, not the fraction correct")


def older_estimand(row: dict[str, Any]) -> bool:
    """A run whose logged `accuracy` is torchmetrics' macro default: it logged no `balanced_accuracy` beside it."""
    scalars = {**(row.get("val_scalars") or {}), **(row.get("test_scalars") or {})}
    has_accuracy = any(tag.endswith("/accuracy") for tag in scalars)
    paired_with_f1 = any(tag.endswith("/f1") for tag in scalars)  # GLUE's F1 + accuracy: no balanced one beside it
    return has_accuracy and not paired_with_f1 and not any(tag.endswith("/balanced_accuracy") for tag in scalars)


def compare_methods(rows: Sequence[dict[str, Any]], reference: str = DEFAULT_REFERENCE,
                    metric: str | None = "accuracy", margin: float = DEFAULT_MARGIN) -> list[dict[str, Any]]:
    """Every method against every setting of the `reference` variant, per fraction, paired by seed.

    Scores are the test metric when both methods have test scores (seeds without one are left unpaired), else
    the best validation metric (``source`` says which). For accuracy on test with every paired run's
    predictions.csv, the scores are the fraction correct from those files and the interval the crossed
    bootstrap; else the t-interval over seeds ("seeds only", ``note`` says why). Differences are in points
    (100 × the metric); `margin` (points) is the TOST margin; verdicts are Holm-adjusted across the table.
    """
    chosen = chosen_by_validation(rows)
    references = [cell for cell in chosen if cell[0].split(" ")[0] == reference]
    table = []
    for ref_method, fraction in references:
        ref_runs = chosen[(ref_method, fraction)]
        for (method, other_fraction), runs in chosen.items():
            if other_fraction != fraction or method == ref_method:
                continue
            table.append(_compare(method, runs, ref_method, ref_runs, fraction, metric, margin))
    return finish_table(sorted(table, key=lambda c: (str(c["fraction"]), c["reference"],
                                                     variant_rank(c["method"].split(" ")[0]), c["method"])))


def _compare(method: str, runs: list[dict[str, Any]], ref_method: str, ref_runs: list[dict[str, Any]],
             fraction: Any, metric: str | None, margin: float) -> dict[str, Any]:
    """One row of the table before Holm's adjustment (`finish_table` adds the verdict)."""
    tested = all(any(_finite(r.get("test")) for r in members) for members in (runs, ref_runs))
    source = "test" if tested else "best_val"
    by_seed = {r.get("seed"): r for r in runs}
    ref_by_seed = {r.get("seed"): r for r in ref_runs}
    scores = {s: r.get(source) for s, r in by_seed.items() if _finite(r.get(source))}
    ref_scores = {s: r.get(source) for s, r in ref_by_seed.items() if _finite(r.get(source))}
    seeds, diff = paired_by_seed(scores, ref_scores)
    boot, note = None, None
    if source == "test" and metric == "accuracy" and seeds:
        per_example, note = _per_example(by_seed, ref_by_seed, seeds)
        if per_example is not None:  # the fraction correct, per seed, from the predictions themselves
            scores = {s: float(c.mean()) for s, c in per_example[0].items()}
            ref_scores = {s: float(c.mean()) for s, c in per_example[1].items()}
            seeds, diff = paired_by_seed(scores, ref_scores)
            boot = crossed_bootstrap(*per_example)
    if boot is None and source == "test" and metric == "accuracy" and any(
            older_estimand(r) for s in seeds for r in (by_seed[s], ref_by_seed[s])):
        note = f"{note}; {MACRO_NOTE}" if note else MACRO_NOTE
    interval = t_interval(diff)
    used: Interval = boot if boot is not None else interval
    sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else math.nan
    n_tests = {r.get("n_test") for s in seeds for r in (by_seed[s], ref_by_seed[s])}
    return {
        "fraction": fraction, "method": method, "reference": ref_method, "source": source,
        "lr": runs[0].get("lr"), "reference_lr": ref_runs[0].get("lr"), "seeds": seeds, "n": len(seeds),
        "n_test": n_tests.pop() if len(n_tests) == 1 else None,
        "mean": float(np.mean([scores[s] for s in seeds])) if seeds else math.nan,
        "reference_mean": float(np.mean([ref_scores[s] for s in seeds])) if seeds else math.nan,
        "difference": 100 * interval.estimate, "t_interval": [100 * interval.low, 100 * interval.high],
        "bootstrap_interval": [100 * boot.low, 100 * boot.high] if boot is not None else None,
        "interval": [100 * used.low, 100 * used.high], "basis": "crossed" if boot is not None else "seeds only",
        "sd_difference": 100 * sd, "se": 100 * used.se, "mde": 100 * interval_mde(used),
        # seeds an MDE of 1 / 2 points would need at this seed sd (a planning aid; the sd itself is an estimate)
        "seeds_needed": {f"{points:g}": seeds_needed(sd, points / 100) for points in MDE_TARGETS},
        # one seed: no p enters the table's Holm family (a test over one seed's examples says nothing of training)
        "margin": margin, "p": difference_p(used) if len(seeds) > 1 else math.nan,
        "p_tost": tost_p(used, margin / 100) if len(seeds) > 1 else math.nan, "note": note,
    }


def finish_table(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Holm-adjust the difference p and the TOST p across the table's rows (two families), and give each row
    its verdict from the adjusted p (`statistics.decide`); rows with one seed get "not distinguishable"."""
    for key in ("p", "p_tost"):
        for entry, adjusted in zip(table, holm([entry[key] for entry in table])):
            entry[f"{key}_holm"] = adjusted
    for entry in table:
        if entry["n"] == 0:
            entry["verdict"] = "no paired runs"
        elif entry["n"] == 1:  # one seed's test examples show the test set's noise, not the training's: no claim
            entry["verdict"] = "not distinguishable (no interval with 1 seed)"
        elif entry["n"] > 1 and entry["sd_difference"] == 0 and entry["difference"] == 0:
            entry["verdict"] = "not distinguishable: identical at every seed"
        else:
            entry["verdict"] = decide(entry["method"], entry["reference"], entry["difference"], entry["p_holm"],
                                      entry["p_tost_holm"], entry["margin"])
    return table


def _num(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "–" if bounds is None or not all(map(math.isfinite, bounds)) else f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"


def _p(raw: float, adjusted: float) -> str:
    return "–" if not math.isfinite(raw) else f"{raw:.3f} / {adjusted:.3f}"


def comparison_legend(reference: str, metric: str | None) -> str:
    """What the columns of `comparison_markdown` mean (printed once above the groups' tables)."""
    return (f"Paired differences vs `{reference}` in points of {metric or 'the metric'} (100 × method − reference; "
            f"each method at its best-validation lr; paired by seed). {100 * CONFIDENCE:g} % interval: crossed "
            "bootstrap over seeds and test examples (one resample of the test examples shared by every seed and both "
            "methods) where every paired run saved predictions.csv, its scores the fraction correct from those files; "
            "else t over seeds, marked \"seeds only\" (conditional on the one test set). p: two-sided test of no "
            "difference; TOST p: two one-sided tests of a difference beyond ±margin points; each raw / Holm-adjusted "
            "across the rows of the table. Verdict from the adjusted p at α = 0.05: \"X above Y\" / \"X below Y\", "
            "else \"equivalent within ±m\", else \"not distinguishable\". MDE: the difference detected with "
            f"{100 * POWER:g} % power, (z₀.₉₇₅ + z₀.₈)·bootstrap sd (t quantiles × sd/√n for seeds only). n test = test "
            "examples per run (– when no predictions.csv says).")


def comparison_markdown(table: Sequence[dict[str, Any]], reference: str) -> list[str]:
    """The paired-differences table of one group (Markdown lines); a line saying why when it is empty."""
    if not table:
        return [f"No paired comparison: no run of the reference method `{reference}` beside another method "
                "(choose one with --reference)."]
    margins = sorted({c["margin"] for c in table})
    lines = ["| method | vs | fraction | scored on | seeds | n test | method mean | reference mean | Δ | "
             "95 % interval | interval from | p (raw / Holm) | TOST p (raw / Holm) | MDE (80 %) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in table:
        lines.append(
            f"| {c['method']} | {c['reference']} | {c['fraction'] if c['fraction'] is not None else '–'} "
            f"| {c['source']} | {c['n']} | {c['n_test'] if c['n_test'] is not None else '–'} "
            f"| {_num(100 * c['mean'])} | {_num(100 * c['reference_mean'])} | {_num(c['difference'])} "
            f"| {_interval(c['interval'])} | {c['basis']} | {_p(c['p'], c['p_holm'])} "
            f"| {_p(c['p_tost'], c['p_tost_holm'])} | {_num(c['mde'])} | {c['verdict']} |")
    lines.append(f"- TOST margin: ±{', ±'.join(f'{m:g}' for m in margins)} points; Holm across the {len(table)} "
                 f"row{'s' if len(table) != 1 else ''} of this table")
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
