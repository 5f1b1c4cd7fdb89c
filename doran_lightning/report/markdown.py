"""The report's ``summary.md``: per comparison group, stability, paired differences, ΔM-vs-ΔD, fraction and lr tables; runs, alarms."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from doran_lightning.report.analysis import DIVERGE_FACTOR, DIVERGE_WINDOW, LR_RANGE_TOLERANCE, group_summary, mean_std
from doran_lightning.report.comparisons import comparison_legend, comparison_markdown

def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _pm(values: Iterable[Any]) -> str:
    mean, std, count = mean_std(values)
    return "–" if count == 0 else f"{mean:.4f} ± {std:.4f}"


def _alarm_cell(counts: dict[str, int]) -> str:
    """``loss_spike 2, grad_jump 1``; ``0`` when watched and quiet; ``–`` when the run logged no alarm tags."""
    if not counts:
        return "–"
    fired = [f"{kind} {count}" for kind, count in counts.items() if count]
    return ", ".join(fired) or "0"



def _group_heading(part: dict[str, Any]) -> list[str]:
    return ["", f"### Group {part['index']}: {part['label']}", ""]


def _stability_lines(rows_by_condition: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| condition | runs | loss spikes | max logged grad norm | non-finite steps | diverged | final val | best val | test "
             "| radial gain (end) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in rows_by_condition.items():
        g = group_summary(label, rows)
        lines.append(
            f"| {label} | {g['runs']} | {g['loss_spikes_total']} | {_fmt(g['max_grad_norm'])} | {g['nonfinite_steps_total']} "
            f"| {g['diverged_runs']}/{g['runs']} | {_pm(r['final_val'] for r in rows)} | {_pm(r['best_val'] for r in rows)} "
            f"| {_pm(r['test'] for r in rows)} | {_pm(r.get('radial_gain') for r in rows)} |"
        )
    return lines


SPLIT_NAMES = {"test": "test score", "best_val": "best validation score (some run has no test score, so no cell shows "
                                                 "one)"}


def _split_line(sources: Iterable[str]) -> list[str]:
    """Which split every cell of the table below shows (one per table: `analysis.common_split`)."""
    return [f"Every cell: the {' / '.join(SPLIT_NAMES[source] for source in sorted(set(sources)))}.", ""]


def _fraction_lines(fraction_table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    fractions = sorted({f for cells in fraction_table.values() for f in cells}, key=float)
    lines = _split_line(cell["source"] for cells in fraction_table.values() for cell in cells.values())
    lines += ["| variant | " + " | ".join(fractions) + " |", "|---|" + "---|" * len(fractions)]
    for variant, cells in fraction_table.items():
        row = [
            f"{cells[f]['mean']:.4f} ± {cells[f]['std']:.4f} ({cells[f]['n']}, lr {cells[f]['lr']})" if f in cells else "–"
            for f in fractions
        ]
        lines.append(f"| {variant} | " + " | ".join(row) + " |")
    return lines


def _lr_lines(sensitivity: list[dict[str, Any]]) -> list[str]:
    lines = _split_line(t["source"] for t in sensitivity)
    lines += ["| setting | fraction | best lr | best | lr range (×best) | width | diverged | metric per lr |",
              "|---|---|---|---|---|---|---|---|"]
    for t in sensitivity:
        per_lr = ", ".join(f"{p['lr']:g}: {_fmt(p['mean'], 3)}" + (f" ({p['diverged']} div.)" if p["diverged"] else "")
                           for p in t["points"])
        lines.append(
            f"| {t['setting']} | {_fmt(t['fraction'])} | {t['best_lr']:g} | {t['best']:.4f} ± {t['best_std']:.4f} "
            f"| {t['range'][0]:g}–{t['range'][1]:g} (×{t['relative_range'][0]:.3g}–×{t['relative_range'][1]:.3g}) "
            f"| ×{t['width']:.3g} | {t['diverged']}/{t['runs']} | {per_lr} |")
    return lines


def _per_group(summary: dict[str, Any], title: str, has: Callable[[dict[str, Any]], bool],
               body: Callable[[dict[str, Any]], list[str]], intro: str | None = None) -> list[str]:
    """A section with one sub-heading per comparison group that has something to show (none: no section)."""
    parts = [part for part in summary["run_groups"] if has(part)]
    if not parts:
        return []
    lines = ["", f"## {title}"] + (["", intro] if intro else [])
    for part in parts:
        lines += _group_heading(part) + body(part)
    return lines


def _groups_table(summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Comparison groups", "",
             "Runs are compared only within a group: the same task, data, backbone and budget (`report.groups`). "
             "No table row, curve or correlation below mixes two groups.", "",
             "| group | task | data | backbone | budget | runs | methods | files in |", "|---|---|---|---|---|---|---|---|"]
    for part in summary["run_groups"]:
        fields = part["fields"]
        lines.append(f"| {part['index']} | {fields['task']} | {fields['data']} | {fields['backbone']} | {fields['budget']} "
                     f"| {part['runs']} | {', '.join(part['methods'])} | {part['folder'] or '.'} |")
    return lines


def markdown_summary(summary: dict[str, Any], groups_rows: Any = None) -> str:
    """``summary.md`` from the summary dict: every table per comparison group, under a heading naming it.

    ``groups_rows`` is no longer read (since issue 29 every run row names its condition and group); it is
    accepted so that callers of the earlier two-argument form keep working, with a DeprecationWarning.
    """
    if groups_rows is not None:
        warnings.warn("markdown_summary(summary, groups_rows): groups_rows is ignored (the rows in summary['runs'] "
                      "carry their condition and group); call markdown_summary(summary)", DeprecationWarning, stacklevel=2)
    metric = summary["metric"] or "(no validation metric logged)"
    by_condition: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in summary["runs"]:
        by_condition.setdefault(row["run_group"], {}).setdefault(row["condition"], []).append(row)
    lines = [
        "# Training report",
        "",
        f"Made by: `{summary['command']}`",
        "",
        f"{len(summary['runs'])} runs in {len(summary['run_groups'])} comparison group(s); metric: `{metric}`; loss "
        f"spike = step with loss > {summary['spike_factor']:g}× the median of the previous {summary['spike_window']} "
        f"steps; diverged = final loss non-finite or > {DIVERGE_FACTOR:g}× the initial loss (means of the last/first "
        f"{DIVERGE_WINDOW} logged steps); max logged grad norm = the largest `train/grad_norm` TensorBoard holds (one value "
        "every `log_every_n_steps` steps: the run summary's max grad norm, over every step, can be larger). "
        "Per-run results: [runs.csv](runs.csv).",
    ]
    lines += _groups_table(summary)
    lines += _per_group(summary, "Stability (per condition, seeds pooled)", lambda part: True,
                        lambda part: _stability_lines(by_condition[part["label"]]))
    lines += _per_group(summary, f"Paired differences vs {summary['reference']}", lambda part: summary["metric"] is not None,
                        lambda part: comparison_markdown(part["comparisons"], summary["reference"]),
                        comparison_legend(summary["reference"], summary["metric"]))
    lines += _per_group(summary, "ΔM vs ΔD (DoRA's learning pattern)", lambda part: bool(part["correlations"]),
                        lambda part: ["| variant | points | Pearson r |", "|---|---|---|"] + [
                            f"| {variant} | {c['points']} | {_fmt(c['pearson_r'], 3)} |"
                            for variant, c in part["correlations"].items()])
    lines += _per_group(summary, f"{metric} vs training fraction (mean ± std over seeds, n)",
                        lambda part: bool(part["fraction_table"]), lambda part: _fraction_lines(part["fraction_table"]))
    lines += _per_group(summary, f"Learning-rate sensitivity ({metric} mean over seeds; range = lrs within "
                                 f"{LR_RANGE_TOLERANCE:g} of the best, contiguous around it)",
                        lambda part: bool(part["lr_sensitivity"]), lambda part: _lr_lines(part["lr_sensitivity"]))
    lines += ["", "## Figures", ""]
    shown = [str(Path(p).relative_to(Path(summary["figures_root"]))) for p in summary["figures"]]
    lines += [f"- ![{Path(p).stem}]({p}) `{p}`" for p in shown] or ["- none"]
    lines += ["", "## Runs", "", "| run | variant | seed | fraction | lr | spikes | max logged grad norm | non-finite | diverged "
              "| alarms | best val | test | n test | group |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    index_of = {part["label"]: part["index"] for part in summary["run_groups"]}
    for r in summary["runs"]:
        lines.append(
            f"| {r['run']} | {r['variant']} | {_fmt(r['seed'])} | {_fmt(r['fraction'])} | {_fmt(r['lr'])} | {r['loss_spikes']} "
            f"| {_fmt(r['max_grad_norm'])} | {r['nonfinite_steps']} | {r['diverged']} | {_alarm_cell(r['alarms'])} "
            f"| {_fmt(r['best_val'])} | {_fmt(r['test'])} | {_fmt(r.get('n_test'))} | {index_of[r['run_group']]} |"
        )
    alarmed = [r for r in summary["runs"] if any(r["alarms"].values())]
    lines += ["", "## Stability alarms (logged during training)", ""]
    if not alarmed:
        watched = sum(bool(r["alarms"]) for r in summary["runs"])
        lines.append(f"None fired ({watched} of {len(summary['runs'])} runs were watched by the alarms callback).")
    for r in alarmed:
        lines.append(f"- **{r['run']}**: {_alarm_cell(r['alarms'])}")
        lines += [f"  - {message}" for message in r["alarm_messages"][:20]]
        if len(r["alarm_messages"]) > 20:
            lines.append(f"  - … {len(r['alarm_messages']) - 20} more")
    if summary["warnings"]:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"
