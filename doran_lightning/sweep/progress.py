"""What a person watching a sweep sees: a live line, each failure with its folder and log tail, ``--status``.

The live line counts finished / running / queued / failed runs with the elapsed time and an estimate
of what is left (mean duration of the runs finished in this invocation × the runs left ÷ runs at once).
``sweep --status <out>`` rebuilds the same picture from the files alone (``sweep.json`` and each run
folder's ``result.json`` / ``failed.json`` / ``running.json``), so it works on a running sweep, a
finished one, or one whose process was killed.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from doran_lightning.sweep.plan import RunSpec
from doran_lightning.safe_files import process_alive
from doran_lightning.sweep.runs import FAILED, RESULT, RUNNING, log_tail, read_json, write_json

PLAN_FILE = "sweep.json"
OUTPUTS_KEY = "outputs"  # {path under --out: sha256} of the tables and report files the sweep wrote


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts runs as the executor reports them; prints a line per event and a live line on a terminal."""

    def __init__(self, total: int, parallel: int, log: Callable[[str], None], phase: str = "run",
                 live: bool | None = None) -> None:
        self.total, self.parallel, self.log, self.phase = total, max(1, parallel), log, phase
        self.finished = self.failed = self.cached = 0
        self.running: set[str] = set()
        self.durations: list[float] = []
        self.started = time.time()
        self.live = sys.stderr.isatty() if live is None else live
        self._lock = threading.Lock()

    def line(self) -> str:
        done = self.finished + self.failed
        queued = self.total - done - len(self.running)
        left = self.total - done
        estimate = "–"
        if self.durations and left:
            estimate = duration(sum(self.durations) / len(self.durations) * left / self.parallel)
        elif not left:
            estimate = "done"
        return (f"{self.phase}: {self.finished} finished ({self.cached} cached), {len(self.running)} running, "
                f"{queued} queued, {self.failed} failed | elapsed {duration(time.time() - self.started)}, "
                f"left ~{estimate}")

    def __call__(self, spec: RunSpec, event: Any) -> None:
        with self._lock:
            if event in ("start", "submitted"):
                if event == "start":
                    self.running.add(spec.key)
                self._show()
                return
            was_running = spec.key in self.running
            self.running.discard(spec.key)
            if event.get("status") == "ok":
                self.finished += 1
                if was_running:
                    self.durations.append(float(event.get("seconds") or 0))
                else:
                    self.cached += 1
                if was_running:
                    self.log(f"{self.phase} ok: {spec.describe()} in {duration(event.get('seconds') or 0)}")
            else:
                self.failed += 1
                self.log(failure_text(spec.describe(), event))
            self._show()

    def _show(self) -> None:
        if self.live:
            print(f"\r\033[K{self.line()}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            print(file=sys.stderr)
        self.log(self.line())


def failure_text(what: str, result: dict[str, Any]) -> str:
    """A failed run: what, why, its folder, and the last lines of its log."""
    lines = [f"FAILED {what}: {result.get('error', 'unknown error')}", f"  run folder: {result.get('run_dir', '?')}"]
    tail = result.get("log_tail") or []
    if tail:
        lines.append("  last lines of its log:")
        lines += [f"    {line}" for line in tail]
    return "\n".join(lines)


def write_plan(out: Path, command: str, phases: dict[str, Sequence[tuple[RunSpec, Path]]]) -> None:
    """``<out>/sweep.json``: every planned run with its folder, for ``--status``."""
    runs = [{"phase": phase, "key": spec.key, "run": spec.describe(), "variant": spec.variant, "task": spec.label,
             "fraction": spec.fraction, "seed": spec.seed, "lr": spec.lr, "run_dir": str(run_dir)}
            for phase, entries in phases.items() for spec, run_dir in entries]
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_FILE
    previous = read_json(path) if path.is_file() else {}
    if previous.get("command") != command:  # another grid in the same folder: its plan starts afresh
        previous = {}
    known = {(run["phase"], run["key"]) for run in runs}
    # A later phase (the final runs after the lr search) adds to the plan instead of replacing it.
    runs = [run for run in previous.get("runs", []) if (run["phase"], run["key"]) not in known] + runs
    # The record of the files the sweep wrote (sweep/outputs.py) outlives a change of grid; a plan of an older
    # release has none, and keeps having none until the sweep records its files (its folder's files count as its own).
    outputs = (read_json(path) if path.is_file() else {OUTPUTS_KEY: {}}).get(OUTPUTS_KEY)
    plan = {"command": command, "updated": time.time(), "runs": runs}
    write_json(path, plan if outputs is None else {**plan, OUTPUTS_KEY: outputs})


def run_state(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(finished | failed | running | interrupted | queued, the file that says so)."""
    for name, state in ((RESULT, "finished"), (FAILED, "failed")):
        if (run_dir / name).is_file():
            data = read_json(run_dir / name)
            return (state if data.get("status", "ok") == "ok" or state == "failed" else "failed"), data
    if (run_dir / RUNNING).is_file():
        data = read_json(run_dir / RUNNING)
        alive = data.get("host") != socket.gethostname() or process_alive(int(data.get("pid", 0)))
        return ("running" if alive else "interrupted"), data
    return "queued", {}


def planned_run_dir(out: Path, stored: str) -> Path:
    """A run folder of ``sweep.json`` found from `out`: the plan names it as the sweep saw it (relative to the
    folder it ran in), but ``--status`` may be asked from another folder or of a moved sweep. Run folders are
    always ``<out>/runs/<variant>/<key>``."""
    rebased = out / "runs" / Path(stored).parent.name / Path(stored).name
    return rebased if rebased.is_dir() or not Path(stored).is_dir() else Path(stored)


def status_table(out: Path) -> str:
    """The table of a sweep's runs from its files: state, time, metric; failures with their log tails."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep plan here; pass the --out folder of a sweep")
    plan = read_json(path)
    counts: dict[str, int] = {}
    rows, failures = [], []
    for run in plan.get("runs", []):
        run["run_dir"] = str(planned_run_dir(out, run["run_dir"]))
        state, data = run_state(Path(run["run_dir"]))
        counts[state] = counts.get(state, 0) + 1
        seconds = data.get("seconds") if state in ("finished", "failed") else (
            time.time() - data["started"] if state == "running" and "started" in data else None)
        value = data.get("test") if data.get("test") is not None else data.get("best_val")
        metric = f"{data.get('metric') or 'metric'} {value:.4f}" if isinstance(value, (int, float)) else "–"
        rows.append(f"| {run['phase']} | {run['variant']} | {run['task']} | {run['fraction']:g} | {run['seed']} "
                    f"| {run['lr']:g} | {state} | {duration(seconds) if seconds is not None else '–'} | {metric} |")
        if state == "failed":
            failures.append(failure_text(run["run"], {**data, "run_dir": run["run_dir"]}))
        if state == "interrupted":
            failures.append(f"INTERRUPTED {run['run']}: resumes from its last.ckpt when the sweep runs again\n"
                            f"  run folder: {run['run_dir']}\n" + "\n".join(
                                f"    {line}" for line in log_tail(Path(run["run_dir"]) / "fit.log", 5)))
    order = ("finished", "running", "queued", "failed", "interrupted")
    header = ", ".join(f"{counts.get(state, 0)} {state}" for state in order if counts.get(state) or state != "interrupted")
    lines = [f"sweep {out}: {len(plan.get('runs', []))} runs: {header}", f"command: {plan.get('command', '?')}", "",
             "| phase | variant | task | fraction | seed | lr | state | time | test (best val) |",
             "|---|---|---|---|---|---|---|---|---|", *rows]
    return "\n".join(lines + ([""] + failures if failures else [])) + "\n"
