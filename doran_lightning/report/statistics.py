"""Paired comparisons of two methods: differences by seed, their 95 % intervals, power, and the verdict wording.

Runs of two methods are paired by seed (the same seed draws the same data subsample and initialisation
noise for both), so the unit of replication is the seed and the interval is a paired t-interval over seeds.
Where both methods saved their per-example test predictions (``predictions.csv``), a paired bootstrap
resamples seeds and, within each drawn seed, test examples, with the same indices for both methods: it adds
the test set's own sampling noise to the seeds'.

The minimum detectable effect (MDE) is the true mean difference a two-sided paired t-test at α = 0.05 would
detect with 80 % power for the number of paired seeds, at the observed standard deviation of the
differences: ``(t_{1-α/2, n-1} + t_{power, n-1}) · sd / √n`` (the usual normal-approximation formula with t
quantiles). A difference whose interval covers 0 is "not distinguishable"; nothing here says "beats".
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

from doran_lightning.tags import TEST_PREDICTION_COLUMNS as PREDICTION_COLUMNS, TEST_PREDICTIONS

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_RESAMPLES = 2000
NOT_DISTINGUISHABLE = "not distinguishable"


class StatisticsError(ValueError):
    """Inputs that cannot be compared (unequal test sets, a malformed predictions file): one line, naming it."""


@dataclass(frozen=True)
class Interval:
    """A mean paired difference with its two-sided interval; ``n`` = seeds paired; bounds NaN when undefined."""

    estimate: float
    low: float
    high: float
    n: int
    kind: str  # "t over seeds" or "bootstrap seeds × test examples"

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def covers_zero(self) -> bool:
        """True also when the interval is undefined: no interval, no claim."""
        return not self.defined or self.low <= 0.0 <= self.high


def paired_by_seed(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list[Hashable], np.ndarray]:
    """The seeds both methods ran (sorted) and the differences a − b at them; unpaired seeds are left out."""
    seeds = _sorted_seeds(set(a) & set(b))
    seeds = [s for s in seeds if a[s] is not None and b[s] is not None and math.isfinite(a[s]) and math.isfinite(b[s])]
    return seeds, np.array([a[s] - b[s] for s in seeds], dtype=np.float64)


def _sorted_seeds(seeds: set[Hashable]) -> list[Hashable]:
    """Seeds in their natural order (numbers numerically), or as text when they do not compare."""
    try:
        return sorted(seeds)  # type: ignore[type-var]
    except TypeError:
        return sorted(seeds, key=str)


def t_interval(differences: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Mean of the paired differences with its t-interval over seeds (NaN bounds below 2 seeds)."""
    d = np.asarray(differences, dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "t over seeds")
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "t over seeds")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, "t over seeds")


def minimum_detectable_effect(sd_difference: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test detects with `power` at `n` seeds (NaN below 2)."""
    if n < 2 or not math.isfinite(sd_difference):
        return math.nan
    quantiles = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(quantiles * sd_difference / math.sqrt(n))


def seeds_needed(sd_difference: float, target: float, alpha: float = ALPHA, power: float = POWER,
                 most: int = 10_000) -> int | None:
    """The fewest paired seeds whose MDE at this sd is at most `target` (None: not within `most`, or sd unknown)."""
    if not math.isfinite(sd_difference) or target <= 0:
        return None
    if sd_difference == 0:
        return 2
    n = 2
    while n <= most:
        if minimum_detectable_effect(sd_difference, n, alpha, power) <= target:
            return n
        n += 1
    return None


def paired_bootstrap(correct_a: Mapping[Hashable, np.ndarray], correct_b: Mapping[Hashable, np.ndarray],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Percentile interval of mean(accuracy a − accuracy b) over seeds, resampling seeds × test examples.

    ``correct_*[seed]``: per test example, 1 where the method's prediction equals the target. Each resample
    draws the seeds with replacement and, for each drawn seed, the test examples with replacement; both
    methods are scored on the same drawn examples, so what they get right together cancels.
    """
    seeds = _sorted_seeds(set(correct_a) & set(correct_b))
    if not seeds:
        return Interval(math.nan, math.nan, math.nan, 0, "bootstrap seeds × test examples")
    sizes = {len(correct_a[s]) for s in seeds} | {len(correct_b[s]) for s in seeds}
    if len(sizes) != 1:
        raise StatisticsError(f"per-example predictions of unequal length ({sorted(sizes)} test examples): the runs "
                              "were not tested on the same test set; compare runs of one task and data only")
    diff = np.stack([np.asarray(correct_a[s], np.float64) - np.asarray(correct_b[s], np.float64) for s in seeds])
    n, m = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        drawn_seeds = rng.integers(n, size=n)
        examples = rng.integers(m, size=(n, m))  # one set of indices per drawn seed, shared by both methods
        means[r] = diff[drawn_seeds[:, None], examples].mean()
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(low), float(high), n, "bootstrap seeds × test examples")


def verdict(method: str, reference: str, intervals: Sequence[Interval], scale: float = 100.0,
            unit: str = "points") -> str:
    """The one wording rule: "not distinguishable" unless every interval is defined and excludes 0 on one side.

    ``intervals[0]`` is the t-interval over seeds: without it (one seed) nothing is claimed, since a bootstrap
    over one seed's test examples sees the test set's noise but not the training's. Otherwise
    ``"<method> above <reference> by x [lo, hi] points"`` (the first interval's bounds, scaled), or ``below`` with
    the bounds of reference − method.
    """
    if not intervals or not math.isfinite(intervals[0].estimate):
        return "no paired runs"
    first = intervals[0]
    if not first.defined:
        return f"{NOT_DISTINGUISHABLE} (no interval with {first.n} seed{'s' if first.n != 1 else ''})"
    if first.low == first.high == 0.0:
        # Every seed's difference is exactly 0 (e.g. a setting that changes no prediction): an MDE of 0 here says
        # nothing about power, so the wording says what happened.
        return f"{NOT_DISTINGUISHABLE}: identical at every seed"
    defined = [i for i in intervals if i.defined]
    if any(i.covers_zero for i in defined) or len({i.low > 0 for i in defined}) != 1:
        return NOT_DISTINGUISHABLE
    if first.low > 0:
        return f"{method} above {reference} by {scale * first.estimate:.2f} [{scale * first.low:.2f}, " \
               f"{scale * first.high:.2f}] {unit}"
    return f"{method} below {reference} by {-scale * first.estimate:.2f} [{-scale * first.high:.2f}, " \
           f"{-scale * first.low:.2f}] {unit}"


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(targets, predictions) of a test stage's ``predictions.csv`` (``index,target,prediction``), in index order."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != PREDICTION_COLUMNS:
            raise StatisticsError(f"{path}: expected the columns {','.join(PREDICTION_COLUMNS)}, got "
                                  f"{','.join(header) or 'nothing'}; not a test stage's predictions file")
        rows = [row for row in reader if row]
    try:
        order = np.argsort([int(row[0]) for row in rows], kind="stable")
    except (ValueError, IndexError) as error:
        raise StatisticsError(f"{path}: a row without an integer index ({error})") from error
    return (np.array([_label(rows[i][1]) for i in order], dtype=object),
            np.array([_label(rows[i][2]) for i in order], dtype=object))


def _label(text: str) -> Any:
    """A label as written ("3", "3.0", "food"): numbers compare as numbers, other labels as text."""
    try:
        return float(text)
    except ValueError:
        return text.strip()


def correctness(path: Path) -> np.ndarray:
    """Per test example of ``predictions.csv``: 1.0 where the prediction equals the target, else 0.0."""
    targets, predictions = read_predictions(path)
    return (targets == predictions).astype(np.float64)


def test_predictions(folders: Sequence[Path]) -> Path | None:
    """The test stage's ``predictions.csv`` among a run's event folders (the ``test`` sub folder first).

    A ``predictions.csv`` of another format (e.g. `predict`'s ``id,label,…``) is not one and is passed over.
    """
    for folder in sorted(folders, key=lambda f: f.name != "test"):
        path = folder / TEST_PREDICTIONS
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                if tuple(next(csv.reader(handle), ())) == PREDICTION_COLUMNS:
                    return path
    return None


def same_test_set(paths: Sequence[Path]) -> bool:
    """Whether every predictions file holds the same targets in the same order (the precondition of pairing)."""
    targets = [read_predictions(p)[0] for p in paths]
    return all(len(t) == len(targets[0]) and bool((t == targets[0]).all()) for t in targets[1:])
