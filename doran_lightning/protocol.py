"""The evidence protocol's one rule in code: nothing is selected on the rows a run reports.

A data module says whether its validation split is read from its test rows (`validation_is_test`:
GLUE's dev file without `val_from_train`, VTAB-1K's ``split_mode: test``); otherwise the two splits are compared
by source and by content (`BaseDataModule.content_keys`), whatever their paths. A fit that selects on
validation there — a checkpoint callback monitoring a ``val/`` metric, or an lr search of `sweep`
(which marks its runs through `SELECTS_ON_VALIDATION`) — is refused before it trains, with the fix.
"""

from __future__ import annotations

import os
from typing import Any

# Set (to what is selected, e.g. "the sweep's lr search") in the environment of runs whose validation
# metric chooses something; the fit then refuses a validation split that is the test split.
SELECTS_ON_VALIDATION = "DORAN_SELECTS_ON_VALIDATION"


def monitored_validation(trainer: Any) -> list[str]:
    """The ``val/`` metrics the trainer's checkpoint callbacks choose their checkpoint by."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [str(c.monitor) for c in trainer.callbacks
            if isinstance(c, ModelCheckpoint) and c.monitor and str(c.monitor).startswith("val/")]


def validation_reads_test(datamodule: Any) -> str | None:
    """How the validation split is the test split, or None: declared by the module (GLUE's dev file, VTAB's
    ``split_mode: test``), the same source, or the same rows by content (`content_keys`: the split-overlap check's
    rule), whatever the paths — a copy, a symlink, a hard link, another row order or file format."""
    describe = getattr(datamodule, "describe_split", lambda split: f"the {split} split")
    if getattr(datamodule, "validation_is_test", False):
        return describe("val")
    if getattr(datamodule, "val_from_train", None) is not None or not hasattr(datamodule, "content_keys"):
        return None  # held out of the training file, apart from the test rows by construction
    val, test = describe("val"), describe("test")
    if val == test:
        return f"{val}, which is also the test split: the module has no test split of its own"
    try:
        val_keys, test_keys = datamodule.content_keys("val"), datamodule.content_keys("test")
    except (OSError, ValueError):
        return None  # a missing or broken test file is named by `test` itself
    if val_keys and val_keys == test_keys:
        return f"{val} holds the same rows as the test split {test}"
    return None


def check_selection(trainer: Any, datamodule: Any) -> None:
    """Refuse a fit that would select on validation rows that are also the test rows."""
    selections = [f"the checkpoint monitors {metric}" for metric in monitored_validation(trainer)]
    if os.environ.get(SELECTS_ON_VALIDATION):
        selections.append(f"{os.environ[SELECTS_ON_VALIDATION]} reads the validation metric")
    if not selections:
        return
    where = validation_reads_test(datamodule)
    if where is None:
        return
    raise ValueError(
        f"validation is the test split here ({where}), but {' and '.join(selections)}: the test number would be "
        "selected on itself. Hold validation rows out of the training file (--data.init_args.val_from_train=N; "
        "VTAB-1K: split_mode: val), give a test split of other rows, or drop the checkpoint's monitor"
    )
