"""Banking77: a real text classification task with 3,080 test queries, shipped with the package (offline).

The files under ``data/assets/banking77`` are PolyAI's ``banking_data/train.csv`` and ``test.csv`` unchanged
(CC BY 4.0; Casanueva et al., 2020): online-banking customer queries, each labelled with one of 77 intents.
"""

from __future__ import annotations

from doran_lightning.data.common import TextRows, text_key
from doran_lightning.data.language import ASSETS, TextClassificationDataModule
from doran_lightning.data.tokenizers import minilm_path

BANKING77_DIR = ASSETS / "banking77"
BANKING77_FILES = {"train": BANKING77_DIR / "train.csv", "test": BANKING77_DIR / "test.csv"}


class Banking77DataModule(TextClassificationDataModule):
    """Banking77's official split: 10,003 train and 3,080 test queries, 77 intents (``text,category`` CSVs).

    Validation is ``val_from_train`` rows held out of train.csv (a fixed stratified draw, disjoint from the
    ``train_limit`` pool and from every test text), so nothing is selected on the test rows. The published
    train file repeats 6 test queries word for word: those train rows are left out, so the splits are
    disjoint by content. Every test query counts ``100 / 3080`` = 0.032 accuracy points.
    """

    def __init__(self, tokenizer: str | None = None, max_length: int = 64, val_from_train: int | None = 1000,
                 **loader_args):
        if val_from_train is None:
            raise ValueError("data.val_from_train must be set for Banking77 (it has no validation file); "
                             "e.g. 1000 rows held out of train.csv")
        super().__init__(
            train_file=str(BANKING77_FILES["train"]), val_file=str(BANKING77_FILES["train"]),
            test_file=str(BANKING77_FILES["test"]), tokenizer=tokenizer or str(minilm_path()),
            text_columns="text", label_column="category", max_length=max_length,
            val_from_train=val_from_train, **loader_args,
        )

    def describe_split(self, split: str) -> str:
        if split == "val":
            return f"{BANKING77_FILES['train']} ({self.val_from_train} held-out rows, data.val_from_train)"
        return str(BANKING77_FILES[split])

    def read_rows(self, split: str) -> TextRows:
        rows = super().read_rows(split)
        if split != "train":
            return rows
        test_keys = {text_key(row) for row in super().read_rows("test").texts}
        kept = [i for i, row in enumerate(rows.texts) if text_key(row) not in test_keys]
        # Rows are dropped, so a row number no longer maps to a file line: messages name the row instead.
        return TextRows(rows.source, [rows.texts[i] for i in kept], [rows.labels[i] for i in kept], None)

