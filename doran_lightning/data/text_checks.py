"""Checks of a user's text data that a reader would not make (issue 31): a `max_length` without room for text, how
much truncation cuts, a header naming a column twice, a first row longer than the header, integer labels
that are not 0..C-1."""

from __future__ import annotations

import csv
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from doran_lightning.console import say
from doran_lightning.data.common import data_error


def refuse_length_without_text(tokenizer: Any, max_length: int, texts_per_example: int) -> None:
    """A `max_length` that the special tokens fill ([CLS] [SEP]) leaves no text: training would see none, and
    below the special-token count the tokenizer does not truncate at all."""
    special = tokenizer.num_special_tokens_to_add(pair=texts_per_example == 2)
    needed = special + texts_per_example
    if max_length < needed:
        raise ValueError(f"data.max_length={max_length} leaves no token for the text: the tokenizer adds {special} "
                         f"special tokens to every example; use at least {needed} (texts usually need 64-256)")


TRUNCATION_SAMPLE = 2000  # train rows tokenised untruncated to tell how much `max_length` cuts


def note_truncation(tokenizer: Any, texts: list[tuple[str, ...]], max_length: int) -> None:
    """Say how many train rows `max_length` cuts, and by how much, when it cuts most of them."""
    sample = texts[:TRUNCATION_SAMPLE]
    if not sample:
        return
    lengths = [len(ids) for ids in tokenizer(*map(list, zip(*sample)), truncation=False, verbose=False)["input_ids"]]
    cut = sorted(length - max_length for length in lengths if length > max_length)
    if 2 * len(cut) > len(lengths):
        read = f" (of the first {len(sample)})" if len(sample) < len(texts) else ""
        say(f"note: data.max_length={max_length} truncates {len(cut)} of {len(lengths)} train rows{read}, by a median "
            f"of {cut[len(cut) // 2]} tokens (longest row {max(lengths)} tokens); raise --data.max_length to keep "
            "more of each text")


def refuse_long_first_row(file: Path, delimiter: str) -> None:
    """A first data row with more fields than the header: pandas then takes the first column as the row index
    and shifts every column by one (the labels become the extra field), without a word. Later rows fail in the
    parser with their line."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, [])
        first = next((row for row in reader if row), None)
        if first is not None and len(first) > len(header):
            raise data_error(file, f"this row has {len(first)} fields but the header names {len(header)} ({header}); "
                                   f"remove the extra field, or quote a text that holds {delimiter!r}", reader.line_num)


def refuse_repeated_columns(file: Path, delimiter: str, wanted: Sequence[str]) -> None:
    """A header naming a wanted column twice: the reader would silently keep one of them (renaming the other)."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    repeated = sorted({name for name in header if header.count(name) > 1 and name in wanted})
    if repeated:
        raise data_error(file, f"the header names column(s) {repeated} more than once; keep one of each", 1)


def integer_labels_as_names(source: str, seen: list[int]) -> list[str]:
    """Integer labels that are not 0..C-1 (1 and 2; ratings 1-5; a gap): a head of max+1 outputs would hold
    classes no row has, so the ids seen become the class names, in order, and the mapping is said."""
    mapping = ", ".join(f"{label}→{index}" for index, label in enumerate(seen[:10])) + (", …" if len(seen) > 10 else "")
    say(f"note: {source}: the integer labels {seen[0]}…{seen[-1]} are not the class ids 0..{len(seen) - 1}: read "
        f"as {len(seen)} class names ({mapping}); give --data.num_classes to use the ids as given")
    return [str(label) for label in seen]
