"""What a sweep may replace in its ``--out``: only files it wrote itself (issue 42).

A sweep writes ``results.json``, ``results.md``, ``results_runs.csv`` and a ``report/`` folder it replaces
whole. ``sweep --out .`` in a folder of the user's own would delete their ``report/NOTES.md`` and overwrite
their ``results.md``; so the sweep records every file it wrote, with its SHA-256, in ``sweep.json``
(``outputs``), and before it runs anything refuses (one line, naming the file) when one of those paths holds
a file it did not write or one edited since — unless ``--overwrite``. A ``sweep.json`` of an older release has
no record: its folder's files count as the sweep's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from doran_lightning.sweep.plan import SweepError
from doran_lightning.sweep.progress import OUTPUTS_KEY, PLAN_FILE
from doran_lightning.sweep.runs import read_json, write_json

TABLES = ("results.json", "results.md", "results_runs.csv")
REPORT = "report"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written_paths(out: Path) -> list[Path]:
    """The files under `out` a sweep writes or replaces (the tables, everything under ``report/``)."""
    report = out / REPORT
    found = [out / name for name in TABLES if (out / name).exists()]
    return found + (sorted(p for p in report.rglob("*") if not p.is_dir()) if report.is_dir() else [])


def refuse_foreign_outputs(out: Path, overwrite: bool) -> None:
    """SweepError when a path the sweep would replace holds a file it did not write (see the module docstring)."""
    plan = out / PLAN_FILE
    recorded = read_json(plan) if plan.is_file() else None
    if overwrite or (recorded is not None and OUTPUTS_KEY not in recorded):
        return
    owned = (recorded or {}).get(OUTPUTS_KEY) or {}
    foreign = [path for path in written_paths(out)
               if owned.get(path.relative_to(out).as_posix()) != (_digest(path) if path.is_file() else None)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise SweepError(f"--out {out}: {foreign[0]}{more} was not written by a sweep (or was changed since), and "
                         "the sweep would replace it; move it, choose another --out, or pass --overwrite")


def record_outputs(out: Path) -> None:
    """Note in ``sweep.json`` every file the sweep has just written, with its digest."""
    plan = out / PLAN_FILE
    data = read_json(plan) if plan.is_file() else {}
    data[OUTPUTS_KEY] = {path.relative_to(out).as_posix(): _digest(path)
                         for path in written_paths(out) if path.is_file()}
    write_json(plan, data)
