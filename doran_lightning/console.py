"""What the command line prints: our own lines, and a quiet mode that keeps library chatter out.

Our messages (parameter counts, statistics cost, alarms without a progress bar, the run summary, where
predictions and exports went) go through `say`, on the ``doran_lightning`` logger, to stderr.
`quiet_libraries` (the CLI's default; ``--verbose`` skips it) silences, at their source, lines a user
cannot act on: Lightning's and Fabric's INFO messages (device banners, the litlogger advertisement,
"Restoring states…") and one deprecation warning that the pinned Lightning triggers inside torch.
Warnings stay warnings: nothing else is filtered.
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only

LOGGER = logging.getLogger("doran_lightning")
# Libraries whose INFO lines are banners and progress chatter; their warnings and errors still show.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# (message regex, category) of warnings raised inside pinned dependencies that no user can act on.
KNOWN_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # lightning/pytorch/utilities/_pytree.py builds torch's LeafSpec, deprecated in torch 2.10+.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)

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


def quiet_libraries() -> None:
    """Silence the library lines listed above (INFO-level loggers and known deprecation warnings)."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
