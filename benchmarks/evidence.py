"""The evidence sweeps of issue 29: DoRAN vs DoRA vs LoRA (and the paper recipe, the ablations) under the protocol.

Cells: SST-2 (real MiniLM-L6, 2,000-sentence pool, 872 held-out validation rows, GLUE dev as test) and the digits
5-9 transfer (the ViT pre-trained on 0-4; its own validation split), each at full data and fraction 0.1. In
every cell each method picks its lr on validation from a grid of three lrs around the config's (3 search seeds);
a pick at an edge of the grid extends it one step that way, at most EDGE_STEPS times (`sweep --edge-steps`), and
the sweep prints every pick with its validation interval. The checkpoint is chosen on validation, and the test
split is evaluated once per finished run. Every stage is one `python -m doran_lightning sweep` call (printed
before it runs), cached and resumable: running this script again skips finished runs.

Seed counts are fixed before the runs they size: the first stage (every main method, PILOT_SEEDS seeds) is the
pilot; from its DoRAN − DoRA differences (their sd over seeds, and the test set's own part of the crossed-bootstrap
sd) `plan_seeds` computes once the number of seeds whose MDE reaches issue 29's target (1.0 point at full data, 2.0
at fraction 0.1), at least MIN_SEEDS and at most SEED_CAP, and writes it to `<cell>/seed_plan.json`. DoRA and DoRAN
then run to that count; a later invocation reads the file and never recomputes it, and no interval, mean or
p-value of the comparison ever changes a seed count.

    python benchmarks/evidence.py --jobs 4                      # all cells, one after another stage by stage
    python benchmarks/evidence.py --cells digits_f1 --jobs 2 -- --trainer.accelerator=gpu
    python benchmarks/evidence.py --dry-run                     # the sweep commands only
    python benchmarks/evidence.py --cells digits_f0.1 --every-lr  # DoRA, DoRAN at every lr of the grid, every seed

    python benchmarks/evidence.py --table                       # the paired tables of every cell, from its runs

`--table` reads every finished run of a cell (its `result.json`, its `predictions.csv`), chooses each method's lr
on validation only, and writes `<out>/<cell>/evidence.md` and `evidence_runs.csv`: DoRAN, the paper recipe and LoRA
against DoRA, paired by seed, with the 95 % t and bootstrap intervals, the number of test examples and the minimum
detectable effect (`doran_lightning.report.comparisons`); where the cell has aux-only runs, also the σ settings
(default σ, noise-only, and the acting σ of `<cell>_sigma`) against aux-only.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

OUT = Path("benchmarks/results/evidence")
MAIN = ("lora", "dora", "doran", "doran-paper")
# Item 5 compares each σ setting with the aux-only ablation (σ = 0): the default σ, noise-only, the acting σ.
SIGMA_REFERENCE = "doran-aux"
SIGMA_METHODS = ("doran", "doran-noise", "doran-gaussian")
# The best σ point of issue 17 where σ acts (row-norm scale, σ0 = 0.1·‖W0‖, norm in the gradient path).
ACTING_SIGMA = ("--model.adapter.sigma_scale=row_norm", "--model.adapter.sigma_init=0.1",
                "--model.adapter.detach_norm=false")


@dataclass(frozen=True)
class Cell:
    name: str
    config: str
    fraction: float
    epochs: int
    lrs: tuple[str, ...]


# Budgets: the configs' epochs at full data; at fraction 0.1 more epochs, so that every method leaves chance
# (SST-2 at 3 epochs of 200 sentences is at chance for every method, which no comparison can use).
# Grids: three lrs a factor of 3 apart, centred on the config's model.lr (2e-3 for SST-2, 1e-2 for digits).
CELLS = {
    "sst2_f1": Cell("sst2_f1", "configs/minilm_sst2.yaml", 1.0, 3, ("7e-4", "2e-3", "6e-3")),
    "sst2_f0.1": Cell("sst2_f0.1", "configs/minilm_sst2.yaml", 0.1, 10, ("7e-4", "2e-3", "6e-3")),
    "digits_f1": Cell("digits_f1", "configs/vit_digits_transfer.yaml", 1.0, 6, ("3e-3", "1e-2", "3e-2")),
    "digits_f0.1": Cell("digits_f0.1", "configs/vit_digits_transfer.yaml", 0.1, 20, ("3e-3", "1e-2", "3e-2")),
}


def seeds(count: int) -> list[str]:
    return [str(s) for s in range(count)]


PILOT_SEEDS = 8
MIN_SEEDS = 20  # DoRA and DoRAN run at least as many seeds as LoRA and the paper recipe, to pair with them
SEED_CAP = 200
SEARCH_SEEDS = 3  # the first seeds of every cell run every lr of the grid; the lr search reads their validation
EDGE_STEPS = 2  # a pick at an edge of the grid adds at most this many lrs beyond it
SEED_PLAN = "seed_plan.json"


def stages(cell: Cell) -> list[tuple[str, list[str], list[str], list[str]]]:
    """(out sub-folder, methods, seeds, extra CLI args) of the fixed stages, in the order they run (the first is
    the pilot); DoRA and DoRAN then run to the count `plan_seeds` fixed from the pilot."""
    plan = [
        (cell.name, list(MAIN), seeds(PILOT_SEEDS), []),
        (cell.name, ["lora", "doran-paper"], seeds(MIN_SEEDS), []),
    ]
    if cell.fraction == 1.0:  # the ablations: fewer seeds, full data only
        plan += [(cell.name, ["doran-noise", "doran-aux"], seeds(5), []),
                 (f"{cell.name}_sigma", ["doran-gaussian"], seeds(5), list(ACTING_SIGMA))]
    return plan


# `<cell>_lrs` holds the grid's other lrs at the cell's seeds, so that DoRA and DoRAN can be compared at every lr
# (no selection) and with the lr chosen on validation over all seeds rather than the search seeds.
LRS_SUFFIX = "_lrs"


def sweep_command(cell: Cell, out: Path, methods: list[str], run_seeds: list[str], extra: list[str], jobs: int,
                  cli_args: list[str], lrs: tuple[str, ...] | None = None,
                  search_seeds: int = SEARCH_SEEDS) -> list[str]:
    return [sys.executable, "-m", "doran_lightning", "sweep", "--config", cell.config, "--methods", *methods,
            "--fractions", f"{cell.fraction:g}", "--search-fraction", f"{cell.fraction:g}",
            "--lrs", *(lrs or cell.lrs), "--search-seeds", str(search_seeds), "--edge-steps", str(EDGE_STEPS),
            "--seeds", *run_seeds,
            "--epochs", str(cell.epochs), "--jobs", str(jobs), "--out", str(out), "--no-report", "--",
            *extra, *cli_args]


def _run_stage(cell: Cell, args: argparse.Namespace, deadline: float | None, stage: tuple,
               lrs: tuple[str, ...] | None = None, search_seeds: int = SEARCH_SEEDS) -> bool:
    """Run one stage (print it first); False where the deadline stops the cell."""
    sub, methods, run_seeds, extra = stage
    command = sweep_command(cell, args.out / sub, methods, run_seeds, extra, args.jobs, args.cli_args,
                            lrs=lrs, search_seeds=search_seeds)
    print("$ " + shlex.join(["python", *command[1:]]), flush=True)
    if args.dry_run:
        return True
    left = None if deadline is None else deadline - time.time()
    if left is not None and left < 30:
        print(f"[{cell.name}] deadline reached; stopping before this stage", flush=True)
        return False
    started = time.time()
    try:
        code = subprocess.call(command, timeout=left, stdout=subprocess.DEVNULL if args.quiet else None)
    except subprocess.TimeoutExpired:
        print(f"[{cell.name}] deadline reached during the stage (finished runs are cached)", flush=True)
        return False
    print(f"[{cell.name}] stage {' '.join(methods)} seeds {run_seeds[0]}-{run_seeds[-1]}: exit {code}, "
          f"{time.time() - started:.0f} s", flush=True)
    if code:
        args.failed.append(f"{cell.name}: stage {' '.join(methods)} exit {code}")
    # Exit 2 is bad input (a config not found, a refused argument): every later stage of the cell would repeat it.
    return code != 2


def finished_rows(cell_dir: Path) -> list[dict]:
    """The comparison rows of every finished run in a cell folder (none before its sweep has run)."""
    from doran_lightning.sweep.results import run_rows
    from doran_lightning.sweep.runs import ResultCache

    runs = cell_dir / "runs"
    return run_rows(ResultCache(runs).finished()) if runs.is_dir() else []


def doran_comparison(cell_dir: Path) -> dict | None:
    """The DoRAN − DoRA row of a cell's table (its finished runs), or None before both have run."""
    from doran_lightning.sweep.results import comparisons_by_group

    groups = comparisons_by_group(finished_rows(cell_dir), "dora", "accuracy")
    if len(groups) > 1:
        raise SystemExit(f"{cell_dir} holds runs of {len(groups)} task/data/backbone/budget groups "
                         f"({', '.join(groups)}); a cell's runs must form one group")
    for table in groups.values():
        for entry in table:
            if entry["method"].split(" ")[0] == "doran" and entry["source"] == "test":
                return entry
    return None


def doran_power(cell_dir: Path) -> tuple[int, float]:
    """(paired seeds, MDE in points) of DoRAN − DoRA over a cell's finished runs; (0, inf) before both have run."""
    entry = doran_comparison(cell_dir)
    if entry is None:
        return 0, math.inf
    return entry["n"], entry["mde"] if math.isfinite(entry["mde"]) else math.inf


def seed_count(sd_seed: float, se_examples: float, target: float) -> tuple[int, str]:
    """(seeds, why) for an MDE of `target` points: from the pilot's seed sd and the test set's part of the sd
    (points), at least MIN_SEEDS, at most SEED_CAP."""
    from doran_lightning.report.statistics import crossed_seeds_needed

    needed = crossed_seeds_needed(sd_seed, se_examples, target, most=SEED_CAP)
    if needed is None:
        return SEED_CAP, (f"the target is out of reach within {SEED_CAP} seeds (the test set alone contributes an "
                          f"sd of {se_examples:.2f} points, which no number of seeds removes)")
    return max(MIN_SEEDS, needed), f"{needed} seeds reach the target" + (f"; raised to {MIN_SEEDS}"
                                                                         if needed < MIN_SEEDS else "")


def plan_seeds(cell: Cell, out: Path) -> dict | None:
    """The seed count of DoRA and DoRAN, fixed once from the pilot (`seed_plan.json`; read back if present).

    The pilot's DoRAN − DoRA: `sd_seed` = sd over its paired seeds of the per-seed differences; where its runs
    saved predictions, the test set's part of the crossed-bootstrap variance is what exceeds sd_seed²/n
    (`se_examples`), else 0 (seeds only, said in the file). None before the pilot has finished.
    """
    import json

    from doran_lightning.report.comparisons import MDE_TARGET_BY_FRACTION

    path = out / cell.name / SEED_PLAN
    if path.is_file():
        return json.loads(path.read_text())
    entry = doran_comparison(out / cell.name)
    if entry is None or entry["n"] < 2 or not math.isfinite(entry["sd_difference"]):
        return None
    n, sd = entry["n"], entry["sd_difference"]
    crossed = entry["basis"] == "crossed"
    se_examples = math.sqrt(max(0.0, entry["se"] ** 2 - sd ** 2 / n)) if crossed else 0.0
    target = MDE_TARGET_BY_FRACTION[cell.fraction]
    count, why = seed_count(sd, se_examples, target)
    plan = {"pilot_seeds": n, "sd_seed_points": sd, "se_examples_points": se_examples, "target_mde_points": target,
            "seeds": count, "why": why, "basis": entry["basis"] if crossed else "seeds only (no predictions.csv)"}
    path.write_text(json.dumps(plan, indent=2))
    return plan


def run_planned(cell: Cell, args: argparse.Namespace, deadline: float | None) -> None:
    """DoRA and DoRAN to the seed count fixed from the pilot (one stage; nothing is extended afterwards)."""
    from doran_lightning.report.comparisons import MDE_TARGET_BY_FRACTION

    if args.dry_run:
        print(f"  then: --methods dora doran to the seed count fixed from the pilot's sd ({cell.name}/{SEED_PLAN}; "
              f"MDE target {MDE_TARGET_BY_FRACTION[cell.fraction]:g} point(s), {MIN_SEEDS}-{SEED_CAP} seeds)",
              flush=True)
        return
    plan = plan_seeds(cell, args.out)
    if plan is None:
        print(f"[{cell.name}] no finished DoRA/DoRAN pilot: no seed count planned", flush=True)
        return
    print(f"[{cell.name}] seed plan (fixed from the {plan['pilot_seeds']}-seed pilot): {plan['seeds']} seeds; "
          f"{plan['why']}", flush=True)
    _run_stage(cell, args, deadline, (cell.name, ["dora", "doran"], seeds(plan["seeds"]), []))


def complete_grid(cell: Cell, args: argparse.Namespace, deadline: float | None) -> None:
    """Run DoRA and DoRAN at the grid's other lrs, at the cell's seeds past the search seeds, into `<cell>_lrs`."""
    from doran_lightning.report.comparisons import chosen_by_validation

    chosen = {method: members
              for (method, _), members in chosen_by_validation(finished_rows(args.out / cell.name)).items()}
    for method in ("dora", "doran"):
        if method not in chosen:
            print(f"[{cell.name}] no finished {method} runs: run the cell before --every-lr", flush=True)
            continue
        chosen_lr = float(chosen[method][0]["lr"])
        last = max(int(row["seed"]) for row in chosen[method])
        if last < SEARCH_SEEDS:  # the search seeds ran every lr already
            print(f"[{cell.name}] {method} has no seed past the search seeds: nothing to complete", flush=True)
            continue
        for lr in (lr for lr in cell.lrs if float(lr) != chosen_lr):
            stage = (f"{cell.name}{LRS_SUFFIX}", [method], seeds(last + 1)[SEARCH_SEEDS:], [])
            if not _run_stage(cell, args, deadline, stage, lrs=(lr,), search_seeds=1):
                return


def run_cell(cell: Cell, args: argparse.Namespace, deadline: float | None) -> None:
    if args.every_lr:
        complete_grid(cell, args, deadline)
        return
    for stage in stages(cell):
        if not _run_stage(cell, args, deadline, stage):
            return
    run_planned(cell, args, deadline)


def tables(out: Path) -> list[Path]:
    """Write each cell's paired comparisons (`evidence.md`, `evidence_runs.csv`); the files written."""
    from doran_lightning.report.comparisons import comparison_legend, comparison_markdown
    from doran_lightning.report.comparisons import write_runs_csv
    from doran_lightning.sweep.results import comparisons_by_group

    written = []
    for cell in sorted(p for p in out.iterdir() if (p / "runs").is_dir() and not p.name.endswith(LRS_SUFFIX)):
        rows = finished_rows(cell)
        lines = [f"## {cell.name}", "", comparison_legend("dora", "accuracy"), ""]
        for label, table in comparisons_by_group(rows, "dora", "accuracy").items():
            lines += [f"### {label}", "", *comparison_markdown(table, "dora"), ""]
        # Item 5: each σ setting against aux-only (no σ), with the acting-σ runs of the `_sigma` sibling folder.
        sigma_cell = cell.with_name(f"{cell.name}_sigma")
        sigma_rows = rows + finished_rows(sigma_cell)
        if any(row["variant"] == SIGMA_REFERENCE for row in sigma_rows):
            lines += [f"## {cell.name}: σ against aux-only", "", comparison_legend(SIGMA_REFERENCE, "accuracy"), ""]
            for label, table in comparisons_by_group(sigma_rows, SIGMA_REFERENCE, "accuracy").items():
                table = [entry for entry in table if entry["method"].split(" ")[0] in SIGMA_METHODS]
                lines += [f"### {label}", "", *comparison_markdown(table, SIGMA_REFERENCE), ""]
        lrs_cell = cell.with_name(f"{cell.name}{LRS_SUFFIX}")
        if (lrs_cell / "runs").is_dir():
            lrs_rows = finished_rows(lrs_cell)
            lines += lr_sections(cell.name, rows + lrs_rows)
            write_runs_csv(lrs_rows, cell / f"evidence{LRS_SUFFIX}_runs.csv")
        (cell / "evidence.md").write_text("\n".join(lines))
        write_runs_csv(rows, cell / "evidence_runs.csv")
        written.append(cell / "evidence.md")
        print("\n".join(lines))
    return written


def lr_sections(name: str, rows: list[dict]) -> list[str]:
    """DoRAN against DoRA at each lr of the grid (both at that lr: nothing selected) and with each method's lr
    chosen on validation over every seed that ran all lrs (instead of the search seeds alone)."""
    from doran_lightning.report.comparisons import comparison_markdown
    from doran_lightning.sweep.results import comparisons_by_group

    rows = [row for row in rows if row["variant"] in ("dora", "doran")]
    lines = [f"## {name}: DoRAN against DoRA at every lr of the grid", "",
             "Both methods at the same lr (no selection), then each at the lr with the best mean validation "
             "accuracy over every seed that ran every lr (validation only; the table above chose on the search "
             "seeds).", ""]
    grid = sorted({row["lr"] for row in rows})
    sections = [(f"lr = {lr:g}", [row for row in rows if row["lr"] == lr]) for lr in grid]
    sections.append(("lr chosen on validation over all seeds", rows))
    for title, members in sections:
        for label, table in comparisons_by_group(members, "dora", "accuracy").items():
            table = [entry for entry in table if entry["method"].split(" ")[0] == "doran"]
            lines += [f"### {title} · {label}", "", *comparison_markdown(table, "dora"),
                      *(f"- lrs: {entry['method']} {entry['lr']}, dora {entry['reference_lr']}" for entry in table),
                      ""]
    return lines


def csv_rows(path: Path) -> list[dict]:
    """Comparison rows from a committed per-run CSV (`evidence_runs.csv` columns); no predictions travel with it."""
    import csv

    from doran_lightning.report.groups import GROUP_FIELDS

    number = lambda text: float(text) if text not in ("", "None") else None  # noqa: E731
    with open(path, newline="", encoding="utf-8") as handle:
        return [{"variant": r["variant"], "setting": r["method"], "lr": float(r["lr"]), "fraction": float(r["fraction"]),
                 "seed": int(r["seed"]), "best_val": number(r["best_val"]), "test": number(r["test"]),
                 "n_test": int(r["n_test"]) if r["n_test"] else None, "group": {f: r[f] for f in GROUP_FIELDS}}
                for r in csv.DictReader(handle)]


def recheck(folder: Path) -> list[str]:
    """The tables of committed per-run CSVs (`<cell>_runs.csv`, with `<cell>_lrs_runs.csv` and `<cell>_sigma…`)
    under today's rules: TOST at ±1 point, Holm across each table's rows. Seeds only: no CSV carries
    per-example predictions, and their test accuracy is the macro number logged before issue 40."""
    from doran_lightning.report.comparisons import comparison_legend, comparison_markdown
    from doran_lightning.sweep.results import comparisons_by_group

    lines = ["Recomputed from the committed per-run CSVs by `python benchmarks/evidence.py --recheck "
             f"{folder}`. These runs predate issue 40: their `test` is the macro accuracy (mean per-class recall) "
             "then logged as `accuracy`, and no per-example predictions were committed, so every interval here "
             "counts seeds only (conditional on the one test set) and no crossed bootstrap can be computed.", "",
             comparison_legend("dora", "accuracy"), ""]
    for path in sorted(folder.glob("*_runs.csv")):
        name = path.name[: -len("_runs.csv")]
        if name.endswith(LRS_SUFFIX) or "_sigma" in name:
            continue
        rows = csv_rows(path)
        lines.append(f"## {name}")
        for label, table in comparisons_by_group(rows, "dora", "accuracy").items():
            lines += ["", *comparison_markdown(table, "dora"), ""]
        lrs = folder / f"{name}{LRS_SUFFIX}_runs.csv"
        if lrs.is_file():
            lines += lr_sections(name, rows + csv_rows(lrs))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once per cell")
    parser.add_argument("--parallel-cells", action="store_true", help="run the cells at the same time")
    parser.add_argument("--minutes", type=float, help="stop starting stages after this long (finished runs stay cached)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--table", action="store_true", help="write the paired tables of the finished runs and exit")
    parser.add_argument("--every-lr", action="store_true",
                        help="after a cell has run: DoRA and DoRAN at the grid's other lrs, same seeds (<cell>_lrs)")
    parser.add_argument("--quiet", action="store_true", help="hide the sweeps' progress lines")
    parser.add_argument("--recheck", type=Path, metavar="FOLDER",
                        help="print the tables of the committed <cell>_runs.csv files in FOLDER under today's rules")
    parser.add_argument("cli_args", nargs="*", help="after `--`: CLI overrides for every run")
    args = parser.parse_args(argv)
    args.failed = []
    if args.table:
        if not args.out.is_dir():
            print(f"evidence: error: --out {args.out}: no such folder (the cells' sweeps write there; run them first)",
                  file=sys.stderr)
            return 2
        from doran_lightning.sweep.plan import SweepError

        try:
            tables(args.out)
        except SweepError as error:  # a cut-short result.json, named
            print(f"evidence: error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.recheck:
        print("\n".join(recheck(args.recheck)))
        return 0
    deadline = None if args.minutes is None else time.time() + 60 * args.minutes
    cells = [CELLS[name] for name in args.cells]
    with ThreadPoolExecutor(len(cells) if args.parallel_cells else 1) as pool:
        list(pool.map(lambda cell: run_cell(cell, args, deadline), cells))
    if args.failed:
        print(f"evidence: error: {len(args.failed)} stage(s) failed ({'; '.join(args.failed)}); see each stage's "
              "output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
