"""The teacher–student benchmark (benchmarks/teacher_student.py, METHOD.md §7): its batched students are the real
adapters, its teachers have the stated rank, norm and sharing, each positive-control teacher lies in its layout's
set of updates (and the control does not), the fit stops on its test and counts the fits the cap stopped, and the
command prints its cap count and positive-control lines."""

from __future__ import annotations

import csv
import importlib
import math
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
from doran_lightning.adapters.generators import ACTIVATIONS, width_key  # noqa: E402
from doran_lightning.adapters.layer import MAIN_SLICE  # noqa: E402

SPEC = world.WorldSpec()


@pytest.mark.parametrize("student", list(world.STUDENTS))
def test_batched_forward_and_merge_are_the_real_modules(student):
    """`Population.forward` equals running the adapted networks one by one, and `merged_updates` equals what
    `merge_adapters` writes into the weights — with the adapters moved away from init."""
    worlds = [world.make_world("block", seed, 8, SPEC) for seed in range(2)]
    torch.manual_seed(0)
    population = world.Population(worlds, SPEC, student)
    with torch.no_grad():
        for parameter in population.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = torch.stack([w.inputs for w in worlds])
    batched = population(population.prepare(inputs))
    assert batched.requires_grad
    torch.testing.assert_close(batched, population.loop_forward(inputs), atol=1e-10, rtol=1e-10)
    updates = population.merged_updates()
    assert min(float(u.norm()) for u in updates.values()) > 1e-3  # not a check of zero updates
    for network in population.networks:
        merge_adapters(network)
    for (layer, t), update in updates.items():
        merged = torch.stack([getattr(net.blocks[layer], t).weight for net in population.networks])
        frozen = torch.stack([w.frozen[layer][t] for w in worlds])
        torch.testing.assert_close(merged - frozen, update, atol=1e-10, rtol=1e-10)


def test_teachers_have_the_stated_rank_norm_and_sharing():
    for seed in range(3):
        updates = {kind: world.make_world(kind, seed, 4, SPEC).update for kind in world.TEACHERS}
        frozen = world.make_world("control", seed, 4, SPEC).frozen
        for kind, update in updates.items():  # same rank and norm for every teacher
            for (layer, t), delta in update.items():
                assert torch.linalg.matrix_rank(delta) == SPEC.rank
                assert abs(float(delta.norm() / frozen[layer][t].norm()) - SPEC.update_scale) < 1e-12
        for side in ("row", "col"):
            overlap = {kind: (world.subspace_overlap(u[(0, "q")], u[(0, "v")], SPEC.rank, side),
                              world.subspace_overlap(u[(0, "q")], u[(1, "v")], SPEC.rank, side))
                       for kind, u in updates.items()}
            assert overlap["block"][0] > 1 - 1e-9 and overlap["block"][1] < 0.7  # within a block only
            assert min(overlap["layers"]) > 1 - 1e-9  # across the blocks too
            assert max(overlap["control"]) < 0.7  # nothing shared


def _represent(population: world.Population, index: int, update: dict) -> None:
    """Set network `index` of a feature-layout student so that its merged updates are `update`: U_A, U_B the
    orthonormal row and column bases of the updates its generator serves, C_t = I, D_t = U_Bᵀ ΔW_t U_A / s, and
    m = ‖W0 + ΔW‖_row + σ (g = 1 on W0 + ΔW)."""
    layers = population.layers[index]
    scaling = population.config.scaling
    by_generator: dict[int, list] = {}
    for key, layer in layers.items():
        by_generator.setdefault(id(layer.generator), []).append(key)
    with torch.no_grad():
        for members in by_generator.values():
            generator = layers[members[0]].generator
            rows = torch.cat([update[key] for key in members], dim=0)
            cols = torch.cat([update[key] for key in members], dim=1)
            basis_A = torch.linalg.svd(rows).Vh[:SPEC.rank].T  # [d, r]
            basis_B = torch.linalg.svd(cols).U[:, :SPEC.rank]
            activation = ACTIVATIONS[generator.activation_name]
            for side, basis, seed, trunk, heads in (("A", basis_A, generator.seed_A, generator.trunk_A, generator.heads_A),
                                                    ("B", basis_B, generator.seed_B, generator.trunk_B, generator.heads_B)):
                hidden = activation(trunk(seed))[0]  # [r, h]
                head = heads[width_key(side, SPEC.d_model)]
                head.weight.copy_((torch.linalg.pinv(hidden) @ basis.T).T)
                head.bias.zero_()
            for key in members:
                member = generator.members.index(layers[key].generator_keys[0])
                generator.cores_A[member] = torch.eye(SPEC.rank, dtype=world.DTYPE)
                generator.cores_B[member] = basis_B.T @ update[key] @ basis_A / scaling
        for key, layer in layers.items():
            target = layer.weight + update[key]
            sigma = layer.sigma(MAIN_SLICE)
            layer.adapters[MAIN_SLICE].magnitude.copy_(target.norm(dim=1) + (0 if sigma is None else sigma))


@pytest.mark.parametrize("student, teacher", list(world.POSITIVE_CONTROLS.items()))
def test_each_positive_control_teacher_is_exactly_its_layouts_update(student, teacher):
    """A zero-loss solution exists by construction: the student's merged updates equal the teacher's and its
    readouts the noise-free targets. On the control teacher the same construction misses: the layout constrains."""
    worlds = [world.make_world(kind, 0, 32, SPEC) for kind in (teacher, "control")]
    population = world.Population(worlds, SPEC, student)
    for index, w in enumerate(worlds):
        _represent(population, index, w.update)
    updates = population.merged_updates()
    for key, delta in worlds[0].update.items():
        torch.testing.assert_close(updates[key][0], delta, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        readout = population(population.prepare(torch.stack([w.test_inputs for w in worlds])))
    assert float((readout[0] - worlds[0].test_clean).abs().max()) < 1e-10
    missed = sum(float((updates[key][1] - delta).pow(2).sum()) for key, delta in worlds[1].update.items())
    assert math.sqrt(missed / sum(float(d.pow(2).sum()) for d in worlds[1].update.values())) > 0.3


def test_the_fit_stops_on_its_test_and_counts_the_cap():
    worlds = [world.make_world("block", seed, 32, SPEC) for seed in range(2)]
    rows = bench.run_batch(worlds, [0, 1], 32, "lora", "block", SPEC, max_evals=5, tolerance=1e-6)
    assert [row["capped"] for row in rows] == [1, 1] and rows[0]["evals"] == 5
    rows = bench.run_batch(worlds, [0, 1], 32, "lora", "block", SPEC, max_evals=5000, tolerance=1e-2)
    assert [row["capped"] for row in rows] == [0, 0] and rows[0]["evals"] < 5000
    assert max(row["train_loss"] for row in rows) < 0.5 * float(worlds[0].targets[:32].pow(2).mean())


def test_the_command_prints_the_cap_count_and_positive_controls(tmp_path, capsys):
    out = tmp_path / "ts"
    bench.main(["--seeds", "2", "--ns", "16", "32", "--max-evals", "4", "--workers", "1", "--students", "lora", "dora",
                "doran-block", "--teachers", "block", "--out", str(out)])
    printed = capsys.readouterr().out
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 2  # students × n × seeds
    assert f"fits stopped by the cap: {len(rows)}" in printed  # a 4-evaluation cap stops every fit
    lines = [line for line in printed.splitlines() if line.startswith("positive control: doran-block vs ")]
    assert len(lines) == 2 and "[" in lines[0]
    table = (out / "table.md").read_text()
    assert "– (capped fits)" in table and "positive control:" in table
    report.main([str(out)])  # the tables again, from runs.csv alone
    assert (out / "table.md").read_text().splitlines()[0] == table.splitlines()[0]
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([str(tmp_path / "nowhere")])


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(SystemExit, match="at least 2"):
        bench.main(["--seeds", "1", "--workers", "1"])
    with pytest.raises(ValueError, match="teacher 'nope' is unknown"):
        world.teacher_updates("nope", SPEC, [], torch.Generator())
    with pytest.raises(ValueError, match="student 'nope' is unknown"):
        world.Population([], SPEC, "nope")


def test_quick_runs_the_positive_controls(tmp_path, monkeypatch):
    """`--quick` fits each feature layout with DoRA and LoRA on the teacher written in the layout's own structure."""
    planned = []
    monkeypatch.setattr(bench, "run_teacher", lambda job: planned.append(job[:3]) or [{"capped": 0, "cpu_s": 0.0}])
    monkeypatch.setattr(bench, "write_outputs", lambda *args: None)  # the fits were replaced: the plan is the test
    assert bench.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    assert planned == [("block", ["doran-block"], [256]), ("layers", ["doran-layers"], [256]),  # the slow fits first
                       ("block", ["lora"], [256]), ("block", ["dora"], [256]),
                       ("layers", ["lora"], [256]), ("layers", ["dora"], [256])]
