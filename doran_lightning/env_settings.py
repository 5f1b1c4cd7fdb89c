"""Settings from the environment that a run did not use say so (issue 42).

LightningCLI reads ``PL_<SUBCOMMAND>__<KEY>`` (e.g. ``PL_FIT__TRAINER__MAX_STEPS=2``) below the ``--config``
files and the command line. A variable a run did not use, because a config or the command line set the
setting (the documented precedence), because no such setting exists (a typo), or because the environment cannot
reach it (a data module's ``init_args``), used to pass without a word; each is now one note line naming the
value that won.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

_MISSING = object()


def _lookup(tree: Any, parts: list[str]) -> Any:
    """The value at `parts` in nested dicts, stepping through ``init_args`` where a subclass keeps its settings."""
    for part in parts:
        if not isinstance(tree, Mapping):
            return _MISSING
        if part in tree:
            tree = tree[part]
        elif isinstance(tree.get("init_args"), Mapping) and part in tree["init_args"]:
            tree = tree["init_args"][part]
        else:
            return _MISSING
    return tree


def _same(given: Any, used: Any) -> bool:
    if isinstance(given, (int, float)) and isinstance(used, (int, float)) and not isinstance(used, bool):
        return math.isclose(float(given), float(used), rel_tol=1e-12)
    return given == used or str(given) == str(used)


def environment_notes(subcommand: str, config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """One note per ``PL_<SUBCOMMAND>__…`` variable whose value is not the one `config` (the parsed settings of
    `subcommand`) holds: ignored (no such setting) or shadowed (naming the value that won)."""
    prefix = f"PL_{subcommand.upper()}__"
    notes = []
    for name in sorted(environ):
        if not name.startswith(prefix):
            continue
        raw = environ[name]
        parts = [part.lower() for part in name[len(prefix):].split("__") if part]
        setting = ".".join(part for part in parts if part != "init_args")
        used = _lookup(config, parts)
        if used is _MISSING:
            notes.append(f"note: {name}={raw} is ignored: `{subcommand}` has no setting {setting} (check the "
                         "spelling; the variable is PL_<SUBCOMMAND>__<KEY> with __ between the parts of the key)")
            continue
        try:
            given = yaml.safe_load(raw)
        except yaml.YAMLError:
            given = raw
        if isinstance(used, Mapping) or _same(given, used):
            continue
        notes.append(f"note: {name}={raw} is not what this run uses: {setting}={used!r} won (a --config file and "
                     "the command line come before the environment, and a data module's init_args cannot be set "
                     f"from it; set --{setting}={raw} instead)")
    return notes
