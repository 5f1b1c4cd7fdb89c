"""`report` groups runs by task, data, backbone and budget and never mixes two groups (issue 29)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from doran_lightning import report
from test_report import PROJECTIONS, hparams_for, training_scalars, write_run

TOPICS = {"data": {"class_path": "doran_lightning.data.language.BuiltinTextDataModule",
                   "init_args": {"max_length": 64, "batch_size": 16, "seed": 0, "fraction": 1.0}},
          "model": {"backbone": {"source": "hf", "name": "minilm"}}, "trainer": {"max_epochs": 5}}
DIGITS = {"data": {"class_path": "doran_lightning.data.vision.DigitsDataModule",
                   "init_args": {"classes": [5, 6, 7, 8, 9], "image_size": 32, "batch_size": 32, "seed": 0}},
          "model": {"backbone": {"source": "timm", "name": "vit_tiny_patch16_224",
                                 "checkpoint_path": "runs/pretrained/vit_tiny_digits04.safetensors"}},
          "trainer": {"max_epochs": 8}}
N_TEST = 50


def fake_run(folder: Path, config: dict, variant: str, seed: int, lr: float, val: float,
             correct: np.ndarray | None = None, test: float = 0.5) -> Path:
    """A run with its saved config; with `correct`, a test sub folder holding predictions.csv and its accuracy."""
    scalars = training_scalars(seed)
    scalars["val/accuracy"] = [(39, val)]
    scalars.pop("test/accuracy")
    run_dir = write_run(folder, hparams_for(variant, seed, lr=lr, fraction=1.0), scalars)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if correct is not None:
        targets = np.arange(N_TEST) % 5 + 5
        predictions = np.where(correct == 1, targets, 5 + (targets - 4) % 5)
        test = float(correct.mean())
        write_run(run_dir / "test", None, {"test/accuracy": [(39, test)]})
        lines = ["index,target,prediction"] + [f"{i},{t},{p}" for i, (t, p) in enumerate(zip(targets, predictions))]
        (run_dir / "test" / "predictions.csv").write_text("\n".join(lines) + "\n")
    else:
        write_run(run_dir / "test", None, {"test/accuracy": [(39, test)]})
    return run_dir


def test_report_over_two_backbones_draws_nothing_that_mixes_them(tmp_path: Path):
    logs, rng = tmp_path / "lightning_logs", np.random.default_rng(0)
    version = iter(range(100))
    for lr in (1e-3, 2e-3):  # MiniLM topics: DoRAN only
        for seed in (0, 1):
            fake_run(logs / f"version_{next(version)}", TOPICS, "doran", seed, lr, val=0.9 + lr, test=0.95)
    tests: dict[tuple[str, float], dict[int, float]] = {}
    for variant, lrs in (("dora", (1e-2,)), ("doran", (1e-2, 2e-2))):  # ViT digits: DoRA and DoRAN
        for lr in lrs:
            for seed in (0, 1, 2):
                correct = (rng.random(N_TEST) < (0.7 if lr == 2e-2 else 0.6 + 0.05 * (variant == "doran"))).astype(int)
                # validation prefers lr 1e-2 for DoRAN although its test is higher at 2e-2: selection reads val only
                run = fake_run(logs / f"version_{next(version)}", DIGITS, variant, seed, lr, val=0.8 - lr, correct=correct)
                tests.setdefault((variant, lr), {})[seed] = float(correct.mean())
                assert run.is_dir()
    out = tmp_path / "out"
    assert report.main([str(logs / "version_*"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    topics, digits = summary["run_groups"]
    assert topics["fields"] == {"task": "BuiltinText", "data": "BuiltinTextDataModule(max_length=64)",
                                "backbone": "minilm", "budget": "max_epochs=5"}
    assert digits["fields"]["backbone"] == "vit_tiny_patch16_224(vit_tiny_digits04.safetensors)"
    assert digits["fields"]["data"] == "DigitsDataModule(classes=[5,6,7,8,9], image_size=32)"
    assert (topics["runs"], digits["runs"]) == (4, 9) and topics["methods"] == ["doran"]
    # lr sensitivity: one DoRAN line per backbone, never one from 1e-3 (MiniLM) to 2e-2 (digits)
    (topic_line,) = topics["lr_sensitivity"]
    (digit_line,) = digits["lr_sensitivity"]
    assert [p["lr"] for p in topic_line["points"]] == [1e-3, 2e-3] and topic_line["runs"] == 4
    assert [p["lr"] for p in digit_line["points"]] == [1e-2, 2e-2] and digit_line["runs"] == 6
    # fraction table and ΔM/ΔD correlation: each group's own methods and points only
    assert set(topics["fraction_table"]) == {"doran"} and set(digits["fraction_table"]) == {"dora", "doran"}
    assert digits["fraction_table"]["doran"]["1"]["lr"] == 1e-2  # chosen on validation
    assert topics["correlations"]["doran"]["points"] == 4 * len(PROJECTIONS) * 8
    assert digits["correlations"]["doran"]["points"] == 6 * len(PROJECTIONS) * 8
    assert summary["lr_sensitivity"] == [] and summary["fraction_table"] == {} and summary["correlations"] == {}
    # the figures of each group lie in its own folder
    folders = {Path(p).parent.name for p in summary["figures"]}
    assert folders == {topics["folder"], digits["folder"]} and topics["folder"].startswith("group1-BuiltinText")
    # paired differences within the digits group only: DoRAN at its val-chosen lr vs DoRA, paired by seed
    assert topics["comparisons"] == []
    (comparison,) = digits["comparisons"]
    ours, theirs = tests[("doran", 1e-2)], tests[("dora", 1e-2)]
    expected = stats.ttest_rel([ours[s] for s in (0, 1, 2)], [theirs[s] for s in (0, 1, 2)]).confidence_interval(0.95)
    assert comparison["t_interval"] == pytest.approx([100 * expected.low, 100 * expected.high])
    assert comparison["n"] == 3 and comparison["n_test"] == N_TEST and comparison["bootstrap_interval"] is not None
    # every paired run saved predictions.csv: the crossed bootstrap gives the interval, the MDE and the p
    assert comparison["basis"] == "crossed" and comparison["interval"] == comparison["bootstrap_interval"]
    assert comparison["mde"] == pytest.approx(2.801585 * comparison["se"], rel=1e-5)
    text = (out / "summary.md").read_text()
    assert f"### Group 1: task=BuiltinText · data=BuiltinTextDataModule(max_length=64) · backbone=minilm" in text
    assert "## Paired differences vs dora" in text and "| doran | dora | 1.0 | test | 3 | 50 |" in text
    assert "beats" not in text and "closes" not in text
    with open(out / "runs.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 13 and {r["backbone"] for r in records} == {"minilm", digits["fields"]["backbone"]}
    assert {r["n_test"] for r in records if r["backbone"] == "minilm"} == {""}
    assert {r["n_test"] for r in records if r["backbone"] != "minilm"} == {str(N_TEST)}


def test_a_malformed_predictions_file_costs_the_bootstrap_not_the_report(tmp_path: Path, capsys):
    run = fake_run(tmp_path / "logs" / "version_0", DIGITS, "dora", 0, 1e-2, val=0.7, correct=np.ones(N_TEST, int))
    (run / "test" / "predictions.csv").write_text("index,target,prediction\n0,5,5\nx,6,6\n")
    assert report.main([str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 0
    assert f"report: note: {run / 'test' / 'predictions.csv'}: a row without an integer index" in capsys.readouterr().err
    (row,) = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert row["predictions"] is None and row["n_test"] is None and row["test"] == pytest.approx(1.0)
    # a --reference no run has is a typo, said in one line (the default, dora, may be absent)
    assert report.main([str(tmp_path / "logs"), "--out", str(tmp_path / "o2"), "--reference", "dorn"]) == 2
    assert capsys.readouterr().err == "report: error: --reference dorn: no run of that method; the runs' methods: dora\n"


def test_group_fields_from_odd_or_missing_configs(tmp_path: Path):
    """Whatever config.yaml holds, a run gets a group; what cannot be read is 'unrecorded', never an error."""
    odd = {"bare": None, "list": [1, 2], "nulls": {"data": {"init_args": None}, "model": {"backbone": None}, "trainer": None},
           "int keys": {"data": {"class_path": "a.B", "init_args": {1: "x", "root": "/d"}}, "trainer": {"max_steps": 50}}}
    for name, config in odd.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        group = report.run_group(folder, {"backbone": "minilm"})
        assert set(group) == set(report.GROUP_FIELDS) and group["backbone"] == "minilm"
    assert report.run_group(tmp_path / "int_keys", {}) == {"task": "B", "data": "B(1=x, root=/d)", "backbone": "unrecorded",
                                                            "budget": "max_steps=50"}
    assert report.run_group(tmp_path / "bare", {})["data"] == "unrecorded"
