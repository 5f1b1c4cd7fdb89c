"""Shared pieces of every DataModule: the base class, subsampling, offline checks, error helpers."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from doran_lightning.console import say
from doran_lightning.domains import check_number
from doran_lightning.hub import cache_only_when_offline, hub_reachable  # noqa: F401  (their home is hub.py)

SPLITS_FOR_STAGE: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}
STAGE_OF_SPLIT = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
# The draw of `val_from_train`'s held-out rows: fixed, so every seed and method validates on the same rows.
VALIDATION_SEED = 12345


class DataError(ValueError):
    """A problem with the user's data; the message names the file (and line) to fix."""


def data_error(source: str | os.PathLike, message: str, line: int | None = None) -> DataError:
    """Build a DataError whose message starts with ``file[:line]``."""
    where = f"{source}:{line}" if line is not None else str(source)
    return DataError(f"{where}: {message}")


def require_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    """Return ``path`` as a Path, or fail naming it and what should be there."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} folder {folder} is a file, not a folder ({hint})")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder} ({hint})")
    return folder


def require_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    """Return ``path`` as a Path, or fail naming it and what should be there."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"{what} file {file} is a folder, not a file ({hint})")
    if file.exists() and not file.is_file():  # a device, pipe or socket (or a link to one): it is there
        target = f" (a link to {os.path.realpath(file)})" if file.is_symlink() else ""
        raise ValueError(f"{what} file {file}{target} is not a regular file but a device, pipe or socket; "
                         f"give a file of data ({hint})")
    if not file.is_file():
        raise FileNotFoundError(f"{what} file not found: {file} ({hint})")
    return file


def path_inside(root: Path, entry: str, source: str | os.PathLike, line: int | None = None) -> Path:
    """``root / entry`` for a relative path read from a data file; absolute or ``..``-escaping entries fail.

    Checked on the text, before the file system is touched, so the error never tells whether a
    file outside the dataset exists.
    """
    relative = entry.strip()
    if "\x00" in relative:
        raise data_error(source, f"path {relative!r} holds a NUL byte; is the file binary or corrupt?", line)
    if os.path.isabs(relative) or PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        raise data_error(source, f"path {relative!r} is absolute; list paths relative to {root}", line)
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise data_error(source, f"path {relative!r} leaves the dataset folder {root} ('..'); "
                                     f"list paths inside {root}", line)
    path = root / relative
    _refuse_link_out_of(root, path, relative, source, line)
    return path


def _refuse_link_out_of(root: Path, path: Path, relative: str, source: str | os.PathLike, line: int | None) -> None:
    """The same rule for what the text cannot show (issue 31): a symbolic link inside the dataset folder, on the
    entry or on a folder of its path, that leads outside it. Only links are resolved, so nothing outside the
    dataset is probed for an entry that is plain text."""
    probe = root
    for part in PurePosixPath(relative.replace("\\", "/")).parts:
        probe = probe / part
        if probe.is_symlink() and not probe.resolve().is_relative_to(root.resolve()):
            raise data_error(source, f"path {relative!r} leaves the dataset folder {root} through the symbolic link "
                                     f"{probe}; copy the file into {root} instead of linking it", line)


def read_json(path: Path, expected: type, shape: str) -> Any:
    """Parse a JSON file whose top level must be ``expected``; errors name the file (and line)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise data_error(path, f"invalid JSON: {error.msg}", error.lineno) from error
    if not isinstance(content, expected):
        raise data_error(path, f"expected {shape}")
    return content


def check_label(label: int, num_classes: int, source: str | os.PathLike, line: int | None) -> int:
    """Return ``label`` if it lies in ``[0, num_classes)``, else fail naming file and line."""
    if not 0 <= label < num_classes:
        raise data_error(source, f"label {label} is outside the class range 0..{num_classes - 1}", line)
    return label


def check_fraction(fraction: float) -> float:
    """Validate the ``fraction`` constructor argument."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction} (use e.g. --data.fraction 0.1 for 10%)")
    return float(fraction)


def stratified_subset(strata: Sequence[Hashable], fraction: float, seed: int) -> list[int]:
    """Indices of a class-stratified random subset holding ``fraction`` of every stratum.

    Every stratum keeps at least one example, so no class disappears at small fractions.
    The result is sorted and depends only on (strata, fraction, seed).
    """
    check_fraction(fraction)
    if fraction == 1.0:
        return list(range(len(strata)))
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        members[stratum].append(index)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    # Sorting the strata keeps the draw independent of dict insertion order.
    for stratum in sorted(members, key=repr):
        indices = members[stratum]
        keep = max(1, round(len(indices) * fraction))
        chosen.extend(indices[i] for i in rng.permutation(len(indices))[:keep])
    return sorted(chosen)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run replays the same batches.

    Lightning calls `set_epoch` at the start of every epoch. `fast_forward(n)` makes the next pass
    skip its first n indices (a run resumed mid-epoch continues where it stopped).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, num_samples: int) -> None:
        self._skip = max(0, int(num_samples))

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])


def example_weight(test_examples: int) -> str:
    """What one test example is worth in accuracy points: the resolution of every test accuracy on that split."""
    return f"one test example is worth 100/{test_examples} = {100 / test_examples:.3g} accuracy points"


class BaseDataModule(L.LightningDataModule):
    """Loader plumbing and the attributes the LightningModule is linked to.

    Subclasses set ``task``, ``num_classes``, ``tokenizer`` and ``metric`` (and ``label_names`` when
    the classes have names) in ``__init__`` and implement ``load_split(split)`` for "train" / "val" /
    "test"; ``load_predict()`` gives the unlabelled inputs of `predict` (default: the test split).
    The train split is subsampled by ``fraction`` (stratified by ``train_strata``) with ``seed``.
    Lightning adds a DistributedSampler under DDP, so none is created here.
    """

    task: str
    num_classes: int | None
    tokenizer: Any
    metric: str
    label_names: list[str] | None = None

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        fraction: float = 1.0,
        seed: int = 0,
        train_limit: int | None = None,
        val_from_train: int | None = None,
    ):
        """``val_from_train``: hold out this many rows of the training file (stratified, a fixed draw that no
        ``seed`` changes, disjoint from the ``train_limit`` pool and from the test rows) as the validation
        split, so that every selection (checkpoint, lr) reads rows that are neither trained on nor reported."""
        super().__init__()
        if train_limit is not None and not (isinstance(train_limit, int) and train_limit >= 1):
            raise ValueError(f"train_limit must be >= 1 or null, got {train_limit}")
        check_number("data.val_from_train", val_from_train, at_least=1, integer=True, optional=True)
        self.train_limit = train_limit
        self.val_from_train = val_from_train
        self._train_partition: tuple[list[int], list[int]] | None = None
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_number("data.eval_batch_size", eval_batch_size, at_least=1, integer=True, optional=True)
        check_number("data.num_workers", num_workers, at_least=0, integer=True)
        check_number("data.seed", seed, at_least=0, integer=True)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.fraction = check_fraction(fraction)
        self.seed = seed
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self.collate_fn: Callable[[list[Any]], Any] | None = None

    # -- to implement -------------------------------------------------------------------------
    def load_split(self, split: str) -> Dataset:
        """Return the full dataset of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def load_predict(self) -> Dataset | None:
        """The unlabelled inputs given for `predict` (``--data.predict_file`` / ``predict_root``), or None."""
        return None

    def describe_predict(self) -> str:
        """Where the `predict` inputs come from (``predict_file`` / ``predict_root``, else the test split)."""
        source = getattr(self, "predict_file", None) or getattr(self, "predict_root", None)
        return str(source) if source else self.describe_split("test")

    def listed_folders(self) -> list[Path]:
        """Folders whose every entry is read as data (a class folder, an image): nothing may be written inside them
        (`cli.guard_outputs`). Default: ``predict_root`` when given."""
        root = getattr(self, "predict_root", None)
        return [Path(root)] if root else []

    def train_strata(self, dataset: Dataset) -> Sequence[Hashable]:
        """The value to stratify the train subsample on (the class label by default)."""
        raise NotImplementedError

    def describe_split(self, split: str) -> str:
        """Where ``split`` comes from (a file or hub name), for error messages."""
        return f"the {split} split"

    def example_keys(self, dataset: Dataset) -> Sequence[Hashable] | None:
        """A content key per example (e.g. the text), used to keep held-out validation rows apart from
        training and test rows that repeat them; None: rows are only told apart by position."""
        return None

    @property
    def validation_is_test(self) -> bool:
        """Whether the validation split is read from the test split's rows (then nothing may be selected on it)."""
        return False

    def content_keys(self, split: str) -> set[Hashable] | None:
        """The content key of every row of ``split`` (the split-overlap check's rule), for `protocol`'s check that
        validation is not the test split whatever the paths; None: rows are told apart by position only."""
        return None

    def test_is_validation(self) -> bool:
        """The test stage reads the validation split's source (no test split of its own)."""
        return self.val_from_train is None and self.describe_split("test") == self.describe_split("val")

    # -- shared -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "test" and "test" not in self.datasets and self.test_is_validation():
            from doran_lightning.console import say

            say(f"note: no test split of its own: `test` reports on the validation rows ({self.describe_split('val')}); "
                "give a test split for a number nothing was selected on")
        for split in SPLITS_FOR_STAGE.get(stage or "fit", ("train", "val", "test")):
            if split not in self.datasets:
                self.datasets[split] = self._prepared_split(split)

    def _prepared_split(self, split: str) -> Dataset:
        if split == "predict":
            dataset = self.load_predict()
            if dataset is None:
                dataset = self.load_split("test")
            if len(dataset) == 0:
                raise DataError(f"{self.describe_predict()}: nothing to predict (no inputs)")
            return dataset
        if split == "val" and self.val_from_train is not None:
            train = self.load_split("train")
            dataset = torch.utils.data.Subset(train, self.train_partition(train)[1])
        else:
            dataset = self.load_split(split)
        if split == "train" and (self.train_limit is not None or self.fraction < 1.0 or self.val_from_train is not None):
            strata = list(self.train_strata(dataset))
            indices = self.train_partition(dataset)[0]
            if self.fraction < 1.0:
                chosen = stratified_subset([strata[i] for i in indices], self.fraction, self.seed)
                indices = [indices[i] for i in chosen]
            if len(indices) < len(dataset):
                dataset = torch.utils.data.Subset(dataset, indices)
        if len(dataset) == 0:
            raise DataError(f"{self.describe_split(split)}: the {split} split is empty")
        if split == "test" and getattr(self, "num_classes", None) != 1:  # a regression score has no such unit
            say(f"test split: {len(dataset)} examples ({self.describe_split('test')}); {example_weight(len(dataset))}")
        return dataset

    def train_partition(self, train: Dataset) -> tuple[list[int], list[int]]:
        """(training pool, held-out validation rows) as indices into the full training split.

        The pool is the ``train_limit`` draw over all rows (seed 0, as before validation could be held out, so
        pools of earlier runs stay the same); the validation rows are drawn from the rest with a fixed seed,
        skipping rows whose content repeats a pool or test row (``example_keys``).
        """
        if self._train_partition is not None:
            return self._train_partition
        strata = list(self.train_strata(train))
        pool = list(range(len(train)))
        if self.train_limit is not None and self.train_limit < len(pool):
            # A fixed pool (the same for every seed) that `fraction` then subsamples: sample-efficiency
            # sweeps on large sets such as SST-2 (67k) at laptop cost.
            pool = stratified_subset(strata, self.train_limit / len(pool), seed=0)
        held_out: list[int] = []
        if self.val_from_train is not None:
            held_out = self._draw_validation(train, strata, pool)
            if self.train_limit is None:  # the rest trains: without the held-out rows and their repeats
                keys = self.example_keys(train)
                taken = set(held_out)
                held_keys = {keys[i] for i in held_out} if keys is not None else set()
                pool = [i for i in pool if i not in taken and (keys is None or keys[i] not in held_keys)]
        self._train_partition = (pool, held_out)
        return self._train_partition

    def _draw_validation(self, train: Dataset, strata: Sequence[Hashable], pool: list[int]) -> list[int]:
        keys = self.example_keys(train)
        in_pool = set(pool) if self.train_limit is not None else set()
        banned: set[Hashable] = set()
        if keys is not None:
            banned = {keys[i] for i in in_pool}
            test_keys = self.example_keys(self.load_split("test"))
            banned.update(test_keys or ())
        candidates = [i for i in range(len(train)) if i not in in_pool and (keys is None or keys[i] not in banned)]
        if keys is not None:  # one row per repeated content, so a text is never both held out and trained on
            first: dict[Hashable, int] = {}
            for i in candidates:
                first.setdefault(keys[i], i)
            candidates = sorted(first.values())
        held_out = self._draw_from(candidates, strata)
        if self.train_limit is None:  # the rest trains: a class whose every row was drawn keeps its last one
            starved = _starved(held_out, strata, keys)
            if starved:
                candidates = [i for i in candidates if i not in starved]
                held_out = self._draw_from(candidates, strata)
        return held_out

    def _draw_from(self, candidates: list[int], strata: Sequence[Hashable]) -> list[int]:
        wanted = self.val_from_train
        if not candidates or wanted > len(candidates) - (0 if self.train_limit is not None else 1):
            raise DataError(f"{self.describe_split('train')}: data.val_from_train={wanted} asks for more rows than "
                            f"the {len(candidates)} that are free of the training pool, the test rows and each "
                            "class's last training row")
        chosen = stratified_subset([strata[i] for i in candidates], wanted / len(candidates), seed=VALIDATION_SEED)
        return sorted(candidates[i] for i in chosen)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(STAGE_OF_SPLIT[split])
        dataset = self.datasets[split]
        # Under DDP Lightning swaps in a DistributedSampler (seeded, set_epoch per epoch); on one process
        # the epoch-seeded sampler gives the same order again after a resume.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle and not distributed else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        from doran_lightning.checkpointing import resumable

        # Its position inside the epoch travels in checkpoints: a run killed mid-epoch resumes there.
        return resumable(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


def _starved(held_out: list[int], strata: Sequence[Hashable], keys: Sequence[Hashable] | None) -> set[int]:
    """The last held-out row of each class that would keep no training row (its rows held out, or repeats of
    held-out texts): `val_from_train` never takes a class's last training row."""
    taken = set(held_out)
    held_keys = {keys[i] for i in held_out} if keys is not None else set()
    training = {strata[i] for i in range(len(strata))
                if i not in taken and (keys is None or keys[i] not in held_keys)}
    return {max(i for i in held_out if strata[i] == stratum) for stratum in {strata[i] for i in held_out} - training}


# ---------------------------------------------------------------- raw text rows (language, commonsense)
@dataclass
class TextRows:
    """One split's raw examples: text columns and raw labels, with where row i came from."""

    source: str
    texts: list[tuple[str, ...]]
    labels: list[Any]
    first_line: int | None = None  # file line of row 0; None when the format has no lines
    label_note: str | None = None  # labels that differed in the file but are one class name (label_text)
    row_ids: list[int] | None = None  # a plain-text file: the 0-based file line of each row (blank lines skipped)

    def line(self, row: int) -> int | None:
        return None if self.first_line is None else self.first_line + row


PLAIN_TEXT_SUFFIXES = (".txt",)  # unlabelled inputs only: one text per line


def read_lines(file: Path, text_columns: Sequence[str]) -> TextRows:
    """The non-empty lines of a plain-text file, one example each (one text column only)."""
    if len(text_columns) != 1:
        raise data_error(file, f"a plain-text file holds one text per line, but this data needs the columns "
                               f"{list(text_columns)}; use CSV/TSV/JSON/JSONL/parquet")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise data_error(file, f"is not UTF-8 text ({error.reason} at byte {error.start})") from None
    kept = [number for number, line in enumerate(lines) if line.strip()]
    return TextRows(str(file), [(lines[number],) for number in kept], [], row_ids=kept)


def text_key(row: tuple[str, ...]) -> str:
    """A hash of one row's text columns (stripped): two rows with the same key hold the same example."""
    return hashlib.sha1("\x1f".join(part.strip() for part in row).encode("utf-8")).hexdigest()


def row_keys(texts: Sequence[tuple[str, ...]]) -> set[str]:
    """The `text_key` of every row: two splits sharing a key hold the same example."""
    return {text_key(row) for row in texts}


def split_overlaps(keys: dict[str, set[str]]) -> str | None:
    """"train∩val 8, train∩test 1" for the pairs of splits that share rows; None when none do. A test split that
    is the val split itself (GLUE's dev set for both) is no overlap."""
    if "test" in keys and keys["test"] == keys.get("val"):
        keys = {split: rows for split, rows in keys.items() if split != "test"}  # the val split tested again
    found = []
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        if first not in keys or second not in keys:
            continue
        shared = keys[first] & keys[second]
        if shared:
            found.append(f"{first}∩{second} {len(shared)}")
    return ", ".join(found) or None
