"""`python -m doran_lightning sweep`: methods × tasks × fractions × seeds (× an lr search), run and tabulated.

Every run launches the project's CLI (`fit`, then `test` on the checkpoint it wrote) with the same
config and budget; only the variant, task, lr, fraction and seed change. Results are cached by
content under ``<out>/runs/<variant>/<key>/``: running the command again skips finished runs and
resumes interrupted ones from their ``last.ckpt``.

1. lr search (when a method has several ``--lrs``): each method at ``--search-fraction`` and
   ``--search-seeds``, on every task; the lr with the best mean validation metric wins per method
   (``--search-per-task``: per method and task).
2. Final runs: each method at its lr, for every task, fraction and seed (search runs are reused).
3. ``results.json`` / ``results.md`` (per comparison group: metric mean ± std over seeds per method, task and
   fraction, and paired differences vs ``--reference`` with their intervals, n test and MDE),
   ``results_runs.csv`` (one row per run) and a `report` over the sweep's runs, with the paper-layout suite
   tables (VTAB-1K, GLUE, commonsense).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from doran_lightning import protocol, report, stability
from doran_lightning.adapters.config import variant_labels
from doran_lightning.data.suites import SUITES, expand_tasks
from doran_lightning.safe_files import error_text
from doran_lightning.report.statistics import DEFAULT_MARGIN
from doran_lightning.sweep import lr_search
from doran_lightning.sweep.executors import LocalExecutor, SlurmExecutor, SlurmOptions, visible_gpus
from doran_lightning.sweep.plan import (
    DEFAULT_METHODS, RunSpec, SweepError, check_methods, config_fields, config_lr, parse_lrs, plan_runs, plan_search,
    refuse_switch_overrides, resolve_config, spec_from_dict, with_key_targets,
)
from doran_lightning.sweep.env_notes import environment_notes
from doran_lightning.sweep.outputs import record_outputs, refuse_foreign_outputs
from doran_lightning.sweep.runs import write_json
from doran_lightning.sweep.progress import Progress, status_table, write_plan
from doran_lightning.report.comparisons import DEFAULT_REFERENCE, comparison_legend, comparison_markdown
from doran_lightning.report.analysis import common_split
from doran_lightning.report.groups import partition
from doran_lightning.report.markdown import SPLIT_NAMES
from doran_lightning.sweep.results import comparisons_by_group, result_groups, run_rows, write_run_csv
from doran_lightning.sweep.runs import Launcher, ResultCache

DEFAULT_FRACTIONS = (0.1, 0.3, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LRS = (1e-3, 3e-3, 1e-2)
# --quick: one short pass through the whole pipeline, not a measurement.
QUICK_LIMITS = (
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
)
EXIT_USER_ERROR = 2


def build_parser(prog: str = "python -m doran_lightning sweep") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", help="config file(s) or shipped config names, e.g. vit_vtab.yaml; "
                                                    "several configs are several tasks (named by the file)")
    parser.add_argument("--methods", nargs="+", choices=list(variant_labels()), default=list(DEFAULT_METHODS),
                        metavar="METHOD", help=f"variants (default {' '.join(DEFAULT_METHODS)}); any of "
                                               f"{', '.join(variant_labels())}")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help=f"data tasks (--data.task=…) or suites: {', '.join(SUITES)} (default: the config's task)")
    parser.add_argument("--targets", choices=("config", "qkv"), default="config",
                        help="adapted projections: the config's (q,v), or qkv (adds the key projection for every method)")
    parser.add_argument("--fractions", nargs="+", type=float, help=f"training fractions (default {DEFAULT_FRACTIONS})")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"seeds (default {DEFAULT_SEEDS}; --quick: 0)")
    parser.add_argument("--lrs", nargs="+", metavar="LR", help=f"lr grid searched per method, plain (default "
                        f"{' '.join(map(str, DEFAULT_LRS))}) or per method: dora=1e-3,3e-3")
    parser.add_argument("--search-fraction", type=float, help="fraction of the lr search (default: the largest)")
    parser.add_argument("--search-seeds", type=int, default=1, help="how many of the seeds the lr search uses (default 1)")
    parser.add_argument("--search-per-task", action="store_true", help="choose the lr per method and task (default: per method)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="equivalence margin of the TOST in the "
                        f"tables, in points of the metric (default ±{DEFAULT_MARGIN:g})")
    parser.add_argument("--edge-steps", type=int, default=0, help="when a method's lr pick lies at an edge of its grid, "
                        "add one lr beyond it (the grid's step) and search again, at most this many times (default 0)")
    parser.add_argument("--epochs", type=int, help="trainer.max_epochs, the same budget for every run (default 10; --quick: 1)")
    parser.add_argument("--metric", help="validation/test metric name (default: the run's, e.g. accuracy)")
    parser.add_argument("--reference", default=DEFAULT_REFERENCE, help="method the others are compared with in the "
                        f"tables, paired by seed (default {DEFAULT_REFERENCE})")
    parser.add_argument("--out", type=Path, default=Path("sweep"), help="the sweep's folder (default ./sweep)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: 1 epoch, 3 batches, seed 0, fractions 0.1 and 1, "
                                                             "each config's own model.lr (unless --lrs)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned commands and exit")
    parser.add_argument("--no-report", action="store_true", help="skip `doran_lightning report` (figures, suite tables)")
    parser.add_argument("--overwrite", action="store_true", help="replace results*.* and report/ in --out even where "
                                                                 "they hold files this sweep did not write")
    parser.add_argument("--status", type=Path, metavar="OUT", help="print the run table of the sweep in OUT and exit")
    run = parser.add_argument_group("executor")
    run.add_argument("--executor", choices=("local", "slurm"), default="local")
    run.add_argument("--jobs", type=int, default=1, help="local: runs at once without GPUs (default 1); with GPUs, "
                                                         "one run per --devices-per-run GPUs")
    run.add_argument("--devices-per-run", type=int, default=1, help="GPUs per run (DDP: add -- --trainer.devices=N "
                                                                   "--trainer.strategy=ddp)")
    slurm = parser.add_argument_group("slurm (submitit job array)")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", type=int, default=60, help="minutes per run (default 60)")
    slurm.add_argument("--gpus-per-run", type=int, help="GPUs per run (default --devices-per-run, 0 without --gpus-per-run "
                                                        "or -- --trainer.accelerator=gpu)")
    slurm.add_argument("--account")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--array-parallelism", type=int, default=256, help="array elements running at once (default 256)")
    slurm.add_argument("--setup", action="append", default=[], help="a shell line run before each job (repeatable), "
                                                                   "e.g. 'source .venv/bin/activate'")
    slurm.add_argument("--slurm-cluster", default="slurm", help=argparse.SUPPRESS)  # "local": submitit's local executor
    parser.add_argument("cli_args", nargs="*", help="after `--`: CLI overrides for every run, e.g. -- --trainer.accelerator=gpu")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the defaults, or from --quick's smaller ones; check them."""
    if not args.config:
        raise SweepError("--config is required (or --status OUT to look at a sweep)")
    args.config = [args.config] if isinstance(args.config, str) else list(args.config)
    args.fractions = args.fractions or ([0.1, 1.0] if args.quick else list(DEFAULT_FRACTIONS))
    args.seeds = args.seeds or ([0] if args.quick else list(DEFAULT_SEEDS))
    # --quick without --lrs: every run at its config's own lr (a grid of one, no search; run_sweep fills it in).
    args.own_lr = bool(args.quick and not args.lrs)
    args.lrs = [str(lr) for lr in (args.lrs or ([DEFAULT_LRS[0]] if args.quick else DEFAULT_LRS))]
    args.epochs = args.epochs or (1 if args.quick else 10)
    args.search_fraction = args.search_fraction or max(args.fractions)
    check_methods(args.methods)
    if getattr(args, "reference", DEFAULT_REFERENCE) not in [*args.methods, DEFAULT_REFERENCE]:
        raise SweepError(f"--reference {args.reference} is not among --methods ({' '.join(args.methods)}); "
                         "add it there, or choose one of them")
    args.lr_grid = parse_lrs(args.lrs, args.methods)
    if not all(0 < f <= 1 for f in [*args.fractions, args.search_fraction]):
        raise SweepError("--fractions and --search-fraction must lie in (0, 1]")
    if getattr(args, "margin", DEFAULT_MARGIN) <= 0:
        raise SweepError(f"--margin {args.margin}: need a margin > 0 points")
    if getattr(args, "edge_steps", 0) < 0:
        raise SweepError(f"--edge-steps {args.edge_steps}: need a number ≥ 0")
    if args.epochs < 1 or not 1 <= args.search_seeds <= len(args.seeds):
        raise SweepError("need --epochs >= 1 and 1 <= --search-seeds <= number of --seeds")
    args.task_list = expand_tasks(args.tasks) if args.tasks else [None]
    if args.tasks and len(args.config) > 1:
        raise SweepError("--tasks goes with one --config (several configs are already several tasks)")
    if args.devices_per_run < 1 or args.jobs < 1:
        raise SweepError("need --jobs >= 1 and --devices-per-run >= 1")
    if args.devices_per_run > 1 and not any(a.startswith("--trainer.devices") for a in args.cli_args):
        raise SweepError(f"--devices-per-run {args.devices_per_run}: also pass -- --trainer.devices={args.devices_per_run} "
                         "--trainer.strategy=ddp so every run uses its GPUs")
    if args.quick:
        args.cli_args = [*QUICK_LIMITS, *args.cli_args]
    refuse_switch_overrides(args.methods, args.cli_args)
    refuse_out_among_inputs(args.out, args.config, args.cli_args)
    refuse_foreign_outputs(args.out, getattr(args, "overwrite", False))
    return args


def refuse_out_among_inputs(out: Path, configs: Sequence[str], cli_args: Sequence[str]) -> None:
    """`--out` must not be a path the runs read (issue 31): the config files and every path they or the forwarded
    ``--key=value`` arguments name (data files and roots, tokenizer, backbone, checkpoints), nor lie inside a data
    root's split folders (``<root>/train``, ``val``, ``test``: their entries are classes) or a predict folder."""
    import yaml

    from doran_lightning.outputs import OutputOverlapError, config_inputs, refuse_overlap

    files = [resolve_config(config) for config in configs]
    named: list[Any] = [*files, *(yaml.safe_load(file.read_text(encoding="utf-8")) for file in files)]
    named += [{arg[2:].split("=", 1)[0].rsplit(".", 1)[-1]: arg.split("=", 1)[1]}
              for arg in cli_args if arg.startswith("--") and "=" in arg]
    inputs = config_inputs(named)
    listed = [folder / split for folder in inputs if folder.is_dir() for split in ("train", "val", "test")]
    try:
        refuse_overlap(out, inputs, "--out", adds_only=True, listed=[folder for folder in listed if folder.is_dir()])
    except OutputOverlapError as error:
        raise SweepError(str(error)) from None


def make_executor(args: argparse.Namespace, launch: Launcher | None) -> LocalExecutor | SlurmExecutor:
    if getattr(args, "executor", "local") == "slurm":
        wants_gpu = any(a.startswith("--trainer.accelerator") and a.endswith(("gpu", "cuda")) for a in args.cli_args)
        gpus = args.gpus_per_run if args.gpus_per_run is not None else (args.devices_per_run if wants_gpu else 0)
        options = SlurmOptions(partition=args.partition, time_min=args.time, gpus_per_run=gpus, account=args.account,
                               cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                               array_parallelism=args.array_parallelism, setup=tuple(args.setup))
        return SlurmExecutor(args.out / "slurm", options, cluster=args.slurm_cluster, launch=launch)
    gpus = [] if launch is not None else visible_gpus()  # an in-process launcher (tests) places nothing
    return LocalExecutor(jobs=args.jobs, gpus=gpus, devices_per_run=getattr(args, "devices_per_run", 1), launch=launch)


def score(result: dict[str, Any]) -> float:
    """Validation score used for the lr choice (higher is better; failed or diverged runs rank last)."""
    value = result.get("best_val")
    if result.get("status") != "ok" or result.get("diverged") or value is None or not math.isfinite(value):
        return -math.inf
    return float(value)


def select_lrs(results: Sequence[dict[str, Any]], per_task: bool = False) -> dict[Any, float]:
    """Per variant (or per (variant, task)), the lr with the best mean validation score over its search runs."""
    grouped: dict[Any, dict[float, list[float]]] = {}
    for result in results:
        spec = result["spec"]
        key = (spec["variant"], spec.get("task")) if per_task else spec["variant"]
        grouped.setdefault(key, {}).setdefault(spec["lr"], []).append(score(result))
    return {key: max(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr)) for key, by_lr in grouped.items()}


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, task, fraction): the metric's mean ± std over seeds, and whether that is at chance.

    The score is the test metric when every finished run of the comparison group has one, else every run's best
    validation metric (``source``): a group's table never puts a test score beside a validation one (issue 43).
    """
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    group_of: dict[tuple[str, str, float], dict[str, str]] = {}
    for result, group in zip(results, result_groups(results)):
        spec = spec_from_dict(result["spec"])
        cells.setdefault((spec.variant, spec.label, spec.fraction), []).append(result)
        group_of.setdefault((spec.variant, spec.label, spec.fraction), group)
    finished = {key: [r for r in members if r.get("status") == "ok"] for key, members in cells.items()}
    source_of: dict[tuple[str, str, float], str] = {}
    for _, parts in partition(list(group_of.items()), lambda item: item[1]).values():
        source = common_split(r for key, _ in parts for r in finished[key])
        source_of.update((key, source) for key, _ in parts)
    rows = []
    ordered = sorted(cells.items(), key=lambda item: (report.variant_rank(item[0][0]), item[0][1], item[0][2]))
    for key, members in ordered:
        variant, task, fraction = key
        ok, source = finished[key], source_of[key]
        mean, std, count = stability.mean_std(r.get(source) for r in ok)
        metric = next((r["metric"] for r in ok if r.get("metric")), None)
        num_classes = next((r["num_classes"] for r in ok if r.get("num_classes")), None)
        rows.append({
            "variant": variant, "task": task, "fraction": fraction, "lr": members[0]["spec"]["lr"], "source": source,
            "mean": mean, "std": std, "n": count, "runs": len(members), "failed": len(members) - len(ok),
            "diverged": sum(bool(r.get("diverged")) for r in ok),
            "at_chance": bool(count) and metric is not None and stability.at_chance(metric, mean, num_classes),
            "seeds": sorted(r["spec"]["seed"] for r in members), "group": group_of[key],
        })
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], metric: str, command: str,
                   comparisons: dict[str, list[dict[str, Any]]] | None = None, reference: str = DEFAULT_REFERENCE) -> str:
    """Per comparison group: method (and task, when several) × fraction, mean ± std over seeds, failed and diverged
    runs noted; with `comparisons` ({group label: `compare_methods` rows}), the paired differences vs `reference`."""
    several_tasks = len({row["task"] for row in rows}) > 1
    lines = [
        f"Made by: `{command}`",
        "",
        f"{metric} (mean ± std over seeds; n runs; diverged runs marked) by training fraction, per comparison group "
        "(task, data, backbone, budget; methods are compared within a group only). Per-run results: "
        "[results_runs.csv](results_runs.csv).",
    ]
    if comparisons is not None:
        lines += ["", comparison_legend(reference, metric)]
    parts = partition(rows, lambda row: row.get("group") or {})
    for index, (label, (_, members)) in enumerate(parts.items(), start=1):
        split = {row["source"] for row in members}
        lines += ["", f"### Group {index}: {label}", "",
                  f"Every cell: the {' / '.join(SPLIT_NAMES[s] for s in sorted(split))}.", ""]
        lines += _fraction_lines(members, several_tasks)
        if comparisons is not None:
            lines += [""] + comparison_markdown(comparisons.get(label, []), reference)
    return "\n".join(lines) + "\n"


def _fraction_lines(rows: Sequence[dict[str, Any]], several_tasks: bool) -> list[str]:
    fractions = sorted({row["fraction"] for row in rows})
    by_cell = {(row["variant"], row["task"], row["fraction"]): row for row in rows}
    lines = [
        f"| variant | {'task | ' if several_tasks else ''}lr | " + " | ".join(f"{f:g}" for f in fractions) + " |",
        f"|---|{'---|' if several_tasks else ''}---|" + "---|" * len(fractions),
    ]
    for variant, task in dict.fromkeys((row["variant"], row["task"]) for row in rows):
        cells = []
        for fraction in fractions:
            row = by_cell.get((variant, task, fraction))
            if row is None or row["n"] == 0:
                cells.append("–" if row is None else f"failed ({row['failed']})")
                continue
            note = f", {row['diverged']} diverged" if row["diverged"] else ""
            note += f", {row['failed']} failed" if row["failed"] else ""
            chance = " **at chance**" if row.get("at_chance") else ""  # no better than guessing: nothing learnt
            cells.append(f"{row['mean']:.4f} ± {row['std']:.4f} (n={row['n']}{note}){chance}")
        lr = next(row["lr"] for row in rows if (row["variant"], row["task"]) == (variant, task))
        lines.append(f"| {variant} | {f'{task} | ' if several_tasks else ''}{lr:g} | " + " | ".join(cells) + " |")
    return lines


def run_sweep(args: argparse.Namespace, launch: Launcher | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Search lrs, run every method × task × fraction × seed, write results; return the results dict."""
    configs = [resolve_config(c) for c in args.config]
    commons = []
    for config in configs:
        targets = [f"--model.adapter.target_modules={json.dumps(with_key_targets(config))}"] if args.targets == "qkv" else []
        commons.append(config_fields(config, args.epochs, [*targets, *args.cli_args]))
    tasks = getattr(args, "task_list", [None])
    per_task = getattr(args, "search_per_task", False)
    own_lr = getattr(args, "own_lr", False)
    cache = ResultCache(args.out / "runs")
    executor = make_executor(args, launch)
    searched = [m for m in args.methods if len(args.lr_grid[m]) > 1]
    search_specs = [spec for common in commons for spec in plan_search(
        searched, args.lr_grid, args.search_fraction, args.seeds[: args.search_seeds], tasks, **common)]
    fixed_lrs = {m: args.lr_grid[m][0] for m in args.methods if m not in searched}

    def final_specs(lr_by: dict[Any, float]) -> list[RunSpec]:
        return [spec for config, common in zip(configs, commons) for spec in plan_runs(
            args.methods, args.fractions, args.seeds, _own_lrs(config, args.methods) if own_lr else lr_by, tasks, **common)]

    command = getattr(args, "command", "python -m doran_lightning sweep")
    for note in environment_notes(args):
        log(note)
    if args.dry_run:
        specs = final_specs(fixed_lrs) if not searched else search_specs
        for spec in specs:
            state = "cached" if cache.load(spec) else "to run"
            log(f"[{state}] python -m doran_lightning {shlex.join(spec.cli_args('fit', cache.run_dir(spec)))}")
        if searched:
            count = len(args.methods) * len(tasks) * len(configs) * len(args.fractions) * len(args.seeds)
            log(f"... then {count} final runs at each method's chosen lr")
        if isinstance(executor, SlurmExecutor):
            log(f"{executor.describe()}\n" + executor.options.sbatch_preview(executor.folder / "%j", len(specs)))
        return {}

    def run_all(specs: list[RunSpec], phase: str) -> list[dict[str, Any]]:
        write_plan(args.out, command, {phase: [(spec, cache.run_dir(spec)) for spec in specs]})
        progress = Progress(len(specs), getattr(executor, "workers", len(specs)), log, phase)
        results = executor.map(specs, cache, args.metric, progress)
        progress.close()
        return results

    log(f"sweep: {executor.describe()}; out {args.out}")
    lr_by: dict[Any, float] = dict(fixed_lrs)
    search_results: list[dict[str, Any]] = []
    if searched:
        # The search runs' validation chooses the lr: a run whose validation is its test split refuses to start.
        os.environ[protocol.SELECTS_ON_VALIDATION] = "the sweep's lr search"
        try:
            search_results = run_all(search_specs, "lr search")
        finally:
            os.environ.pop(protocol.SELECTS_ON_VALIDATION, None)
        chosen = select_lrs(search_results, per_task)
        grids = {m: list(args.lr_grid[m]) for m in searched}
        steps: dict[str, int] = {}
        limit = getattr(args, "edge_steps", 0)
        while added := lr_search.extensions(grids, chosen, steps, limit):
            for variant, lr in added.items():
                log(f"lr search: {variant}'s pick lies at an edge of {sorted(grids[variant])}; adding {lr:g}")
                grids[variant].append(lr)
                steps[variant] = steps.get(variant, 0) + 1
            more = [spec for common in commons for spec in plan_search(
                list(added), {v: [lr] for v, lr in added.items()}, args.search_fraction,
                args.seeds[: args.search_seeds], tasks, **common)]
            os.environ[protocol.SELECTS_ON_VALIDATION] = "the sweep's lr search"
            try:
                search_results += run_all(more, "lr search (edge)")
            finally:
                os.environ.pop(protocol.SELECTS_ON_VALIDATION, None)
            chosen = select_lrs(search_results, per_task)
        lr_by.update(chosen)
        log("chosen lrs: " + "; ".join(lr_search.describe_pick(
            k, lr, grids[k[0] if isinstance(k, tuple) else k], lr_search.validation_at(search_results, k, lr),
            steps.get(k[0] if isinstance(k, tuple) else k, 0) >= limit) for k, lr in chosen.items())
            + "".join(f"; {m}={lr:g} (one lr, no search)" for m, lr in fixed_lrs.items()))
    final_results = run_all(final_specs(lr_by), "run")
    metric = next((r["metric"] for r in final_results if r.get("metric")), args.metric or "metric")
    rows = aggregate(final_results)
    if own_lr:  # what ran: each config's own lr
        lr_by = {(spec.variant, spec.label): spec.lr for spec in final_specs(lr_by)}
    per_run = run_rows(final_results)
    reference = getattr(args, "reference", DEFAULT_REFERENCE)
    comparisons = comparisons_by_group(per_run, reference, metric, getattr(args, "margin", DEFAULT_MARGIN))
    summary = {"command": command, "metric": metric, "lr_by_variant": {_lr_key(k): lr for k, lr in lr_by.items()},
               "table": rows, "reference": reference, "comparisons": comparisons, "lr_search": search_results,
               "runs": final_results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", summary)
    write_run_csv(per_run, args.out)
    (args.out / "results.md").write_text(markdown_table(rows, metric, command, comparisons, reference))
    if not args.no_report:  # only this sweep's runs: the cache may hold runs of other settings
        run_dirs = [r["run_dir"] if "run_dir" in r else str(cache.root / r["spec"]["variant"] / r["key"])
                    for r in [*search_results, *final_results] if r["status"] == "ok"]
        if run_dirs:
            # The sweep owns its report folder: a resumed sweep replaces it whole.
            # The default reference may be absent from the methods; one given was checked to be among them.
            chosen = ["--reference", reference] if reference != DEFAULT_REFERENCE else []
            chosen += ["--margin", f"{args.margin:g}"] if getattr(args, "margin", DEFAULT_MARGIN) != DEFAULT_MARGIN else []
            report.main([*dict.fromkeys(run_dirs), "--out", str(args.out / "report"), "--overwrite", *chosen])
            tables = sorted((args.out / "report").glob("suite_*.md"))
            if tables:
                log("suite tables: " + ", ".join(str(path) for path in tables))
    record_outputs(args.out)
    return summary


def _own_lrs(config: Path, methods: Sequence[str]) -> dict[Any, float]:
    """Every method at the config's own lr (`sweep --quick` without --lrs)."""
    lr = config_lr(config)
    return dict.fromkeys(methods, lr)


def _lr_key(key: Any) -> str:
    return f"{key[0]}@{key[1]}" if isinstance(key, tuple) else str(key)


def main(argv: list[str] | None = None, prog: str = "python -m doran_lightning sweep") -> int:
    """0 when every run finished, 1 when some failed, 2 with a one-line reason for bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    name = prog.split()[-1].removesuffix(".py").rsplit("/", 1)[-1]
    if args.status is not None:
        try:
            print(status_table(args.status), end="")
        except (FileNotFoundError, SweepError) as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    args.command = shlex.join([*shlex.split(prog), *argv])
    try:
        summary = run_sweep(resolve_defaults(args))
    except (SweepError, OSError) as error:  # OSError: an --out that cannot be made (a file on the path, read-only)
        print(f"{name}: error: {error_text(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary:
        print((args.out / "results.md").read_text())
        if any(r["status"] != "ok" for r in [*summary["lr_search"], *summary["runs"]]):
            return 1
    return 0
