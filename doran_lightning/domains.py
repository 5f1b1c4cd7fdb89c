"""Range checks for numeric settings: one line naming the key, the allowed range and the value given.

Used where a setting is parsed (the model's, the datamodules', the alarms' constructors), so a
NaN learning rate or a negative worker count fails before anything is built, e.g.
``model.lr must be a finite number > 0, got nan``.
"""

from __future__ import annotations

import math
from typing import Any


def check_number(key: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, at_most: float | None = None, integer: bool = False,
                 optional: bool = False) -> Any:
    """Return `value` when it is a finite number (an int with `integer`) in the given bounds, else raise ValueError.

    `above`/`below` are exclusive bounds, `at_least`/`at_most` inclusive; `optional` also accepts None.
    """
    if value is None and optional:
        return value
    bounds = [f"{sign} {bound:g}" for sign, bound in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
              if bound is not None]
    rule = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = kind_ok and not isinstance(value, bool) and math.isfinite(value) and all((
        above is None or value > above, at_least is None or value >= at_least,
        below is None or value < below, at_most is None or value <= at_most))
    if not ok:
        raise ValueError(f"{key} must be {rule}{' or null' if optional else ''}, got {value!r}")
    return value
