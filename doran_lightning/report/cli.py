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
    RADIAL_GAIN, SIGMA, SPIKE_FACTOR, SPIKE_WINDOW, alarm_counts, choose_metric, condition_keys, condition_label,
    fraction_table, group_runs, group_summary, lr_sensitivity, run_stability, setting_label, variant_rank,
)
from doran_lightning.report.comparisons import DEFAULT_REFERENCE, compare_methods, write_runs_csv
from doran_lightning.report.statistics import DEFAULT_MARGIN
from doran_lightning.report.groups import SUITE_FIELDS, group_label, group_slug, partition
from doran_lightning.report.figures import (
    plot_delta_scatter, plot_fraction, plot_lr_sensitivity, plot_projection_statistic, plot_training_curves,
)
from doran_lightning.report.markdown import markdown_summary
from doran_lightning.report.suites import (
    differences as suite_differences, markdown as suite_markdown, suite_tables, write_suites,
)
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
    parser.add_argument("--reference", default=None,
                        help=f"method the others are compared with, paired by seed (default {DEFAULT_REFERENCE})")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="equivalence margin of the TOST in points "
                        f"of the metric (default ±{DEFAULT_MARGIN:g})")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves (default 0: raw)")
    return parser


def make_report(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Load the runs, write figures and summaries into ``args.out``; return the summary dict."""
    if getattr(args, "margin", DEFAULT_MARGIN) <= 0:
        raise ReportError(f"--margin {args.margin}: need a margin > 0 points")
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
    rows_by_run = {run.path: run_stability(run, metric, args.spike_factor, args.spike_window) for run in runs}
    warnings += [f"{row['predictions_error']}: not used (no bootstrap for this run's comparisons)"
                 for row in rows_by_run.values() if row.get("predictions_error")]
    variants = sorted({run.variant for run in runs}, key=variant_rank)
    if args.reference is not None and args.reference not in variants:
        raise ReportError(f"--reference {args.reference}: no run of that method; the runs' methods: {', '.join(variants)}")
    args.reference = args.reference or DEFAULT_REFERENCE
    parts = list(partition(runs, lambda run: rows_by_run[run.path]["group"]).values())
    run_groups = [_group_part(index, group, members, rows_by_run, len(parts))
                  for index, (group, members) in enumerate(parts, start=1)]
    if len(run_groups) > 1:
        warnings.append(f"{len(run_groups)} comparison groups (task, data, backbone, budget differ): each has its own "
                        "tables and figures (folders group<N>-…); summary.json's per-group results are under run_groups")

    inputs = [*run_dirs, *(folder for event_dirs in run_dirs.values() for folder in event_dirs)]
    with staged_folder(args.out, args.overwrite, inputs=inputs, note=lambda line: print(f"report: note: {line}",
                                                                                         file=sys.stderr)) as out:
        summary = _write_outputs(out, command, args, metric, run_groups, warnings)
    return summary


def _group_part(index: int, group: dict[str, str], runs: list[Run], rows_by_run: dict[Path, dict[str, Any]],
                count: int) -> dict[str, Any]:
    """One comparison group's runs, its conditions (seeds as replicates) and where its files go."""
    keys = condition_keys(runs)
    conditions = group_runs(runs, keys)
    label = group_label(group)
    for run in runs:
        rows_by_run[run.path].update(setting=setting_label(run, keys), condition=condition_label(run, keys),
                                     run_group=label)  # the unit of the lr-sensitivity table; the stability row
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for members in conditions.values():
        for run in members:
            by_variant[run.variant].append(run)
    return {"index": index, "label": label, "fields": group, "folder": "" if count == 1 else group_slug(index, group),
            "keys": keys, "conditions": conditions, "by_variant": by_variant,
            "rows": {name: [rows_by_run[run.path] for run in members] for name, members in conditions.items()}}


def _write_group(out: Path, command: str, args: argparse.Namespace, metric: str | None, part: dict[str, Any],
                 warnings: list[str]) -> dict[str, Any]:
    """Figures and tables of one comparison group, in its folder (``out`` itself when there is one group)."""
    folder = out / part["folder"]
    folder.mkdir(exist_ok=True)
    conditions, heading = part["conditions"], f"group {part['index']}"
    figures = [plot_training_curves(conditions, folder, command, args.smooth)]
    for stat, missing in ((SIGMA, "no noise-σ runs"), (RADIAL_GAIN, "no DoRA/DoRAN runs, or logged before issue 17")):
        paths = plot_projection_statistic(conditions, folder, command, stat)
        figures += paths
        if not paths:
            warnings.append(f"{heading}: no {stat.prefix}/<projection> tags ({missing}): no {stat.prefix} figures")
    scatter, correlations = plot_delta_scatter(part["by_variant"], folder, command)
    if scatter is None:
        warnings.append(f"{heading}: no delta_m/<projection> + delta_d/<projection> tags: no ΔM-vs-ΔD scatter")
    figures += [scatter] if scatter else []
    rows = [row for members in part["rows"].values() for row in members]
    table = fraction_table(rows) if metric else {}
    fraction_plot = plot_fraction(table, metric, folder, command) if metric else None
    figures += [fraction_plot] if fraction_plot else []
    sensitivity = lr_sensitivity(rows) if metric else []
    lr_plot = plot_lr_sensitivity(sensitivity, metric, folder, command) if metric else None
    figures += [lr_plot] if lr_plot else []
    return {"index": part["index"], "label": part["label"], "fields": part["fields"], "folder": part["folder"],
            "runs": len(rows), "methods": sorted({row["variant"] for row in rows}, key=variant_rank),
            "condition_keys": part["keys"], "conditions": [group_summary(name, members) for name, members in
                                                           part["rows"].items()],
            "correlations": correlations, "fraction_table": table, "lr_sensitivity": sensitivity,
            "comparisons": compare_methods(rows, args.reference, metric, getattr(args, "margin", DEFAULT_MARGIN)) if metric else [],
            "figures": [str(args.out / p.relative_to(out)) for p in figures]}


def _write_outputs(out: Path, command: str, args: argparse.Namespace, metric: str | None,
                   run_groups: list[dict[str, Any]], warnings: list[str]) -> dict[str, Any]:
    """Per-group figures and tables, suite tables, runs.csv, summary.json and summary.md into `out` (staged)."""
    written = [_write_group(out, command, args, metric, part, warnings) for part in run_groups]
    all_rows = [row for part in run_groups for members in part["rows"].values() for row in members]
    suites, suite_texts, suite_figures = _write_suite_groups(out, command, all_rows, metric, args.reference,
                                                          getattr(args, "margin", DEFAULT_MARGIN))
    write_runs_csv(all_rows, out / "runs.csv")
    single = written[0] if len(written) == 1 else None
    summary = {
        "command": command,
        "metric": metric,
        "spike_factor": args.spike_factor,
        "spike_window": args.spike_window,
        "reference": args.reference,
        "condition_keys": sorted({key for part in written for key in part["condition_keys"]}),
        "runs": all_rows,
        "groups": [{**condition, "run_group": part["label"]} for part in written for condition in part["conditions"]],
        # With several comparison groups these stay empty: nothing is pooled across groups (see run_groups).
        "correlations": single["correlations"] if single else {},
        "fraction_table": single["fraction_table"] if single else {},
        "lr_sensitivity": single["lr_sensitivity"] if single else [],
        "run_groups": written,
        "suites": suites,
        "figures": [*(figure for part in written for figure in part["figures"]),
                    *(str(args.out / p.relative_to(out)) for p in suite_figures)],
        "figures_root": str(args.out),
        "runs_csv": str(args.out / "runs.csv"),
        "warnings": warnings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    suites_md = "".join(f"\n{suite_texts[name]}\nAlso as [{suites[name]['files']['csv']}]"
                        f"({suites[name]['files']['csv']}).\n" for name in suites)
    text = markdown_summary(summary)
    if suites_md:  # the paper-layout tables first: they are what a suite sweep is for
        head, sep, rest = text.partition("\n## Stability")
        text = f"{head}\n## Suite tables\n{suites_md}{sep}{rest}"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return summary


def _write_suite_groups(out: Path, command: str, rows: list[dict[str, Any]], metric: str | None,
                        reference: str, margin: float = DEFAULT_MARGIN) -> tuple[dict[str, Any], dict[str, str], list[Path]]:
    """Suite tables per (data, backbone, budget): their tasks are columns, so the task is not part of that key."""
    parts = partition(rows, lambda row: row["group"], fields=SUITE_FIELDS)
    suites, texts, figures = {}, {}, []
    for index, (group, members) in enumerate(parts.values(), start=1):
        folder = out if len(parts) == 1 else out / f"suites{index}"
        tables = suite_tables(members, metric)
        if not tables:
            continue
        folder.mkdir(exist_ok=True)
        files = write_suites(tables, folder, command, reference, margin)
        prefix = "" if folder == out else f"{folder.name}/"
        for table in tables:
            name = table.name if folder == out else f"{table.name} ({folder.name})"
            suites[name] = {"files": {kind: prefix + file for kind, file in files[table.name].items()},
                            "columns": [c.name for c in table.columns], "cells": table.cells,
                            "group": group_label(group), "differences": suite_differences(table, reference, margin)}
            texts[name] = suite_markdown(table, reference, margin)
            figures.append(folder / files[table.name]["png"])
    return suites, texts, figures


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
