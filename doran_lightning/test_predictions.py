"""Per-example test predictions: ``predictions.csv`` beside the test metrics, for paired statistics.

One row per test example in the test loader's order (``index``, ``target``, ``prediction``): with it two
runs on the same test rows can be compared example by example (`report`'s paired bootstrap over test
examples × seeds). Written by one-process runs; a multi-process test (DDP) writes none, since its
sampler pads and interleaves the rows, and says so.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from doran_lightning.safe_files import atomic_write
from doran_lightning.tags import TEST_PREDICTION_COLUMNS as COLUMNS, TEST_PREDICTIONS  # noqa: F401  (re-exported)


class TestPredictionRecorder(pl.Callback):
    """Collects what `test_step` returns (the predicted class, or the regression value) with its target."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Any, Any]] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if outputs is None or not isinstance(batch, Mapping) or "labels" not in batch or dataloader_idx != 0:
            return
        targets, predictions = batch["labels"].detach().cpu().tolist(), outputs.detach().cpu().tolist()
        start = len(self.rows)
        self.rows.extend((start + i, t, p) for i, (t, p) in enumerate(zip(targets, predictions)))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.rows:
            return
        if trainer.world_size > 1:
            rank_zero_warn("per-example test predictions are written by one-process runs only; this test ran on "
                           f"{trainer.world_size} processes, so no {TEST_PREDICTIONS} was written")
            return
        if trainer.log_dir is None:
            return
        path = Path(trainer.log_dir) / TEST_PREDICTIONS

        def write(temporary: str) -> None:
            with open(temporary, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(COLUMNS)
                writer.writerows(self.rows)

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
