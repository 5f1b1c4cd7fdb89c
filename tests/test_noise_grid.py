"""benchmarks/noise_grid.py: every grid point is one switch of the sweep tool, and its table reads the sweeps."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from doran_lightning.adapters import AdapterConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("noise_grid", ROOT / "benchmarks" / "noise_grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["noise_grid"] = module
    spec.loader.exec_module(module)
    return module


def _adapter_values(overrides: tuple[str, ...]) -> dict[str, str]:
    prefix = "--model.adapter."
    return dict(item[len(prefix):].split("=", 1) for item in overrides)


def test_the_grid_is_the_issues_36_points_plus_4_baselines_each_in_the_run_order(grid) -> None:
    assert len(grid.GRID) == 2 * 2 * 3 * 3 and len(grid.BASELINES) == 4
    assert sorted(grid.DEFAULT_ORDER) == sorted(grid.POINTS)
    settings = {(p.methods, tuple(sorted(_adapter_values(p.overrides).items()))) for p in grid.GRID.values()}
    assert len(settings) == 36  # no two points run the same thing
    point = grid.POINTS["noise-nodetach-gaussian-c0.1"]
    assert point.methods == ("doran-noise",)
    assert _adapter_values(point.overrides) == {"detach_norm": "false", "sigma_scale": "row_norm",
                                                "sigma_init": "0.1", "noise_mode": "gaussian"}
    values = _adapter_values(point.overrides)
    AdapterConfig(method="doran", aux=False, detach_norm=values["detach_norm"] == "true", sigma_scale=values["sigma_scale"],
                  sigma_init=float(values["sigma_init"]), noise_mode=values["noise_mode"])  # a valid config
    assert _adapter_values(grid.POINTS["dora-nodetach"].overrides) == {"detach_norm": "false"}


def test_sweep_arguments_of_a_point(grid, tmp_path: Path) -> None:
    args = grid.argparse.Namespace(config="configs/minilm_text.yaml", fractions=[0.3], lrs=[3e-3], search_seeds=1,
                                   epochs=3, seeds=[0, 1], out=tmp_path, cli_args=["--trainer.accelerator=cpu"])
    argv = grid.sweep_argv(grid.POINTS["doran-detach-fixed-c1"], args)
    assert argv == ["--config", "configs/minilm_text.yaml", "--methods", "doran", "--fractions", "0.3", "--lrs", "0.003",
                    "--epochs", "3", "--seeds", "0", "1", "--out", str(tmp_path / "doran-detach-fixed-c1"), "--no-report",
                    "--", "--model.adapter.detach_norm=true", "--model.adapter.sigma_scale=row_norm",
                    "--model.adapter.sigma_init=1.0", "--model.adapter.noise_mode=fixed", "--trainer.accelerator=cpu"]
    args.fractions, args.lrs, args.search_seeds = [1.0], [3e-3, 1e-2], 2  # the lr-sensitivity form
    argv = grid.sweep_argv(grid.POINTS["dora"], args)
    assert argv[:14] == ["--config", "configs/minilm_text.yaml", "--methods", "dora", "--fractions", "1", "--lrs", "0.003",
                         "0.01", "--search-seeds", "2", "--epochs", "3", "--seeds"]


def _results(variant: str, tests: dict[float, dict[int, float]], gain: float) -> dict:
    """A sweep's results.json: `tests` = {fraction: {seed: test accuracy}}."""
    runs = [{"spec": {"variant": variant, "seed": seed, "fraction": fraction}, "status": "ok", "test": value,
             "radial_gain": gain, "final_loss": 1.0 + value, "seconds": 10.0}
            for fraction, by_seed in tests.items() for seed, value in by_seed.items()]
    table = [{"variant": variant, "fraction": fraction, "lr": 3e-3, "mean": sum(by_seed.values()) / len(by_seed),
              "std": 0.0, "n": len(by_seed), "runs": len(by_seed), "diverged": 0} for fraction, by_seed in tests.items()]
    return {"runs": runs, "table": table}


def test_table_pairs_each_point_with_dora_by_seed_within_a_fraction(grid, tmp_path: Path) -> None:
    for name, variant, tests, gain in (("dora", "dora", {0.3: {0: 0.9, 1: 0.8}, 1.0: {0: 0.5, 1: 0.6}}, 1.0),
                                       ("noise-nodetach-learnable-c1", "doran-noise",
                                        {0.3: {0: 0.95, 1: 0.8}, 1.0: {0: 0.5, 1: 0.7}}, 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(variant, tests, gain)))
    lines = grid.table(tmp_path).splitlines()
    assert len(lines) == 6
    assert lines[2] == ("| dora | dora | 0.3 | 0.003 | 0.8500 ± 0.0000 (2) | +0.0000 ± 0.0000 (2) "
                        "| +0.0000 ± 0.0000 (2) | 1.000 | 0/2 | 20 |")
    assert lines[4] == ("| noise-nodetach-learnable-c1 | doran-noise | 0.3 | 0.003 | 0.8750 ± 0.0000 (2) "
                        "| +0.0250 ± 0.0250 (2) | +0.0250 ± 0.0250 (2) | 0.400 | 0/2 | 20 |")
    assert lines[5] == ("| noise-nodetach-learnable-c1 | doran-noise | 1 | 0.003 | 0.6000 ± 0.0000 (2) "
                        "| +0.0500 ± 0.0500 (2) | +0.0500 ± 0.0500 (2) | 0.400 | 0/2 | 20 |")


def _run_file(root: Path, point: str, lr: float, seed: int, test: float, best_val: float, status: str = "ok") -> None:
    folder = root / point / "runs" / point / f"lr{lr:g}-s{seed}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": status, "fraction": 1.0, "lr": lr, "seed": seed,
                                                    "test": test, "best_val": best_val}))


def test_table_by_lr_reads_every_run_and_pairs_at_the_same_lr(grid, tmp_path: Path) -> None:
    """The lr-search runs count too, and a point is paired with DoRA at its own lr, never across lrs."""
    for seed, (a, b) in enumerate([(0.80, 0.90), (0.84, 0.86)]):
        _run_file(tmp_path, "dora", 0.01, seed, a, 0.7)
        _run_file(tmp_path, "dora", 0.03, seed, b, 0.8)
        _run_file(tmp_path, "doran", 0.03, seed, b + 0.01 * (seed + 1), 0.9)
    _run_file(tmp_path, "doran", 0.01, 0, 0.5, 0.6)
    _run_file(tmp_path, "doran", 0.01, 1, 0.1, 0.1, status="failed")  # not counted
    lines = grid.table_by_lr(tmp_path).splitlines()
    assert lines[2:] == [
        "| dora | 1 | 0.01 | 2 | 0.8200 ± 0.0200 | 0.7000 | +0.0000 ± 0.0000 (2) |",
        "| dora | 1 | 0.03 | 2 | 0.8800 ± 0.0200 | 0.8000 | +0.0000 ± 0.0000 (2) |",
        "| doran | 1 | 0.01 | 1 | 0.5000 ± 0.0000 | 0.6000 | -0.3000 ± 0.0000 (1) |",
        "| doran | 1 | 0.03 | 2 | 0.8950 ± 0.0150 | 0.9000 | +0.0150 ± 0.0050 (2) |"]
