"""Issue 17's screening grid: where DoRAN's σ can act, one switch per point, with the sample-efficiency sweep.

Every grid point is one `benchmarks/sample_efficiency.py` call with its own ``--out`` folder (so that runs of
different σ settings never share a variant label in a report) and the point's overrides after ``--``:

- baselines: ``lora``, ``dora`` (norm detached, DoRA §4.3), ``dora-nodetach`` (norm in the gradient path),
  ``doran`` (DoRAN's shipped defaults: σ0 = 0.01 absolute, detached);
- the grid: detach ∈ {true, false} × σ0/‖W0‖ ∈ {0.01, 0.1, 1} (``sigma_scale: row_norm``) × noise mode
  {learnable, fixed, gaussian}, each for noise-only (``doran-noise``) and DoRAN (``doran``): 36 points,
  named e.g. ``noise-nodetach-gaussian-c0.1``, ``doran-detach-learnable-c1``.

Points run in the order of ``--points`` (default: `DEFAULT_ORDER`, most informative first: where the
Jacobian analysis says σ acts). A finished run is cached by the sweep tool, so the command can be
interrupted and re-run. ``--table`` only reads the finished points' ``results.json`` and prints one table.

    python benchmarks/noise_grid.py --config configs/minilm_text.yaml --fractions 0.3 --lrs 3e-3 \\
        --epochs 3 --seeds 0 1 2 --out benchmarks/results/i17_screen_topics
    python benchmarks/noise_grid.py --out benchmarks/results/i17_screen_topics --table
    python benchmarks/noise_grid.py --out benchmarks/results/i17_screen_topics --table --by-lr   # every lr's runs

The same driver carries points to other tasks (``--points … --fractions 0.3 1.0 --lrs 1e-3 3e-3``: the sweep's
own lr search per point) and runs the lr-sensitivity sweep (``--fractions 1.0 --lrs 3e-3 1e-2 3e-2 1e-1 3e-1
--search-seeds 3``: every lr with every seed); `python -m doran_lightning report <out>/*/runs` then tables and
draws metric vs lr per setting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GridPoint:
    """One σ setting: the sweep's methods and the overrides that make the point."""

    name: str
    methods: tuple[str, ...]
    overrides: tuple[str, ...] = ()


def _adapter(**values: Any) -> tuple[str, ...]:
    return tuple(f"--model.adapter.{key}={str(value).lower() if isinstance(value, bool) else value}"
                 for key, value in values.items())


def grid_point(method: str, detach: bool, relative: float, mode: str) -> GridPoint:
    """Noise-only (``doran-noise``) or DoRAN (``doran``) at one (detach, σ0/‖W0‖, noise mode)."""
    name = f"{'noise' if method == 'doran-noise' else 'doran'}-{'detach' if detach else 'nodetach'}-{mode}-c{relative:g}"
    return GridPoint(name, (method,),
                     _adapter(detach_norm=detach, sigma_scale="row_norm", sigma_init=relative, noise_mode=mode))


BASELINES = {
    "lora": GridPoint("lora", ("lora",)),
    "dora": GridPoint("dora", ("dora",)),
    "dora-nodetach": GridPoint("dora-nodetach", ("dora",), _adapter(detach_norm=False)),
    "doran": GridPoint("doran", ("doran",)),
}
RELATIVE = (1.0, 0.1, 0.01)
MODES = ("learnable", "gaussian", "fixed")
GRID = {point.name: point for method in ("doran-noise", "doran") for detach in (False, True) for mode in MODES
        for relative in RELATIVE for point in [grid_point(method, detach, relative, mode)]}
POINTS = {**BASELINES, **GRID}
# Most informative first: the baselines; noise-only (σ alone) with the norm in the gradient path, where σ sets
# the radial gain, learnable σ at every scale, then the other modes at σ0 = ‖W0‖; the detached control at
# σ0 = ‖W0‖ (the largest row rescaling); DoRAN at the same points; then the rest of the grid.
PRIORITY = (
    *BASELINES,
    "noise-nodetach-learnable-c1", "noise-nodetach-learnable-c0.1", "noise-nodetach-learnable-c0.01",
    "noise-nodetach-gaussian-c1", "noise-nodetach-fixed-c1", "noise-detach-learnable-c1",
    "doran-nodetach-learnable-c1", "doran-nodetach-learnable-c0.1", "doran-nodetach-gaussian-c1",
    "doran-nodetach-fixed-c1", "doran-detach-learnable-c1",
)
DEFAULT_ORDER = (*PRIORITY, *(name for name in POINTS if name not in PRIORITY))


def _sweep_module() -> Any:
    """benchmarks/sample_efficiency.py (the script's folder is on sys.path when run as a script)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import sample_efficiency

    return sample_efficiency


def sweep_argv(point: GridPoint, args: argparse.Namespace) -> list[str]:
    """The sample_efficiency.py arguments of one point."""
    search = ["--search-seeds", str(args.search_seeds)] if args.search_seeds != 1 else []
    return ["--config", args.config, "--methods", *point.methods, "--fractions", *(f"{f:g}" for f in args.fractions),
            "--lrs", *(f"{lr:g}" for lr in args.lrs), *search, "--epochs", str(args.epochs),
            "--seeds", *map(str, args.seeds), "--out", str(args.out / point.name), "--no-report", "--", *point.overrides,
            *args.cli_args]


def _by_seed(results: dict[str, Any], variant: str, field: str = "test",
             fraction: float | None = None) -> dict[int, float]:
    """{seed: value} of the finished runs of `variant` (at `fraction` when given: seeds pair within a fraction)."""
    return {run["spec"]["seed"]: run[field] for run in results["runs"]
            if run["spec"]["variant"] == variant and run.get("status") == "ok" and run.get(field) is not None
            and (fraction is None or run["spec"].get("fraction") == fraction)}


def _paired(values: dict[int, float], baseline: dict[int, float], digits: int = 4) -> str:
    differences = [value - baseline[seed] for seed, value in values.items() if seed in baseline]
    if not differences:
        return "–"
    return f"{statistics.fmean(differences):+.{digits}f} ± {statistics.pstdev(differences):.{digits}f} ({len(differences)})"


def table(out: Path, reference: str = "dora") -> str:
    """One markdown row per (point, variant) from the finished points' results.json.

    Columns: test accuracy mean ± std over seeds; its difference to the `reference` point paired by seed (the
    seed also picks the training subsample, so pairing removes most of the subsample's variance); the same for
    the last logged training loss (a finer sign of whether the setting changed training at all); the radial
    gain at the end (mean over runs); divergences; wall time summed over the point's runs.
    """
    reference_path = out / reference / "results.json"
    reference_results: dict[str, Any] = {"runs": []}
    reference_variant = reference
    if reference_path.is_file():
        reference_results = json.loads(reference_path.read_text())
        reference_variant = reference_results["table"][0]["variant"]
    lines = [f"| point | variant | fraction | lr | test accuracy (mean ± std, n) | Δ test vs {reference}, paired by seed "
             f"| Δ final train loss vs {reference}, paired | radial gain (end) | diverged | wall (s, all runs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in DEFAULT_ORDER:
        path = out / name / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        for row in results["table"]:
            variant, fraction = row["variant"], row.get("fraction")
            runs = [run for run in results["runs"]
                    if run["spec"]["variant"] == variant and run["spec"].get("fraction") == fraction]
            seconds = sum(float(run.get("seconds", 0.0)) for run in runs)
            gains = [run["radial_gain"] for run in runs if run.get("radial_gain") is not None]
            cell = "–" if row["n"] == 0 or not math.isfinite(row["mean"]) else f"{row['mean']:.4f} ± {row['std']:.4f} ({row['n']})"
            delta = _paired(_by_seed(results, variant, fraction=fraction),
                            _by_seed(reference_results, reference_variant, fraction=fraction))
            delta_loss = _paired(_by_seed(results, variant, "final_loss", fraction),
                                 _by_seed(reference_results, reference_variant, "final_loss", fraction))
            gain = "–" if not gains else f"{statistics.fmean(gains):.3f}"
            lines.append(f"| {name} | {variant} | {fraction:g} | {row['lr']:g} | {cell} | {delta} | {delta_loss} | {gain} "
                         f"| {row['diverged']}/{row['runs']} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def _runs_by_lr(point_dir: Path) -> dict[tuple[float, float], dict[int, dict[str, Any]]]:
    """{(fraction, lr): {seed: result}} of every finished run of one point, lr-search runs included."""
    from doran_lightning.sweep.runs import ResultCache

    runs: dict[tuple[float, float], dict[int, dict[str, Any]]] = {}
    for result in ResultCache(point_dir / "runs").finished():
        if result.get("status") == "ok" and result.get("test") is not None:
            key = (float(result.get("fraction", 1.0)), float(result["lr"]))
            runs.setdefault(key, {})[int(result["seed"])] = result
    return runs


def table_by_lr(out: Path, reference: str = "dora") -> str:
    """One markdown row per (point, fraction, lr) over every finished run, lr-search runs included.

    The sweep picks each point's lr on seed 0's validation score; this shows what every lr gave, so that a
    comparison at a common lr and one at each point's own lr can both be read. Columns: test and best-validation
    accuracy, mean ± std over seeds; test paired by seed with the `reference` point at the same fraction and lr.
    """
    reference_runs = _runs_by_lr(out / reference) if (out / reference).is_dir() else {}
    lines = ["| point | fraction | lr | seeds | test accuracy (mean ± std) | best val (mean) | Δ test vs "
             f"{reference} at this lr, paired by seed |", "|---|---|---|---|---|---|---|"]
    for name in DEFAULT_ORDER:
        if not (out / name).is_dir():
            continue
        for (fraction, lr), by_seed in sorted(_runs_by_lr(out / name).items()):
            tests = [run["test"] for run in by_seed.values()]
            vals = [run["best_val"] for run in by_seed.values() if run.get("best_val") is not None]
            baseline = {seed: run["test"] for seed, run in reference_runs.get((fraction, lr), {}).items()}
            delta = _paired({seed: run["test"] for seed, run in by_seed.items()}, baseline) if len(baseline) > 1 else "–"
            lines.append(f"| {name} | {fraction:g} | {lr:g} | {len(tests)} | {statistics.fmean(tests):.4f} ± "
                         f"{statistics.pstdev(tests):.4f} | {statistics.fmean(vals) if vals else math.nan:.4f} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the task's config, e.g. configs/vit_digits_transfer.yaml")
    parser.add_argument("--points", nargs="+", choices=list(POINTS), help="grid points in run order (default: all)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3])
    parser.add_argument("--lrs", nargs="+", type=float,
                        help="lr grid per point (one lr: no search; several: the sweep's search, as its --lrs)")
    parser.add_argument("--search-seeds", type=int, default=1,
                        help="seeds of the lr search (as the sweep's; = len(--seeds) runs every lr with every seed: "
                             "the lr-sensitivity sweep)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="print the table of the finished points and exit")
    parser.add_argument("--by-lr", action="store_true",
                        help="with --table: one row per (point, lr) over every finished run, lr search included")
    parser.add_argument("--dry-run", action="store_true", help="print each point's sweep command and exit")
    parser.add_argument("cli_args", nargs="*", help="after `--`: extra CLI overrides for every run")
    args = parser.parse_args(argv)
    if args.table:
        print(table_by_lr(args.out) if args.by_lr else table(args.out), end="")
        return 0
    if not args.config or not args.lrs:
        parser.error("--config and --lrs are required to run the grid")
    sweep = _sweep_module()
    for name in args.points or DEFAULT_ORDER:
        argv_point = sweep_argv(POINTS[name], args)
        print(f"[{time.strftime('%H:%M:%S')}] point {name}: python benchmarks/sample_efficiency.py "
              f"{' '.join(argv_point)}", flush=True)
        if args.dry_run:
            continue
        started = time.time()
        code = sweep.main(argv_point)
        print(f"[{time.strftime('%H:%M:%S')}] point {name}: exit {code}, {time.time() - started:.0f} s", flush=True)
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "grid.md").write_text(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
