"""`benchmarks/evidence.py`: after the fixed stages, DoRA and DoRAN go on in blocks of seeds until the minimum
detectable effect of DoRAN − DoRA meets issue 29's target, and stop at the cap or when a stage adds no seed."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from doran_lightning.report.statistics import minimum_detectable_effect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
evidence = importlib.import_module("evidence")

GROUP = {"task": "digits 5-9", "data": "digits", "backbone": "vit", "budget": "max_epochs=6"}


def _after(command: list[str], flag: str) -> list[str]:
    start = command.index(flag) + 1
    end = next((i for i in range(start, len(command)) if command[i].startswith("--")), len(command))
    return command[start:end]


class FakeSweep:
    """Stands in for `python -m doran_lightning sweep`: writes a finished result per method and seed, DoRAN's test
    accuracy DoRA's plus a fixed per-seed difference (points) drawn with the given sd."""

    def __init__(self, sd_points: float, methods_that_run: tuple[str, ...] = ("dora", "doran")):
        self.differences = np.random.default_rng(0).normal(0.0, sd_points, 1000)
        self.methods_that_run = methods_that_run
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], **_: object) -> int:
        self.calls.append(command)
        out = Path(_after(command, "--out")[0])
        grid = _after(command, "--lrs")
        lr = float(grid[0]) if len(grid) == 1 else 0.01  # a grid: every seed at 0.01, as if the search chose it
        for method in _after(command, "--methods"):
            if method not in self.methods_that_run:
                continue
            for seed in map(int, _after(command, "--seeds")):
                folder = out / "runs" / method / f"{lr}-{seed}"
                if folder.exists():
                    continue
                folder.mkdir(parents=True)
                test = 0.80 + (self.differences[seed] / 100 if method == "doran" else 0.0) + (lr - 0.01)
                spec = {"variant": method, "fraction": 1.0, "seed": seed, "lr": lr, "config": "c.yaml",
                        "config_sha256": "0", "max_epochs": 6}
                (folder / "result.json").write_text(json.dumps({
                    "status": "ok", "spec": spec, "group": GROUP, "best_val": 0.8, "test": test, "n_test": 180}))
        return 0


def _args(out: Path) -> argparse.Namespace:
    return argparse.Namespace(out=out, jobs=1, cli_args=[], dry_run=False, quiet=True, every_lr=False)


def _mde(differences: np.ndarray, n: int) -> float:
    return minimum_detectable_effect(float(np.std(differences[:n], ddof=1)), n)


def _ran(tmp_path: Path, monkeypatch, sd_points: float, count: int) -> tuple[FakeSweep, "evidence.Cell"]:
    """The digits full-data cell with DoRA and DoRAN finished at seeds 0 … count-1; the fake sweep in place."""
    fake = FakeSweep(sd_points)
    monkeypatch.setattr(evidence.subprocess, "call", fake)
    cell = evidence.CELLS["digits_f1"]
    fake(evidence.sweep_command(cell, tmp_path / cell.name, ["dora", "doran"], evidence.seeds(count), [], 1, []))
    return fake, cell


def test_seeds_grow_in_blocks_until_the_mde_meets_the_target(tmp_path, monkeypatch):
    fake, cell = _ran(tmp_path, monkeypatch, 2.5, 30)
    evidence.extend_to_target(cell, _args(tmp_path), None)
    paired, mde = evidence.doran_power(tmp_path / cell.name)
    block = evidence.SEED_BLOCK
    assert paired % block == 0 and paired > 30
    assert mde <= 1.0 and abs(mde - _mde(fake.differences, paired)) < 1e-9
    assert _mde(fake.differences, paired - block) > 1.0  # the block before did not reach the target
    assert [len(_after(c, "--seeds")) for c in fake.calls[1:]] == list(range(40, paired + 1, block))


def test_the_cap_and_a_stage_that_adds_no_seed_stop_the_extension(tmp_path, monkeypatch):
    cell = evidence.CELLS["digits_f0.1"]
    noisy = FakeSweep(sd_points=40.0)  # an MDE of 2 points would need thousands of seeds
    monkeypatch.setattr(evidence.subprocess, "call", noisy)
    evidence.extend_to_target(cell, _args(tmp_path), None)
    assert evidence.doran_power(tmp_path / cell.name)[0] == evidence.SEED_CAP

    broken = FakeSweep(sd_points=5.0, methods_that_run=("dora",))  # DoRAN fails: nothing is ever paired
    monkeypatch.setattr(evidence.subprocess, "call", broken)
    evidence.extend_to_target(cell, _args(tmp_path / "broken"), None)
    assert len(broken.calls) == 1


def test_every_lr_runs_the_grids_other_lr_at_the_cells_seeds_past_the_search_seeds(tmp_path, monkeypatch):
    fake, cell = _ran(tmp_path, monkeypatch, 2.0, 10)
    args = _args(tmp_path)
    args.every_lr = True
    evidence.run_cell(cell, args, None)
    grid_calls = fake.calls[1:]
    assert [(_after(c, "--methods"), _after(c, "--lrs"), _after(c, "--seeds"), _after(c, "--search-seeds"))
            for c in grid_calls] == [(["dora"], ["3e-2"], evidence.seeds(10)[2:], ["1"]),
                                     (["doran"], ["3e-2"], evidence.seeds(10)[2:], ["1"])]
    assert all(Path(_after(c, "--out")[0]) == tmp_path / "digits_f1_lrs" for c in grid_calls)
    evidence.tables(tmp_path)
    text = (tmp_path / "digits_f1" / "evidence.md").read_text()
    assert "### lr = 0.03" in text and "- lrs: doran 0.03, dora 0.03" in text


def test_every_lr_has_nothing_to_run_where_only_the_search_seeds_ran(tmp_path, monkeypatch):
    fake, cell = _ran(tmp_path, monkeypatch, 2.0, 2)
    evidence.complete_grid(cell, _args(tmp_path), None)
    assert len(fake.calls) == 1 and not (tmp_path / "digits_f1_lrs").exists()


def test_a_cell_holding_runs_of_two_groups_is_refused_not_pooled(tmp_path, monkeypatch):
    _, cell = _ran(tmp_path, monkeypatch, 2.0, 4)
    other = tmp_path / cell.name / "runs" / "dora" / "other-budget"
    other.mkdir(parents=True)
    spec = {"variant": "dora", "fraction": 1.0, "seed": 0, "lr": 0.01, "config": "c.yaml", "config_sha256": "0",
            "max_epochs": 3}
    (other / "result.json").write_text(json.dumps({"status": "ok", "spec": spec, "best_val": 0.8, "test": 0.8,
                                                   "group": {**GROUP, "budget": "max_epochs=3"}, "n_test": 180}))
    with pytest.raises(SystemExit, match="2 task/data/backbone/budget groups"):
        evidence.doran_power(tmp_path / cell.name)
