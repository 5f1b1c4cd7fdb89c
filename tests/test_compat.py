"""Lightning internals we depend on (doran_lightning.lightning_compat) and run folders of concurrent fits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_fit_args
from lightning.pytorch.loggers import TensorBoardLogger

from doran_lightning.lightning_compat import claim_run_version, missing_internals


def test_lightning_still_has_the_private_names_we_use():
    assert missing_internals() == [], ("A Lightning upgrade changed internals that mid-epoch resume, checkpoint "
                                       "parsing or run folders rely on: adapt doran_lightning/lightning_compat.py")


def test_claimed_versions_are_unique_and_explicit_ones_kept(tmp_path: Path):
    (tmp_path / "lightning_logs" / "version_3").mkdir(parents=True)
    loggers = [TensorBoardLogger(tmp_path) for _ in range(2)]
    for logger in loggers:
        claim_run_version(logger)
    assert [logger.version for logger in loggers] == [4, 5]
    explicit = TensorBoardLogger(tmp_path, version="mine")
    claim_run_version(explicit)
    assert explicit.version == "mine" and not (tmp_path / "lightning_logs" / "mine").exists()


@pytest.mark.slow
def test_two_fits_started_together_in_one_folder_get_their_own_run_folders(tmp_path: Path):
    command = [sys.executable, "-m", "doran_lightning", *tiny_fit_args(tmp_path, "--trainer.limit_val_batches=0",
                                                                       steps_per_epoch=1)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    folders = sorted((tmp_path / "lightning_logs").iterdir())
    assert [folder.name for folder in folders] == ["version_0", "version_1"]
    for folder in folders:  # each run wrote its own events and checkpoint, nothing shared
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        assert [p.name for p in (folder / "checkpoints").iterdir()] and (folder / "config.yaml").is_file()
