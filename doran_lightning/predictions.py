"""`predict`'s output: one row per input in ``predictions.csv`` and ``predictions.jsonl``.

`PredictionWriter` is a Lightning `BasePredictionWriter`: Lightning hands it each batch's output of
`DoranModule.predict_step` with the dataset indices of the batch; it turns them into rows and, when the
epoch ends, writes both files atomically (temporary file, fsync, rename) into the run folder (or the
``--out`` folder) and prints where, with the count. A row holds:

- ``id``: the input's file path (image folders) or its row number (0-based, in file order);
- ``input`` (text tasks): the input text as read (the instruction for causal LM); a text pair, or an instruction
  with an input, adds ``input_2``. Image rows need none: their ``id`` is the file path;
- classification: ``label`` (the predicted class name) and ``p_<class name>`` per class (they sum to 1;
  JSONL nests them under ``probabilities``);
- regression: ``value``; causal LM: ``answer`` (the generated text).

Under DDP every rank predicts a share; rank zero gathers the rows, drops the sampler's padding
duplicates and writes them in dataset order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Subset

from doran_lightning.safe_files import atomic_write
from doran_lightning.console import say

FILE_STEM = "predictions"


def example_id(dataset: Any, index: int) -> Any:
    """The id of `dataset[index]`: its ``ids`` entry (e.g. an image path) when it has them, else the index."""
    ids = getattr(dataset, "ids", None)
    return ids[index] if ids is not None else index


def example_input(dataset: Any, index: int) -> dict[str, str]:
    """The ``input`` (and ``input_2``) columns of `dataset[index]`: its text as read, when it is a text dataset."""
    if isinstance(dataset, Subset):  # a subsample of a split: its own index into the full one
        return example_input(dataset.dataset, int(dataset.indices[index]))
    texts = dataset.input_texts(index) if hasattr(dataset, "input_texts") else ()
    return {("input" if number == 0 else f"input_{number + 1}"): text for number, text in enumerate(texts)}


def prediction_rows(task: str, label_names: Sequence[str], output: Any, ids: Sequence[Any],
                    inputs: Sequence[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Rows of one batch: `output` is `predict_step`'s (probabilities [B, C], values [B] or texts); `inputs`, the
    `example_input` columns of each row, come right after its id."""
    heads = [{"id": id_, **columns} for id_, columns in zip(ids, inputs or [{}] * len(ids))]
    if task == "causal_lm":
        return [{**head, "answer": text.strip()} for head, text in zip(heads, output)]
    values = output.detach().float().cpu()
    if values.dim() == 1:  # regression
        return [{**head, "value": float(value)} for head, value in zip(heads, values.tolist())]
    rows = []
    for head, probabilities in zip(heads, values.tolist()):
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        rows.append({**head, "label": label_names[best], "probabilities": dict(zip(label_names, probabilities))})
    return rows


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row as CSV columns: ``probabilities`` becomes one ``p_<name>`` column per class."""
    flat = {key: value for key, value in row.items() if key != "probabilities"}
    flat.update({f"p_{name}": value for name, value in row.get("probabilities", {}).items()})
    return flat


def prediction_files(folder: Path) -> tuple[Path, Path]:
    """The two files `predict` writes into `folder`."""
    return folder / f"{FILE_STEM}.csv", folder / f"{FILE_STEM}.jsonl"


def check_prediction_folder(folder: Path, overwrite: bool, predict_file: str | None = None) -> None:
    """Refuse, before anything runs, an `--out` that is a file, that holds the predict file being read, or that
    already holds predictions (unless `overwrite`): earlier predictions are someone's work."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out={folder} is a file; give a folder for {FILE_STEM}.csv and {FILE_STEM}.jsonl")
    existing = [path for path in prediction_files(folder) if path.exists()]
    source = Path(predict_file).resolve() if predict_file else None
    for path in existing:
        if source is not None and path.resolve() == source:
            raise ValueError(f"--out={folder}: {path} is the predict file being read; choose another folder")
    if existing and not overwrite:
        raise ValueError(f"--out={folder} already holds {existing[0].name}; pass --overwrite=true to replace the "
                         "predictions there, or choose another folder")


def write_predictions(rows: list[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``predictions.jsonl`` into `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = prediction_files(folder)
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row)) or ["id"]  # input_2 on some rows only

    def write_csv(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)

    def write_jsonl(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    atomic_write(csv_path, write_csv)
    atomic_write(jsonl_path, write_jsonl)
    return csv_path, jsonl_path


class PredictionWriter(BasePredictionWriter):
    """Collects `predict_step` outputs as rows and writes them when the prediction epoch ends.

    Args:
        out: folder for the two files; None: the run folder (``trainer.log_dir``).
    """

    def __init__(self, out: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")  # rows are kept, not Lightning's per-epoch tensor list
        self.out = None if out is None else Path(out)
        self.rows: list[tuple[int, dict[str, Any]]] = []  # (dataset index, row)
        self.written: tuple[Path, Path] | None = None
        self._count = 0

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows, self.written = [], None

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        if batch_indices is None or not len(batch_indices):  # a loader Lightning cannot track: count
            start = len(self.rows)
            batch_indices = list(range(start, start + len(prediction)))
        ids = [example_id(loader.dataset, index) for index in batch_indices]
        inputs = [example_input(loader.dataset, index) for index in batch_indices]
        rows = prediction_rows(pl_module.hparams.task, pl_module.label_names, prediction, ids, inputs)
        self.rows.extend(zip(batch_indices, rows))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        # trainer.log_dir is a collective call under DDP: every rank asks for it.
        folder = self.out if self.out is not None else Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        unique = dict(sorted(rows, key=lambda item: item[0]))  # DistributedSampler pads with repeats
        self.written = write_predictions(list(unique.values()), folder)
        self._count = len(unique)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After the progress bar's last line (the bar closes in its own teardown, earlier in the list).
        if stage == "predict" and self.written is not None:
            say(f"Wrote {self._count} predictions to {self.written[0]} and {self.written[1].name}")
