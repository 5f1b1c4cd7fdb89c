"""Running one sweep run: its cache folder, the `fit` + `test` CLI calls, resume from ``last.ckpt``, the result.

A run's folder ``<out>/runs/<variant>/<key>/`` holds ``spec.json``, the CLI logs (``fit.log``,
``test.log``), the TensorBoard version folder with its checkpoints and, as its state on disk:

- ``result.json``: finished (only successful runs are cached; a re-run skips them);
- ``failed.json``: the last attempt failed (the next invocation retries it);
- ``running.json``: an attempt started (pid, host, start time); without a result it was interrupted
  and the next attempt resumes from the run's ``last.ckpt`` when there is one.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from doran_lightning import report, stability
from doran_lightning.safe_files import atomic_write
from doran_lightning.sweep.plan import RunSpec, SweepError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RESULT, FAILED, RUNNING = "result.json", "failed.json", "running.json"
RESUME_PREFIX = "resume"  # sub_dir of the TensorBoard logs a resumed fit writes
LOG_TAIL_LINES = 15

# A launcher runs one CLI call (argument list after `python -m doran_lightning`) and returns its exit code.
Launcher = Callable[[list[str], Path], int]


class ResultCache:
    """``<root>/<variant>/<key>/``: the run's logs and, once it finished, ``result.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_dir(self, spec: RunSpec) -> Path:
        legacy = self.root / spec.variant / spec.legacy_key
        return legacy if (legacy / RESULT).is_file() else self.root / spec.variant / spec.key

    def load(self, spec: RunSpec) -> dict[str, Any] | None:
        path = self.run_dir(spec) / RESULT
        return read_result(path) if path.is_file() else None

    def store(self, spec: RunSpec, result: dict[str, Any]) -> None:
        write_json(self.run_dir(spec) / RESULT, result)

    def finished(self) -> list[dict[str, Any]]:
        """Every stored result (all variants and keys, lr-search runs included), paths rebased, in path order."""
        return [read_result(path) for path in sorted(self.root.glob(f"*/*/{RESULT}"))]


# The paths a result stores inside its own run folder (besides ``run_dir``).
_RUN_PATHS = ("path", "predictions")


def read_result(path: Path) -> dict[str, Any]:
    """A run's ``result.json`` with its paths rebased onto the folder it lies in.

    They were written relative to the sweep's working directory; read from another one (`benchmarks/evidence.py
    --table --out …`, a copied results folder) they would name files that are not there.
    """
    result = read_json(path)
    stored, here = result.get("run_dir"), path.parent
    if stored is None or Path(stored) == here:
        return result
    result["run_dir"] = str(here)
    for key in _RUN_PATHS:
        value = result.get(key)
        if value and Path(value).is_relative_to(stored):
            result[key] = str(here / Path(value).relative_to(stored))
    return result


def read_json(path: Path) -> dict[str, Any]:
    """One of the sweep's JSON files (``result.json``, ``sweep.json``, …); a cut-short or foreign one is a
    `SweepError` naming it (one line), never a JSONDecodeError traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SweepError(f"{path}: not complete JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         "it was cut short or edited — delete it (a run's file: that run is redone) and run the "
                         "sweep again") from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not UTF-8 text; delete it and run the sweep again") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: holds a JSON {type(data).__name__}, not the object the sweep writes; "
                         "delete it and run the sweep again")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic (`safe_files.atomic_write`): a crash never leaves a half-written file that a resumed sweep would trust."""
    text = json.dumps(data, indent=2, default=str)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `fit` kept: a monitored/best one when present, else ``last.ckpt``."""
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    named = [p for p in checkpoints if not p.name.startswith("last")]
    return (named or checkpoints or [None])[-1]


def version_dir(spec: RunSpec, run_dir: Path) -> Path:
    return run_dir / spec.variant / spec.version


def resume_checkpoint(spec: RunSpec, run_dir: Path) -> Path | None:
    """The ``last.ckpt`` an interrupted attempt left, if any."""
    last = version_dir(spec, run_dir) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def prepare(spec: RunSpec, cache: ResultCache) -> tuple[Path, Path | None]:
    """The run's folder, ready for an attempt, and the checkpoint to resume from (None: start clean).

    An interrupted attempt with a ``last.ckpt`` is resumed; one without is started afresh, its logs removed
    so they do not mix in.
    """
    run_dir = cache.run_dir(spec)
    checkpoint = resume_checkpoint(spec, run_dir)
    if checkpoint is None and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    write_json(run_dir / "spec.json", asdict(spec))
    return run_dir, checkpoint


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux), so a killed sweep
    leaves no orphaned run writing into a folder the resumed sweep is about to use."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def subprocess_launcher(extra_env: dict[str, str] | None = None) -> Launcher:
    """Run `python -m doran_lightning …` in the current folder, output to ``<run>/<subcommand>.log``.

    The child imports the same `doran_lightning` as this process; ``extra_env`` (e.g. ``CUDA_VISIBLE_DEVICES``)
    is added to its environment.
    """
    package_root = str(Path(__file__).resolve().parents[2])

    def launch(cli_args: list[str], run_dir: Path) -> int:
        env = {**{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}, **os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(run_dir / f"{cli_args[0]}.log", "a") as log:
            preexec = _die_with_parent if sys.platform.startswith("linux") else None
            # --verbose: the run's log is a file to debug from, so Lightning's own lines (e.g. "Restored all
            # states from the checkpoint") stay in it; the flag is the CLI's, outside the run's hashed arguments.
            return subprocess.call([sys.executable, "-m", "doran_lightning", *cli_args, "--verbose"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)

    return launch


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log (progress-bar carriage returns folded), [] when there is none."""
    if not path.is_file():
        return []
    with open(path, errors="replace") as handle:
        tail = deque(handle, maxlen=lines * 4)
    text = [line.rstrip("\n").rsplit("\r", 1)[-1] for line in tail]
    return [line for line in text if line.strip()][-lines:]


def execute(spec: RunSpec, cache: ResultCache, launch: Launcher, metric: str | None, rank: int = 0) -> dict[str, Any]:
    """Fit (resuming an interrupted attempt), test and summarise one run, or return its cached result.

    ``rank`` > 0 (the other tasks of a multi-task SLURM job) runs the CLI calls only: rank 0 prepares the
    folder and writes the result.
    """
    cached = cache.load(spec)
    if cached is not None:
        return cached
    if rank == 0:
        run_dir, checkpoint = prepare(spec, cache)
        write_json(run_dir / RUNNING, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                       "job": os.environ.get("SLURM_JOB_ID"),
                                       "resumed_from": str(checkpoint) if checkpoint else None})
    else:
        run_dir, checkpoint = cache.run_dir(spec), resume_checkpoint(spec, cache.run_dir(spec))
    started = time.time()
    failure = None
    fit_args = spec.cli_args("fit", run_dir)
    if checkpoint is not None:  # the interrupted attempt's logs stay; this one's go to a sub folder beside them
        attempt = 1 + sum(1 for p in version_dir(spec, run_dir).glob(f"{RESUME_PREFIX}*") if p.is_dir())
        fit_args = spec.cli_args("fit", run_dir, sub_dir=f"{RESUME_PREFIX}{attempt}") + [f"--ckpt_path={checkpoint}"]
    if launch(fit_args, run_dir) != 0:
        failure = "fit failed"
    else:
        best = find_checkpoint(run_dir)
        # An attempt killed during its test left a partial test/ (LightningCLI refuses to write over its config):
        # the test is redone whole, it reads the checkpoint only.
        shutil.rmtree(version_dir(spec, run_dir) / "test", ignore_errors=True)
        test_args = spec.cli_args("test", run_dir, sub_dir="test") + ([f"--ckpt_path={best}"] if best else [])
        if launch(test_args, run_dir) != 0:
            failure = "test failed"
    result: dict[str, Any] = {"key": spec.key, "spec": asdict(spec), "started": started, "seconds": round(time.time() - started, 1),
                              "run_dir": str(run_dir), "resumed_from": str(checkpoint) if checkpoint else None}
    if rank != 0:
        return result
    if failure is None:
        result.update(summarise(spec, run_dir, metric))
        failure = result.get("error")
    if failure:
        log = run_dir / ("fit.log" if failure.startswith("fit") else "test.log")
        result.update(status="failed", error=failure if failure.startswith(str(run_dir)) else f"{failure}, see {log}",
                      log_tail=log_tail(log))
        write_json(run_dir / FAILED, result)  # not cached: the next invocation retries it
    else:
        cache.store(spec, result)
    (run_dir / RUNNING).unlink(missing_ok=True)
    return result


def summarise(spec: RunSpec, run_dir: Path, metric: str | None) -> dict[str, Any]:
    """The run's numbers from its TensorBoard logs (`report`'s loader): stability, metric, the last test/val scalars."""
    root = version_dir(spec, run_dir)
    event_dirs = [root, *sorted(p for p in root.glob(f"{RESUME_PREFIX}*") if p.is_dir()), root / "test"]
    run = report.load_run(root, [d for d in event_dirs if d.is_dir()])
    if "train/loss" not in run.scalars:
        return {"status": "failed", "error": f"{root}: no train/loss logged (did the fit take no optimizer step?)"}
    chosen = report.choose_metric([run], metric)
    return {"status": "ok", "metric": chosen,
            **report.run_stability(run, chosen, spike_factor=stability.SPIKE_FACTOR, spike_window=stability.SPIKE_WINDOW)}
