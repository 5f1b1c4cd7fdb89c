"""Which folder a command writes to, and no litter when it fails.

- `fit` (and a `test` / `validate` / `predict` without a checkpoint of a run) claims a fresh ``version_N``
  (`lightning_compat.claim_run_version`).
- `test`, `validate` and `predict` given ``--ckpt_path=<run>/checkpoints/<file>.ckpt`` write inside that
  run: ``<run>/test/``, ``<run>/validate/``, ``<run>/predict/`` (``test_1``, ``test_2``, … when one is
  already there), so predictions and test results sit beside the run they came from. A run folder that cannot
  be written (a read-only copy or mount) is left alone: the command takes a fresh ``version_N`` under
  ``--trainer.default_root_dir`` instead, with a note.
- A command that fails before it produced anything removes the folder it claimed: `fit` before training
  started (bad data, missing weights, bad columns), an evaluation whose folder holds only the files every
  start writes (config, hparams, event files). A folder with a checkpoint is never removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from doran_lightning.console import say
from doran_lightning.lightning_compat import claim_run_version

EVALUATION_STAGES = ("test", "validate", "predict")
# Files every start of a command writes; a folder holding nothing else holds no result.
_START_FILES = ("config.yaml", "hparams.yaml")
_EVENT_PREFIX = "events.out.tfevents"


def checkpoint_run(ckpt_path: Any) -> Path | None:
    """The run folder of ``<run>/checkpoints/<file>.ckpt`` (None for ``best``/``last`` or another layout)."""
    if not isinstance(ckpt_path, (str, Path)) or not Path(ckpt_path).is_file():
        return None
    checkpoint = Path(ckpt_path)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def claim_sub_folder(run: Path, stage: str) -> Path:
    """``run/stage``, or ``run/stage_1``, ``run/stage_2``, …: the first that did not exist (atomic ``mkdir``)."""
    index = 0
    while True:
        folder = run / (stage if index == 0 else f"{stage}_{index}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            index += 1


def writable(folder: Path) -> bool:
    """Whether this process may create entries in `folder` (False on a read-only mount, even for root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def claim_inside_run(run: Path, stage: str) -> Path | None:
    """`claim_sub_folder`, or None (with a note) when the run folder cannot be written."""
    try:
        if writable(run):
            return claim_sub_folder(run, stage)
        reason = "is read-only"
    except OSError as error:
        reason = f"cannot be written ({error.strerror or error})"
    say(f"note: the checkpoint's run folder {run} {reason}: `{stage}` writes to a new version folder under "
        "--trainer.default_root_dir instead")
    return None


def holds_no_result(folder: Path) -> bool:
    """Only what every start writes (config.yaml, hparams.yaml, event files), or nothing."""
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in _START_FILES and not path.name.startswith(_EVENT_PREFIX):
            return False
    return True


class TrainingStarted(pl.Callback):
    """Marks that `fit` reached its first training batch: from then on its folder holds the run's history."""

    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True


class RunFolders:
    """The folders one trainer claimed for its current command, and their removal when it fails early."""

    def __init__(self) -> None:
        self.claimed: list[Path] = []
        self.new_roots: list[Path] = []
        self.marker = TrainingStarted()

    def claim(self, trainer: pl.Trainer, stage: str, ckpt_path: Any = None) -> Path | None:
        """Point the trainer's loggers at this command's folder; return the evaluation folder when there is one.

        Call on rank zero only (other ranks take rank zero's folder; Lightning broadcasts it).
        """
        self.claimed = []
        self.marker.started = False
        run = checkpoint_run(ckpt_path) if stage in EVALUATION_STAGES else None
        loggers = list(trainer.loggers)
        # A root (lightning_logs/) this command creates goes too when its one run folder is discarded.
        self.new_roots = [Path(logger.root_dir) for logger in loggers
                          if getattr(logger, "root_dir", None) and not Path(logger.root_dir).exists()]
        folder = claim_inside_run(run, stage) if run is not None and any(
            _default_tensorboard(logger) for logger in loggers) else None
        if folder is not None:
            self.claimed.append(folder)
            trainer.loggers = [_inside(folder, logger) if _default_tensorboard(logger) else logger
                               for logger in loggers]
            for logger in trainer.loggers:
                claim_run_version(logger)  # a second logger of another kind keeps a version of its own
            return folder
        for logger in loggers:
            before = getattr(logger, "_version", "explicit")
            claim_run_version(logger)
            if before is None and getattr(logger, "log_dir", None):
                self.claimed.append(Path(logger.log_dir))
        return None

    def discard_if_empty(self, stage: str) -> list[Path]:
        """After a failure: remove the claimed folders that hold no result; return those removed."""
        if stage == "fit" and self.marker.started:
            return []  # training ran: its events and checkpoints are the user's evidence
        removed = []
        for folder in self.claimed:
            if folder.is_dir() and holds_no_result(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        for root in self.new_roots:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
        self.claimed = []
        return removed


def _default_tensorboard(logger: Any) -> bool:
    """A TensorBoardLogger whose version nobody chose (the CLI's default, or one configured without a version)."""
    return isinstance(logger, TensorBoardLogger) and getattr(logger, "_version", "explicit") is None


def _inside(folder: Path, logger: TensorBoardLogger) -> TensorBoardLogger:
    """A TensorBoardLogger (the CLI's defaults) whose ``log_dir`` is `folder`: `logger`'s root would be the
    ``lightning_logs`` of the working directory, not the checkpoint's."""
    run = folder.parent
    return TensorBoardLogger(save_dir=str(run.parent), name="", version=run.name, sub_dir=folder.name)
