"""What a sweep runs: `RunSpec` (one run, hashed by content), config lookup and the run grid.

A run is one method variant × task × training fraction × seed × lr on one config, with the same
budget (``max_epochs``) and CLI overrides for every run. Its content hash names its cache folder,
so a re-run of the same command finds every finished run (see ``runs.ResultCache``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from doran_lightning.adapters.config import VARIANT_SWITCHES as ADAPTER_VARIANT_SWITCHES, AdapterConfig
from doran_lightning.adapters.config import variant_labels, variant_switches


def cli_switches(label: str) -> dict[str, str]:
    """The AdapterConfig fields of variant `label` as CLI values (any registered method: `variant_switches`)."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in variant_switches(label).items()}


# AdapterConfig fields per variant label as CLI values (the rule itself lives in adapters.config).
VARIANT_SWITCHES: dict[str, dict[str, str]] = {label: cli_switches(label) for label in ADAPTER_VARIANT_SWITCHES}
DEFAULT_METHODS = ("lora", "dora", "doran", "doran-noise", "doran-aux")
# --targets qkv: the key projection added to the config's q,v targets, per backbone naming.
KEY_TARGETS = {"query": "key", "q_proj": "k_proj"}


class SweepError(Exception):
    """A problem with the sweep's input: printed as one line, exit code 2."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run's outcome; its hash names the cache entry.

    ``task`` is the data module's task (``--data.task``), None to keep the config's own; a spec
    without a task hashes exactly as before the task axis existed, so older caches stay valid.
    ``env``: the ``PL_*`` variables the run inherits (LightningCLI reads ``PL_FIT__…`` as settings); hashed
    only when there are some, so a sweep run without them keeps its older cache.
    """

    variant: str
    fraction: float
    seed: int
    lr: float
    config: str
    config_sha256: str
    max_epochs: int
    extra_args: tuple[str, ...] = ()
    task: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    def _hashed(self, with_config: bool) -> str:
        fields = asdict(self)
        if fields["task"] is None:
            del fields["task"]
        if not fields["env"]:
            del fields["env"]
        if not with_config:
            del fields["config"]  # a moved or second checkout (a worktree) finds its finished runs
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def key(self) -> str:
        """Hash of what decides the outcome: the config's content, not where the checkout lies."""
        return self._hashed(with_config=False)

    @property
    def legacy_key(self) -> str:
        """The key of caches written before the config path left it (read, never written)."""
        return self._hashed(with_config=True)

    @property
    def label(self) -> str:
        """The task column of tables: the data task, else the config's name."""
        return self.task or Path(self.config).stem

    @property
    def version(self) -> str:
        """TensorBoard version dir name: readable, unique per run thanks to the hash."""
        task = f"{self.task}-" if self.task else ""
        return f"{task}f{self.fraction:g}-s{self.seed}-lr{self.lr:g}-{self.key[:8]}"

    def describe(self) -> str:
        task = f" task={self.label}"
        return f"{self.variant}{task} fraction={self.fraction:g} seed={self.seed} lr={self.lr:g}"

    def cli_args(self, subcommand: str, save_dir: Path, sub_dir: str | None = None) -> list[str]:
        """Arguments after `python -m doran_lightning` for `fit` or `test`."""
        switches = cli_switches(self.variant)
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(save_dir), "name": self.variant, "version": self.version, "sub_dir": sub_dir},
        }
        return [
            subcommand,
            "--config", self.config,
            *(f"--model.adapter.{field}={value}" for field, value in switches.items()),
            *([f"--data.task={self.task}"] if self.task else []),
            f"--model.lr={self.lr:g}",
            f"--data.fraction={self.fraction:g}",
            f"--data.seed={self.seed}",  # the subsample changes with the seed too
            f"--seed_everything={self.seed}",
            f"--trainer.max_epochs={self.max_epochs}",
            f"--trainer.logger={json.dumps(logger)}",
            *self.extra_args,
        ]


def shipped_configs() -> Path:
    """The configs that ship inside the package."""
    return Path(str(resources.files("doran_lightning") / "configs"))


def resolve_config(config: str) -> Path:
    """The config file: as given, else among the shipped configs (as `fit --config NAME` finds it)."""
    for candidate in (Path(config), shipped_configs() / config):
        if candidate.is_file():
            return candidate.resolve()
    shipped = sorted(p.name for p in shipped_configs().glob("*.yaml"))
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


def parse_lrs(entries: Sequence[str], methods: Sequence[str]) -> dict[str, list[float]]:
    """``--lrs``: ``1e-3 3e-3`` (every method) and/or ``dora=1e-3,3e-3`` (one method) -> lr grid per method."""
    shared: list[float] = []
    own: dict[str, list[float]] = {}
    for entry in entries:
        method, sep, values = str(entry).rpartition("=") if "=" in str(entry) else ("", "", str(entry))
        if sep and method not in methods:
            raise SweepError(f"--lrs {entry}: {method!r} is not among --methods ({', '.join(methods)})")
        try:
            lrs = [float(value) for value in values.split(",") if value]
        except ValueError:
            raise SweepError(f"--lrs {entry}: expected numbers, e.g. 1e-3 or dora=1e-3,3e-3") from None
        if not lrs or any(lr <= 0 for lr in lrs):
            raise SweepError(f"--lrs {entry}: need learning rates > 0")
        (own.setdefault(method, []) if sep else shared).extend(lrs)
    missing = [m for m in methods if m not in own and not shared]
    if missing:
        raise SweepError(f"--lrs: no learning rate for {', '.join(missing)}; give plain values or method=lr entries")
    return {m: list(dict.fromkeys(own.get(m, shared))) for m in methods}


def check_methods(methods: Sequence[str]) -> None:
    known = variant_labels()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SweepError(f"--methods {' '.join(unknown)}: unknown variant; known: {', '.join(known)}")


def plan_runs(
    variants: Sequence[str], fractions: Sequence[float], seeds: Sequence[int], lr_by_variant: dict[Any, float],
    tasks: Sequence[str | None] = (None,), **common: Any,
) -> list[RunSpec]:
    """Runs for every variant × task × fraction × seed at the chosen lr.

    ``lr_by_variant`` maps a variant, or a ``(variant, task)`` pair when the lr was searched per task.
    ``common``: the other RunSpec fields (config, config_sha256, max_epochs, extra_args).
    """
    return [
        RunSpec(variant=v, fraction=f, seed=s, lr=lr_by_variant.get((v, t), lr_by_variant.get(v)), task=t, **common)
        for v in variants
        for t in tasks
        for f in fractions
        for s in seeds
    ]


def plan_search(variants: Sequence[str], lrs: Sequence[float] | dict[str, Sequence[float]], fraction: float,
                seeds: Sequence[int], tasks: Sequence[str | None] = (None,), **common: Any) -> list[RunSpec]:
    """The lr-search runs: every variant × its lrs × task at one fraction and the search seeds."""
    grid = lrs if isinstance(lrs, dict) else dict.fromkeys(variants, lrs)
    return [RunSpec(variant=v, fraction=fraction, seed=s, lr=lr, task=t, **common)
            for v in variants for lr in grid[v] for t in tasks for s in seeds]


def config_lr(config: Path) -> float:
    """The lr a config trains with: its ``model.lr`` (or ``model.init_args.lr``), else DoranModule's default."""
    model = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model") or {}
    lr = (model.get("init_args") or model).get("lr") if isinstance(model, dict) else None
    if lr is None:
        import inspect

        from doran_lightning.module import DoranModule

        lr = inspect.signature(DoranModule).parameters["lr"].default
    try:
        return float(lr)
    except (TypeError, ValueError):
        raise SweepError(f"{config.name}: model.lr is {lr!r}, not a number") from None


def config_fields(config: Path, max_epochs: int, extra_args: Sequence[str]) -> dict[str, Any]:
    """The RunSpec fields shared by every run of one config."""
    return {"config": str(config), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "max_epochs": max_epochs, "extra_args": tuple(extra_args), "env": inherited_env()}


# Set by Lightning's own `seed_everything` in the process that seeds (the seed is a field of the spec already).
_LIGHTNING_SET = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def inherited_env(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The ``PL_*`` variables every run inherits, sorted: LightningCLI reads ``PL_FIT__…`` as settings, so they
    change what a run is and belong in its cache key."""
    environ = os.environ if environ is None else environ
    return tuple(sorted((name, value) for name, value in environ.items()
                        if name.startswith("PL_") and name not in _LIGHTNING_SET))


def spec_from_dict(fields: Mapping[str, Any]) -> RunSpec:
    """A RunSpec from its JSON form (``result.json``'s ``spec``: tuples came back as lists)."""
    return RunSpec(**{**fields, "extra_args": tuple(fields.get("extra_args", ())),
                      "env": tuple(tuple(pair) for pair in fields.get("env", ()))})


def refuse_switch_overrides(methods: Sequence[str], cli_args: Sequence[str]) -> None:
    """An argument after ``--`` (or a ``--config`` there) that sets a field `--methods` sets per run (method, noise,
    aux, …) would train another variant under the label's name: refused, naming the argument."""
    switches = sorted({field for method in methods for field in ADAPTER_VARIANT_SWITCHES[method]})
    for index, arg in enumerate(cli_args):
        key = arg.split("=", 1)[0]
        for prefix in ("--model.adapter.", "--model.init_args.adapter."):
            field = key[len(prefix):] if key.startswith(prefix) else None
            if field in switches:
                raise SweepError(f"-- {arg}{'' if '=' in arg else ' …'}: --methods {' '.join(methods)} sets "
                                 f"model.adapter.{field} for each run (the variant's label), and this would "
                                 "override it, training one variant under another's name; choose the variant "
                                 "with --methods")
        if key in ("--model.adapter", "--model.init_args.adapter"):
            raise SweepError(f"-- {key}=…: --methods {' '.join(methods)} sets the adapter's variant fields "
                             f"({', '.join(switches)}); give other adapter settings one by one "
                             "(--model.adapter.r=16)")
        config = arg[len("--config="):] if arg.startswith("--config=") else (
            cli_args[index + 1] if arg == "--config" and index + 1 < len(cli_args) else None)
        if config and Path(config).is_file():
            content = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
            model = content.get("model") if isinstance(content, dict) else None
            model = (model.get("init_args") or model) if isinstance(model, dict) else {}
            adapter = model.get("adapter") if isinstance(model, dict) else None
            adapter = (adapter.get("init_args") or adapter) if isinstance(adapter, dict) else {}
            clash = sorted(set(adapter) & set(switches)) if isinstance(adapter, dict) else []
            if clash:
                raise SweepError(f"-- --config {config}: sets model.adapter.{clash[0]}, which --methods "
                                 f"{' '.join(methods)} sets for each run; it would train one variant under another's "
                                 "name — remove it there and choose the variant with --methods")
