"""Methods vs a reference within one group (report.comparisons): selection on validation, pairing, bootstrap, CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from doran_lightning.report import comparisons
from doran_lightning.report.statistics import holm, minimum_detectable_effect

GROUP = {"task": "digits", "data": "Digits", "backbone": "vit", "budget": "max_epochs=8"}


def row(variant: str, seed: int, lr: float, val: float, test: float | None, **extra) -> dict:
    return {"variant": variant, "seed": seed, "lr": lr, "fraction": 1.0, "best_val": val, "test": test,
            "group": GROUP, "run": f"{variant}-{lr}-{seed}", **extra}


def test_each_method_at_its_validation_lr_paired_by_seed_with_the_mde():
    rng = np.random.default_rng(2)
    dora = {s: 0.80 + 0.01 * rng.standard_normal() for s in range(6)}
    doran = {s: dora[s] + 0.004 + 0.005 * rng.standard_normal() for s in range(6)}
    rows = [row("dora", s, 1e-3, 0.7, v) for s, v in dora.items()]
    rows += [row("doran", s, 1e-3, 0.75, v) for s, v in doran.items()]
    rows += [row("doran", s, 3e-3, 0.74, 0.99) for s in range(6)]  # better on test, worse on validation: not chosen
    rows += [row("doran", 9, 1e-3, 0.75, 0.5)]  # a seed DoRA did not run: unpaired, left out
    rows += [row("dora", 7, 1e-3, 0.7, None), row("doran", 7, 1e-3, 0.75, 0.8)]  # a failed test: that seed unpaired
    (found,) = comparisons.compare_methods(rows, "dora")
    diff = np.array([doran[s] - dora[s] for s in range(6)])
    expected = stats.ttest_rel([doran[s] for s in range(6)], [dora[s] for s in range(6)]).confidence_interval(0.95)
    assert found["lr"] == 1e-3 and found["seeds"] == list(range(6)) and found["source"] == "test"
    assert found["difference"] == pytest.approx(100 * diff.mean())
    assert found["t_interval"] == pytest.approx([100 * expected.low, 100 * expected.high])
    assert found["mde"] == pytest.approx(100 * minimum_detectable_effect(diff.std(ddof=1), 6))
    assert found["verdict"].startswith("not distinguishable") == (expected.low <= 0 <= expected.high)


def test_without_test_scores_the_comparison_says_it_read_validation():
    rows = [row("dora", s, 1e-3, 0.70 + 0.01 * s, None) for s in range(3)]
    rows += [row("lora", s, 1e-3, 0.60 + 0.01 * s + 0.001 * s * s, None) for s in range(3)]
    (found,) = comparisons.compare_methods(rows, "dora")
    assert found["source"] == "best_val" and found["method"] == "lora" and found["bootstrap_interval"] is None
    assert found["verdict"] == "lora below dora"
    assert comparisons.compare_methods(rows, "doran") == []  # no reference runs: nothing compared


def test_bootstrap_needs_every_paired_run_predictions_of_one_test_set(tmp_path: Path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=30)

    def saved(name: str, correct: np.ndarray, order: np.ndarray = targets) -> str:
        path = tmp_path / f"{name}.csv"
        predictions = np.where(correct == 1, order, (order + 1) % 3)
        path.write_text("index,target,prediction\n" + "".join(f"{i},{t},{p}\n" for i, (t, p) in enumerate(zip(order, predictions))))
        return str(path)

    rows = []
    for seed in range(3):
        for variant, rate in (("dora", 0.6), ("doran", 0.7)):
            correct = (rng.random(30) < rate).astype(int)
            rows.append(row(variant, seed, 1e-3, 0.7, correct.mean(), predictions=saved(f"{variant}{seed}", correct), n_test=30))
    (found,) = comparisons.compare_methods(rows, "dora")
    assert found["bootstrap_interval"] is not None and found["n_test"] == 30 and found["note"] is None
    low, high = found["bootstrap_interval"]
    assert low < found["difference"] < high
    rows[-1]["predictions"] = saved("shuffled", np.ones(30, int), order=targets[::-1])  # another test set
    (found,) = comparisons.compare_methods(rows, "dora")
    assert found["bootstrap_interval"] is None and "different test sets" in found["note"]
    assert "different test sets" in "\n".join(comparisons.comparison_markdown([found], "dora"))


def test_runs_csv_has_one_row_per_run_with_the_group_fields(tmp_path: Path):
    rows = [row("dora", 0, 1e-3, 0.7, 0.71, n_test=50, run_dir="/runs/dora/abc"), row("doran", 0, 1e-3, 0.7, 0.72)]
    path = comparisons.write_runs_csv(rows, tmp_path / "runs.csv")
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))
    assert list(records[0]) == list(comparisons.RUN_COLUMNS)
    assert records[0] == {**GROUP, "method": "dora", "variant": "dora", "lr": "0.001", "fraction": "1.0", "seed": "0",
                          "best_val": "0.7", "test": "0.71", "n_test": "50", "run": "/runs/dora/abc"}
    assert records[1]["run"] == "doran-0.001-0" and records[1]["n_test"] == ""


def test_lrs_are_judged_on_the_seeds_they_share():
    """A sweep: lr search on seeds 0-1, the winner then run on seeds 0-5; the choice reads seeds 0-1 only."""
    rows = [row("dora", s, 1e-3, 0.70, 0.70) for s in range(6)]
    rows += [row("doran", s, 1e-3, 0.80 if s < 2 else 0.60, 0.7) for s in range(6)]  # won the search, worse later
    rows += [row("doran", s, 3e-3, 0.75, 0.7) for s in range(2)]
    (found,) = comparisons.compare_methods(rows, "dora")
    assert found["lr"] == 1e-3 and found["n"] == 6


def test_a_comparison_at_different_lrs_says_the_lrs_may_make_the_difference():
    rows = [row("dora", s, 1e-2, 0.70, 0.70 + 0.01 * s) for s in range(4)]
    rows += [row("doran", s, 3e-2, 0.75, 0.74 + 0.012 * s) for s in range(4)]
    rows += [row("lora", s, 1e-2, 0.72, 0.71 + 0.009 * s) for s in range(4)]
    lines = comparisons.comparison_markdown(comparisons.compare_methods(rows, "dora"), "dora")
    notes = [line for line in lines if "the lrs'" in line]
    assert notes == [next(line for line in notes if line.startswith("- doran ran at lr 0.03, dora at 0.01"))]


def test_the_lr_note_reads_lrs_stored_as_text():
    """A run's hparams.yaml gives `report` lrs such as "1e-2" as strings (YAML 1.1 reads no float there)."""
    rows = [row("dora", s, "1e-2", 0.70, 0.70 + 0.01 * s) for s in range(3)]
    rows += [row("doran", s, "3e-2", 0.75, 0.74 + 0.012 * s) for s in range(3)]
    lines = comparisons.comparison_markdown(comparisons.compare_methods(rows, "dora"), "dora")
    assert any(line.startswith("- doran ran at lr 0.03, dora at 0.01") for line in lines)


def test_verdicts_are_holm_adjusted_across_the_rows_and_equivalence_needs_the_tost():
    offsets = [0.001, -0.002, 0.003, 0.0, 0.002, -0.001, 0.001, 0.0]
    rows = [row("dora", s, 1e-3, 0.7, 0.80 + o) for s, o in enumerate(offsets)]
    rows += [row("doran", s, 1e-3, 0.7, 0.80 + o + 0.001 * (-1) ** s) for s, o in enumerate(offsets)]  # ±0.1 point
    rows += [row("lora", s, 1e-3, 0.7, 0.78 + o + 0.004 * (-1) ** s) for s, o in enumerate(offsets)]  # −2 points
    table = comparisons.compare_methods(rows, "dora", margin=1.0)
    found = {entry["method"]: entry for entry in table}
    assert [found["doran"]["p_holm"], found["lora"]["p_holm"]] == pytest.approx(
        holm([found["doran"]["p"], found["lora"]["p"]]))
    assert found["lora"]["verdict"] == "lora below dora" and found["doran"]["verdict"] == "equivalent within ±1"
    # a margin of 0.05 points is tighter than the data shows: no equivalence, no difference
    narrow = {e["method"]: e for e in comparisons.compare_methods(rows, "dora", margin=0.05)}
    assert narrow["doran"]["verdict"] == "not distinguishable"
    lines = comparisons.comparison_markdown(table, "dora")
    assert "- TOST margin: ±1 points; Holm across the 2 rows of this table" in lines
    assert all(entry["basis"] == "seeds only" for entry in table)
    assert any("seeds only: not every paired run saved predictions.csv" in line for line in lines)


def test_runs_that_logged_the_older_macro_accuracy_are_marked():
    old = {"test/accuracy": 0.8}
    new = {"test/accuracy": 0.8, "test/balanced_accuracy": 0.79}
    rows = [row("dora", s, 1e-3, 0.7, 0.80 + 0.01 * s, test_scalars=old) for s in range(3)]
    rows += [row("doran", s, 1e-3, 0.7, 0.81 + 0.012 * s, test_scalars=new) for s in range(3)]
    (found,) = comparisons.compare_methods(rows, "dora")
    assert comparisons.MACRO_NOTE in found["note"]
    for entry in rows:
        entry["test_scalars"] = new
    (found,) = comparisons.compare_methods(rows, "dora")
    assert comparisons.MACRO_NOTE not in found["note"]


def test_one_seed_is_never_a_verdict_even_with_predictions(tmp_path: Path):
    targets = np.arange(200) % 3
    rows = []
    for variant, hits in (("dora", 100), ("doran", 160)):  # 30 points apart on 200 test examples, one seed
        path = tmp_path / f"{variant}.csv"
        predictions = np.where(np.arange(200) < hits, targets, (targets + 1) % 3)
        path.write_text("index,target,prediction\n" + "".join(f"{i},{t},{p}\n" for i, (t, p) in enumerate(zip(targets, predictions))))
        rows.append(row(variant, 0, 1e-3, 0.7, hits / 200, predictions=str(path), n_test=200))
    (found,) = comparisons.compare_methods(rows, "dora")
    assert found["basis"] == "crossed" and math.isnan(found["p"])  # the test examples alone would "decide"
    assert found["verdict"] == "not distinguishable (no interval with 1 seed)"
