"""The stability rules, one home for each: loss spike, divergence, collapse to chance, gradient jump.

The live alarms (`alarms.py`), the run summary, `report` and the benchmarks (`sample_efficiency`,
`noise_stress`) all decide with these functions and constants, so "loss spike" means the same
thing in a TensorBoard alarm, a report table and a sweep summary. Plain Python and numpy: no
Lightning, no logging. Also here: the natural sort of layer names and the mean ± std of a sweep cell.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Loss spike: a finite loss above SPIKE_FACTOR × the median of the previous SPIKE_WINDOW finite losses,
# once MIN_HISTORY of them are known.
SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 50
MIN_HISTORY = 5
# Episode or alarm (issue 31): a spike is an *episode* when the median of the next SPIKE_RECOVERY finite losses is
# back at or below the spike's threshold (one noisy batch, recovered); otherwise the run has not recovered: an alarm.
SPIKE_RECOVERY = 5
# Divergence: the loss ends non-finite, or its last DIVERGE_WINDOW values average DIVERGE_FACTOR × its first.
DIVERGE_FACTOR = 1.5
DIVERGE_WINDOW = 5
# Collapse: after warm-up, the training loss's running median at or above COLLAPSE_LOSS_RATIO × ln C (what
# predicting the uniform distribution scores), or a validation accuracy within CHANCE_MARGIN × 1/C of chance.
COLLAPSE_LOSS_RATIO = 0.97
CHANCE_MARGIN = 0.1
# Gradient jump: a value above GRAD_JUMP_FACTOR × the largest of the previous GRAD_WINDOW values (a steady
# rise, e.g. while B leaves zero, is no jump) and above GRAD_JUMP_MIN in absolute terms.
GRAD_JUMP_FACTOR = 10.0
GRAD_WINDOW = 20
GRAD_JUMP_MIN = 1e-2


class SpikeDetector:
    """Streaming loss-spike rule: `update(loss)` returns the threshold the loss was compared with (None: too early)."""

    def __init__(self, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW, min_history: int = MIN_HISTORY) -> None:
        self.factor, self.min_history = factor, min_history
        self.history: deque = deque(maxlen=window)

    def threshold(self) -> float | None:
        if len(self.history) < self.min_history:
            return None
        median = statistics.median(self.history)
        return self.factor * median if median > 0 else None

    def update(self, value: float) -> float | None:
        """The threshold for `value` (from the values before it); non-finite values are skipped entirely."""
        if not math.isfinite(value):
            return None
        threshold = self.threshold()
        self.history.append(value)
        return threshold


def spike_indices(values: Sequence[float] | np.ndarray, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                  min_history: int = MIN_HISTORY) -> np.ndarray:
    """Indices of the loss spikes in a whole series (the rule of `SpikeDetector`)."""
    detector = SpikeDetector(factor, window, min_history)
    spikes = []
    for index, value in enumerate(values):
        threshold = detector.update(float(value))
        if threshold is not None and value > threshold:
            spikes.append(index)
    return np.array(spikes, dtype=np.int64)


def spike_recovered(threshold: float, later: Sequence[float]) -> bool:
    """Whether the losses after a spike (up to SPIKE_RECOVERY of them) came back: finite, median ≤ the threshold."""
    if not later or not all(math.isfinite(value) for value in later):
        return False
    return statistics.median(later) <= threshold


def unrecovered_spikes(values: Sequence[float] | np.ndarray, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                       min_history: int = MIN_HISTORY, recovery: int = SPIKE_RECOVERY) -> np.ndarray:
    """Indices of the spikes of a whole series that did not recover within `recovery` values — the alarms'
    rule: a spike opens a window of `recovery` values, and spikes inside that window belong to it."""
    detector = SpikeDetector(factor, window, min_history)
    thresholds = [detector.update(float(value)) for value in values]
    kept, window_end = [], -1
    for index in spike_indices(values, factor, window, min_history):
        if index < window_end:
            continue
        window_end = index + recovery
        if not spike_recovered(thresholds[index], [float(v) for v in values[index + 1:index + 1 + recovery]]):
            kept.append(index)
    return np.array(kept, dtype=np.int64)


def loss_diverged(losses: np.ndarray) -> bool:
    """The loss ends non-finite, or its last steps average DIVERGE_FACTOR × its first steps' or more."""
    head, tail = losses[:DIVERGE_WINDOW], losses[-DIVERGE_WINDOW:]
    return bool(not np.isfinite(tail).all() or float(np.mean(tail)) > DIVERGE_FACTOR * float(np.nanmean(head)))


def grad_jump_threshold(history: Iterable[float], factor: float = GRAD_JUMP_FACTOR,
                        minimum: float = GRAD_JUMP_MIN) -> float | None:
    """The level a gradient norm must exceed to be a jump: factor × the window's maximum, at least `minimum`."""
    values = [value for value in history if math.isfinite(value)]
    return max(factor * max(values), minimum) if values else None


def uninformed_loss(num_classes: int) -> float:
    """Cross-entropy of the uniform prediction over C classes: ln C."""
    return math.log(num_classes)


def loss_collapsed(recent_losses: Sequence[float], num_classes: int | None) -> bool:
    """The median of the recent training losses sits at or above COLLAPSE_LOSS_RATIO × ln C (C >= 2)."""
    finite = [value for value in recent_losses if math.isfinite(value)]
    if not num_classes or num_classes < 2 or not finite:
        return False
    return statistics.median(finite) >= COLLAPSE_LOSS_RATIO * uninformed_loss(num_classes)


def chance_level(metric: str, num_classes: int | None) -> float | None:
    """What guessing scores on `metric` (accuracy: 1/C; matthews: 0); None where not defined."""
    if not num_classes or num_classes < 2:
        return None
    return {"accuracy": 1.0 / num_classes, "matthews": 0.0}.get(metric)


def chance_bound(metric: str, num_classes: int | None) -> float | None:
    """The highest `metric` value still counted as chance: the chance level plus CHANCE_MARGIN × 1/C."""
    chance = chance_level(metric, num_classes)
    return None if chance is None or not num_classes else chance + CHANCE_MARGIN / num_classes


def at_chance(metric: str, value: float | None, num_classes: int | None) -> bool:
    """`value` of `metric` is no better than chance (within CHANCE_MARGIN × 1/C), or not finite."""
    bound = chance_bound(metric, num_classes)
    if bound is None or value is None:
        return False
    return not math.isfinite(value) or value <= bound


def warmup_length(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """Warm-up steps of the lr schedule: `warmup_steps`, or `warmup_ratio` of the total when that is 0."""
    return warmup_steps or int(warmup_ratio * total_steps)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", text)]


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, population std and count of the finite values (NaNs when none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)
