"""Paired comparisons of two methods: differences by seed, their 95 % intervals, power, and the verdict wording.

Runs of two methods are paired by seed (the same seed draws the same data subsample and initialisation
noise for both). Where every paired run saved its per-example test predictions (``predictions.csv``), the
comparison is a CROSSED bootstrap (`crossed_bootstrap`): each replicate draws one resample of the test
examples, shared by every seed and both methods, and one resample of the seeds. Both the seeds and the test set
are then samples: a test set with a persistent per-example effect (some images favour one method at every seed)
widens the interval, which a t-interval over seeds, conditional on the one test set, cannot see.

From the crossed bootstrap's replicates of the mean difference come its sd ``se``, the 95 % interval
``estimate ± z_{0.975}·se``, the two-sided p of "no difference" and the TOST p of "equivalent within ±margin"
(normal approximation with that sd), and the minimum detectable effect ``MDE = (z_{1-α/2} + z_{power})·se``.
Without per-example predictions (older runs) the same quantities come from the t-distribution over seeds
(``se = sd/√n``, n − 1 degrees of freedom); the tables say so ("seeds only").

Verdicts (`decide`), with Holm's adjustment across the rows of a table (`holm`): "X above Y" / "X below Y" when
the difference test rejects at α, else "equivalent within ±m" when the TOST rejects at α, else "not
distinguishable". Nothing here says "beats".
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
    kind: str  # "t over seeds" or "crossed bootstrap seeds × test examples"
    se: float = math.nan  # standard error of the estimate (t: sd/√n; bootstrap: the replicates' sd)
    df: float = math.inf  # degrees of freedom of its reference distribution (inf: normal)

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
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * se)
    return Interval(mean, mean - half, mean + half, n, "t over seeds", se, n - 1)


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


CROSSED = "crossed bootstrap seeds × test examples"


def _differences(correct_a: Mapping[Hashable, np.ndarray], correct_b: Mapping[Hashable, np.ndarray]) -> np.ndarray:
    """seeds × test examples matrix of correct_a − correct_b over the seeds both have (empty: no seed)."""
    seeds = _sorted_seeds(set(correct_a) & set(correct_b))
    if not seeds:
        return np.empty((0, 0))
    sizes = {len(correct_a[s]) for s in seeds} | {len(correct_b[s]) for s in seeds}
    if len(sizes) != 1:
        raise StatisticsError(f"per-example predictions of unequal length ({sorted(sizes)} test examples): the runs "
                              "were not tested on the same test set; compare runs of one task and data only")
    return np.stack([np.asarray(correct_a[s], np.float64) - np.asarray(correct_b[s], np.float64) for s in seeds])


def _draw_weights(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """resamples × size: how often each index was drawn in `size` draws with replacement, divided by `size`.

    A replicate's mean of a seeds × examples matrix D is then ``w_seed[r] @ D @ w_example[r]``: the same drawn
    examples for every drawn seed (crossed), where the nested scheme would draw new examples per seed.
    """
    drawn = rng.integers(size, size=(resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * size).reshape(resamples, size) / size


def crossed_bootstrap(correct_a: Mapping[Hashable, np.ndarray], correct_b: Mapping[Hashable, np.ndarray],
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds of accuracy a − accuracy b with its crossed-bootstrap sd and normal interval.

    ``correct_*[seed]``: per test example, 1 where the method's prediction equals the target. Each replicate
    resamples the seeds once and the test examples once, the same examples for every seed and both methods
    (what the methods get right together cancels). ``se`` = the replicates' sd; bounds = estimate ± z·se.
    """
    return crossed_bootstrap_tasks([(correct_a, correct_b)], resamples, seed, confidence)


def crossed_bootstrap_tasks(tasks: Sequence[tuple[Mapping[Hashable, np.ndarray], Mapping[Hashable, np.ndarray]]],
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                            confidence: float = CONFIDENCE) -> Interval:
    """`crossed_bootstrap` of the mean over tasks of each task's accuracy difference (a suite's mean column).

    Every task must hold the same seeds. A replicate draws one resample of the seeds, shared by every task, and
    per task one resample of its test examples, shared by every seed and both methods.
    """
    diffs = [_differences(a, b) for a, b in tasks]
    if not diffs or any(d.size == 0 for d in diffs):
        return Interval(math.nan, math.nan, math.nan, 0, CROSSED)
    n = diffs[0].shape[0]
    if any(d.shape[0] != n for d in diffs):
        raise StatisticsError("the tasks of a crossed bootstrap hold different numbers of seeds; pair them first")
    rng = np.random.default_rng(seed)
    w_seed = _draw_weights(rng, n, resamples)
    replicates = np.mean([np.einsum("rm,rm->r", w_seed @ d, _draw_weights(rng, d.shape[1], resamples))
                          for d in diffs], axis=0)
    se = float(replicates.std(ddof=1))
    estimate = float(np.mean([d.mean() for d in diffs]))
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return Interval(estimate, estimate - half, estimate + half, n, CROSSED, se)


paired_bootstrap = crossed_bootstrap  # the name report and older callers import


def nested_bootstrap(correct_a: Mapping[Hashable, np.ndarray], correct_b: Mapping[Hashable, np.ndarray],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """The scheme used before issue 40, kept to show its shortfall: new example indices for each drawn seed.

    It treats each seed's test set as a fresh sample, so a per-example effect shared by every seed averages out
    over seeds and the interval is too narrow (tests/test_statistics.py measures its coverage).
    """
    diff = _differences(correct_a, correct_b)
    if diff.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "nested bootstrap")
    n, m = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        drawn = rng.integers(n, size=n)
        means[r] = diff[drawn[:, None], rng.integers(m, size=(n, m))].mean()
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(low), float(high), n, "nested bootstrap", float(means.std(ddof=1)))


def bootstrap_mde(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """MDE from a bootstrap sd of the mean difference: (z_{1-α/2} + z_{power})·se (NaN when se is unknown)."""
    if not math.isfinite(se):
        return math.nan
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def crossed_seeds_needed(sd_seed: float, se_examples: float, target: float, alpha: float = ALPHA,
                         power: float = POWER, most: int = 10_000) -> int | None:
    """Seeds whose crossed-bootstrap MDE is at most `target`: the smallest n with
    (z_{1-α/2} + z_{power})·√(sd_seed²/n + se_examples²) ≤ target; None when the test set's own part
    (`se_examples`, which no number of seeds shrinks) already reaches the target, or past `most`."""
    if not (math.isfinite(sd_seed) and math.isfinite(se_examples)) or target <= 0:
        return None
    room = (target / (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))) ** 2 - se_examples ** 2
    if room <= 0:
        return None
    n = max(2, math.ceil(sd_seed ** 2 / room - 1e-12))
    return n if n <= most else None


def interval_mde(interval: Interval, alpha: float = ALPHA, power: float = POWER) -> float:
    """The MDE that goes with an interval: t quantiles over seeds, z quantiles for the crossed bootstrap."""
    if interval.kind == "t over seeds":
        return minimum_detectable_effect(interval.se * math.sqrt(interval.n), interval.n, alpha, power)
    return bootstrap_mde(interval.se, alpha, power)


# ---------------------------------------------------------------- tests and verdicts
ABOVE, BELOW = "above", "below"
EQUIVALENT = "equivalent within ±{margin:g}"
DEFAULT_MARGIN = 1.0  # points: the TOST margin unless a table sets its own


def _distribution(interval: Interval) -> Any:
    return stats.norm if not math.isfinite(interval.df) else stats.t(interval.df)


def difference_p(interval: Interval) -> float:
    """Two-sided p of "no difference" (estimate / se against t(df) or the normal); NaN without an se."""
    if not (math.isfinite(interval.se) and math.isfinite(interval.estimate)):
        return math.nan
    if interval.se == 0:
        return 1.0 if interval.estimate == 0 else 0.0
    return float(2 * _distribution(interval).sf(abs(interval.estimate) / interval.se))


def tost_p(interval: Interval, margin: float) -> float:
    """p of the two one-sided tests of |Δ| ≥ margin (the larger of the two; small = equivalent within ±margin)."""
    if not (math.isfinite(interval.se) and math.isfinite(interval.estimate)) or margin <= 0:
        return math.nan
    if interval.se == 0:
        return 0.0 if abs(interval.estimate) < margin else 1.0
    dist = _distribution(interval)
    lower = dist.sf((interval.estimate + margin) / interval.se)  # H0: Δ ≤ −margin
    upper = dist.cdf((interval.estimate - margin) / interval.se)  # H0: Δ ≥ +margin
    return float(max(lower, upper))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted)."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    k = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (k - rank) * p))
        adjusted[i] = running
    return adjusted


def decide(method: str, reference: str, estimate: float, p_difference: float, p_equivalence: float, margin: float,
           alpha: float = ALPHA) -> str:
    """The verdict words: "X above Y", "X below Y", "equivalent within ±m" (m as given), "not distinguishable".

    A difference is claimed when its (adjusted) p is below α; equivalence when the TOST's (adjusted) p is.
    """
    if math.isfinite(p_difference) and p_difference < alpha and estimate != 0:
        return f"{method} {ABOVE if estimate > 0 else BELOW} {reference}"
    if math.isfinite(p_equivalence) and p_equivalence < alpha:
        return EQUIVALENT.format(margin=margin)
    return NOT_DISTINGUISHABLE


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
