"""Teacher–student test of generated A/B (issues 29 and 39, METHOD.md §7): can a generator layout's sharing make the
low-rank update cheaper to estimate, and can this benchmark detect it when it does?

A world per seed of two frozen attention blocks in sequence (`teacher_student_world.py`); three teachers (control:
independent updates; block: q and v of a block share their feature-side factors; layers: both blocks share them);
five students (LoRA, DoRA, DoRAN, DoRAN block layout, DoRAN across-layer layout: the project's adapters) fitted to
noisy teacher readouts of n random inputs, every (teacher, student, n) for all seeds at once as one batched
problem, full batch, by L-BFGS run separately per seed until its stopping test holds (`fit`). Each layout's own
teacher is its positive control: there it must beat DoRA and LoRA, or the benchmark cannot detect the effect.

    python benchmarks/teacher_student.py            # every student on every teacher, 20 seeds, n 256 … 2048
    python benchmarks/teacher_student.py --quick    # the positive controls: 5 seeds, n 256

Writes <out>/runs.csv (one row per fit) and <out>/table.md; statistics in `teacher_student_report.py`.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when run as a script

from teacher_student_report import write_outputs  # noqa: E402
from teacher_student_world import (POSITIVE_CONTROLS, STUDENTS, TEACHERS, Population, World, WorldSpec,  # noqa: E402
                                   keys, make_world)

FULL_NS = (256, 512, 1024, 2048)
QUICK_NS = (256,)
BASELINES = ("lora", "dora")  # what each layout must beat on its own teacher
MAX_EVALS = 12_000  # the cap: doran-layers needed 8,360 at n = 256 (5 seeds; RESULTS); the whole grid at this cap is unmeasured
TOLERANCE = 1e-4  # the stopping test: relative loss decrease over the last WINDOW iterations
WINDOW = 10


class SeedVectors:
    """The trainable tensors of every seed's network as one matrix [K, P] (a row per seed), read and written in place."""

    def __init__(self, population: Population) -> None:
        self.params = population.seed_parameters()

    def get(self) -> torch.Tensor:
        return torch.stack([torch.cat([p.detach().reshape(-1) for p in ps]) for ps in self.params])

    def grad(self) -> torch.Tensor:
        return torch.stack([torch.cat([p.grad.reshape(-1) for p in ps]) for ps in self.params])

    @torch.no_grad()
    def set(self, values: torch.Tensor) -> None:
        for row, ps in zip(values, self.params):
            offset = 0
            for p in ps:
                p.copy_(row[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def _direction(grad: torch.Tensor, pairs: list) -> torch.Tensor:
    """L-BFGS's two-loop recursion, per row (seed); the first step has unit length."""
    direction = grad.clone()
    coefficients = []
    for step, change, rho in reversed(pairs):
        alpha = rho * (step * direction).sum(1)
        direction -= alpha[:, None] * change
        coefficients.append(alpha)
    if pairs:
        step, change, _ = pairs[-1]
        gamma = (step * change).sum(1) / (change * change).sum(1).clamp_min(1e-300)
        direction *= torch.where(gamma > 0, gamma, torch.ones_like(gamma))[:, None]
    else:
        direction /= grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
    for (step, change, rho), alpha in zip(pairs, reversed(coefficients)):
        beta = rho * (change * direction).sum(1)
        direction += step * (alpha - beta)[:, None]
    return -direction


def fit(population: Population, data: dict[str, torch.Tensor], targets: torch.Tensor, max_evals: int = MAX_EVALS,
        tolerance: float = TOLERANCE, window: int = WINDOW, history: int = 20) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-batch L-BFGS for every seed separately but evaluated together: each seed has its own history, step
    length (backtracking to Armijo's condition) and stopping test, as if it ran alone. A seed stops when its
    training loss fell by less than `tolerance` (relative) over its last `window` iterations, or when its line
    search finds no decrease (float64: the loss is flat to rounding); the fit ends when every seed stopped or after
    `max_evals` evaluations (gradient evaluations plus line-search trials). Returns (final loss per seed, whether
    each seed was stopped by the cap, evaluations)."""
    vectors = SeedVectors(population)

    def losses(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors.set(point)
        population.zero_grad(set_to_none=False)
        per_seed = (population(data) - targets).pow(2).mean(dim=(1, 2))
        per_seed.sum().backward()
        return per_seed.detach(), vectors.grad()

    point = vectors.get()
    loss, grad = losses(point)
    evals, pairs, past = 1, [], [loss]
    active = torch.ones_like(loss, dtype=torch.bool)
    while evals < max_evals and bool(active.any()):
        direction = _direction(grad, pairs)
        slope = (direction * grad).sum(1)
        uphill = slope >= 0
        direction[uphill] = -grad[uphill]
        slope = (direction * grad).sum(1)
        length = active.to(point.dtype)  # stopped seeds stay where they are
        trial_loss, trial_grad = losses(point + length[:, None] * direction)
        evals += 1
        for _ in range(40):  # backtracking (Armijo) for the seeds whose step was too long
            bad = active & (trial_loss > loss + 1e-4 * length * slope)
            if not bool(bad.any()) or evals >= max_evals:
                break
            length = torch.where(bad, length * 0.5, length)
            trial_loss, trial_grad = losses(point + length[:, None] * direction)
            evals += 1
        accepted = active & (trial_loss <= loss + 1e-4 * length * slope)
        new_point = torch.where(accepted[:, None], point + length[:, None] * direction, point)
        new_grad = torch.where(accepted[:, None], trial_grad, grad)
        new_loss = torch.where(accepted, trial_loss, loss)
        step, change = new_point - point, new_grad - grad
        curvature = (step * change).sum(1)
        keep = curvature > 1e-300
        pairs.append((step * keep[:, None], change * keep[:, None],
                      torch.where(keep, 1.0 / curvature.clamp_min(1e-300), torch.zeros_like(curvature))))
        pairs = pairs[-history:]
        point, grad, loss = new_point, new_grad, new_loss
        past.append(loss)
        settled = (past[-window - 1] - loss) <= tolerance * loss.abs() if len(past) > window else torch.zeros_like(active)
        active &= ~(settled | (~accepted & active & (evals < max_evals)))
    vectors.set(point)
    return loss, active, evals


def run_batch(worlds: list[World], seeds: list[int], n: int, student: str, teacher: str, spec: WorldSpec,
              max_evals: int, tolerance: float) -> list[dict]:
    """Fit one student to the first n samples of every world; one result row per seed."""
    torch.manual_seed(10_007 * n + 101 * list(STUDENTS).index(student) + seeds[0])
    population = Population(worlds, spec, student)
    inputs = torch.stack([world.inputs[:n] for world in worlds])
    targets = torch.stack([world.targets[:n] for world in worlds])
    start = time.process_time()
    loss, capped, evals = fit(population, population.prepare(inputs), targets, max_evals, tolerance)
    cpu = time.process_time() - start
    updates = population.merged_updates()
    with torch.no_grad():
        readout = population(population.prepare(torch.stack([world.test_inputs for world in worlds])))
    rows = []
    for index, (seed, world) in enumerate(zip(seeds, worlds)):
        squared = sum(float((updates[key][index] - world.update[key]).pow(2).sum()) for key in keys(spec))
        total = sum(float(world.update[key].pow(2).sum()) for key in keys(spec))
        excess = float((readout[index] - world.test_clean).pow(2).mean() / (world.test_frozen - world.test_clean).pow(2).mean())
        rows.append({"teacher": teacher, "student": student, "n": n, "seed": seed, "recovery_error": (squared / total) ** 0.5,
                     "heldout_excess": excess, "train_loss": float(loss[index]), "capped": int(capped[index]),
                     "evals": evals, "cpu_s": cpu / len(worlds)})
    return rows


def run_teacher(job: tuple) -> list[dict]:
    """Every listed student × n × seed of one teacher (one worker process, one thread)."""
    teacher, students, ns, seeds, spec, max_evals, tolerance = job
    torch.set_num_threads(1)
    worlds = [make_world(teacher, seed, max(ns), spec) for seed in seeds]
    rows: list[dict] = []
    for student in students:
        for n in ns:
            done = run_batch(worlds, seeds, n, student, teacher, spec, max_evals, tolerance)
            rows += done
            print(f"{teacher:7s} {student:12s} n={n:5d}  recovery error {sum(r['recovery_error'] for r in done) / len(done):.4f}  "
                  f"evals {done[0]['evals']}  capped {sum(r['capped'] for r in done)}  "
                  f"cpu {sum(r['cpu_s'] for r in done):.1f} s", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the positive controls only: each feature layout, DoRA and "
                        "LoRA on the layout's own teacher; 5 seeds, n 256")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 20; quick 5)")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="sample sizes (default 256 … 2048)")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--max-evals", type=int, default=MAX_EVALS, help=f"the cap on L-BFGS evaluations per fit (default {MAX_EVALS})")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"a seed stops when its loss fell by less than this (relative) over {WINDOW} iterations")
    parser.add_argument("--workers", type=int, default=2, help="processes (one (teacher, student) job at a time each)")
    parser.add_argument("--out", type=Path, default=None, help="folder for runs.csv and table.md (default "
                        "docs/reports/teacher_student_layouts; quick: benchmarks/results/teacher_student_quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = list(range(args.seeds if args.seeds is not None else 5 if args.quick else 20))
    ns = sorted(set(args.ns or (QUICK_NS if args.quick else FULL_NS)))
    if len(seeds) < 2 or ns[0] < 1 or args.max_evals < 1 or args.workers < 1:
        raise SystemExit("teacher_student: --seeds needs at least 2 (an interval); --ns, --max-evals and --workers "
                         "take positive integers")
    out = args.out or Path("benchmarks/results/teacher_student_quick" if args.quick else "docs/reports/teacher_student_layouts")
    spec = WorldSpec()
    if args.quick:  # can the benchmark say yes? each layout against DoRA and LoRA on the teacher of its own structure
        plan = [(teacher, [s for s in args.students if s in BASELINES or s == layout])
                for layout, teacher in POSITIVE_CONTROLS.items() if teacher in args.teachers and layout in args.students]
    else:
        plan = [(teacher, args.students) for teacher in args.teachers]
    # One job per (teacher, student), the slow feature-layout fits first, so that the workers finish together; the
    # rows keep the plan's order (every fit is seeded by its own n, student and seeds: the split changes no number).
    order = [(teacher, student) for teacher, students in plan for student in students]
    slow_first = sorted(order, key=lambda pair: pair[1] not in POSITIVE_CONTROLS)
    jobs = [(teacher, [student], ns, seeds, spec, args.max_evals, args.tolerance) for teacher, student in slow_first]
    start = time.perf_counter()
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            results = pool.map(run_teacher, jobs, chunksize=1)
    else:
        results = [run_teacher(job) for job in jobs]
    by_pair = dict(zip(slow_first, results))
    rows = [row for pair in order for row in by_pair[pair]]
    wall = time.perf_counter() - start
    cpu = sum(row["cpu_s"] for row in rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/teacher_student.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"`{command.strip()}` — {len(seeds)} seeds, n = {', '.join(map(str, ns))}, L-BFGS until the loss fell by "
              f"< {args.tolerance:g} (relative) over {WINDOW} iterations, cap {args.max_evals} evaluations; wall "
              f"{wall / 60:.1f} min, fitting CPU {cpu / 60:.1f} min; world {asdict(spec)}")
    write_outputs(rows, out / "table.md", header)
    print(f"fits stopped by the cap: {sum(int(row['capped']) for row in rows)}")
    print(f"wrote {out / 'runs.csv'}, {out / 'table.md'}; wall {wall:.0f} s, fitting CPU {cpu:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
