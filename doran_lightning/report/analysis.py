"""Numbers from runs: loss spikes, divergence, grouping by condition, mean ± std over seeds.

Pure functions of the loaded runs (no files, no matplotlib). The rules themselves (``loss_diverged``,
``spike_indices``, ``mean_std`` and their constants) are `doran_lightning.stability`'s, re-exported here
for the report's callers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from doran_lightning import tags
from doran_lightning.adapters.config import VARIANT_LABELS
from doran_lightning.report.groups import run_group
from doran_lightning.report.runs import ReportError, Run, Series, natural_key, setting_applies
from doran_lightning.report.statistics import StatisticsError, read_predictions, test_predictions
from doran_lightning.stability import (  # noqa: F401  (re-exported: report.SPIKE_FACTOR, report.loss_diverged, …)
    DIVERGE_FACTOR,
    DIVERGE_WINDOW,
    SPIKE_FACTOR,
    SPIKE_WINDOW,
    loss_diverged,
    mean_std,
    spike_indices,
)

VARIANTS = VARIANT_LABELS  # table and legend order: the variant rule's own
# Hparams that split runs into separate conditions when they differ; seeds are replicates.
CONDITION_KEYS = ("fraction", "lr", "r", "optimizer", "detach_norm", "sigma_scale", "sigma_init")
# Keys that are the x-axis or the cell of a table rather than part of a setting's name.
AXIS_KEYS = ("fraction", "lr")
# The lr-sensitivity table: the lr range whose mean metric stays within this of the setting's best.
LR_RANGE_TOLERANCE = 0.01  # one point of accuracy
# Preferred validation metric tags, in order, when --metric is not given.
METRIC_PRIORITY = ("accuracy", "matthews", "pearson_spearman", "pearson", "spearman", "f1", "generation_accuracy")
SIGMA, DELTA_M, DELTA_D, RADIAL_GAIN = (tags.STATISTIC_BY_KEY[key]
                                        for key in ("sigma", "delta_m", "delta_d", "radial_gain"))
def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over finite pairs; NaN with fewer than 3 pairs or a constant coordinate."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def choose_metric(runs: Sequence[Run], requested: str | None) -> str | None:
    """Validation metric name (``val/<name>``) shared by the runs: ``--metric`` or the first by priority."""
    names = {tag[4:] for run in runs for tag in run.scalars if tag.startswith(("val/", "test/"))}
    names = {name.split("/", 1)[-1] for name in names} - {"loss"}
    if requested:
        if requested not in names:
            raise ReportError(
                f"--metric {requested}: no run logs val/{requested} or test/{requested}; available: {sorted(names) or 'none'}"
            )
        return requested
    for name in METRIC_PRIORITY:
        if name in names:
            return name
    return sorted(names)[0] if names else None


def run_stability(run: Run, metric: str | None, spike_factor: float, spike_window: int) -> dict[str, Any]:
    """Per-run stability numbers: spikes, max grad norm, non-finite steps, divergence, val/test metric."""
    loss = run.scalars[tags.TRAIN_LOSS]
    spikes = spike_indices(loss.values, spike_factor, spike_window)
    nonfinite_loss = int(np.sum(~np.isfinite(loss.values)))
    counter = run.scalars.get(tags.TRAIN_NONFINITE_STEPS)
    # The module logs a running count; a non-finite loss the counter missed still counts.
    logged_nonfinite = int(np.nanmax(counter.values)) if counter is not None and np.isfinite(counter.values).any() else 0
    grad = run.scalars.get(tags.TRAIN_GRAD_NORM)
    finite_grad = grad.values[np.isfinite(grad.values)] if grad is not None else np.array([])
    diverged = loss_diverged(loss.values)
    val_loss = run.scalars.get(tags.VAL_LOSS)
    if val_loss is not None and not math.isfinite(val_loss.values[-1]):
        diverged = True
    val = run.scalars.get(tags.stage_tag("val", metric)) if metric else None
    test = run.scalars.get(tags.stage_tag("test", metric)) if metric else None
    gain = run.scalars.get(RADIAL_GAIN.aggregate_tag)
    predictions, n_test, unreadable = _test_predictions(run)
    return {
        "path": str(run.path),
        "run": run.name or run.path.name,
        "variant": run.variant,
        "seed": run.hparam("seed"),
        "fraction": run.hparam("fraction"),
        "lr": run.hparam("lr"),
        "r": run.hparam("r"),
        "steps": int(loss.steps[-1]),
        "loss_spikes": len(spikes),
        "spike_steps": [int(loss.steps[i]) for i in spikes],
        "max_grad_norm": float(finite_grad.max()) if finite_grad.size else None,
        "nonfinite_steps": max(logged_nonfinite, nonfinite_loss),
        "diverged": bool(diverged),
        "final_loss": float(loss.values[-1]),
        "final_val": float(val.values[-1]) if val is not None else None,
        "best_val": float(np.nanmax(val.values)) if val is not None and np.isfinite(val.values).any() else None,
        "test": float(test.values[-1]) if test is not None else None,
        # Where the layers' steps ended between DoRA's projection (0) and LoRA's full step (1).
        "radial_gain": float(gain.values[-1]) if gain is not None else None,
        "alarms": alarm_counts(run),
        "alarm_messages": run.alarm_messages,
        "task": run.task,
        "group": run_group(run.path, run.hparams),  # what it may be compared with (report.groups)
        "predictions": str(predictions) if predictions else None,  # per test example, for the paired bootstrap
        "n_test": n_test,
        "predictions_error": unreadable,
        "num_classes": run.hparam("num_classes"),  # chance level of the suite tables
        "test_scalars": {tag: float(s.values[-1]) for tag, s in run.scalars.items() if tag.startswith("test/") and s.values.size},
        "val_scalars": {tag: float(s.values[-1]) for tag, s in run.scalars.items() if tag.startswith("val/") and s.values.size},
    }


def _test_predictions(run: Run) -> tuple[Path | None, int | None, str | None]:
    """The run's test ``predictions.csv``, its number of examples, and why it could not be read (else None)."""
    path = test_predictions(run.event_dirs)
    if path is None:
        return None, None, None
    try:
        return path, len(read_predictions(path)[0]), None
    except StatisticsError as error:  # a malformed file costs the bootstrap, not the run's other numbers
        return None, None, str(error)


def alarm_counts(run: Run) -> dict[str, int]:
    """Alarms per kind that the run fired (``alarm/<kind>`` holds the running count); kinds never logged are absent."""
    counts = {}
    for kind in tags.ALARM_KINDS:
        series = run.scalars.get(tags.alarm_tag(kind))
        if series is not None and np.isfinite(series.values).any():
            counts[kind] = int(np.nanmax(series.values))
    return counts


def condition_keys(runs: Sequence[Run]) -> list[str]:
    """The CONDITION_KEYS whose values differ between runs of the same variant."""
    varying = []
    for key in CONDITION_KEYS:
        per_variant = defaultdict(set)
        for run in runs:
            per_variant[run.variant].add(repr(run.hparam(key)))
        if any(len(values) > 1 for values in per_variant.values()):
            varying.append(key)
    return varying


def condition_label(run: Run, keys: Sequence[str]) -> str:
    """``dora detach_norm=False lr=0.01``: the variant and the `keys` that act in its method."""
    parts = [run.variant] + [f"{key}={run.hparam(key)}" for key in keys if setting_applies(run.hparams, key)]
    return " ".join(parts)


def setting_label(run: Run, keys: Sequence[str]) -> str:
    """The condition without its lr and fraction (``dora detach_norm=False``): one curve of metric vs lr."""
    return condition_label(run, [key for key in keys if key not in AXIS_KEYS])


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, list[Run]]:
    """Runs grouped by condition label, variants in VARIANTS order, seeds sorted."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[condition_label(run, keys)].append(run)
    return {
        label: sorted(groups[label], key=lambda r: (str(r.hparam("seed")), str(r.path)))
        for label in sorted(groups, key=lambda label: (variant_rank(label.split(" ")[0]), natural_key(label)))
    }


def variant_rank(variant: str) -> int:
    """Position in VARIANTS (unknown labels last), so tables and legends read lora → doran-aux."""
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def on_common_grid(series: Sequence[Series], smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Series interpolated on the union of their steps up to the shortest run's end: ``[runs, steps]``.

    After a run's first non-finite value it stays NaN (the run diverged there).
    """
    end = min(int(s.steps[-1]) for s in series)
    grid = np.unique(np.concatenate([s.steps[s.steps <= end] for s in series]))
    rows = []
    for s in series:
        values = ema(s.values, smooth) if smooth > 0 else s.values
        finite = np.isfinite(values)
        row = np.interp(grid, s.steps[finite], values[finite]) if finite.any() else np.full(len(grid), np.nan)
        if not finite.all():
            row[grid >= s.steps[np.argmin(finite)]] = np.nan
        rows.append(row)
    return grid, np.array(rows)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing (non-finite values pass through unchanged)."""
    smoothed = values.copy()
    last = None
    for index, value in enumerate(values):
        if math.isfinite(value):
            last = value if last is None else weight * last + (1 - weight) * value
            smoothed[index] = last
    return smoothed


def delta_points(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (ΔD, ΔM, step) points over projections and logged steps; the all-zero init point is dropped."""
    d_all, m_all, step_all = [], [], []
    for run in runs:
        for name in run.projections(DELTA_M.prefix):
            dm, dd = run.scalars[DELTA_M.tag(name)], run.scalars.get(DELTA_D.tag(name))
            if dd is None:
                continue
            steps = np.intersect1d(dm.steps, dd.steps)
            m = dm.values[np.searchsorted(dm.steps, steps)]
            d = dd.values[np.searchsorted(dd.steps, steps)]
            keep = (m != 0) | (d != 0)
            d_all.append(d[keep]), m_all.append(m[keep]), step_all.append(steps[keep])
    if not d_all:
        return np.array([]), np.array([]), np.array([])
    return np.concatenate(d_all), np.concatenate(m_all), np.concatenate(step_all)



def common_split(rows: Iterable[dict[str, Any]]) -> str:
    """The one score a table or figure shows for all its `rows`: "test" when every run has a test score, else
    "best_val" for all of them, so that no test score ever stands beside a validation one (issue 43)."""
    return "test" if all(r.get("test") is not None and math.isfinite(r["test"]) for r in rows) else "best_val"


def fraction_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant: {fraction: cell}}: test metric mean ± std over seeds; the best validation metric in every cell
    when any run lacks a test score (`common_split`; each cell's ``source`` names it).

    Where a (variant, fraction) cell holds several lrs, the lr with the best mean validation metric is used.
    """
    cells: dict[tuple[str, float], dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["fraction"] is not None:
            cells[(row["variant"], float(row["fraction"]))][row["lr"]].append(row)
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    chosen_runs: dict[tuple[str, float], tuple[Any, list[dict[str, Any]]]] = {}
    for (variant, fraction), by_lr in sorted(cells.items()):
        def val_score(lr: Any) -> float:
            mean = mean_std(r["best_val"] for r in by_lr[lr])[0]
            return mean if math.isfinite(mean) else -math.inf

        lr = max(by_lr, key=val_score)
        chosen_runs[(variant, fraction)] = lr, by_lr[lr]
    source = common_split(r for _, chosen in chosen_runs.values() for r in chosen)
    for (variant, fraction), (lr, chosen) in chosen_runs.items():
        mean, std, count = mean_std(r[source] for r in chosen)
        table[variant][f"{fraction:g}"] = {"mean": mean, "std": std, "n": count, "lr": lr, "source": source}
    return {variant: table[variant] for variant in sorted(table, key=variant_rank)}



def group_summary(label: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    grads = [r["max_grad_norm"] for r in rows if r["max_grad_norm"] is not None]
    return {
        "group": label,
        "runs": len(rows),
        "seeds": [r["seed"] for r in rows],
        "loss_spikes_total": sum(r["loss_spikes"] for r in rows),
        "max_grad_norm": max(grads) if grads else None,
        "nonfinite_steps_total": sum(r["nonfinite_steps"] for r in rows),
        "diverged_runs": sum(r["diverged"] for r in rows),
        "final_val": mean_std(r["final_val"] for r in rows),
        "best_val": mean_std(r["best_val"] for r in rows),
        "test": mean_std(r["test"] for r in rows),
        "radial_gain": mean_std(r.get("radial_gain") for r in rows),
    }


def lr_sensitivity(rows: Sequence[dict[str, Any]], tolerance: float = LR_RANGE_TOLERANCE) -> list[dict[str, Any]]:
    """Per setting and fraction with several lrs: metric vs lr, the best lr, and the lr range within `tolerance`.

    The range is the contiguous run of grid lrs around the best whose mean metric (test, else best val) is at
    least best − tolerance; its width is hi/lo (1 when only the best lr qualifies), also given relative to the
    best lr (lo/best, hi/best), so that methods whose best lrs differ are compared on their own scale.
    Diverged runs count in `diverged` and score as missing (a lr where every seed diverged is out of range).
    """
    cells: dict[tuple[str, Any], dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("lr") is not None:
            cells[(row.get("setting") or row["variant"], row["fraction"])][float(row["lr"])].append(row)
    table = []
    source = common_split(r for by_lr in cells.values() if len(by_lr) > 1 for members in by_lr.values() for r in members)
    for (setting, fraction), by_lr in cells.items():
        if len(by_lr) < 2:
            continue
        lrs = sorted(by_lr)
        points = []
        for lr in lrs:
            members = by_lr[lr]
            mean, std, count = mean_std(r[source] for r in members if not r["diverged"])
            points.append({"lr": lr, "mean": mean, "std": std, "n": count, "runs": len(members),
                           "diverged": sum(bool(r["diverged"]) for r in members)})
        finite = [i for i, p in enumerate(points) if math.isfinite(p["mean"])]
        if not finite:
            continue
        best = max(finite, key=lambda i: points[i]["mean"])
        low = high = best
        floor = points[best]["mean"] - tolerance
        while low > 0 and math.isfinite(points[low - 1]["mean"]) and points[low - 1]["mean"] >= floor:
            low -= 1
        while high < len(points) - 1 and math.isfinite(points[high + 1]["mean"]) and points[high + 1]["mean"] >= floor:
            high += 1
        table.append({
            "setting": setting, "fraction": fraction, "points": points, "best_lr": lrs[best],
            "best": points[best]["mean"], "best_std": points[best]["std"], "range": [lrs[low], lrs[high]],
            "width": lrs[high] / lrs[low], "relative_range": [lrs[low] / lrs[best], lrs[high] / lrs[best]],
            "diverged": sum(p["diverged"] for p in points), "runs": sum(p["runs"] for p in points), "source": source,
        })
    return sorted(table, key=lambda t: (variant_rank(t["setting"].split(" ")[0]), natural_key(t["setting"]),
                                        str(t["fraction"])))
