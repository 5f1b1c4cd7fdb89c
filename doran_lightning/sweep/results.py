"""A sweep's results by comparison group: each run's group, the paired comparisons, the per-run CSV.

The group of a run is what `report.groups.run_group` read from its folder (stored in ``result.json`` by
`runs.summarise`). A result cached before groups existed is read again from its folder; a failed run takes
the group of the finished runs of its config and task (the sweep gives them one data, backbone and budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from doran_lightning.report.comparisons import compare_methods, write_runs_csv
from doran_lightning.report.groups import UNRECORDED, partition, run_group
from doran_lightning.report.runs import load_hparams
from doran_lightning.report.statistics import DEFAULT_MARGIN, correctness, test_predictions
from doran_lightning.sweep.plan import RunSpec, spec_from_dict


def _spec(result: dict[str, Any]) -> RunSpec:
    return spec_from_dict(result["spec"])


def _version_dir(result: dict[str, Any]) -> Path:
    spec = _spec(result)
    return Path(result["run_dir"]) / spec.variant / spec.version


def _cell(result: dict[str, Any]) -> tuple[str, str]:
    spec = result["spec"]
    return str(spec.get("config")), str(spec.get("task"))


def result_groups(results: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The comparison group of every result, in order (see the module docstring for failed and older results)."""
    known: dict[tuple[str, str], dict[str, str]] = {}
    groups: list[dict[str, str] | None] = []
    for result in results:
        group = result.get("group")
        if group is None and result.get("status") == "ok" and "run_dir" in result:
            root = _version_dir(result)
            group = run_group(root, load_hparams(root))
        if group is not None:
            known.setdefault(_cell(result), group)
        groups.append(group)
    return [group or known.get(_cell(result)) or {
        "task": _spec(result).label, "data": UNRECORDED, "backbone": UNRECORDED,
        "budget": f"max_epochs={result['spec'].get('max_epochs')}"} for group, result in zip(groups, results)]


def run_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished runs as comparison rows: the spec's variant, lr, fraction and seed; group; predictions."""
    rows = []
    for result, group in zip(results, result_groups(results)):
        if result.get("status") != "ok":
            continue
        spec = result["spec"]
        predictions = result.get("predictions")
        if predictions is None and "run_dir" in result:  # cached before predictions were recorded
            root = _version_dir(result)
            found = test_predictions([root / "test", root])
            predictions = str(found) if found else None
        n_test = result.get("n_test")
        if n_test is None and predictions:  # cached before the test size was recorded
            n_test = len(correctness(Path(predictions)))
        rows.append({**result, "variant": spec["variant"], "lr": spec["lr"], "fraction": spec["fraction"],
                     "seed": spec["seed"], "group": group, "predictions": predictions, "n_test": n_test})
    return rows


def comparisons_by_group(rows: Sequence[dict[str, Any]], reference: str, metric: str | None,
                         margin: float = DEFAULT_MARGIN) -> dict[str, list[dict[str, Any]]]:
    """{group label: `compare_methods` of that group's runs}: methods are compared within a group only; `margin`:
    the TOST margin in points."""
    return {label: compare_methods(members, reference, metric, margin)
            for label, (_, members) in partition(rows, lambda row: row["group"]).items()}


def write_run_csv(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """``results_runs.csv`` beside ``results.md``: one row per finished run."""
    return write_runs_csv(rows, out / "results_runs.csv")

