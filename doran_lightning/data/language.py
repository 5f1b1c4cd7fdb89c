"""Language DataModules: GLUE, a user's labelled text files, the shipped topic set (commonsense QA: `commonsense`).

Text classification batches: ``{"input_ids", "attention_mask", ["token_type_ids"], "labels"}`` (dynamic padding;
labels long, float for regression). Commonsense batches are described on ``CommonsenseDataModule``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from doran_lightning.console import say
from doran_lightning.domains import check_number
from doran_lightning.data.common import (
    PLAIN_TEXT_SUFFIXES,
    TextRows,
    BaseDataModule,
    cache_only_when_offline,
    check_label,
    data_error,
    read_lines,
    require_dir,
    require_file,
    row_keys,
    text_key,
    split_overlaps,
)
from doran_lightning.data.label_text import case_note, clean_label, integer_label, is_number, merged_note
from doran_lightning.data.suites import GLUE_METRICS
from doran_lightning.data.text_checks import (
    integer_labels_as_names, note_truncation, refuse_length_without_text, refuse_long_first_row, refuse_repeated_columns,
)
from doran_lightning.data.tokenizers import load_tokenizer, minilm_path

ASSETS = Path(__file__).parent / "assets"
BUILTIN_TEXT_FILE = ASSETS / "topics.csv"

# GLUE's TSVs hold unescaped quotes and long lines.
csv.field_size_limit(sys.maxsize)




# --------------------------------------------------------------------------------------------
# text classification
# --------------------------------------------------------------------------------------------
class TokenizedText(Dataset):
    """Texts (labelled, or not for `predict`) tokenised on access, so a small ``fraction`` of a large set stays cheap."""

    def __init__(self, texts: list[tuple[str, ...]], labels: list[int | float] | None, tokenizer: Any, max_length: int):
        self.texts, self.labels, self.tokenizer, self.max_length = texts, labels, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def input_texts(self, index: int) -> tuple[str, ...]:
        """The row's text (or text pair) as read, for a person reading `predict`'s output."""
        return tuple(self.texts[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        encoded = self.tokenizer(*self.texts[index], truncation=True, max_length=self.max_length)
        return {**encoded} if self.labels is None else {**encoded, "labels": self.labels[index]}


class _TextClassificationBase(BaseDataModule):
    """Tokenises ``TextRows`` from ``read_rows(split)`` and pads batches dynamically."""

    ids_are_names = False  # integer labels read as class names (1 and 2 → "1", "2"): `integer_labels_as_names`

    def __init__(
        self,
        tokenizer: str | None,
        max_length: int,
        num_classes: int,
        metric: str,
        label_names: Sequence[str] | None = None,
        predict_file: str | None = None,
        **loader_args,
    ):
        """``predict_file``: unlabelled texts for `predict` (CSV/TSV/JSON/JSONL/parquet with the text
        columns, or a plain-text file with one text per line); default: the test split.
        ``loader_args``: batch_size, eval_batch_size, num_workers, pin_memory,
        persistent_workers, fraction, seed (see BaseDataModule)."""
        from transformers import DataCollatorWithPadding

        super().__init__(**loader_args)
        self.predict_file = predict_file
        self.task = "text_classification"
        self.num_classes = num_classes
        self.metric = metric
        self.label_names = list(label_names) if label_names else None
        self.max_length = check_number("data.max_length", max_length, at_least=1, integer=True)
        self.tokenizer = load_tokenizer(tokenizer)
        refuse_length_without_text(self.tokenizer, self.max_length, len(self.text_columns_for_predict()))
        self.collate_fn = DataCollatorWithPadding(self.tokenizer)
        self.row_keys: dict[str, set[str]] = {}  # per split: a hash of each row's text (overlap check)
        self.split_overlaps: str | None = None

    def read_rows(self, split: str) -> TextRows:
        raise NotImplementedError

    def text_columns_for_predict(self) -> Sequence[str]:
        """The column names `predict_file` must hold (those of the training data)."""
        return ("text",)

    def load_predict(self) -> TokenizedText | None:
        if self.predict_file is None:
            return None
        rows = read_table(self.predict_file, self.text_columns_for_predict(), None)
        dataset = TokenizedText(rows.texts, None, self.tokenizer, self.max_length)
        if rows.row_ids is not None:  # a plain-text file: a prediction's id is its file line (0-based), blank lines counted
            dataset.ids = rows.row_ids  # type: ignore[attr-defined]
        return dataset

    def _label(self, raw: Any, rows: TextRows, row: int) -> int | float:
        """Convert one raw label (class name, integer, or score) and check it."""
        line = rows.line(row)
        where = "" if line is not None else f"row {row}: "
        if raw is None:  # an empty cell (or NaN, which the CSV reader turns into None)
            raise data_error(rows.source, f"{where}label is missing (an empty cell or NaN)", line)
        if self.num_classes == 1:
            try:
                score = float(raw)
            except (TypeError, ValueError):
                raise data_error(rows.source, f"{where}regression label {raw!r} is not a number", line) from None
            if not math.isfinite(score):
                raise data_error(rows.source, f"{where}regression label {raw!r} is not finite", line)
            return score
        if isinstance(raw, str) and self.label_names and raw in self.label_names:
            return self.label_names.index(raw)
        value = integer_label(raw)
        if self.ids_are_names and value is not None:
            if str(value) not in self.label_names:
                raise data_error(rows.source, f"{where}label {value} is not one of the train file's labels "
                                              f"{self.label_names}", line)
            return self.label_names.index(str(value))
        if value is None:
            known = f"one of {self.label_names}" if self.label_names else "an integer class id"
            hint = "; for a regression target set --data.num_classes=1" if is_number(raw) else ""
            raise data_error(rows.source, f"{where}label {raw!r} is not {known}{hint}", line)
        return check_label(value, self.num_classes, rows.source, line)

    def load_split(self, split: str) -> TokenizedText:
        rows = self.read_rows(split)
        labels = [self._label(raw, rows, row) for row, raw in enumerate(rows.labels)]
        if split == "train" and split not in self.row_keys:  # once, though the train file may be read again
            note_truncation(self.tokenizer, rows.texts, self.max_length)
        self.row_keys[split] = row_keys(rows.texts)
        return TokenizedText(rows.texts, labels, self.tokenizer, self.max_length)

    def content_keys(self, split: str) -> set[Any]:
        return row_keys(self.read_rows(split).texts)

    def example_keys(self, dataset: Dataset) -> Sequence[Any]:
        # The overlap warning's rule (`text_key`), so a held-out row is never one the warning would call shared.
        return [text_key(row) for row in dataset.texts]  # type: ignore[attr-defined]

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if (stage or "fit") == "fit" and self.split_overlaps is None and "train" in self.row_keys:
            keys = dict(self.row_keys)
            if "test" not in keys and self.describe_split("test") != self.describe_split("val"):
                with contextlib.suppress(OSError, ValueError):  # a broken test file is named by `test` itself
                    keys["test"] = row_keys(self.read_rows("test").texts)
            self.split_overlaps = split_overlaps(keys)
            if self.split_overlaps:
                say(f"warning: split overlap, the same text in two splits: {self.split_overlaps} (distinct texts); "
                    "a score on those rows measures memory, not generalisation — remove them from val/test")

    def train_strata(self, dataset: Dataset) -> Sequence[Any]:
        labels = dataset.labels  # type: ignore[attr-defined]
        # Regression scores are stratified by their integer part (e.g. the 0..5 STS-B bins).
        return [math.floor(label) for label in labels] if self.num_classes == 1 else labels


def _parse_failure(file: Path, suffix: str, error: Exception) -> str:
    """Why a table could not be read, in the user's terms: no rows, the encoding, or the parser's own reason."""
    if suffix in (".csv", ".tsv") and len([line for line in file.read_bytes().splitlines() if line.strip()]) <= 1:
        return "it has no data rows (a header at most)"
    cause = error.__cause__ or error  # datasets' DatasetGenerationError hides the parser's error as its cause
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 text ({cause.reason} at byte {cause.start}); save it as UTF-8"
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else 'no detail'}"


# Only an empty cell is missing: pandas would also read "NA", "null", "None", "nan" and "N/A" as missing, so a
# class or a text spelt that way would vanish (issue 31).
_ONLY_EMPTY_IS_MISSING = {"keep_default_na": False, "na_values": [""]}
FILE_BUILDERS = {".csv": ("csv", dict(_ONLY_EMPTY_IS_MISSING)),
                 ".tsv": ("csv", {"sep": "\t", **_ONLY_EMPTY_IS_MISSING}), ".json": ("json", {}),
                 ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
def read_table(path: str | Path, text_columns: Sequence[str], label_column: str | None) -> TextRows:
    """Read a CSV/TSV/JSON/JSONL/parquet file with ``datasets``' local loaders (no `label_column`: unlabelled,
    and a plain-text file with one text per line is accepted too)."""
    import datasets

    file = require_file(path, "text data", "check --data.*_file")
    suffix = file.suffix.lower()
    if label_column is None and suffix in PLAIN_TEXT_SUFFIXES:
        return read_lines(file, text_columns)
    if suffix not in FILE_BUILDERS:
        known = (*FILE_BUILDERS, *(PLAIN_TEXT_SUFFIXES if label_column is None else ()))
        raise data_error(file, f"unsupported file type {suffix!r}; use one of {', '.join(known)}")
    builder, options = FILE_BUILDERS[suffix]
    try:
        table = datasets.load_dataset(builder, data_files={"data": str(file)}, split="data", **options)
    except Exception as error:  # datasets wraps parser errors in several exception types
        raise data_error(file, f"could not be read as {suffix[1:]}: {_parse_failure(file, suffix, error)}") from error
    wanted = (*text_columns, label_column) if label_column is not None else tuple(text_columns)
    if suffix in (".csv", ".tsv"):
        refuse_repeated_columns(file, "\t" if suffix == ".tsv" else ",", wanted)
        refuse_long_first_row(file, "\t" if suffix == ".tsv" else ",")
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise data_error(file, f"missing column(s) {missing}; the file has {table.column_names}")
    first_line = {".csv": 2, ".tsv": 2, ".jsonl": 1}.get(suffix)
    columns = []
    for column in text_columns:
        values = table[column]
        # The readers turn an empty cell into None (or NaN): str() would train on the word "None".
        empty = next((row for row, value in enumerate(values) if value is None or value != value), None)
        if empty is not None:
            line = None if first_line is None else first_line + empty
            raise data_error(file, f"{'' if line else f'row {empty}: '}text column {column!r} is empty", line)
        columns.append([str(value) for value in values])
    texts = list(zip(*columns))
    raw_labels = table[label_column] if label_column is not None else []
    labels = [clean_label(label) for label in raw_labels]
    raw_names = {label.strip() for label in raw_labels if isinstance(label, str)}
    return TextRows(str(file), texts, labels, first_line, merged_note(raw_names, str(file)))


class TextClassificationDataModule(_TextClassificationBase):
    """A user's labelled text in CSV/TSV/JSON/JSONL/parquet (one or two text columns).

    Labels may be class names (mapped in ``label_names`` order, default: sorted names of the
    train file), integer ids, or scores with ``num_classes=1`` (regression). Without
    ``test_file`` the test stage uses ``val_file``.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str,
        tokenizer: str | None = None,
        test_file: str | None = None,
        text_columns: str | list[str] = "text",
        label_column: str = "label",
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        max_length: int = 128,
        metric: str = "accuracy",
        **loader_args,
    ):
        self.files = {"train": train_file, "val": val_file, "test": test_file or val_file}
        self.text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns must name one or two columns, got {self.text_columns}")
        self.label_column = label_column
        if num_classes is None and label_names is None:
            label_names, num_classes = self._labels_of_train_file()
        num_classes = num_classes or len(label_names or [])
        super().__init__(tokenizer, max_length, num_classes, metric, label_names, **loader_args)

    def _labels_of_train_file(self) -> tuple[list[str] | None, int]:
        """Infer the classes from the train file: sorted names, or 1 + the largest integer id.

        Numeric labels must be integers (3.0 counts): 0.2 / 0.7 would otherwise become class names or be
        truncated to 0, merging classes without a word. A fractional or non-finite one is refused, naming its row.
        """
        rows = read_table(self.files["train"], self.text_columns, self.label_column)
        raw = rows.labels
        if raw and all(is_number(label) for label in raw):
            for row, label in enumerate(raw):
                if integer_label(label) is None:
                    line = rows.line(row)
                    where = "" if line is not None else f"row {row}: "
                    raise data_error(rows.source, f"{where}label {label!r} is not an integer class id; for a "
                                                  "regression target set --data.num_classes=1", line)
            seen = sorted({integer_label(label) for label in raw})
            if len(seen) >= 2 and seen[0] >= 0 and seen != list(range(len(seen))):
                self.ids_are_names = True
                return integer_labels_as_names(rows.source, seen), len(seen)
            if len(seen) >= 2:  # 0..C-1, or a negative id that `_label` refuses naming its line
                return None, seen[-1] + 1
        names = sorted({str(label) for label in raw if label is not None})
        for note in (rows.label_note, case_note(names, rows.source)):
            if note:
                say(note)
        if len(names) == 1:
            raise data_error(rows.source, f"every label in column {self.label_column!r} is {names[0]!r}: a classifier "
                                          "needs at least 2 classes (for a regression target set --data.num_classes=1)")
        return names, len(names)

    def describe_split(self, split: str) -> str:
        return str(self.files[split])

    def text_columns_for_predict(self) -> Sequence[str]:
        return self.text_columns

    def read_rows(self, split: str) -> TextRows:
        return read_table(self.files[split], self.text_columns, self.label_column)


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's texts and label live, on the hub and in GLUE's own TSVs."""

    folder: str  # GLUE's folder name, e.g. "SST-2"
    text_columns: tuple[str, ...]  # hub / data_files column names
    num_labels: int
    metric: str
    tsv_text: tuple[str | int, ...]  # header names (or indices when the TSV has no header)
    tsv_label: str | int
    tsv_label_names: tuple[str, ...] = ()  # string labels of the TSVs, in hub label order
    dev_file: str = "dev.tsv"
    hub_val_split: str = "validation"


NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", ("sentence",), 2, GLUE_METRICS["cola"], (3,), 1),
    "sst2": GlueTask("SST-2", ("sentence",), 2, GLUE_METRICS["sst2"], ("sentence",), "label"),
    "mrpc": GlueTask("MRPC", ("sentence1", "sentence2"), 2, GLUE_METRICS["mrpc"], ("#1 String", "#2 String"), "Quality"),
    "qqp": GlueTask("QQP", ("question1", "question2"), 2, GLUE_METRICS["qqp"], ("question1", "question2"), "is_duplicate"),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), 1, GLUE_METRICS["stsb"], ("sentence1", "sentence2"), "score"),
    "mnli": GlueTask("MNLI", ("premise", "hypothesis"), 3, GLUE_METRICS["mnli"], ("sentence1", "sentence2"), "gold_label",
                     NLI3, "dev_matched.tsv", "validation_matched"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), 2, GLUE_METRICS["qnli"], ("question", "sentence"), "label", NLI2),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), 2, GLUE_METRICS["rte"], ("sentence1", "sentence2"), "label", NLI2),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), 2, GLUE_METRICS["wnli"], ("sentence1", "sentence2"), "label"),
}


def read_glue_tsv(path: Path, spec: GlueTask) -> TextRows:
    """Parse one of GLUE's own TSVs (header row, except CoLA; quotes are literal)."""
    has_header = isinstance(spec.tsv_label, str)
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, []) if has_header else []
        index = {name: i for i, name in enumerate(header)}
        wanted = (*spec.tsv_text, spec.tsv_label)
        if has_header and any(name not in index for name in wanted):
            raise data_error(path, f"header {header} lacks the columns {list(wanted)} of GLUE {spec.folder}", 1)
        positions = [index[c] if has_header else c for c in wanted]
        for row in reader:
            line = reader.line_num
            if len(row) <= max(positions):
                raise data_error(path, f"expected at least {max(positions) + 1} tab-separated fields, got {len(row)}", line)
            texts.append(tuple(row[p] for p in positions[:-1]))
            labels.append(row[positions[-1]])
    return TextRows(str(path), texts, labels, first_line=2 if has_header else 1)


class GLUEDataModule(_TextClassificationBase):
    """A GLUE task from GLUE's TSVs (``root``), local files (``data_files``) or the hub cache.

    * ``root``: GLUE's own layout, ``<root>/SST-2/train.tsv`` + ``dev.tsv`` (``root`` may also be
      the task folder itself; MNLI uses ``dev_matched.tsv``).
    * ``data_files``: ``{"train": path, "validation": path[, "test": path]}`` of CSV/TSV/JSON/JSONL/
      parquet with the hub's column names (e.g. ``sentence``, ``label``).
    * neither: ``datasets.load_dataset(hub_name, task)``, which must be cached when offline.

    GLUE's test labels are hidden, so the test stage evaluates the dev set (what papers report)
    unless ``data_files`` has a ``test`` entry. Validation is then the dev set too, unless
    ``val_from_train`` holds rows of train out for it: set it whenever anything (checkpoint, lr) is
    selected on validation, or the reported dev number is selected on itself. Metric: MCC (CoLA), Pearson/Spearman (STS-B),
    F1+accuracy (MRPC, QQP), accuracy otherwise.
    """

    def __init__(
        self,
        task: str,
        tokenizer: str | None = None,
        max_length: int = 128,
        root: str | None = None,
        data_files: dict[str, str] | None = None,
        hub_name: str = "nyu-mll/glue",
        **loader_args,
    ):
        key = task.lower().replace("-", "")
        if key not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; expected one of: {', '.join(GLUE_TASKS)}")
        self.glue_task, self.spec = key, GLUE_TASKS[key]
        self.root = Path(root) if root else None
        self.data_files = dict(data_files or {})
        if "val" in self.data_files:
            self.data_files["validation"] = self.data_files.pop("val")
        self.hub_name = hub_name
        self._hub: Any = None
        # GLUE's TSVs spell NLI labels out; the hub and data_files use integer ids.
        label_names = self.spec.tsv_label_names if self.root is not None else None
        super().__init__(tokenizer, max_length, self.spec.num_labels, self.spec.metric, label_names, **loader_args)

    def _task_dir(self) -> Path:
        assert self.root is not None
        nested = self.root / self.spec.folder
        return nested if nested.is_dir() or not (self.root / "train.tsv").is_file() else self.root

    @property
    def validation_is_test(self) -> bool:
        # Without held-out rows, GLUE's dev file is both the validation and (its test labels being hidden) the test split.
        return self.val_from_train is None and (self.root is not None or "test" not in self.data_files)

    def describe_split(self, split: str) -> str:
        if split == "val" and self.val_from_train is not None:
            return f"{self.describe_split('train')} ({self.val_from_train} held-out rows, data.val_from_train)"
        if self.root is not None:
            return str(self._task_dir() / ("train.tsv" if split == "train" else self.spec.dev_file))
        files = {"train": "train", "val": "validation", "test": "test" if "test" in self.data_files else "validation"}
        return self.data_files.get(files[split], f"{self.hub_name}/{self.glue_task} ({split})")

    def text_columns_for_predict(self) -> Sequence[str]:
        return self.spec.text_columns

    def read_rows(self, split: str) -> TextRows:
        if self.root is not None:
            task_dir = require_dir(self._task_dir(), f"GLUE {self.spec.folder}", "set --data.root to the folder holding GLUE's task folders")
            path = require_file(self.describe_split(split), f"GLUE {self.spec.folder} {split}", f"expected in {task_dir}")
            return read_glue_tsv(path, self.spec)
        if self.data_files:
            return self._read_data_file(split)
        return self._read_hub(split)

    def _read_data_file(self, split: str) -> TextRows:
        name = {"train": "train", "val": "validation"}.get(split) or ("test" if "test" in self.data_files else "validation")
        if name not in self.data_files:
            raise KeyError(f"--data.data_files has no {name!r} entry (keys: {sorted(self.data_files)})")
        return read_table(self.data_files[name], self.spec.text_columns, "label")

    def _read_hub(self, split: str) -> TextRows:
        import datasets

        if self._hub is None:
            with cache_only_when_offline():
                try:
                    self._hub = datasets.load_dataset(self.hub_name, self.glue_task)
                except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
                    raise OSError(
                        f"GLUE dataset {self.hub_name!r} ({self.glue_task}) is not in the local cache and the "
                        f"hub cannot be reached. Use a local copy instead: --data.root <folder holding "
                        f"{self.spec.folder}/train.tsv and {self.spec.dev_file}> or --data.data_files "
                        f"'{{train: train.csv, validation: dev.csv}}'"
                    ) from error
        table = self._hub["train" if split == "train" else self.spec.hub_val_split]
        texts = list(zip(*[table[c] for c in self.spec.text_columns]))
        return TextRows(f"{self.hub_name}/{self.glue_task}", texts, list(table["label"]))


class BuiltinTextDataModule(_TextClassificationBase):
    """The project's own offline topic set: short English texts on sport, technology, food, weather.

    Written for this project (``data/assets/topics.csv``: ``text,label,split``) with a fixed
    train/val/test split; for smoke runs and examples with the offline MiniLM encoder.
    """

    def __init__(self, tokenizer: str | None = None, max_length: int = 64, **loader_args):
        with BUILTIN_TEXT_FILE.open(encoding="utf-8", newline="") as handle:
            self.records = list(csv.DictReader(handle))
        label_names = sorted({record["label"] for record in self.records})
        super().__init__(tokenizer or minilm_path(), max_length, len(label_names), "accuracy", label_names, **loader_args)

    def describe_split(self, split: str) -> str:
        return f"{BUILTIN_TEXT_FILE} ({split})"

    def read_rows(self, split: str) -> TextRows:
        chosen = [r for r in self.records if r["split"] == split]
        return TextRows(str(BUILTIN_TEXT_FILE), [(r["text"],) for r in chosen], [r["label"] for r in chosen])


# Shipped import paths (configs name doran_lightning.data.language.CommonsenseDataModule): re-exported.
from doran_lightning.data.commonsense import (  # noqa: E402
    HELDOUT,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_WITH_INPUT,
    CommonsenseDataModule,
    CommonsenseExamples,
    build_prompt,
    extract_answer,
    read_instruction_json,
)
