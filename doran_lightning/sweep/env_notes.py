"""What the sweep says about the ``PL_*`` variables its runs inherit (issue 42).

LightningCLI reads ``PL_FIT__<KEY>`` as a setting below the config files and the command line, so in a sweep a
variable naming a field the sweep sets per run (the variant's switches, lr, fraction, seed, epochs, logger, or
an argument after ``--``) is shadowed: one note line names it and what won. Every other one changes every run:
one note says it is inherited and part of each run's cache key (`plan.inherited_env`).
"""

from __future__ import annotations

import argparse

from doran_lightning.adapters.config import VARIANT_SWITCHES
from doran_lightning.sweep.plan import inherited_env

_SUBCOMMAND_PREFIX = "PL_FIT__"


def setting_of(variable: str, prefix: str = _SUBCOMMAND_PREFIX) -> str:
    """``PL_FIT__DATA__INIT_ARGS__FRACTION`` -> ``data.fraction`` (init_args dropped: one name per setting)."""
    parts = [part.lower() for part in variable[len(prefix):].split("__") if part]
    return ".".join(part for part in parts if part != "init_args")


def _shadowing(args: argparse.Namespace) -> dict[str, str]:
    """{setting: what sets it in every run} for the settings the sweep's own arguments fix."""
    methods = list(args.methods)
    winners = {
        "model.lr": "the lr of --lrs (or the search's choice)",
        "data.fraction": f"--fractions ({' '.join(f'{f:g}' for f in args.fractions)})",
        "data.seed": f"--seeds ({' '.join(map(str, args.seeds))})",
        "seed_everything": f"--seeds ({' '.join(map(str, args.seeds))})",
        "trainer.max_epochs": f"--epochs (trainer.max_epochs={args.epochs})",
        "trainer.logger": "the sweep's TensorBoard logger (one folder per run)",
    }
    for field in sorted({field for method in methods for field in VARIANT_SWITCHES[method]}):
        values = ", ".join(f"{method}: {field}={VARIANT_SWITCHES[method].get(field)}" for method in methods)
        winners[f"model.adapter.{field}"] = f"--methods ({values})"
    if any(getattr(args, "task_list", [None])):
        winners["data.task"] = "--tasks"
    for arg in args.cli_args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            winners[key.replace(".init_args.", ".")] = f"-- {key}={value}"
    return winners


def environment_notes(args: argparse.Namespace) -> list[str]:
    """One note line per inherited ``PL_*`` variable: shadowed (naming what won) or inherited (keyed)."""
    winners = _shadowing(args)
    notes = []
    for name, value in inherited_env():
        setting = setting_of(name) if name.startswith(_SUBCOMMAND_PREFIX) else None
        if setting in winners:
            notes.append(f"sweep: note: {name}={value} is shadowed in every run: {setting} is set by {winners[setting]}")
        else:
            notes.append(f"sweep: note: every run inherits {name}={value} from the environment (it is part of each "
                         "run's cache key)")
    return notes
