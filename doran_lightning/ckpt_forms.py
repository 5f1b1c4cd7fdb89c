"""The ``--ckpt_path`` forms Lightning documents, made to work with this CLI's run folders, or refused in one line.

Every `fit` claims a fresh ``version_N`` (`run_folders`), so Lightning's own ``"last"`` (the last checkpoint of
*this* trainer's ModelCheckpoint folder) would find nothing and start from scratch with a warning, and ``"best"``
exists only inside the process that ran `fit`. Here, before anything is built:

- ``last``: the newest ``last*.ckpt`` of the runs under ``trainer.default_root_dir``
  (``<root>/<logger name>/<version>/checkpoints/``); `fit` with none starts fresh and says so (Lightning's
  set-and-forget use), `test` / `validate` / `predict` with none are refused;
- ``best``: the best checkpoint that the newest of those runs recorded (its ModelCheckpoint's ``best_model_path``;
  without a ``monitor``, Lightning records its latest top-1 file);
- ``registry``: refused (Lightning's model registry needs the network and `litmodels`);
- a path: ``~`` expanded; a folder is refused naming it (the ``.ckpt`` files inside are listed).

``hpc`` and ``null`` stay Lightning's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doran_lightning.console import say

EVALUATIONS = ("test", "validate", "predict", "export")


def last_checkpoints(root: Path) -> list[Path]:
    """``last*.ckpt`` of every run under `root`, newest first."""
    found = [path for path in root.glob("*/*/checkpoints/last*.ckpt") if path.is_file()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def recorded_best(last: Path) -> Path | None:
    """The best checkpoint a run's ModelCheckpoint recorded in its `last` checkpoint, when the file is still there."""
    from doran_lightning.checkpointing import read_checkpoint

    states = read_checkpoint(last).get("callbacks") or {}
    for name, state in states.items():
        best = state.get("best_model_path") if isinstance(state, dict) and "ModelCheckpoint" in str(name) else None
        if not best:
            continue
        beside = last.parent / Path(best).name  # the run's own copy, when its folder was moved or copied
        for candidate in (beside, Path(best)):
            if candidate.is_file():
                return candidate
    return None


def resolve_ckpt_path(value: Any, subcommand: str, root: Path) -> Any:
    """`value` of ``--ckpt_path`` as a file this CLI can use (or None: train from scratch); raises ValueError in one
    line for a form it cannot honour."""
    if not isinstance(value, str) or value == "hpc":
        return value
    if value.startswith("registry"):
        raise ValueError(f"--ckpt_path={value}: Lightning's model registry is not supported by this CLI; download the "
                         "checkpoint and pass its path")
    if value in ("last", "best"):
        runs = last_checkpoints(root)
        if value == "last" and runs:
            say(f"note: --ckpt_path=last is {runs[0]} (the newest last checkpoint under {root})")
            return str(runs[0])
        best = recorded_best(runs[0]) if runs else None
        if best is not None:
            say(f"note: --ckpt_path=best is {best} (recorded by the newest run under {root}, {runs[0].parent.parent})")
            return str(best)
        if value == "last" and subcommand == "fit":
            say(f"note: --ckpt_path=last: no run under {root} has a last checkpoint; training starts from scratch")
            return None
        why = ("no run under it has a last checkpoint" if not runs else
               f"its newest run {runs[0].parent.parent} recorded no best checkpoint (no ModelCheckpoint kept a top-k file)")
        raise ValueError(f"--ckpt_path={value}: looked in trainer.default_root_dir={root}, but {why}; pass the "
                         "checkpoint file, e.g. <run>/checkpoints/last.ckpt")
    path = Path(value).expanduser()
    if path.is_dir():
        inside = sorted(str(p) for p in path.rglob("*.ckpt"))[:3]
        raise ValueError(f"--ckpt_path={value} is a folder; pass a checkpoint file"
                         + (f", e.g. {', '.join(inside)}" if inside else " (it holds no .ckpt file)"))
    return str(path) if value.startswith("~") else value
