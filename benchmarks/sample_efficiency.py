"""Sample-efficiency sweep: method variants × training fractions × seeds, with a per-method lr search.

Every run launches the project's CLI (`python -m doran_lightning fit …`, then `test …` on the
checkpoint it wrote) with the same config and budget; only the variant, lr, fraction and seed change.
A run's results are cached under ``<out>/runs/<variant>/<config hash>/result.json``: re-running the
command skips finished runs and restarts unfinished ones, so a sweep can be interrupted and resumed.

1. lr search: each variant at ``--search-fraction`` (default: the largest fraction) and
   ``--search-seeds`` over ``--lrs``; the lr with the best mean validation metric wins per variant.
2. Final runs: each variant at its lr, for every fraction and seed (search runs are reused).
3. ``results.json`` / ``results.md``: test metric mean ± std over seeds per variant and fraction,
   and a `report` (figures) over all runs.

Budget: every run gets the same ``--epochs`` (so a smaller fraction also means fewer steps) and the
same config; pass further overrides after ``--``. A stress setting (divergence counts per method) is
the same sweep with e.g. ``--lrs 0.05 --fractions 0.1 -- --model.adapter.r=1``; the report's
"diverged" column counts the runs.

Ablations are one switch each: ``--methods`` takes doran-noise / doran-aux (one part off), doran-fixed /
doran-gaussian (noise modes), doran-model (one generator for all blocks); ``--targets qkv`` adapts the key
projection too, for every method (``qkv[q,k,v]`` on timm ViTs, ``key`` on BERT, ``k_proj`` on LLaMA).

Example (a few minutes on a laptop CPU):
    python benchmarks/sample_efficiency.py --config vit_tiny_digits.yaml --quick --out runs/quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from doran_lightning import report
from doran_lightning.adapters import AdapterConfig
from doran_lightning.adapters.config import VARIANT_SWITCHES as ADAPTER_VARIANT_SWITCHES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# AdapterConfig fields per variant label as CLI values (the rule itself lives in adapters.config).
VARIANT_SWITCHES: dict[str, dict[str, str]] = {
    label: {key: value if isinstance(value, str) else json.dumps(value) for key, value in switches.items()}
    for label, switches in ADAPTER_VARIANT_SWITCHES.items()
}
DEFAULT_METHODS = ("lora", "dora", "doran", "doran-noise", "doran-aux")
# --targets qkv: the key projection added to the config's q,v targets, per backbone naming.
KEY_TARGETS = {"query": "key", "q_proj": "k_proj"}
DEFAULT_FRACTIONS = (0.1, 0.3, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LRS = (1e-3, 3e-3, 1e-2)
# --quick: one short pass through the whole pipeline, not a measurement.
QUICK_LIMITS = (
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# A launcher runs one CLI call (argument list after `python -m doran_lightning`) and returns its exit code.
Launcher = Callable[[list[str], Path], int]


class SweepError(Exception):
    """A problem with the sweep's input: printed as one line, exit code 2."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run's outcome; its hash names the cache entry."""

    variant: str
    fraction: float
    seed: int
    lr: float
    config: str
    config_sha256: str
    max_epochs: int
    extra_args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Hash of what decides the outcome: the config's content, not where the checkout lies."""
        fields = asdict(self)
        del fields["config"]  # a moved or second checkout (a worktree) finds its finished runs
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def legacy_key(self) -> str:
        """The key of caches written before the config path left it (read, never written)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def version(self) -> str:
        """TensorBoard version dir name: readable, unique per run thanks to the hash."""
        return f"f{self.fraction:g}-s{self.seed}-lr{self.lr:g}-{self.key[:8]}"

    def cli_args(self, subcommand: str, save_dir: Path, sub_dir: str | None = None) -> list[str]:
        """Arguments after `python -m doran_lightning` for `fit` or `test`."""
        switches = VARIANT_SWITCHES[self.variant]
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(save_dir), "name": self.variant, "version": self.version, "sub_dir": sub_dir},
        }
        return [
            subcommand,
            "--config", self.config,
            *(f"--model.adapter.{field}={value}" for field, value in switches.items()),
            f"--model.lr={self.lr:g}",
            f"--data.fraction={self.fraction:g}",
            f"--data.seed={self.seed}",  # the subsample changes with the seed too
            f"--seed_everything={self.seed}",
            f"--trainer.max_epochs={self.max_epochs}",
            f"--trainer.logger={json.dumps(logger)}",
            *self.extra_args,
        ]


def resolve_config(config: str) -> Path:
    """The config file: as given, else under the project's shipped ``configs/``."""
    for candidate in (Path(config), PROJECT_ROOT / "configs" / config):
        if candidate.is_file():
            return candidate.resolve()
    shipped = sorted(p.name for p in (PROJECT_ROOT / "configs").glob("*.yaml"))
    raise SweepError(f"--config {config}: no such file here or in configs/ (shipped: {', '.join(shipped) or 'none'})")


def with_key_targets(config: Path) -> list[str]:
    """The config's adapter targets with the key projection added: ``qkv[q,k,v]``, or key / k_proj."""
    adapter = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("adapter") or {}
    targets = adapter.get("target_modules")
    if not isinstance(targets, list):
        raise SweepError(f"--targets qkv: {config.name} must list model.adapter.target_modules (got {targets!r})")
    fused = adapter.get("fused_modules") or AdapterConfig().fused_modules
    result: list[str] = []
    for target in targets:
        prefix, _, leaf = target.rpartition(".")
        fused_name = leaf.partition("[")[0]
        if "[" in leaf and fused_name in fused:  # a fused projection: adapt every slice (q,k,v)
            result.append(target.partition("[")[0] + f"[{','.join(fused[fused_name])}]")
            continue
        result.append(target)
        if leaf in KEY_TARGETS:
            result.append(f"{prefix}.{KEY_TARGETS[leaf]}" if prefix else KEY_TARGETS[leaf])
    if result == targets:
        raise SweepError(f"--targets qkv: no query projection ({', '.join(KEY_TARGETS)} or a fused slice) "
                         f"among {targets} in {config.name}")
    return result


def plan_runs(
    variants: Sequence[str], fractions: Sequence[float], seeds: Sequence[int], lr_by_variant: dict[str, float], **common: Any
) -> list[RunSpec]:
    """Runs for every variant × fraction × seed at the variant's lr (``common``: the other RunSpec fields)."""
    return [
        RunSpec(variant=v, fraction=f, seed=s, lr=lr_by_variant[v], **common)
        for v in variants
        for f in fractions
        for s in seeds
    ]


def plan_search(variants: Sequence[str], lrs: Sequence[float], fraction: float, seeds: Sequence[int], **common: Any) -> list[RunSpec]:
    """The lr-search runs: every variant × lr at one fraction and the search seeds."""
    return [RunSpec(variant=v, fraction=fraction, seed=s, lr=lr, **common) for v in variants for lr in lrs for s in seeds]


class ResultCache:
    """``<root>/<variant>/<key>/``: the run's logs and, once it finished, ``result.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_dir(self, spec: RunSpec) -> Path:
        legacy = self.root / spec.variant / spec.legacy_key
        return legacy if (legacy / "result.json").is_file() else self.root / spec.variant / spec.key

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        path = self.run_dir(spec) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def store(self, spec: RunSpec, result: dict[str, Any]) -> None:
        path = self.run_dir(spec) / "result.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(path)  # atomic: a crash never leaves a half-written result that would be skipped


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `fit` kept: a monitored/best one when present, else ``last.ckpt``."""
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    named = [p for p in checkpoints if not p.name.startswith("last")]
    return (named or checkpoints or [None])[-1]


def subprocess_launcher() -> Launcher:
    """Run `python -m doran_lightning …` from the project root, output to ``<run>/<subcommand>.log``."""

    def launch(cli_args: list[str], run_dir: Path) -> int:
        env = {**os.environ, **{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}}
        with open(run_dir / f"{cli_args[0]}.log", "w") as log:
            return subprocess.call(
                [sys.executable, "-m", "doran_lightning", *cli_args], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    return launch


def execute(spec: RunSpec, cache: ResultCache, launch: Launcher, metric: str | None) -> dict[str, Any]:
    """Fit, test and summarise one run, or return its cached result."""
    cached = cache.load(spec)
    if cached is not None:
        return cached
    run_dir = cache.run_dir(spec)
    if run_dir.exists():  # an interrupted earlier attempt: start clean so its logs do not mix in
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    started = time.time()
    failure = None
    if launch(spec.cli_args("fit", run_dir), run_dir) != 0:
        failure = f"fit failed, see {run_dir / 'fit.log'}"
    else:
        checkpoint = find_checkpoint(run_dir)
        test_args = spec.cli_args("test", run_dir, sub_dir="test") + ([f"--ckpt_path={checkpoint}"] if checkpoint else [])
        if launch(test_args, run_dir) != 0:
            failure = f"test failed, see {run_dir / 'test.log'}"
    result: dict[str, Any] = {"key": spec.key, "spec": asdict(spec), "seconds": round(time.time() - started, 1)}
    if failure:
        return {**result, "status": "failed", "error": failure}  # not cached: the next invocation retries it
    version_dir = run_dir / spec.variant / spec.version
    run = report.load_run(version_dir, [version_dir, version_dir / "test"])
    if "train/loss" not in run.scalars:
        return {**result, "status": "failed", "error": f"{version_dir}: no train/loss logged"}
    chosen = report.choose_metric([run], metric)
    result.update(status="ok", metric=chosen, **report.run_stability(run, chosen, spike_factor=report.SPIKE_FACTOR,
                                                                  spike_window=report.SPIKE_WINDOW))
    cache.store(spec, result)
    return result


def score(result: dict[str, Any]) -> float:
    """Validation score used for the lr choice (higher is better; failed or diverged runs rank last)."""
    value = result.get("best_val")
    if result.get("status") != "ok" or result.get("diverged") or value is None or not math.isfinite(value):
        return -math.inf
    return float(value)


def select_lrs(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per variant, the lr with the best mean validation score over its search seeds."""
    by_variant: dict[str, dict[float, list[float]]] = {}
    for result in results:
        spec = result["spec"]
        by_variant.setdefault(spec["variant"], {}).setdefault(spec["lr"], []).append(score(result))
    return {
        variant: max(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr))
        for variant, by_lr in by_variant.items()
    }


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, fraction): test metric (best val when no test) mean ± std over seeds."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        cells.setdefault((result["spec"]["variant"], result["spec"]["fraction"]), []).append(result)
    rows = []
    for (variant, fraction), members in sorted(cells.items(), key=lambda item: (report.variant_rank(item[0][0]), item[0][1])):
        ok = [r for r in members if r.get("status") == "ok"]
        source = "test" if any(r.get("test") is not None for r in ok) else "best_val"
        mean, std, count = report.mean_std(r.get(source) for r in ok)
        rows.append({
            "variant": variant, "fraction": fraction, "lr": members[0]["spec"]["lr"], "source": source,
            "mean": mean, "std": std, "n": count, "runs": len(members), "failed": len(members) - len(ok),
            "diverged": sum(bool(r.get("diverged")) for r in ok),
            "seeds": sorted(r["spec"]["seed"] for r in members),
        })
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], metric: str, command: str) -> str:
    fractions = sorted({row["fraction"] for row in rows})
    by_cell = {(row["variant"], row["fraction"]): row for row in rows}
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lines = [
        f"Made by: `{command}`",
        "",
        f"{metric} (mean ± std over seeds; n runs; diverged runs marked) by training fraction:",
        "",
        "| variant | lr | " + " | ".join(f"{f:g}" for f in fractions) + " |",
        "|---|---|" + "---|" * len(fractions),
    ]
    for variant in variants:
        cells = []
        for fraction in fractions:
            row = by_cell.get((variant, fraction))
            if row is None or row["n"] == 0:
                cells.append("–" if row is None else f"failed ({row['failed']})")
                continue
            note = f", {row['diverged']} diverged" if row["diverged"] else ""
            note += f", {row['failed']} failed" if row["failed"] else ""
            cells.append(f"{row['mean']:.4f} ± {row['std']:.4f} (n={row['n']}{note})")
        lr = next(row["lr"] for row in rows if row["variant"] == variant)
        lines.append(f"| {variant} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config file or a shipped config name, e.g. minilm_text.yaml")
    parser.add_argument("--methods", nargs="+", choices=list(VARIANT_SWITCHES), default=list(DEFAULT_METHODS),
                        help=f"variants (default {' '.join(DEFAULT_METHODS)}); ablations: doran-fixed, "
                             "doran-gaussian (noise modes), doran-model (aux scope)")
    parser.add_argument("--targets", choices=("config", "qkv"), default="config",
                        help="adapted projections: the config's (q,v), or qkv (adds the key projection for every method)")
    parser.add_argument("--fractions", nargs="+", type=float, help=f"training fractions (default {DEFAULT_FRACTIONS})")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"seeds (default {DEFAULT_SEEDS}; --quick: 0)")
    parser.add_argument("--lrs", nargs="+", type=float, help=f"lr grid searched per method (default {DEFAULT_LRS})")
    parser.add_argument("--search-fraction", type=float, help="fraction of the lr search (default: the largest)")
    parser.add_argument("--search-seeds", type=int, default=1, help="how many of the seeds the lr search uses (default 1)")
    parser.add_argument("--epochs", type=int, help="trainer.max_epochs, the same budget for every run (default 10; --quick: 1)")
    parser.add_argument("--metric", help="validation/test metric name (default: the run's, e.g. accuracy)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_efficiency"))
    parser.add_argument("--quick", action="store_true", help="smoke pass: 1 epoch, 3 batches, seed 0, fractions 0.1 and 1, first lr")
    parser.add_argument("--jobs", type=int, default=1, help="runs launched at once (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned commands and exit")
    parser.add_argument("--no-report", action="store_true", help="skip the figures of `doran_lightning report`")
    parser.add_argument("cli_args", nargs="*", help="after `--`: extra CLI overrides for every run, e.g. -- --trainer.accelerator=gpu")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the defaults, or from --quick's smaller ones."""
    args.fractions = args.fractions or ([0.1, 1.0] if args.quick else list(DEFAULT_FRACTIONS))
    args.seeds = args.seeds or ([0] if args.quick else list(DEFAULT_SEEDS))
    args.lrs = args.lrs or ([DEFAULT_LRS[0]] if args.quick else list(DEFAULT_LRS))
    args.epochs = args.epochs or (1 if args.quick else 10)
    args.search_fraction = args.search_fraction or max(args.fractions)
    if not all(0 < f <= 1 for f in [*args.fractions, args.search_fraction]):
        raise SweepError("--fractions and --search-fraction must lie in (0, 1]")
    if any(lr <= 0 for lr in args.lrs) or args.epochs < 1 or not 1 <= args.search_seeds <= len(args.seeds):
        raise SweepError("need --lrs > 0, --epochs >= 1 and 1 <= --search-seeds <= number of --seeds")
    if args.quick:
        args.cli_args = [*QUICK_LIMITS, *args.cli_args]
    return args


def run_sweep(args: argparse.Namespace, launch: Launcher | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Search lrs, run every variant × fraction × seed, write results; return the results dict."""
    config = resolve_config(args.config)
    targets = [f"--model.adapter.target_modules={json.dumps(with_key_targets(config))}"] if args.targets == "qkv" else []
    common = {"config": str(config), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
              "max_epochs": args.epochs, "extra_args": (*targets, *args.cli_args)}
    cache = ResultCache(args.out / "runs")
    launch = launch or subprocess_launcher()
    search_specs = plan_search(args.methods, args.lrs, args.search_fraction, args.seeds[: args.search_seeds], **common)
    if args.dry_run:
        specs = search_specs if len(args.lrs) > 1 else plan_runs(args.methods, args.fractions, args.seeds, dict.fromkeys(args.methods, args.lrs[0]), **common)
        for spec in specs:
            state = "cached" if cache.load(spec) else "to run"
            log(f"[{state}] python -m doran_lightning {' '.join(spec.cli_args('fit', cache.run_dir(spec)))}")
        if len(args.lrs) > 1:
            log(f"... then {len(args.methods) * len(args.fractions) * len(args.seeds)} final runs at each method's chosen lr")
        return {}

    def run_one(index: int, spec: RunSpec, total: int, phase: str) -> dict[str, Any]:
        cached = cache.load(spec) is not None
        result = execute(spec, cache, launch, args.metric)
        status = "cached" if cached else f"{result['status']} in {result['seconds']}s"
        log(f"{phase} {index}/{total} {spec.variant} fraction={spec.fraction:g} seed={spec.seed} lr={spec.lr:g}: {status}"
            + (f" ({result['error']})" if result["status"] != "ok" else ""))
        return result

    def run_all(specs: list[RunSpec], phase: str) -> list[dict[str, Any]]:
        # Runs are independent processes: with --jobs > 1 several share the machine (e.g. one GPU).
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, index, spec, len(specs), phase) for index, spec in enumerate(specs, 1)]
            return [future.result() for future in futures]

    lr_by_variant = dict.fromkeys(args.methods, args.lrs[0])
    search_results: list[dict[str, Any]] = []
    if len(args.lrs) > 1:
        search_results = run_all(search_specs, "lr search")
        lr_by_variant = select_lrs(search_results)
        log("chosen lrs: " + ", ".join(f"{v}={lr:g}" for v, lr in lr_by_variant.items()))
    final_results = run_all(plan_runs(args.methods, args.fractions, args.seeds, lr_by_variant, **common), "run")
    metric = next((r["metric"] for r in final_results if r.get("metric")), args.metric or "metric")
    rows = aggregate(final_results)
    command = getattr(args, "command", "python benchmarks/sample_efficiency.py")
    summary = {"command": command, "metric": metric, "lr_by_variant": lr_by_variant, "table": rows,
               "lr_search": search_results, "runs": final_results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "results.md").write_text(markdown_table(rows, metric, command))
    if not args.no_report:  # only this sweep's runs: the cache may hold runs of other settings
        run_dirs = [str(cache.root / r["spec"]["variant"] / r["key"]) for r in [*search_results, *final_results] if r["status"] == "ok"]
        if run_dirs:
            # The sweep owns its report folder: a resumed sweep replaces it whole.
            report.main([*dict.fromkeys(run_dirs), "--out", str(args.out / "report"), "--overwrite"])
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/sample_efficiency.py", *argv])
    try:
        summary = run_sweep(resolve_defaults(args))
    except SweepError as error:
        print(f"sample_efficiency: error: {error}", file=sys.stderr)
        return 2
    if summary:
        print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
