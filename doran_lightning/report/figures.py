"""Report figures with matplotlib's object API and Agg canvas (no global backend state).

``draw_heatmap`` is the one projection × step heat-map drawer: the report's σ figure and the
training dashboard's TensorBoard images both use it.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from doran_lightning import tags
from doran_lightning.report.analysis import SIGMA, delta_points, ema, on_common_grid, pearson
from doran_lightning.report.runs import Run

SPLIT_LABELS = {"test": "test", "best_val": "best validation"}  # an axis names the one split its points come from


def short_labels(names: Sequence[str]) -> tuple[str, list[str]]:
    """The dotted prefix all `names` share (up to a dot) and what is left of each: ``bert.encoder.layer.`` and
    ``0.attention.self.query`` …, so row labels stay short enough to read."""
    if len(names) < 2:
        return "", list(names)
    shared = os.path.commonprefix(list(names))
    shared = shared[: shared.rfind(".") + 1]
    return shared, [name[len(shared):] for name in names]


def draw_heatmap(ax: Any, title: str, projections: Sequence[str], steps: Sequence[int] | np.ndarray, matrix: np.ndarray,
                 colorbar_label: str | None = None, fontsize: float | None = None) -> None:
    """Draw ``matrix`` (projections × steps) on ``ax`` with a colour bar: projections top to bottom, in order.

    Rows are labelled without the prefix every projection shares (named once, as the y label). ``fontsize``: every
    text of the drawing (default: row labels shrinking with the row count, matplotlib's size elsewhere)."""
    rows = np.arange(len(projections))
    mesh = ax.pcolormesh(steps, rows, matrix, shading="nearest", cmap="viridis")
    shared, labels = short_labels(projections)
    ax.set_yticks(rows, labels, fontsize=fontsize or max(6, 10 - len(projections) // 12))
    ax.invert_yaxis()
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("step", fontsize=fontsize)
    ax.set_ylabel(f"{shared}…" if shared else "", fontsize=fontsize)
    if fontsize:
        ax.tick_params(axis="x", labelsize=fontsize)
    bar = ax.figure.colorbar(mesh, ax=ax)
    bar.set_label(colorbar_label or "", fontsize=fontsize)
    if fontsize:
        bar.ax.tick_params(labelsize=fontsize)


def constant_by_construction(run: Run, stat: tags.Statistic, matrix: np.ndarray) -> str | None:
    """Why every value of `stat` in this run is one number, when that is by construction (None otherwise).

    The radial gain (0 = DoRA's projected step, 1 = LoRA's full step) is exactly 1 with the norm detached
    (``detach_norm: true``): the norm carries no gradient, so nothing is projected out (METHOD.md §2)."""
    finite = matrix[np.isfinite(matrix)]
    if not finite.size or finite.max() != finite.min():
        return None
    if stat.prefix == tags.STATISTIC_BY_KEY["radial_gain"].prefix and run.hparam("detach_norm") is not False:
        return f"constant {finite[0]:g} by construction: detach_norm=true keeps the norm out of the gradient"
    return f"constant {finite[0]:g} in this run"


def _figure(rows: int, cols: int, width: float, height: float, command: str) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(rows, cols)
    if len(command) > 200:  # e.g. a sweep listing every run dir; summary.md keeps the full command
        command = f"{command[:140]} … {command[-50:]} (full command in summary.md)"
    # Wrapped to the figure's width (at most 20 characters of 6-pt text per inch), so the footer is never cut off.
    fig.supxlabel(textwrap.fill(f"made by: {command}", width=max(40, int(20 * width))), fontsize=6, color="gray")
    return fig, axes


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(index % cmap.N) for index, label in enumerate(labels)}


def plot_training_curves(groups: dict[str, list[Run]], out: Path, command: str, smooth: float) -> Path:
    """Loss and global grad-norm vs step: thin line per run, thick mean, band = min–max over seeds."""
    fig, axes = _figure(1, 2, 12, 4.5, command)
    colors = _colors(list(groups))
    for ax, tag, title in zip(axes[0], (tags.TRAIN_LOSS, tags.TRAIN_GRAD_NORM), ("training loss", "global grad norm")):
        for label, runs in groups.items():
            series = [run.scalars[tag] for run in runs if tag in run.scalars]
            if not series:
                continue
            for s in series:
                ax.plot(s.steps, ema(s.values, smooth) if smooth > 0 else s.values, color=colors[label], lw=0.5, alpha=0.35)
            grid, matrix = on_common_grid(series, smooth)
            with warnings.catch_warnings():  # all-NaN columns after every seed diverged are expected
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(matrix, axis=0)
                ax.fill_between(grid, np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0), color=colors[label], alpha=0.15)
            ax.plot(grid, mean, color=colors[label], lw=1.8, label=f"{label} (n={len(series)})")
        ax.set(title=f"{title} (mean, band = min–max over seeds)", xlabel="step", yscale="log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no '{tag}' logged", ha="center", transform=ax.transAxes)
    path = out / "training_curves.png"
    fig.savefig(path)
    return path


def plot_projection_statistic(groups: dict[str, list[Run]], out: Path, command: str, stat: tags.Statistic) -> list[Path]:
    """Heat map (projection × step) and a few curves of one statistic, one run per setting (lowest seed).

    Writes ``<prefix>_heatmap.png`` and ``<prefix>_curves.png`` (σ; the radial gain σ/(‖V‖+σ)). A setting is a
    group label without its lr and fraction, so e.g. DoRA with and without the detached norm both show.
    """
    shown: dict[str, Run] = {}
    for label, runs in groups.items():
        setting = " ".join(part for part in label.split(" ") if not part.startswith(("fraction=", "lr=")))
        if runs[0].projections(stat.prefix) and setting not in shown:
            shown[setting] = runs[0]
    if not shown:
        return []
    heat, heat_axes = _figure(len(shown), 1, 10, 1.2 + 2.8 * len(shown), command)
    curves, curve_axes = _figure(len(shown), 1, 8, 1.0 + 2.6 * len(shown), command)
    for row, (label, run) in enumerate(shown.items()):
        names = run.projections(stat.prefix)
        grid, matrix = on_common_grid([run.scalars[stat.tag(name)] for name in names])
        constant = constant_by_construction(run, stat, matrix)
        note = f"\n({constant})" if constant else ""
        draw_heatmap(heat_axes[row, 0], f"{stat.symbol} per projection — {label} (seed {run.hparam('seed')}){note}",
                     names, grid, matrix, colorbar_label=stat.symbol)
        ax = curve_axes[row, 0]
        if constant:
            ax.text(0.5, 0.5, constant, ha="center", va="bottom", transform=ax.transAxes, fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})
        picks = sorted({round(i) for i in np.linspace(0, len(names) - 1, min(4, len(names)))})
        for index in picks:
            ax.plot(grid, matrix[index], lw=1, label=names[index])
        if stat.aggregate_tag in run.scalars:
            aggregate = run.scalars[stat.aggregate_tag]
            ax.plot(aggregate.steps, aggregate.values, "k-", lw=2, label=stat.aggregate)
        ax.set(title=f"{stat.symbol} trajectories — {label} (seed {run.hparam('seed')})", xlabel="step",
               ylabel=stat.symbol)
        ax.legend(fontsize=7)
    paths = [out / f"{stat.prefix}_heatmap.png", out / f"{stat.prefix}_curves.png"]
    heat.savefig(paths[0])
    curves.savefig(paths[1])
    return paths


def plot_sigma(groups: dict[str, list[Run]], out: Path, command: str) -> list[Path]:
    """σ heat map and curves (``sigma_heatmap.png``, ``sigma_curves.png``)."""
    return plot_projection_statistic(groups, out, command, SIGMA)


def plot_delta_scatter(by_variant: dict[str, list[Run]], out: Path, command: str) -> tuple[Path | None, dict[str, Any]]:
    """ΔM vs ΔD per variant (DoRA's Figure 2), colour = step, with Pearson r over all points."""
    points = {variant: delta_points(runs) for variant, runs in by_variant.items()}
    points = {variant: p for variant, p in points.items() if p[0].size}
    correlations = {v: {"pearson_r": pearson(d, m), "points": int(d.size)} for v, (d, m, _) in points.items()}
    if not points:
        return None, correlations
    fig, axes = _figure(1, len(points), 4 * len(points), 4, command)
    for ax, (variant, (d, m, steps)) in zip(axes[0], points.items()):
        sc = ax.scatter(d, m, c=steps, s=6, cmap="plasma", alpha=0.7)
        ax.set(title=f"{variant}: r = {correlations[variant]['pearson_r']:.2f}", xlabel="ΔD (1 − cos)", ylabel="ΔM")
    fig.colorbar(sc, ax=axes[0, -1], label="step")
    path = out / "delta_m_vs_delta_d.png"
    fig.savefig(path)
    return path, correlations



def plot_fraction(table: dict[str, dict[str, dict[str, Any]]], metric: str, out: Path, command: str) -> Path | None:
    if not table:
        return None
    fig, axes = _figure(1, 1, 6, 4.5, command)
    ax = axes[0, 0]
    colors = _colors(list(table))
    single = len({float(f) for cells in table.values() for f in cells}) == 1
    for index, (variant, cells) in enumerate(table.items()):
        fractions = sorted(cells, key=float)
        # One fraction: the methods side by side around it instead of on top of each other.
        shift = 0.015 * (index - (len(table) - 1) / 2) if single else 0.0
        ax.errorbar(
            [float(f) + shift for f in fractions], [cells[f]["mean"] for f in fractions],
            yerr=[cells[f]["std"] for f in fractions], color=colors[variant], marker="o", capsize=3, label=variant,
        )
    sources = {cell["source"] for cells in table.values() for cell in cells.values()}  # one (`common_split`)
    ax.set(title=f"{metric} vs training fraction (mean ± std over seeds)", xlabel="fraction of training data",
           ylabel=f"{'/'.join(SPLIT_LABELS[source] for source in sorted(sources))} {metric}")
    fractions = sorted({float(f) for cells in table.values() for f in cells})
    if len(fractions) > 1:  # a log axis spanning the fractions measured, not matplotlib's decades around one point
        ax.set_xscale("log")
        ax.set_xlim(fractions[0] / 1.3, fractions[-1] * 1.3)
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    else:
        ax.set_xlim(0, max(1.1, fractions[0] + 0.1))
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.text(0.02, 0.02, f"one training fraction ({fractions[0]:g}): no trend to draw", transform=ax.transAxes,
                fontsize=8, color="gray")
    ax.legend(fontsize=8)
    path = out / "metric_vs_fraction.png"
    fig.savefig(path)
    return path


def plot_lr_sensitivity(table: Sequence[dict[str, Any]], metric: str, out: Path, command: str) -> Path | None:
    """Metric vs lr (log x) per setting, mean ± std over seeds; lrs with diverged runs are marked ×."""
    if not table:
        return None
    fig, axes = _figure(1, 1, 7, 4.5, command)
    ax = axes[0, 0]
    labels = [f"{t['setting']} (fraction {t['fraction']})" for t in table]
    colors = _colors(labels)
    for label, entry in zip(labels, table):
        points = entry["points"]
        ax.errorbar([p["lr"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                    color=colors[label], marker="o", capsize=3, label=f"{label}: width ×{entry['width']:.3g}")
        for p in points:
            if p["diverged"]:
                ax.plot(p["lr"], p["mean"] if math.isfinite(p["mean"]) else ax.get_ylim()[0], "x", color=colors[label],
                        markersize=10)
    sources = sorted({entry["source"] for entry in table})  # one (`common_split`)
    ax.set(title=f"{metric} vs learning rate (mean ± std over seeds; × = diverged runs)", xlabel="lr", xscale="log",
           ylabel=f"{'/'.join(SPLIT_LABELS[source] for source in sources)} {metric}")
    ax.legend(fontsize=7)
    path = out / "metric_vs_lr.png"
    fig.savefig(path)
    return path
