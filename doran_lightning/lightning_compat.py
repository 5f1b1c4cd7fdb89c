"""Every private Lightning attribute this project relies on, in one place (checked by tests/test_compat.py).

- Mid-epoch resume (`restore_train_loader_position`): `FitLoop._combined_loader_states_to_load` and
  `FitLoop._load_combined_loader_states`. Lightning hands a resumable train loader its saved position
  in `FitLoop.setup_data`, but `configure_optimizers` (via `estimated_stepping_batches`) already ran
  `setup_data` before the checkpoint was restored, so the position would be dropped.
- Checkpoint parsing: `LightningCLI._parse_ckpt_path`, which the CLI overrides to read `--ckpt_path`
  with our safe loader (its own read would fail with a stack trace on a corrupt file) and to merge the
  checkpoint's hyperparameters setting by setting (`resume.py`); it compares against the subcommand's
  defaults, read from `LightningCLI._subcommand_parsers`.
- Run folders (`claim_run_version`): `_version` of TensorBoardLogger / CSVLogger, set to a
  `version_N` claimed with an atomic `mkdir`, so two fits started together in one folder cannot
  both pick the same N (Lightning scans the folder, then creates it later).

`missing_internals()` lists what an upgrade removed; the test turns that into a loud failure.

Why our own `checkpointing.ResumableDataLoader` and not torchdata's `StatefulDataLoader` (checked with
torchdata 0.11.0, installable from PyPI here): Lightning saves and restores either one the same way,
so the private fit-loop call above is needed with both; `StatefulDataLoader` would replace only the
loader class (about 60 lines) at the price of a new dependency pinned to torch releases and of its
own state format inside our checkpoints. Our loader skips already-seen batches without loading them
(the sampler's `fast_forward`) and is what the kill -9 test (tests/test_faults.py) exercises; we did
not run that test with `StatefulDataLoader`, so there is no evidence it would need less of our code.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops import _FitLoop

_VERSION_FOLDER = re.compile(r"version_(\d+)$")


def missing_internals() -> list[str]:
    """Private names we use that this Lightning version lacks (empty when all is well)."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    checks = {
        "_FitLoop._combined_loader_states_to_load": hasattr(trainer.fit_loop, "_combined_loader_states_to_load"),
        "_FitLoop._load_combined_loader_states": callable(getattr(_FitLoop, "_load_combined_loader_states", None)),
        "LightningCLI._parse_ckpt_path": callable(getattr(LightningCLI, "_parse_ckpt_path", None)),
        "LightningCLI._subcommand_parsers": "_subcommand_parsers" in inspect.getsource(LightningCLI._add_subcommands),
    }
    for logger_class in (FabricTensorBoardLogger, FabricCSVLogger):
        logger = logger_class.__new__(logger_class)
        logger_class.__init__(logger, root_dir="unused")
        checks[f"{logger_class.__name__}._version"] = getattr(logger, "_version", "absent") is None
    return [name for name, present in checks.items() if not present]


def subcommand_defaults(cli: LightningCLI, subcommand: str) -> Any:
    """The defaults (a jsonargparse Namespace) of one subcommand's parser: what a setting is when not given."""
    return cli._subcommand_parsers[subcommand].get_defaults()


def restore_train_loader_position(trainer: pl.Trainer) -> bool:
    """Hand a resumed train loader its saved in-epoch position now; False if it could not be applied."""
    fit_loop = trainer.fit_loop
    if not getattr(fit_loop, "_combined_loader_states_to_load", None):
        return True
    fit_loop._load_combined_loader_states()
    return not fit_loop._combined_loader_states_to_load


def finished_run_folder(logger: Any) -> Path | None:
    """The folder a logger given an explicit version (``--trainer.logger.version=0``) would write into, when it
    already holds another run's logs (event files, metrics.csv, hparams.yaml); else None."""
    if getattr(logger, "_version", None) is None or not isinstance(getattr(logger, "log_dir", None), (str, Path)):
        return None  # no folder (fast_dev_run's DummyLogger answers every attribute with a no-op)
    folder = Path(logger.log_dir)
    logs = ("events.out.tfevents.*", "metrics.csv", "hparams.yaml")
    return folder if folder.is_dir() and any(next(folder.glob(pattern), None) for pattern in logs) else None


def claim_run_version(logger: Any) -> None:
    """Give a folder logger without an explicit version the first free `version_N`, created with `mkdir`.

    `mkdir` fails when the folder exists, so concurrent processes never share a version.
    Loggers with an explicit version, or without a version folder, are left alone.
    """
    if getattr(logger, "_version", "explicit") is not None or not hasattr(logger, "root_dir"):
        return
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(match.group(1)) for entry in root.iterdir() if (match := _VERSION_FOLDER.match(entry.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    logger._version = version
