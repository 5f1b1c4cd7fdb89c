"""What the command line prints: our own lines, and a quiet mode that keeps library chatter out.

Our messages (parameter counts, statistics cost, alarms without a progress bar, the run summary, where
predictions and exports went) go through `say`, on the ``doran_lightning`` logger, to stderr.
`quiet_libraries` (the CLI's default; ``--verbose`` skips it) silences, at their source, lines a user
cannot act on: Lightning's and Fabric's INFO messages (device banners, the litlogger advertisement,
"Restoring states…") and one deprecation warning that the pinned Lightning triggers inside torch.
Warnings stay warnings: nothing else is filtered.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

LOGGER = logging.getLogger("doran_lightning")
# Libraries whose INFO lines are banners and progress chatter; their warnings and errors still show.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# (message regex, category) of warnings raised inside pinned dependencies that no user can act on.
KNOWN_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # lightning/pytorch/utilities/_pytree.py builds torch's LeafSpec, deprecated in torch 2.10+.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# Environment switches of the Hugging Face libraries' tqdm bars, read when they are imported.
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_switched: set[str] = set()  # the switches we set (a user's own setting is left alone)

LOGGER.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():  # as Lightning does: an application's own logging set-up wins
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.propagate = False


@rank_zero_only
def say(message: str) -> None:
    """Print one of our own lines (rank zero only)."""
    LOGGER.info(message)


def quiet_libraries(quiet: bool = True) -> None:
    """Silence the library lines listed above (INFO-level loggers, known deprecation warnings); `quiet=False`
    (``--verbose``) restores them."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    for message, category in KNOWN_LIBRARY_WARNINGS:
        warnings.filters[:] = [f for f in warnings.filters if not (f[0] == "ignore" and f[2] is category
                                                                   and getattr(f[1], "pattern", None) == message)]
        if quiet:
            warnings.filterwarnings("ignore", message=message, category=category)
    _hf_progress_bars(enabled=not quiet)


def _hf_progress_bars(enabled: bool) -> None:
    for name in PROGRESS_BAR_SWITCHES:
        if not enabled and name not in os.environ:
            os.environ[name] = "1"
            _switched.add(name)
        elif enabled and name in _switched:
            del os.environ[name]
            _switched.discard(name)
    # Libraries already imported read their switch no more: tell them directly.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()


class RunProgressBar(RichProgressBar):
    """Lightning's Rich bar showing the run's version as a whole number: ``v_num: 15``, not ``15.000`` (the bar
    formats every number as a float)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(items.get("v_num"), int):
            items["v_num"] = str(items["v_num"])
        return items


def with_progress_bar(callbacks: Any, enabled: Any) -> Any:
    """`callbacks` plus a `RunProgressBar` when the bar is on, Rich is installed and no bar was configured
    (the cases where Lightning would add its own RichProgressBar)."""
    listed = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if enabled is False or importlib.util.find_spec("rich") is None or any(isinstance(c, ProgressBar) for c in listed):
        return callbacks
    return [*listed, RunProgressBar()]
