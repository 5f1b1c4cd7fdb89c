"""Banking77, the shipped text task with 3,080 test queries: the vendored files, its real sizes, disjoint splits."""

from __future__ import annotations

import csv
import hashlib

import pytest

from doran_lightning.data.banking import BANKING77_FILES, Banking77DataModule
from doran_lightning.data.common import text_key

# PolyAI-LDN/task-specific-datasets@57ec275, banking_data/*.csv (assets/banking77/README.md): unchanged copies.
SHA256 = {"train": "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b",
          "test": "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d"}


def read(split: str) -> list[dict[str, str]]:
    with BANKING77_FILES[split].open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def keys(dataset) -> set[str]:
    """The text keys of a split (a Subset of the train file, or a whole file)."""
    base, indices = (dataset.dataset, dataset.indices) if hasattr(dataset, "indices") else (dataset, range(len(dataset)))
    return {text_key(base.texts[i]) for i in indices}


def test_the_shipped_files_are_the_published_split():
    for split, digest in SHA256.items():
        assert hashlib.sha256(BANKING77_FILES[split].read_bytes()).hexdigest() == digest, split
    train, test = read("train"), read("test")
    assert (len(train), len(test)) == (10003, 3080)
    assert len({row["category"] for row in train}) == len({row["category"] for row in test}) == 77


def test_full_train_split_leaves_out_the_queries_the_test_split_repeats():
    test_keys = {text_key((row["text"],)) for row in read("test")}
    repeated = [row for row in read("train") if text_key((row["text"],)) in test_keys]
    assert len(repeated) == 6  # the published train file repeats 6 test queries
    dm = Banking77DataModule(val_from_train=1000)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (keys(dm.datasets[split]) for split in ("train", "val", "test"))
    assert not train & test and not val & test and not train & val
    assert dm.num_classes == 77 and len(dm.datasets["test"]) == 3080 and len(test) == 3079  # one query twice
    # 10,003 rows less the 6 repeats of test queries: every other row trains or validates (one repeat of a
    # held-out text within train trains nowhere).
    rows = len(dm.datasets["train"]) + len(dm.datasets["val"])
    assert 9990 <= rows <= 9997 and abs(len(dm.datasets["val"]) - 1000) <= 10


def test_validation_must_be_held_out_of_train():
    with pytest.raises(ValueError, match="val_from_train must be set for Banking77"):
        Banking77DataModule(val_from_train=None)
