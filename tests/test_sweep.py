"""`python -m doran_lightning sweep`: task axis and suites, executors (local pool, submitit), progress, status, suite tables.

Most tests use an in-process fake CLI that writes real TensorBoard event files where `fit`/`test`
would (the result goes through `report`'s loader); the last test runs the real CLI, kills the sweep
with SIGKILL and resumes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from doran_lightning import report, sweep
from doran_lightning.checkpointing import read_checkpoint
from doran_lightning.data import suites
from doran_lightning.report import suites as suite_tables
from doran_lightning.sweep import cli, executors, plan, runs

ROOT = Path(__file__).resolve().parents[1]


def options_of(cli_args: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cli_args if arg.startswith("--") and "=" in arg)


class FakeCLI:
    """Logs what `fit`/`test` would; accuracy = 0.5 + task offset + seed/100; `fail` names variants whose fit fails.

    ``hold`` seconds per fit let runs overlap; ``active``/``peak`` count fits in flight.
    """

    def __init__(self, fail: str | None = None, hold: float = 0.0, lr_peak: float | None = None) -> None:
        self.fail, self.hold, self.lr_peak = fail, hold, lr_peak  # lr_peak: accuracy falls 5 points per decade off it
        self.calls: list[list[str]] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # pickled into a submitit job: a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, cli_args: list[str], run_dir: Path) -> int:
        options = options_of(cli_args)
        self.calls.append(cli_args)
        logger = json.loads(options["trainer.logger"])["init_args"]
        log_dir = Path(logger["save_dir"], logger["name"], logger["version"], logger["sub_dir"] or "")
        log_dir.mkdir(parents=True, exist_ok=True)
        if logger["name"] == self.fail:
            (run_dir / f"{cli_args[0]}.log").write_text("loading\nValueError: data.root /nope does not exist\n")
            return 1
        task, seed = options.get("data.task", ""), int(options["seed_everything"])
        accuracy = 0.5 + (0.01 * len(task)) + seed / 100 + (0.05 if logger["name"] == "doran" else 0.0)
        if self.lr_peak is not None:
            accuracy -= 0.05 * abs(math.log10(float(options["model.lr"]) / self.lr_peak))
        writer = SummaryWriter(str(log_dir))
        if cli_args[0] == "fit":
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            time.sleep(self.hold)
            with self._lock:
                self.active -= 1
            for step in range(6):
                writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("val/accuracy", accuracy, 5)
            (log_dir / "checkpoints").mkdir(exist_ok=True)
            (log_dir / "checkpoints" / "last.ckpt").write_bytes(b"fake")
            (log_dir / "hparams.yaml").write_text(f"variant: {logger['name']}\nfraction: {options['data.fraction']}\n"
                                                  f"seed: {seed}\nlr: {options['model.lr']}\n")
            if task:
                (log_dir / "config.yaml").write_text(f"data:\n  class_path: x\n  init_args:\n    task: {task}\n")
        else:
            writer.add_scalar("test/accuracy", accuracy, 5)
        writer.close()
        return 0


def make_args(tmp_path: Path, *extra: str, config: str = "tiny.yaml"):
    path = tmp_path / config
    if not path.exists():
        path.write_text("model: {adapter: {target_modules: [query, value]}}\n")
    argv = ["--config", str(path), "--out", str(tmp_path / "out"), "--no-report", "--epochs", "1", *extra]
    args = cli.build_parser().parse_args(argv)
    args.command = "python -m doran_lightning sweep (test)"
    return cli.resolve_defaults(args)


def test_suites_have_one_home_and_expand():
    assert [len(tasks) for tasks in suites.VTAB_GROUPS.values()] == [7, 4, 8] and len(suites.SUITES["vtab-1k"]) == 19
    assert suites.expand_tasks(["vtab-specialized", "eurosat", "dtd"]) == [
        "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "dtd"]
    assert suites.expand_tasks(["glue"]) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
    assert suites.expand_tasks(["commonsense"]) == [None]  # one training run scored on eight sets
    from doran_lightning.data.language import GLUE_TASKS
    from doran_lightning.data.vision import VTAB_NUM_CLASSES
    from doran_lightning.tasks import build_metrics

    assert {task: spec.metric for task, spec in GLUE_TASKS.items()} == suites.GLUE_METRICS
    assert VTAB_NUM_CLASSES is suites.VTAB_NUM_CLASSES
    for metric, parts in suites.METRIC_PARTS.items():  # the names the module logs for a metric of two parts
        assert tuple(build_metrics(metric, 2)) == parts


def test_task_enters_the_key_and_a_taskless_key_is_the_old_one():
    spec = sweep.RunSpec("doran", 1.0, 0, 1e-3, "c.yaml", "abc", 3)
    old_fields = {k: v for k, v in asdict(spec).items() if k not in ("config", "task", "env")}  # fields added later
    assert spec.key == hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()[:16]
    cifar = sweep.RunSpec("doran", 1.0, 0, 1e-3, "c.yaml", "abc", 3, task="cifar")
    assert cifar.key != spec.key and cifar.version.startswith("cifar-f1-s0")
    assert "--data.task=cifar" in cifar.cli_args("fit", Path("/x")) and spec.label == "c"


def test_lrs_per_method_and_bad_values(tmp_path: Path):
    args = make_args(tmp_path, "--methods", "lora", "dora", "--lrs", "1e-3", "dora=3e-3,1e-2")
    assert args.lr_grid == {"lora": [1e-3], "dora": [3e-3, 1e-2]}
    for bad, message in ((["--lrs", "doran=1e-3"], "not among --methods"), (["--lrs", "x"], "expected numbers"),
                         (["--lrs", "dora=1e-3"], "no learning rate for lora")):
        with pytest.raises(sweep.SweepError, match=message):
            make_args(tmp_path, "--methods", "lora", "dora", *bad)
    with pytest.raises(sweep.SweepError, match="--trainer.devices=2"):
        make_args(tmp_path, "--devices-per-run", "2")


def test_dry_run_plans_a_suite_and_prints_the_sbatch_file(tmp_path: Path):
    lines: list[str] = []
    args = make_args(tmp_path, "--methods", "lora", "dora", "doran", "--tasks", "vtab-1k", "--seeds", "0", "1", "2",
                     "--fractions", "1", "--lrs", "1e-3", "--dry-run", "--executor", "slurm", "--partition", "gpu",
                     "--time", "120", "--gpus-per-run", "1", "--account", "proj", "--setup", "source .venv/bin/activate")
    assert cli.run_sweep(args, log=lines.append) == {}
    commands = [line for line in lines if line.startswith("[to run]")]
    assert len(commands) == 3 * 19 * 3 and sum("--data.task=kitti" in line for line in commands) == 9
    sbatch = lines[-1]
    for flag in ("#SBATCH --array=0-170%171", "#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --account=proj", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "source .venv/bin/activate"):
        assert flag in sbatch, flag
    assert f"{tmp_path / 'out' / 'slurm'}/%A_%a/%A_%a_0_log.out" in sbatch  # one log folder per array element
    assert not (tmp_path / "out" / "runs").exists()


def test_slurm_parameters_of_a_ddp_run():
    options = executors.SlurmOptions(partition="a100", time_min=30, gpus_per_run=4, account="acc", mem_gb=64)
    assert options.submitit_parameters() == {
        "name": "doran-sweep", "timeout_min": 30, "nodes": 1, "tasks_per_node": 4, "gpus_per_node": 4,
        "slurm_array_parallelism": 256, "slurm_partition": "a100", "slurm_account": "acc", "mem_gb": 64}
    assert "#SBATCH --ntasks-per-node=4" in options.sbatch_preview(Path("/s/%j"), 2)  # one task per GPU: DDP ranks


def test_local_pool_runs_two_at_once_and_a_failure_stops_nothing(tmp_path: Path):
    lines: list[str] = []
    fake = FakeCLI(fail="dora", hold=0.5)
    args = make_args(tmp_path, "--methods", "lora", "dora", "doran", "--tasks", "dtd", "svhn", "--seeds", "0",
                     "--fractions", "1", "--lrs", "1e-3", "--jobs", "2")
    summary = cli.run_sweep(args, launch=fake, log=lines.append)
    assert fake.peak == 2  # two fits in flight at once, never more
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    failure = next(line for line in lines if line.startswith("FAILED dora task=dtd"))
    run_dir = tmp_path / "out" / "runs" / "dora" / sweep.RunSpec(**{**summary["runs"][2]["spec"], "extra_args": ()}).key
    assert f"run folder: {run_dir}" in failure and "    ValueError: data.root /nope does not exist" in failure
    assert lines[-1].startswith("run: 4 finished (0 cached), 0 running, 0 queued, 2 failed | elapsed")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| doran | dtd | 0.001 | 0.5800 ± 0.0000 (n=1) |" in table and "| dora | svhn | 0.001 | failed (1) |" in table

    status = sweep.status_table(tmp_path / "out")
    assert "6 runs: 4 finished, 0 running, 0 queued, 2 failed" in status
    assert "| run | doran | svhn | 1 | 0 | 0.001 | finished |" in status and "ValueError: data.root /nope" in status
    # An attempt whose process died (a kill -9): shown as interrupted, resumed from its checkpoint next time.
    (run_dir / "failed.json").unlink()
    (run_dir / "running.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": os.uname().nodename, "started": 0}))
    assert "1 interrupted" in sweep.status_table(tmp_path / "out")
    assert cli.main(["--status", str(tmp_path / "nowhere")]) == 2
    from doran_lightning.cli import main as doran_main  # the verb as `python -m doran_lightning sweep` routes it

    assert doran_main(["sweep", "--status", str(tmp_path / "out")]) == 0


def test_resume_after_an_interruption_uses_last_ckpt(tmp_path: Path):
    args = make_args(tmp_path, "--methods", "lora", "--tasks", "dtd", "--seeds", "0", "1", "--fractions", "1", "--lrs", "1e-3")
    cli.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    victim = next((tmp_path / "out" / "runs" / "lora").glob("*/result.json"))
    victim.unlink()  # killed after its checkpoint: folder and last.ckpt are there, no result
    again = FakeCLI()
    summary = cli.run_sweep(args, launch=again, log=lambda _: None)
    (fit, test) = again.calls
    ckpt = options_of(fit)["ckpt_path"]
    assert ckpt == str(victim.parent / "lora" / Path(ckpt).parent.parent.name / "checkpoints" / "last.ckpt")
    assert json.loads(options_of(fit)["trainer.logger"])["init_args"]["sub_dir"] == "resume1"
    resumed = next(r for r in summary["runs"] if r["resumed_from"])
    assert resumed["status"] == "ok" and resumed["resumed_from"] == ckpt and test[0] == "test"


def test_slurm_path_through_submitits_local_executor(tmp_path: Path):
    pytest.importorskip("submitit")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this test module
    lines: list[str] = []
    args = make_args(tmp_path, "--methods", "lora", "doran", "--tasks", "dtd", "--seeds", "0", "--fractions", "1",
                     "--lrs", "1e-3", "--executor", "slurm", "--slurm-cluster", "local", "--time", "5")
    summary = cli.run_sweep(args, launch=FakeCLI(), log=lines.append)
    assert [r["status"] for r in summary["runs"]] == ["ok", "ok"]
    assert [row["mean"] for row in summary["table"]] == pytest.approx([0.53, 0.58])
    job_folders = [p for p in (tmp_path / "out" / "slurm").iterdir() if p.name.isdigit()]  # "%j" holds the pickles
    assert len(job_folders) == 2 and all(list(folder.glob("*_log.out")) for folder in job_folders)
    rerun = FakeCLI()
    cli.run_sweep(args, launch=rerun, log=lines.append)
    assert rerun.calls == []  # finished runs are never resubmitted


def vtab_row(method: str, task: str, seed: int, value: float, **extra) -> dict:
    return {"variant": method, "task": task, "seed": seed, "fraction": 1.0, "lr": 1e-3, "best_val": value,
            "test_scalars": {"test/accuracy": value}, **extra}


def test_suite_tables_layout_group_means_missing_and_best():
    natural = suites.VTAB_GROUPS["natural"]
    rows = [vtab_row("lora", task, seed, 0.5 + seed / 100) for task in suites.SUITES["vtab-1k"] for seed in (0, 1)]
    rows += [vtab_row("doran", task, seed, 0.6 + seed / 100) for task in natural for seed in (0, 1)]
    rows += [{"variant": "dora", "task": "mrpc", "seed": 0, "fraction": 1.0, "lr": 1e-3, "best_val": 0.8,
              "test_scalars": {"test/f1": 0.9, "test/accuracy": 0.8}}]
    rows += [{"variant": "doran", "task": None, "seed": 0, "fraction": 1.0, "lr": 1e-3, "best_val": 0.8,
              "test_scalars": {f"test/accuracy/{name}": 0.7 for name in suites.COMMONSENSE_SETS[:7]}}]
    vtab, glue, commonsense = suite_tables.suite_tables(rows, "accuracy")
    assert [c.name for c in vtab.columns][-4:] == ["Natural mean", "Specialized mean", "Structured mean", "Mean (19 tasks)"]
    mean, std, n = vtab.cells["lora"]["Mean (19 tasks)"]
    assert (mean, std, n) == (pytest.approx(50.5), pytest.approx(0.5), 2)
    assert vtab.cells["doran"]["Natural mean"][0] == pytest.approx(60.5) and vtab.cells["doran"]["kitti"] is None
    assert vtab.cells["doran"]["Mean (19 tasks)"] is None  # never averaged over the tasks it has
    text = suite_tables.markdown(vtab)
    assert "| doran | **60.5 ± 0.5** |" in text and "missing (0/8 tasks)" in text and "missing (7/19 tasks)" in text
    assert glue.cells["dora"]["mrpc"] == (pytest.approx(85.0), 0.0, 1)  # MRPC: mean of F1 and accuracy
    assert glue.cells["dora"]["Average"] is None and glue.cells["dora"]["cola"] is None
    assert commonsense.cells["doran"]["boolq"][0] == pytest.approx(70.0) and commonsense.cells["doran"]["Average"] is None


def test_a_run_at_chance_is_marked_and_never_bold():
    # 10 digit classes: 10.8 % is guessing (chance 10 % + 1 point margin), 60 % is not.
    rows = [vtab_row("lora", "digits", 0, 0.108, num_classes=10), vtab_row("dora", "digits", 0, 0.105, num_classes=10)]
    (table,) = suite_tables.suite_tables(rows, "accuracy")
    text = suite_tables.markdown(table)
    assert "| lora | 10.8 (at chance) |" in text and "| dora | 10.5 (at chance) |" in text and "**" not in text.split("\n\n")[1]
    rows.append(vtab_row("doran", "digits", 0, 0.6, num_classes=10))
    text = suite_tables.markdown(suite_tables.suite_tables(rows, "accuracy")[0])
    assert "| doran | **60.0** |" in text and "| lora | 10.8 (at chance) |" in text


def test_quick_runs_at_the_configs_own_lr(tmp_path: Path):
    (tmp_path / "own.yaml").write_text("model: {lr: 0.05, adapter: {target_modules: [query, value]}}\n")
    args = make_args(tmp_path, "--methods", "lora", "doran", "--quick", "--fractions", "1", config="own.yaml")
    summary = cli.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    assert {run["spec"]["lr"] for run in summary["runs"]} == {0.05}
    assert summary["lr_search"] == [] and summary["lr_by_variant"] == {"lora@own": 0.05, "doran@own": 0.05}
    assert plan.config_lr(plan.resolve_config("vit_tiny_digits.yaml")) == 0.02  # the README's quick sweep


def test_report_writes_suite_files_from_runs_that_name_their_task(tmp_path: Path):
    fake = FakeCLI()
    args = make_args(tmp_path, "--methods", "lora", "doran", "--tasks", "cola", "mrpc", "--seeds", "0", "1",
                     "--fractions", "1", "--lrs", "1e-3")
    args.no_report = False
    cli.run_sweep(args, launch=fake, log=lambda _: None)
    out = tmp_path / "out" / "report"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["suites"]) == {"glue"} and (out / "suite_glue.png").stat().st_size > 0
    csv_lines = (out / "suite_glue.csv").read_text().splitlines()
    assert csv_lines[0] == "suite,method,column,mean,std,seeds,best"
    # The fake logs test/accuracy only: cola (matthews) and mrpc (f1 + accuracy) have no official metric -> missing.
    assert "glue,doran,cola,,,0,False" in csv_lines
    text = (out / "summary.md").read_text()
    assert text.index("## Suite tables") < text.index("## Stability") and "| lora | missing | missing |" in text


@pytest.mark.slow
def test_kill_9_then_resume_with_the_real_cli(tmp_path: Path):
    """Two real runs at once; SIGKILL the sweep when the short one finished and the long one has a last.ckpt."""
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "doran_lightning", "sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora",
               "--fractions", "0.2", "1", "--seeds", "0", "--lrs", "2e-2", "--epochs", "4", "--jobs", "2",
               "--no-report", "--out", str(out), "--", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **runs.OFFLINE_ENV}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    short = long = None
    while time.time() < deadline and first.poll() is None:
        results = list(out.glob("runs/lora/*/result.json"))
        ckpts = [p for p in out.glob("runs/lora/*/lora/*/checkpoints/last.ckpt")
                 if not (p.parents[3] / "result.json").exists()]
        if results and ckpts:
            short, long = results[0].parent, ckpts[0].parents[3]
            break
        time.sleep(0.05)
    assert short is not None, "the short run never finished while the long one was running"
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(1.0)  # the runs die with the sweep (PR_SET_PDEATHSIG)
    assert not (long / "result.json").exists()
    killed_at = read_checkpoint(ckpts[0])["global_step"]
    short_log = (short / "fit.log").read_text()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert (short / "fit.log").read_text() == short_log  # the finished run was not repeated
    result = json.loads((long / "result.json").read_text())
    assert result["status"] == "ok" and result["resumed_from"].endswith("checkpoints/last.ckpt")
    assert "Restored all states from the checkpoint" in (long / "fit.log").read_text()
    (resumed_logs,) = long.glob("lora/*/resume1")  # the resumed attempt's logs, beside the first attempt's
    resumed_steps = report.load_scalars([resumed_logs]).get("train/loss")
    # Training went on from the checkpoint's step (a restart from scratch would log steps from 0 again).
    assert killed_at > 0 and (resumed_steps is None or resumed_steps.steps.min() >= killed_at)
    assert "run: 2 finished (1 cached)" in second.stdout


def test_local_executor_places_runs_on_gpu_groups():
    four = ["0", "1", "2", "3"]
    assert executors.LocalExecutor(jobs=1, gpus=four).slots() == ["0", "1", "2", "3"]  # one run per GPU
    assert executors.LocalExecutor(jobs=1, gpus=four, devices_per_run=2).slots() == ["0,1", "2,3"]  # DDP pairs
    assert executors.LocalExecutor(jobs=3, gpus=["0"]).slots() == ["0", "0", "0"]  # --jobs share one GPU
    assert executors.LocalExecutor(jobs=2).slots() == [None, None]  # no GPU: the environment is left alone
    with pytest.raises(sweep.SweepError, match="--devices-per-run 4: only 2 GPUs visible"):
        executors.LocalExecutor(gpus=["0", "1"], devices_per_run=4)


def test_results_compare_methods_within_each_task_group_with_intervals(tmp_path: Path):
    """results.md: one heading per group (task), paired differences vs --reference, per-run CSV beside it."""
    with pytest.raises(sweep.SweepError, match=r"--reference lora is not among --methods \(dora doran\)"):
        make_args(tmp_path, "--methods", "dora", "doran", "--reference", "lora")
    args = make_args(tmp_path, "--methods", "dora", "doran", "--tasks", "dtd", "svhn", "--seeds", "0", "1", "2",
                     "--fractions", "1", "--lrs", "1e-3", "--reference", "dora")
    summary = cli.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    table = (tmp_path / "out" / "results.md").read_text()
    headings = [line for line in table.splitlines() if line.startswith("### Group")]
    assert [h.split("task=")[1].split(" ")[0] for h in headings] == ["dtd", "svhn"]
    # FakeCLI: DoRAN = DoRA + 0.05 at every seed, so each group's paired difference is 5 points (float32 logs)
    for label, (comparison,) in summary["comparisons"].items():
        assert comparison["n"] == 3 and comparison["difference"] == pytest.approx(5.0, abs=1e-4)
        assert comparison["t_interval"] == pytest.approx([5.0, 5.0], abs=1e-4) and comparison["mde"] < 1e-3
        assert comparison["verdict"] == "doran above dora"
        assert comparison["n_test"] is None and comparison["bootstrap_interval"] is None  # no predictions.csv
    assert table.count("| doran | dora | 1.0 | test | 3 | – |") == 2
    lines = (tmp_path / "out" / "results_runs.csv").read_text().splitlines()
    assert lines[0] == "task,data,backbone,budget,method,variant,lr,fraction,seed,best_val,test,n_test,run"
    assert len(lines) == 1 + 2 * 2 * 3 and sum(line.startswith("svhn,x,unrecorded,max_epochs=1,doran,") for line in lines) == 3


def test_suite_table_differences_vs_the_reference_are_paired_t_intervals(tmp_path: Path):
    import numpy as np
    from scipy import stats

    natural, rng = suites.VTAB_GROUPS["natural"], np.random.default_rng(4)
    values = {(m, t, s): 0.6 + 0.02 * (m == "doran") + 0.01 * rng.standard_normal() for m in ("dora", "doran")
              for t in natural for s in (0, 1, 2)}
    rows = [vtab_row(m, t, s, v, n_test=40) for (m, t, s), v in values.items()]
    (vtab,) = suite_tables.suite_tables(rows, "accuracy")
    found = {d["column"]: d for d in suite_tables.differences(vtab, "dora")}
    column_mean = lambda m, s: 100 * np.mean([values[(m, t, s)] for t in natural])  # noqa: E731
    expected = stats.ttest_rel([column_mean("doran", s) for s in (0, 1, 2)],
                               [column_mean("dora", s) for s in (0, 1, 2)]).confidence_interval(0.95)
    natural_mean = found["Natural mean"]
    assert natural_mean["t_interval"] == pytest.approx([expected.low, expected.high])
    assert natural_mean["n"] == 3 and natural_mean["n_test"] == 40 * len(natural) and found["dtd"]["n_test"] == 40
    assert set(found) == {*natural, "Natural mean"}  # columns DoRA has no runs for are not compared
    text = suite_tables.markdown(vtab, "dora")
    assert "Paired differences vs `dora`" in text and f"| doran | Natural mean | 3 | {40 * len(natural)} |" in text
    files = suite_tables.write_suites([vtab], tmp_path, "cmd")
    assert (tmp_path / files["vtab-1k"]["runs_csv"]).read_text().count("\n") == 1 + len(rows)


def test_an_lr_pick_at_an_edge_extends_the_grid_until_it_is_interior_or_the_limit(tmp_path: Path):
    from doran_lightning.sweep import lr_search

    logged: list[str] = []
    args = make_args(tmp_path, "--methods", "dora", "--seeds", "0", "1", "2", "--search-seeds", "3", "--fractions", "1",
                     "--lrs", "1e-3", "3e-3", "1e-2", "--edge-steps", "3")
    summary = cli.run_sweep(args, launch=FakeCLI(lr_peak=0.1), log=logged.append)
    # 1e-2 wins at the top edge: 1e-2 · (1e-2 / 3e-3) = 1/30, then 1/9 (interior once 10/27 is searched too)
    steps = [1e-2 ** 2 / 3e-3]
    steps += [steps[-1] ** 2 / 1e-2]
    steps += [steps[-1] ** 2 / steps[-2]]
    searched = sorted({r["spec"]["lr"] for r in summary["lr_search"]})
    assert searched == pytest.approx([1e-3, 3e-3, 1e-2, *steps])
    assert summary["lr_by_variant"]["dora"] == pytest.approx(steps[1])
    assert len(summary["lr_search"]) == 3 * 6  # every lr on the 3 search seeds
    (chosen,) = [line for line in logged if line.startswith("chosen lrs:")]
    # validation 51 − 5·log10(10/9) = 50.77 points over seeds 0-2 (+0, +1, +2): sd 1, t(2) · 1/√3 = 2.48
    assert chosen == "chosen lrs: dora=0.111111 (val 50.77 [48.29, 53.26] over 3 search seeds; grid 0.001-0.37037 " \
                     "of 6, interior)"
    # a limit of one step: the pick 1/30 is still at the top edge, and the line says so
    logged.clear()
    args = make_args(tmp_path, "--methods", "dora", "--seeds", "0", "1", "2", "--search-seeds", "3", "--fractions", "1",
                     "--lrs", "1e-3", "3e-3", "1e-2", "--edge-steps", "1")
    summary = cli.run_sweep(args, launch=FakeCLI(lr_peak=0.1), log=logged.append)
    assert summary["lr_by_variant"]["dora"] == pytest.approx(steps[0])
    assert "at the high edge (extension limit reached))" in next(line for line in logged if line.startswith("chosen"))
    # the helpers by hand
    assert lr_search.edge_of([1e-3, 3e-3, 1e-2], 1e-3) == "low" and lr_search.edge_of([1e-3, 3e-3], 2e-3) is None
    assert lr_search.next_lr([1e-3, 3e-3, 1e-2], "low") == pytest.approx(1e-3 / 3)


def test_suite_differences_use_the_crossed_bootstrap_where_predictions_give_the_scores(tmp_path: Path):
    import numpy as np

    from doran_lightning.report.statistics import crossed_bootstrap_tasks

    rng, tasks, seeds = np.random.default_rng(5), tuple(suites.VTAB_GROUPS["natural"]), (0, 1, 2, 3)
    correct, rows = {}, []
    for method, rate in (("dora", 0.6), ("doran", 0.65)):
        for task in tasks:
            for seed in seeds:
                hits = (rng.random(40) < rate).astype(int)
                path = tmp_path / f"{method}-{task}-{seed}.csv"
                path.write_text("index,target,prediction\n" + "".join(f"{i},1,{1 if h else 0}\n" for i, h in enumerate(hits)))
                correct[(method, task, seed)] = 100.0 * hits
                rows.append(vtab_row(method, task, seed, float(hits.mean()), predictions=str(path), n_test=40))
    (vtab,) = suite_tables.suite_tables(rows, "accuracy")
    found = {d["column"]: d for d in suite_tables.differences(vtab, "dora")}
    expected = crossed_bootstrap_tasks([({s: correct[("doran", t, s)] for s in seeds},
                                         {s: correct[("dora", t, s)] for s in seeds}) for t in tasks])
    mean = found["Natural mean"]
    assert mean["basis"] == "crossed" and mean["interval"] == pytest.approx([expected.low, expected.high])
    assert found["dtd"]["basis"] == "crossed"
    # a logged score that is not the fraction correct of its predictions (e.g. the older macro accuracy): seeds only
    rows[0]["test_scalars"] = {"test/accuracy": rows[0]["test_scalars"]["test/accuracy"] + 0.01}
    (vtab,) = suite_tables.suite_tables(rows, "accuracy")
    found = {d["column"]: d for d in suite_tables.differences(vtab, "dora")}
    assert found[tasks[0]]["basis"] == "seeds only" and found["Natural mean"]["basis"] == "seeds only"
    assert found[tasks[1]]["basis"] == "crossed"
