"""The teacher–student benchmark (benchmarks/teacher_student.py, METHOD.md §7): its batched students are the real
adapters, its shared teacher shares structure and its control does not, and the students recover the teacher as n
grows."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
world = importlib.import_module("teacher_student_world")
bench = importlib.import_module("teacher_student")
report = importlib.import_module("teacher_student_report")

from doran_lightning.adapters import merge_adapters  # noqa: E402

SPEC = world.WorldSpec()


@pytest.mark.parametrize("method, compile", [("lora", False), ("dora", False), ("doran", False), ("doran", True)])
def test_batched_forward_and_merge_are_the_real_modules(method, compile):
    """`Population.forward` (the factored, batched formula; eager and as the benchmark compiles it) equals running
    the adapted modules block by block, and `merged_updates` equals what `merge_adapters` writes into the weights —
    with adapters moved away from init."""
    worlds = [world.make_world("shared", seed, 16, SPEC) for seed in range(3)]
    torch.manual_seed(0)
    population = world.Population(worlds, SPEC, method, compile=compile)
    with torch.no_grad():
        for parameter in population.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = torch.stack([w.inputs for w in worlds])
    batched = population(population.prepare(inputs))  # with gradients: the path the fit takes
    assert batched.requires_grad
    torch.testing.assert_close(batched, population.loop_forward(inputs), atol=1e-5, rtol=1e-5)
    updates = population.merged_updates()
    assert min(float(updates[t].norm()) for t in world.PROJECTIONS) > 1e-3  # the check is not of zero updates
    merge_adapters(population)
    for t in world.PROJECTIONS:
        merged = torch.stack([getattr(block, t).weight for block in population.blocks])
        torch.testing.assert_close(merged - torch.stack([w.frozen[t] for w in worlds]), updates[t], atol=1e-5, rtol=1e-5)


def test_the_generated_teacher_shares_its_subspaces_and_the_control_does_not():
    for seed in range(3):
        shared = world.make_world("shared", seed, 8, SPEC).update
        control = world.make_world("independent", seed, 8, SPEC).update
        doran_form = world.make_world("doran_form", seed, 8, SPEC).update
        for side in ("row", "col"):
            assert world.subspace_overlap(shared["q"], shared["v"], SPEC.rank, side) > 0.999
            assert world.subspace_overlap(control["q"], control["v"], SPEC.rank, side) < 0.5
            # the adapters' own generator layout shares only the rank side, which B absorbs: a generic pair
            assert world.subspace_overlap(doran_form["q"], doran_form["v"], SPEC.rank, side) < 0.5
        for update in (shared, control):  # same rank and norm for every teacher
            for t in world.PROJECTIONS:
                assert torch.linalg.matrix_rank(update[t]) == SPEC.rank
                ratio = update[t].norm() / world.make_world("shared", seed, 8, SPEC).frozen[t].norm()
                assert abs(float(ratio) - SPEC.update_scale) < 1e-5


@pytest.mark.parametrize("method", ["lora", "doran"])
def test_students_recover_the_teacher_better_with_more_samples(method):
    worlds = [world.make_world("independent", seed, 1024, SPEC) for seed in range(3)]
    small = bench.run_batch(worlds, [0, 1, 2], 64, method, "independent", SPEC, max_evals=80, tolerance=1e-7)
    large = bench.run_batch(worlds, [0, 1, 2], 1024, method, "independent", SPEC, max_evals=80, tolerance=1e-7)
    for few, many in zip(small, large):
        assert many["recovery_error"] < 0.7 * few["recovery_error"], (few, many)
        assert many["heldout_excess"] < few["heldout_excess"]
        assert many["recovery_error"] < 0.5  # recovered, not merely less wrong


def test_the_fit_lowers_every_seeds_loss():
    worlds = [world.make_world("shared", seed, 128, SPEC) for seed in range(2)]
    population = world.Population(worlds, SPEC, "doran")
    data = population.prepare(torch.stack([w.inputs for w in worlds]))
    targets = torch.stack([w.targets for w in worlds])
    with torch.no_grad():
        before = (population(data) - targets).pow(2).mean(dim=(1, 2))
    bench.fit(population, data, targets, max_evals=30, tolerance=0.0)
    with torch.no_grad():
        after = (population(data) - targets).pow(2).mean(dim=(1, 2))
    assert bool((after < 0.5 * before).all()), (before, after)


def test_the_command_writes_runs_table_and_plot(tmp_path, capsys):
    out = tmp_path / "ts"
    bench.main(["--seeds", "2", "--ns", "64", "128", "--max-evals", "8", "--workers", "1", "--methods", "lora", "doran",
                "--no-compile", "--out", str(out),
                "--figure", str(tmp_path / "plot.png")])
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 * 2  # methods × teachers × n × seeds
    table = (out / "table.md").read_text()
    assert "log-log slope" in table and "| shared |" in table and "| independent |" in table
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert "slope" in capsys.readouterr().out
    first_line = table.splitlines()[0]
    report.main([str(out), "--figure", str(tmp_path / "again.png")])  # the tables again, from runs.csv alone
    assert (out / "table.md").read_text().splitlines()[0] == first_line
    assert (tmp_path / "again.png").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([str(tmp_path / "nowhere")])


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(SystemExit, match="at least 2 sample sizes"):
        bench.main(["--ns", "64", "--workers", "1"])
    with pytest.raises(SystemExit, match="positive integers"):
        bench.main(["--ns", "0", "64", "--workers", "1"])
    with pytest.raises(ValueError, match="teacher 'nope' is unknown"):
        world.teacher_factors("nope", SPEC, torch.Generator())
