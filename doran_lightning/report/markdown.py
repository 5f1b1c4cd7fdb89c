"""The report's ``summary.md``: stability per condition, ΔM-vs-ΔD correlations, the fraction and lr tables, runs, alarms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from doran_lightning.report.analysis import DIVERGE_FACTOR, DIVERGE_WINDOW, LR_RANGE_TOLERANCE, group_summary, mean_std

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



def markdown_summary(summary: dict[str, Any], groups_rows: dict[str, list[dict[str, Any]]]) -> str:
    metric = summary["metric"] or "(no validation metric logged)"
    lines = [
        "# Training report",
        "",
        f"Made by: `{summary['command']}`",
        "",
        f"{len(summary['runs'])} runs; metric: `{metric}`; loss spike = step with loss > {summary['spike_factor']:g}× "
        f"the median of the previous {summary['spike_window']} steps; diverged = final loss non-finite or > "
        f"{DIVERGE_FACTOR:g}× the initial loss (means of the last/first {DIVERGE_WINDOW} logged steps).",
        "",
        "## Stability (per condition, seeds pooled)",
        "",
        "| condition | runs | loss spikes | max grad norm | non-finite steps | diverged | final val | best val | test "
        "| radial gain (end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in groups_rows.items():
        g = group_summary(label, rows)
        lines.append(
            f"| {label} | {g['runs']} | {g['loss_spikes_total']} | {_fmt(g['max_grad_norm'])} | {g['nonfinite_steps_total']} "
            f"| {g['diverged_runs']}/{g['runs']} | {_pm(r['final_val'] for r in rows)} | {_pm(r['best_val'] for r in rows)} "
            f"| {_pm(r['test'] for r in rows)} | {_pm(r.get('radial_gain') for r in rows)} |"
        )
    if summary["correlations"]:
        lines += ["", "## ΔM vs ΔD (DoRA's learning pattern)", "", "| variant | points | Pearson r |", "|---|---|---|"]
        for variant, c in summary["correlations"].items():
            lines.append(f"| {variant} | {c['points']} | {_fmt(c['pearson_r'], 3)} |")
    if summary["fraction_table"]:
        fractions = sorted({f for cells in summary["fraction_table"].values() for f in cells}, key=float)
        lines += ["", f"## {metric} vs training fraction (mean ± std over seeds, n)", ""]
        lines += ["| variant | " + " | ".join(fractions) + " |", "|---|" + "---|" * len(fractions)]
        for variant, cells in summary["fraction_table"].items():
            row = [
                f"{cells[f]['mean']:.4f} ± {cells[f]['std']:.4f} ({cells[f]['n']}, lr {cells[f]['lr']})" if f in cells else "–"
                for f in fractions
            ]
            lines.append(f"| {variant} | " + " | ".join(row) + " |")
    if summary.get("lr_sensitivity"):
        lines += ["", f"## Learning-rate sensitivity ({metric} mean over seeds; range = lrs within "
                      f"{LR_RANGE_TOLERANCE:g} of the best, contiguous around it)", "",
                  "| setting | fraction | best lr | best | lr range (×best) | width | diverged | metric per lr |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in summary["lr_sensitivity"]:
            per_lr = ", ".join(f"{p['lr']:g}: {_fmt(p['mean'], 3)}" + (f" ({p['diverged']} div.)" if p["diverged"] else "")
                               for p in t["points"])
            lines.append(
                f"| {t['setting']} | {_fmt(t['fraction'])} | {t['best_lr']:g} | {t['best']:.4f} ± {t['best_std']:.4f} "
                f"| {t['range'][0]:g}–{t['range'][1]:g} (×{t['relative_range'][0]:.3g}–×{t['relative_range'][1]:.3g}) "
                f"| ×{t['width']:.3g} | {t['diverged']}/{t['runs']} | {per_lr} |")
    lines += ["", "## Figures", ""]
    lines += [f"- ![{Path(p).stem}]({Path(p).name}) `{Path(p).name}`" for p in summary["figures"]] or ["- none"]
    lines += ["", "## Runs", "", "| run | variant | seed | fraction | lr | spikes | max grad norm | non-finite | diverged "
              "| alarms | best val | test |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["runs"]:
        lines.append(
            f"| {r['run']} | {r['variant']} | {_fmt(r['seed'])} | {_fmt(r['fraction'])} | {_fmt(r['lr'])} | {r['loss_spikes']} "
            f"| {_fmt(r['max_grad_norm'])} | {r['nonfinite_steps']} | {r['diverged']} | {_alarm_cell(r['alarms'])} "
            f"| {_fmt(r['best_val'])} | {_fmt(r['test'])} |"
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
