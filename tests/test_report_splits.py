"""`report` compares like with like (issue 43): no table or figure puts a test score beside a validation score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_report import hparams_for, training_scalars, write_run

from doran_lightning import report

METHODS = ("lora", "dora", "doran")
LRS = (1e-3, 3e-3)


def write_runs(logs: Path, untested: tuple[str, float, int] | None) -> None:
    """Three methods × two lrs × two seeds; validation scores in [0.6, 0.7), test scores in [0.9, 1.0), so a
    value tells its split. `untested` (method, lr, seed) is a run that was never tested."""
    for m, method in enumerate(METHODS):
        for l, lr in enumerate(LRS):
            for seed in (0, 1):
                scalars = training_scalars(seed)
                scalars["val/accuracy"] = [(39, 0.6 + 0.02 * m + 0.01 * l + 0.001 * seed)]
                scalars["test/accuracy"] = [(39, 0.9 + 0.02 * m + 0.01 * l + 0.001 * seed)]
                if (method, lr, seed) == untested:
                    del scalars["test/accuracy"]
                run = write_run(logs / f"{method}-lr{lr:g}-s{seed}", hparams_for(method, seed, lr=lr, fraction=1.0),
                                scalars)
                (run / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"task": "topics"}}}))


def split_of(value: float) -> str:
    assert 0.6 <= value < 0.7 or 0.9 <= value < 1.0, value
    return "val" if value < 0.7 else "test"


def shown_splits(summary: dict, suite_cells: list[float]) -> dict[str, set[str]]:
    """Table -> the splits of every value it shows."""
    fraction = [cell["mean"] for cells in summary["fraction_table"].values() for cell in cells.values()]
    per_lr = [point["mean"] for entry in summary["lr_sensitivity"] for point in entry["points"]]
    return {"fraction": {split_of(v) for v in fraction}, "lr": {split_of(v) for v in per_lr},
            "suite": {split_of(v / 100) for v in suite_cells}}


def run(tmp_path: Path, untested: tuple[str, float, int] | None) -> tuple[dict, str, list[float]]:
    logs, out = tmp_path / "logs", tmp_path / "out"
    write_runs(logs, untested)
    assert report.main([str(logs), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (table,) = report.suite_tables(summary["runs"], summary["metric"])
    cells = [cell[0] for row in table.cells.values() for cell in row.values() if cell is not None]
    return summary, (out / "summary.md").read_text() + (out / "suite_tasks.md").read_text(), cells


def test_one_untested_run_puts_every_table_on_validation_and_says_so(tmp_path: Path):
    summary, markdown, suite_cells = run(tmp_path, untested=("dora", 3e-3, 1))
    # Before issue 43 the fraction table showed lora's and doran's test scores beside dora's best validation.
    assert shown_splits(summary, suite_cells) == {"fraction": {"val"}, "lr": {"val"}, "suite": {"val"}}
    assert {cell["source"] for cells in summary["fraction_table"].values() for cell in cells.values()} == {"best_val"}
    assert markdown.count("Every cell: the best validation score") == 2  # the fraction and lr tables
    assert "last validation scores (a run has no test score)" in markdown  # the suite table's title
    # The grad norm TensorBoard holds (every log_every_n_steps) is named as such, not as the run summary's max.
    assert "| max logged grad norm |" in markdown and "| max grad norm |" not in markdown
    assert summary["fraction_table"]["doran"]["1"]["mean"] == pytest.approx(0.6 + 0.04 + 0.01 + 0.0005)


def test_every_run_tested_puts_every_table_on_test(tmp_path: Path):
    summary, markdown, suite_cells = run(tmp_path, untested=None)
    assert shown_splits(summary, suite_cells) == {"fraction": {"test"}, "lr": {"test"}, "suite": {"test"}}
    assert markdown.count("Every cell: the test score") == 2 and "Tasks (test metric, %)" in markdown
    # The lr inside a cell is still chosen on validation: 3e-3 has the higher validation score for every method.
    assert {cells["1"]["lr"] for cells in summary["fraction_table"].values()} == {3e-3}


def sweep_result(variant: str, seed: int, test: float | None, best_val: float) -> dict:
    spec = {"variant": variant, "fraction": 1.0, "seed": seed, "lr": 1e-3, "config": "c.yaml", "config_sha256": "0",
            "max_epochs": 1}
    group = {"task": "digits", "data": "d", "backbone": "b", "budget": "max_epochs=1"}
    return {"spec": spec, "status": "ok", "group": group, "test": test, "best_val": best_val, "metric": "accuracy",
            "num_classes": 10, "diverged": False}


def test_sweep_table_flags_a_method_at_chance_and_shows_one_split():
    from doran_lightning.sweep import cli

    # `sweep --quick` in issue 43 ended with every method at 10 % on 10 classes, and the table did not say so.
    results = [sweep_result("lora", seed, 0.1, 0.1) for seed in (0, 1)]
    results += [sweep_result("doran", seed, 0.92 + 0.01 * seed, 0.65) for seed in (0, 1)]
    rows = cli.aggregate(results)
    assert {row["variant"]: row["at_chance"] for row in rows} == {"lora": True, "doran": False}
    text = cli.markdown_table(rows, "accuracy", "cmd")
    assert "| lora | 0.001 | 0.1000 ± 0.0000 (n=2) **at chance** |" in text
    assert "| doran | 0.001 | 0.9250 ± 0.0050 (n=2) |" in text and "Every cell: the test score." in text
    # One untested run: every cell of its group shows validation, never a test score beside it.
    results[3] = {**results[3], "test": None}
    rows = {row["variant"]: row for row in cli.aggregate(results)}
    assert (rows["doran"]["mean"], rows["doran"]["source"], rows["lora"]["source"]) == (0.65, "best_val", "best_val")
