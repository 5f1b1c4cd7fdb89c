"""`python -m doran_lightning report`: stability and sample-efficiency evidence from TensorBoard runs.

Reads the event files of one or many runs with TensorBoard's own ``EventAccumulator``, groups the
runs by method variant (lora, dora, doran, doran-noise, doran-aux) and by the hparams that differ
between runs (fraction, lr, r, optimizer, detach_norm, sigma_scale, sigma_init), treating seeds as
replicates, and writes PNG figures plus ``summary.md`` / ``summary.json`` into ``--out``, including the
stability alarms each run fired during training. Runs that name a task (a VTAB-1K or GLUE task,
commonsense sets, a sweep's tasks) also fill the paper-layout suite tables (``suite_<name>.md/.csv/.png``, see ``report.suites``). Runs are named relative
to the folders given on the command line, and footers show the command without the absolute prefix of
folders outside the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from doran_lightning import tags
from doran_lightning.outputs import OutputExistsError, OutputOverlapError, check_output_folder, staged_folder
from doran_lightning.safe_files import error_text
from doran_lightning.report.analysis import (
    RADIAL_GAIN, SIGMA, SPIKE_FACTOR, SPIKE_WINDOW, alarm_counts, choose_metric, condition_keys, fraction_table,
    group_runs, group_summary, lr_sensitivity, run_stability, setting_label,
)
from doran_lightning.report.figures import (
    plot_delta_scatter, plot_fraction, plot_lr_sensitivity, plot_projection_statistic, plot_training_curves,
)
from doran_lightning.report.markdown import markdown_summary
from doran_lightning.report.suites import markdown as suite_markdown, suite_tables, write_suites
from doran_lightning.report.runs import (
    ReportError, Run, _split_pattern, find_run_dirs, given_folders, load_alarm_messages, load_run, shown_name,
    truncated_event_files,
)

EXIT_USER_ERROR = 2


def shown_command(argv: Sequence[str]) -> str:
    """The command for figure footers: paths relative to the working directory, never an absolute prefix.

    A path outside the working directory (e.g. a temporary folder) keeps only the given folder's name
    and what follows it (``…/runs/*/version_0``).
    """
    cwd = Path.cwd().resolve()
    shown = []
    for arg in argv:
        if os.path.isabs(arg):
            folder, tail = _split_pattern(arg)
            folder = folder.resolve()
            if folder == cwd or cwd in folder.parents:
                arg = str(Path(folder.relative_to(cwd), *tail))
            else:
                arg = str(Path("…", folder.name, *tail))
        shown.append(arg)
    return shlex.join(["python", "-m", "doran_lightning", "report", *shown])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m doran_lightning report",
        description="Stability and sample-efficiency figures + Markdown summary from TensorBoard runs.",
    )
    parser.add_argument("logdirs", nargs="+", help="TensorBoard log dirs or globs (searched recursively for event files)")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="output directory, written whole or not at all (default: ./report)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
    parser.add_argument("--spike-factor", type=float, default=SPIKE_FACTOR,
                        help=f"loss spike = loss > k × running median (default {SPIKE_FACTOR:g})")
    parser.add_argument("--spike-window", type=int, default=SPIKE_WINDOW,
                        help=f"running-median window in logged steps (default {SPIKE_WINDOW})")
    parser.add_argument("--metric", default=None, help="validation/test metric name, e.g. accuracy (default: auto)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves (default 0: raw)")
    return parser


def make_report(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Load the runs, write figures and summaries into ``args.out``; return the summary dict."""
    if args.spike_factor <= 1 or args.spike_window < 1 or not 0 <= args.smooth < 1:
        raise ReportError("need --spike-factor > 1, --spike-window >= 1 and 0 <= --smooth < 1")
    folders = given_folders(args.logdirs)
    # Before the (slow) loading, so a typo costs nothing; --out must not be, hold or lie inside a folder named
    # to be read (a glob's matches are checked once found, below: its prefix folder may well hold --out).
    check_output_folder(args.out, args.overwrite, inputs=[Path(p) for p in args.logdirs if not set("*?[") & set(p)])
    run_dirs = find_run_dirs(args.logdirs)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {', '.join(args.logdirs)}")
    runs, warnings = [], []
    for run_dir, event_dirs in run_dirs.items():
        run = load_run(run_dir, event_dirs)
        for file in truncated_event_files(event_dirs):
            warnings.append(f"{file}: truncated (its last record is cut short: the run was killed while writing, "
                            "or the copy is incomplete); the scalars before the cut are used")
        run.name = shown_name(run.path, folders)
        if any(alarm_counts(run).values()):  # the messages are only read where the counts say there are some
            run.alarm_messages = load_alarm_messages(event_dirs)
        if tags.TRAIN_LOSS not in run.scalars or run.scalars[tags.TRAIN_LOSS].steps.size == 0:
            warnings.append(f"{run_dir}: skipped, no 'train/loss' scalars (tags: {sorted(run.scalars) or 'none'})")
            continue
        if tags.TRAIN_GRAD_NORM not in run.scalars:
            warnings.append(f"{run_dir}: no 'train/grad_norm' tag; max grad norm unknown")
        runs.append(run)
    if not runs:
        raise ReportError("no run logs 'train/loss':\n  " + "\n  ".join(warnings))
    metric = choose_metric(runs, args.metric)
    if metric is None:
        warnings.append("no val/<metric> or test/<metric> tags: metric columns and the fraction plot are empty")
    keys = condition_keys(runs)
    groups = group_runs(runs, keys)
    rows_by_run = {run.path: run_stability(run, metric, args.spike_factor, args.spike_window) for run in runs}
    for run in runs:  # the unit of the lr-sensitivity table
        rows_by_run[run.path]["setting"] = setting_label(run, keys)
    groups_rows = {label: [rows_by_run[run.path] for run in members] for label, members in groups.items()}
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for members in groups.values():
        for run in members:
            by_variant[run.variant].append(run)

    inputs = [*run_dirs, *(folder for event_dirs in run_dirs.values() for folder in event_dirs)]
    with staged_folder(args.out, args.overwrite, inputs=inputs, note=lambda line: print(f"report: note: {line}",
                                                                                         file=sys.stderr)) as out:
        summary = _write_outputs(out, command, args, metric, keys, groups, groups_rows, by_variant, warnings)
    return summary


def _write_outputs(out: Path, command: str, args: argparse.Namespace, metric: str | None, keys: list[str],
                   groups: dict[str, list[Run]], groups_rows: dict[str, list[dict[str, Any]]],
                   by_variant: dict[str, list[Run]], warnings: list[str]) -> dict[str, Any]:
    """Figures, summary.json and summary.md into `out` (the staging folder that becomes ``--out``)."""
    figures = [plot_training_curves(groups, out, command, args.smooth)]
    for stat, missing in ((SIGMA, "no noise-σ runs"), (RADIAL_GAIN, "no DoRA/DoRAN runs, or logged before issue 17")):
        paths = plot_projection_statistic(groups, out, command, stat)
        figures += paths
        if not paths:
            warnings.append(f"no {stat.prefix}/<projection> tags ({missing}): no {stat.prefix} figures")
    scatter, correlations = plot_delta_scatter(by_variant, out, command)
    if scatter is None:
        warnings.append("no delta_m/<projection> + delta_d/<projection> tags: no ΔM-vs-ΔD scatter")
    figures += [scatter] if scatter else []
    all_rows = [row for rows in groups_rows.values() for row in rows]
    table = fraction_table(all_rows) if metric else {}
    fraction_plot = plot_fraction(table, metric, out, command) if metric else None
    figures += [fraction_plot] if fraction_plot else []
    tables = suite_tables(all_rows, metric)
    suite_files = write_suites(tables, out, command)
    figures += [out / files["png"] for files in suite_files.values()]
    sensitivity = lr_sensitivity(all_rows) if metric else []
    lr_plot = plot_lr_sensitivity(sensitivity, metric, out, command) if metric else None
    figures += [lr_plot] if lr_plot else []

    summary = {
        "command": command,
        "metric": metric,
        "spike_factor": args.spike_factor,
        "spike_window": args.spike_window,
        "condition_keys": keys,
        "runs": all_rows,
        "groups": [group_summary(label, rows) for label, rows in groups_rows.items()],
        "correlations": correlations,
        "fraction_table": table,
        "suites": {t.name: {"files": suite_files[t.name], "columns": [c.name for c in t.columns], "cells": t.cells}
                   for t in tables},
        "lr_sensitivity": sensitivity,
        "figures": [str(args.out / p.name) for p in figures],
        "warnings": warnings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    suites_md = "".join(f"\n{suite_markdown(t)}\nAlso as [{suite_files[t.name]['csv']}]({suite_files[t.name]['csv']}).\n"
                        for t in tables)
    text = markdown_summary(summary, groups_rows)
    if suites_md:  # the paper-layout tables first: they are what a suite sweep is for
        head, sep, rest = text.partition("\n## Stability")
        text = f"{head}\n## Suite tables\n{suites_md}{sep}{rest}"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the report; 0 on success, 2 with a one-line reason for bad input (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help or a usage error already printed by argparse
        return int(exit_request.code or 0)
    command = shown_command(argv)
    try:
        summary = make_report(args, command)
    except (ReportError, OutputExistsError, OutputOverlapError, OSError) as error:  # OSError: unreadable, read-only, full
        if os.environ.get("DORAN_TRACEBACK"):
            raise
        print(f"report: error: {error_text(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    for warning in summary["warnings"]:
        print(f"report: note: {warning}", file=sys.stderr)
    print(f"report: {len(summary['runs'])} runs -> {args.out / 'summary.md'} and {len(summary['figures'])} figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
