"""An lr search that cannot end on an edge of its grid unnoticed: edge extension and the pick's validation interval.

A pick at the smallest or largest lr of a method's grid says only that the best lr may lie beyond it. With
``sweep --edge-steps N`` the grid then grows one geometric step that way (the ratio of the two lrs at that end) and
the new lr is searched on the same seeds; this repeats until the pick is interior or N steps were added (the stated
limit: a pick still at an edge is then reported as such). Every pick is printed with the mean validation metric
of its search runs and that mean's 95 % t-interval over the search seeds.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from doran_lightning.report.statistics import t_interval

LOW, HIGH = "low", "high"


def edge_of(grid: Sequence[float], lr: float) -> str | None:
    """``"low"`` / ``"high"`` when `lr` is the smallest / largest lr of a grid of ≥ 2 lrs, else None."""
    lrs = sorted(set(grid))
    if len(lrs) < 2:
        return None
    if math.isclose(lr, lrs[0]):
        return LOW
    if math.isclose(lr, lrs[-1]):
        return HIGH
    return None


def next_lr(grid: Sequence[float], edge: str) -> float:
    """One geometric step beyond the grid's `edge` (the ratio of the two lrs at that end)."""
    lrs = sorted(set(grid))
    if edge == LOW:
        return lrs[0] * lrs[0] / lrs[1]
    return lrs[-1] * lrs[-1] / lrs[-2]


def extensions(grids: dict[str, list[float]], chosen: dict[Any, float], steps_taken: dict[str, int],
               limit: int) -> dict[str, float]:
    """{variant: the lr to add} for each variant whose pick lies at an edge of its grid and has steps left.

    `chosen` maps a variant, or (variant, task) when searched per task: a variant extends when any of its
    picks lies at an edge (the grid is one per variant).
    """
    added: dict[str, float] = {}
    for key, lr in chosen.items():
        variant = key[0] if isinstance(key, tuple) else key
        edge = edge_of(grids.get(variant, []), lr)
        if edge is None or steps_taken.get(variant, 0) >= limit or variant in added:
            continue
        added[variant] = next_lr(grids[variant], edge)
    return added


def describe_pick(key: Any, lr: float, grid: Sequence[float], validation: Sequence[float],
                  limit_reached: bool) -> str:
    """``dora=0.01 (val 81.20 [79.00, 83.40] over 3 search seeds; grid 0.003-0.03, interior)`` (values × 100)."""
    interval = t_interval([100 * v for v in validation])
    bounds = f"[{interval.low:.2f}, {interval.high:.2f}]" if interval.defined else "[no interval]"
    edge = edge_of(grid, lr)
    where = "interior" if edge is None else f"at the {edge} edge" + (" (extension limit reached)" if limit_reached
                                                                      else "")
    lrs = sorted(set(grid))
    name = "/".join(str(part) for part in key) if isinstance(key, tuple) else str(key)
    return (f"{name}={lr:g} (val {interval.estimate:.2f} {bounds} over {interval.n} search seed"
            f"{'s' if interval.n != 1 else ''}; grid {lrs[0]:g}-{lrs[-1]:g} of {len(lrs)}, {where})")


def validation_at(results: Sequence[dict[str, Any]], key: Any, lr: float) -> list[float]:
    """The best validation metric of the finished search runs of `key` (variant or (variant, task)) at `lr`."""
    found = []
    for result in results:
        spec = result["spec"]
        this = (spec["variant"], spec.get("task")) if isinstance(key, tuple) else spec["variant"]
        value = result.get("best_val")
        if this == key and math.isclose(spec["lr"], lr) and result.get("status") == "ok" and value is not None \
                and math.isfinite(value):
            found.append(float(value))
    return found
