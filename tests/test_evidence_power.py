"""`benchmarks/evidence.py`: the seed count of DoRA and DoRAN is fixed once from the pilot's sd (never extended
because of an interval), the grids have three lrs around the config's, and `--every-lr` completes them."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest


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


def _ran(tmp_path: Path, monkeypatch, sd_points: float, count: int) -> tuple[FakeSweep, "evidence.Cell"]:
    """The digits full-data cell with DoRA and DoRAN finished at seeds 0 … count-1; the fake sweep in place."""
    fake = FakeSweep(sd_points)
    monkeypatch.setattr(evidence.subprocess, "call", fake)
    cell = evidence.CELLS["digits_f1"]
    fake(evidence.sweep_command(cell, tmp_path / cell.name, ["dora", "doran"], evidence.seeds(count), [], 1, []))
    return fake, cell


def test_the_seed_count_is_fixed_once_from_the_pilot_and_never_extended(tmp_path, monkeypatch):
    fake = FakeSweep(sd_points=4.0)
    monkeypatch.setattr(evidence.subprocess, "call", fake)
    cell = evidence.CELLS["digits_f1"]
    evidence.run_cell(cell, _args(tmp_path), None)
    pilot = fake.differences[: evidence.PILOT_SEEDS]
    # no predictions.csv: the test set's part is unknown (0) and the count is (z.975 + z.8)² sd² / target²
    expected = max(evidence.MIN_SEEDS, math.ceil((2.801585 * float(np.std(pilot, ddof=1)) / 1.0) ** 2))
    plan = json.loads((tmp_path / cell.name / evidence.SEED_PLAN).read_text())
    assert plan["seeds"] == expected and plan["pilot_seeds"] == evidence.PILOT_SEEDS and expected > evidence.MIN_SEEDS
    assert _after(fake.calls[-1], "--seeds") == evidence.seeds(expected)
    assert len(fake.calls) == len(evidence.stages(cell)) + 1  # one planned stage, nothing after it
    # a second invocation reads the plan: the same count, whatever the intervals of the finished runs now say
    (tmp_path / cell.name / evidence.SEED_PLAN).write_text(json.dumps({**plan, "seeds": 33}))
    evidence.run_cell(cell, _args(tmp_path), None)
    assert _after(fake.calls[-1], "--seeds") == evidence.seeds(33)


def test_seed_count_by_hand_and_out_of_reach():
    # room = (1 / 2.801585)² − 0.2² = 0.087408; 2² / room = 45.76 → 46 seeds
    assert evidence.seed_count(2.0, 0.2, 1.0)[0] == 46
    assert evidence.seed_count(0.5, 0.0, 1.0) == (evidence.MIN_SEEDS, "2 seeds reach the target; raised to 20")
    count, why = evidence.seed_count(1.0, 0.5, 1.0)  # the test set alone: 2.80 × 0.5 = 1.4 points > 1
    assert count == evidence.SEED_CAP and "out of reach" in why and "0.50 points" in why


def test_grids_have_three_lrs_around_the_configs_and_search_three_seeds():
    import yaml

    for cell in evidence.CELLS.values():
        config = yaml.safe_load((ROOT / cell.config).read_text())["model"]["lr"]
        lrs = sorted(float(lr) for lr in cell.lrs)
        assert len(lrs) >= 3 and lrs[0] < float(config) < lrs[-1]
        command = evidence.sweep_command(cell, Path("o"), ["dora"], evidence.seeds(3), [], 1, [])
        assert _after(command, "--search-seeds") == ["3"] and _after(command, "--edge-steps") == [str(evidence.EDGE_STEPS)]


def test_every_lr_runs_the_grids_other_lr_at_the_cells_seeds_past_the_search_seeds(tmp_path, monkeypatch):
    fake, cell = _ran(tmp_path, monkeypatch, 2.0, 10)
    args = _args(tmp_path)
    args.every_lr = True
    evidence.run_cell(cell, args, None)
    grid_calls = fake.calls[1:]
    assert [(_after(c, "--methods"), _after(c, "--lrs"), _after(c, "--seeds"), _after(c, "--search-seeds"))
            for c in grid_calls] == [(["dora"], [lr], evidence.seeds(10)[3:], ["1"]) for lr in ("3e-3", "3e-2")] + \
                                    [(["doran"], [lr], evidence.seeds(10)[3:], ["1"]) for lr in ("3e-3", "3e-2")]
    assert all(Path(_after(c, "--out")[0]) == tmp_path / "digits_f1_lrs" for c in grid_calls)
    evidence.tables(tmp_path)
    text = (tmp_path / "digits_f1" / "evidence.md").read_text()
    assert "### lr = 0.03" in text and "- lrs: doran 0.03, dora 0.03" in text


def test_every_lr_has_nothing_to_run_where_only_the_search_seeds_ran(tmp_path, monkeypatch):
    fake, cell = _ran(tmp_path, monkeypatch, 2.0, evidence.SEARCH_SEEDS)
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
