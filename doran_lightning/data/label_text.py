"""Class names as a user sees them (issue 42).

Two labels that look identical on screen ("café" typed as one code point or as "e" + a combining accent, "tea"
with a zero-width space) are one class: names are read in Unicode NFC with invisible format characters (zero-width
spaces and joiners, a byte-order mark, soft hyphens, direction marks) removed and surrounding space stripped. When
that merges names that differ in the file, one note says which. Letter case is kept (``Tea`` and ``tea`` may be
meant as two classes) with a note naming the pair.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np


def clean_name(text: str) -> str:
    """`text` as a class name: NFC, without format characters (Unicode category Cf), stripped."""
    text = unicodedata.normalize("NFC", text)
    return "".join(char for char in text if unicodedata.category(char) != "Cf").strip()


def clean_label(raw: Any) -> Any:
    """A label cell as a class: names through `clean_name` (" pos" and "pos" are one class, so are NFC and NFD
    "café"); true/false as the names "True"/"False"; numbers as they are."""
    if isinstance(raw, bool):
        return str(raw)
    return clean_name(raw) if isinstance(raw, str) else raw


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def integer_label(raw: Any) -> int | None:
    """A class id from an int, an integral float (3.0) or a string of digits; None for anything else (0.2, nan, "a")."""
    if is_number(raw):
        return int(raw) if math.isfinite(raw) and float(raw).is_integer() else None
    text = str(raw).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def merged_note(raw_names: Iterable[str], source: str, what: str = "labels") -> str | None:
    """A note when several distinct `raw_names` become one class name, else None."""
    forms: dict[str, set[str]] = {}
    for raw in raw_names:
        forms.setdefault(clean_name(raw), set()).add(raw)
    merged = {name: sorted(raw) for name, raw in forms.items() if len(raw) > 1}
    if not merged:
        return None
    shown = "; ".join(f"{' and '.join(ascii(raw) for raw in raws)} -> {name!r}" for name, raws in sorted(merged.items()))
    return (f"note: {source}: {what} that look identical are one class (Unicode NFC, invisible characters removed): "
            f"{shown}")


def case_note(names: Iterable[str], source: str, what: str = "labels") -> str | None:
    """A note when class names differ only by letter case (kept apart), else None."""
    by_fold: dict[str, set[str]] = {}
    for name in names:
        by_fold.setdefault(name.casefold(), set()).add(name)
    pairs = [sorted(group) for group in by_fold.values() if len(group) > 1]
    if not pairs:
        return None
    shown = "; ".join(" / ".join(repr(name) for name in group) for group in sorted(pairs))
    return (f"note: {source}: {what} {shown} differ only by letter case and stay separate classes; if they are one, "
            "write them the same way")
