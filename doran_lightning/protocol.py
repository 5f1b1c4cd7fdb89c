"""The evidence protocol's one rule in code: nothing is selected on the rows a run reports.

A data module says whether its validation split is read from its test rows (`validation_is_test`:
GLUE's dev file without `val_from_train`, VTAB-1K's ``split_mode: test``). A fit that selects on
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


def check_selection(trainer: Any, datamodule: Any) -> None:
    """Refuse a fit that would select on validation rows that are also the test rows."""
    if not getattr(datamodule, "validation_is_test", False):
        return
    selections = [f"the checkpoint monitors {metric}" for metric in monitored_validation(trainer)]
    if os.environ.get(SELECTS_ON_VALIDATION):
        selections.append(f"{os.environ[SELECTS_ON_VALIDATION]} reads the validation metric")
    if not selections:
        return
    where = datamodule.describe_split("val") if hasattr(datamodule, "describe_split") else "the validation split"
    raise ValueError(
        f"validation is the test split here ({where}), but {' and '.join(selections)}: the test number would be "
        "selected on itself. Hold validation rows out of the training file (--data.init_args.val_from_train=N; "
        "VTAB-1K: split_mode: val), or drop the checkpoint's monitor"
    )
