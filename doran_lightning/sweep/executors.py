"""Where runs execute: ``local`` (a pool of N runs at once on this machine) or ``slurm`` (a submitit job array).

No scheduler of ours: the local executor is a `concurrent.futures` pool whose workers each drive one
run process (`python -m doran_lightning fit/test`, started by ``runs.subprocess_launcher``; Lightning's
DDP ranks re-run that command, so a run must be its own process), with one GPU group per worker
through ``CUDA_VISIBLE_DEVICES``. On a cluster, submitit writes the sbatch file, SLURM queues, places
and runs the array; a DDP run is one job with one task per GPU, rank 0 writing the result.
"""

from __future__ import annotations

import os
import queue
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from doran_lightning.sweep.plan import RunSpec, SweepError
from doran_lightning.sweep.runs import RUNNING, Launcher, ResultCache, execute, log_tail, subprocess_launcher

# Called with (spec, "start") when a run starts and (spec, result) when it ends.
Events = Callable[[RunSpec, Any], None]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class LocalExecutor:
    """N runs at once on this machine; with GPUs, each run gets ``devices_per_run`` of them to itself.

    ``launch``: an in-process launcher (tests); by default each worker launches the CLI with its devices.
    """

    jobs: int = 1
    gpus: Sequence[str] = ()
    devices_per_run: int = 1
    launch: Launcher | None = None
    groups: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        per = self.devices_per_run
        self.groups = [",".join(self.gpus[i:i + per]) for i in range(0, len(self.gpus) - per + 1, per)]
        if self.gpus and not self.groups:
            raise SweepError(f"--devices-per-run {per}: only {len(self.gpus)} GPUs visible ({','.join(self.gpus)})")

    @property
    def workers(self) -> int:
        """Runs at once: --jobs, and at least one per GPU group (several --jobs share a group round-robin)."""
        return max(len(self.groups), self.jobs, 1)

    def slots(self) -> list[str | None]:
        """The CUDA_VISIBLE_DEVICES of each worker (None: leave the environment alone)."""
        if not self.groups:
            return [None] * self.workers
        return [self.groups[i % len(self.groups)] for i in range(self.workers)]

    def describe(self) -> str:
        if self.groups:
            return f"local: {self.workers} runs at once on GPUs {' | '.join(self.slots())}"
        return f"local: {self.workers} run{'s' if self.workers > 1 else ''} at once (CPU or the config's devices)"

    def map(self, specs: Sequence[RunSpec], cache: ResultCache, metric: str | None, events: Events) -> list[dict[str, Any]]:
        free: queue.Queue[str | None] = queue.Queue()
        for group in self.slots():
            free.put(group)

        def one(spec: RunSpec) -> dict[str, Any]:
            group = free.get()  # one device group per worker: the pool never starts more runs than groups
            try:
                launch = self.launch or subprocess_launcher({"CUDA_VISIBLE_DEVICES": group} if group is not None else None)
                if cache.load(spec) is None:
                    events(spec, "start")
                try:
                    result = execute(spec, cache, launch, metric)
                except Exception as error:  # a broken run never stops the others
                    result = {"key": spec.key, "spec": spec.__dict__, "status": "failed", "error": repr(error),
                              "run_dir": str(cache.run_dir(spec)), "log_tail": []}
                events(spec, result)
                return result
            finally:
                free.put(group)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(one, specs))


def run_job(spec: RunSpec, cache_root: str, metric: str | None, launch: Launcher | None = None) -> dict[str, Any]:
    """The function a SLURM job (or array element) runs: every task launches the CLI, rank 0 keeps the result."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    try:
        import submitit

        rank = submitit.JobEnvironment().global_rank
    except RuntimeError:  # not inside a submitit job (a direct call)
        pass
    cache = ResultCache(Path(cache_root))
    if rank > 0:
        _wait_for_rank_zero(cache.run_dir(spec) / RUNNING, os.environ.get("SLURM_JOB_ID"))
    return execute(spec, cache, launch or subprocess_launcher(), metric, rank=rank)


def _wait_for_rank_zero(running: Path, job_id: str | None, timeout_s: float = 600.0) -> None:
    """Rank 0 prepares the run folder (clean start or resume); the other tasks start their CLI after it."""
    import json

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if running.is_file() and json.loads(running.read_text()).get("job") == job_id:
            return
        time.sleep(1.0)


def _submitit() -> Any:
    try:
        import submitit
        import submitit.slurm.slurm  # noqa: F401  (the sbatch renderer)
    except ImportError:
        raise SweepError("--executor slurm needs submitit: pip install 'doran_lightning[slurm]' (or pip install submitit)") from None
    return submitit


@dataclass
class SlurmOptions:
    """The sbatch settings of every run (a DDP run: one job, one task per GPU on one node)."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_run: int = 0
    account: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256
    setup: tuple[str, ...] = ()
    job_name: str = "doran-sweep"

    def submitit_parameters(self) -> dict[str, Any]:
        """Parameters for ``submitit.AutoExecutor.update_parameters``."""
        tasks = max(1, self.gpus_per_run)
        params: dict[str, Any] = {"name": self.job_name, "timeout_min": self.time_min, "nodes": 1, "tasks_per_node": tasks,
                                  "gpus_per_node": self.gpus_per_run, "slurm_array_parallelism": self.array_parallelism}
        optional = {"slurm_partition": self.partition, "slurm_account": self.account, "cpus_per_task": self.cpus_per_task,
                    "mem_gb": self.mem_gb, "slurm_setup": list(self.setup) or None}
        return {**params, **{k: v for k, v in optional.items() if v is not None}}

    def sbatch_preview(self, folder: Path, count: int) -> str:
        """The sbatch file submitit would write for an array of ``count`` runs (its own renderer)."""
        slurm = _submitit().slurm.slurm

        executor_params = {k.removeprefix("slurm_"): v for k, v in self.submitit_parameters().items()}
        renamed = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node"}
        executor_params = {renamed.get(k, k): v for k, v in executor_params.items()}
        executor_params["mem"] = slurm._convert_mem(executor_params.pop("mem_gb")) if "mem_gb" in executor_params else None
        command = "python -u -m submitit.core._submit " + shlex.quote(str(folder))
        return slurm._make_sbatch_string(command=command, folder=folder, map_count=count,
                                         **{k: v for k, v in executor_params.items() if v is not None})


@dataclass
class SlurmExecutor:
    """A submitit job array; ``cluster="local"`` runs it with submitit's own local executor (tests, no cluster)."""

    folder: Path
    options: SlurmOptions
    cluster: str | None = "slurm"
    launch: Launcher | None = None
    poll_s: float = 5.0

    def describe(self) -> str:
        o = self.options
        return (f"slurm ({self.cluster}): job array, partition={o.partition or 'default'}, time={o.time_min} min, "
                f"{o.gpus_per_run} GPU(s) and {max(1, o.gpus_per_run)} task(s) per run, logs in {self.folder}/<job id>")

    def map(self, specs: Sequence[RunSpec], cache: ResultCache, metric: str | None, events: Events) -> list[dict[str, Any]]:
        submitit = _submitit()
        results: dict[int, dict[str, Any]] = {}
        pending = []
        for index, spec in enumerate(specs):
            cached = cache.load(spec)
            if cached is not None:
                results[index] = cached
                events(spec, cached)
            else:
                pending.append(index)
        if pending:
            executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
            params = self.options.submitit_parameters()
            if self.cluster == "local":  # submitit's local executor takes the generic parameters only
                params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "name"}
            executor.update_parameters(**params)
            chosen = [specs[i] for i in pending]
            jobs = executor.map_array(run_job, chosen, [str(cache.root)] * len(chosen), [metric] * len(chosen),
                                      [self.launch] * len(chosen))
            for spec in chosen:
                events(spec, "submitted")
            waiting = dict(zip(pending, jobs))
            started: set[int] = set()
            while waiting:
                for index, job in list(waiting.items()):
                    if index not in started and (cache.run_dir(specs[index]) / RUNNING).is_file():
                        started.add(index)  # rank 0 of the job has begun the run
                        events(specs[index], "start")
                    if not job.done():
                        continue
                    del waiting[index]
                    results[index] = self._outcome(job, specs[index], cache)
                    events(specs[index], results[index])
                if waiting:
                    time.sleep(self.poll_s)
        return [results[i] for i in range(len(specs))]

    @staticmethod
    def _outcome(job: Any, spec: RunSpec, cache: ResultCache) -> dict[str, Any]:
        try:
            return job.result()
        except Exception as error:  # the job died (time limit, node failure): the run folder tells the rest
            run_dir = cache.run_dir(spec)
            return {"key": spec.key, "spec": spec.__dict__, "status": "failed", "run_dir": str(run_dir),
                    "error": f"SLURM job {job.job_id} failed: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}",
                    "log_tail": log_tail(run_dir / "fit.log")}
