"""Alarm precision and recall: do the stability alarms stay quiet in healthy runs and fire in failing ones?

Runs small CLI fits (`--test_after_fit=true`) one after the other, each in its own folder, and reads
the run summary each prints: the test metric and the stability verdict (alarms per kind, non-finite
steps). Healthy cases are runs that reach a good test metric; failing cases diverge, collapse to
chance (topics at lr 0.1) or get a NaN batch injected (`InjectNaN`, a callback given on the
command line). Writes ``<out>/results.json`` and ``<out>/results.md`` (the table in docs/LOGGING.md).

``--runs`` measures the same over runs that already exist (every run of a sweep's output): each run is
classed by what its logs show, with the shared rules of `stability.py` — *fails* if it diverged, had a
non-finite step or a loss spike that did not come back (`stability.unrecovered_spikes`), its training loss over the second half of the run sits at or above the
uninformed level (ln C), or its last validation metric is at chance; *healthy* otherwise — and its
alarms are the counts it logged (``alarm/<kind>``). A healthy run with an alarm is a false alarm; a failing
run without one is a miss.

    python benchmarks/alarm_precision.py --out benchmarks/results/alarm_precision
    python benchmarks/alarm_precision.py --only topics-doran-lr0.1 --out /tmp/a   # one case
    python benchmarks/alarm_precision.py --runs 'benchmarks/results/i17_screen_digits/*/runs' --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

TOPICS = ["--config", "minilm_text.yaml", "--trainer.max_epochs=3"]
DIGITS = ["--config", "vit_tiny_digits.yaml", "--trainer.max_epochs=5"]
NAN = ["--trainer.callbacks+=alarm_precision.InjectNaN"]

# name: (expected outcome, CLI arguments after `fit`)
CASES: dict[str, tuple[str, list[str]]] = {
    "topics-doran-lr2e-3": ("healthy", [*TOPICS]),
    "topics-doran-lr0.01": ("healthy", [*TOPICS, "--model.lr=0.01"]),
    "topics-dora-lr0.01": ("healthy", [*TOPICS, "--model.lr=0.01", "--model.adapter.method=dora"]),
    "topics-lora-lr0.01": ("healthy", [*TOPICS, "--model.lr=0.01", "--model.adapter.method=lora"]),
    "digits-doran": ("healthy", [*DIGITS]),
    "digits-dora": ("healthy", [*DIGITS, "--model.adapter.method=dora"]),
    "digits-lora": ("healthy", [*DIGITS, "--model.adapter.method=lora"]),
    "topics-doran-lr0.1": ("fails", [*TOPICS, "--model.lr=0.1"]),
    "topics-dora-lr0.1": ("fails", [*TOPICS, "--model.lr=0.1", "--model.adapter.method=dora"]),
    "digits-doran-lr3": ("fails", [*DIGITS, "--model.lr=3"]),
    "digits-dora-lr3": ("fails", [*DIGITS, "--model.lr=3", "--model.adapter.method=dora"]),
    "digits-doran-nan": ("fails", [*DIGITS, *NAN]),
}


class InjectNaN(pl.Callback):
    """Replaces one training batch's images by NaN at `step` (a corrupt batch the run must flag)."""

    def __init__(self, step: int = 20) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch["pixel_values"].fill_(math.nan)


def run_case(name: str, args: list[str], out: Path) -> dict[str, Any]:
    folder = out / name
    command = [sys.executable, "-m", "doran_lightning", "fit", *args, f"--trainer.default_root_dir={folder}",
               "--test_after_fit=true", "--trainer.enable_progress_bar=false"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                             os.environ.get("PYTHONPATH")]))}
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    text = result.stdout + result.stderr
    test = re.search(r"test/\w+\s+([\d.]+)", text)
    best = re.search(r"best val/\w+\s+([\d.]+)", text)
    verdict = re.search(r"stability\s+(.*)", text)
    kinds = dict(re.findall(r"(\w+) ×(\d+)", verdict.group(1))) if verdict else {}
    nonfinite = re.search(r"(\d+) non-finite step", verdict.group(1)) if verdict else None
    return {"case": name, "exit": result.returncode, "seconds": round(time.time() - start, 1),
            "test": float(test.group(1)) if test else None, "best_val": float(best.group(1)) if best else None,
            "verdict": verdict.group(1).strip() if verdict else text.strip().splitlines()[-1:],
            "alarms": {kind: int(count) for kind, count in kinds.items()},
            "nonfinite_steps": int(nonfinite.group(1)) if nonfinite else None,
            "command": "python -m doran_lightning fit " + " ".join(args) + " --test_after_fit=true"}


def markdown(rows: list[dict[str, Any]], expected: dict[str, str]) -> str:
    lines = ["| case | expected | test metric | alarms | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        alarms = ", ".join(f"{kind} ×{count}" for kind, count in row["alarms"].items()) or "none"
        test = "–" if row["test"] is None else f"{row['test']:.3f}"
        verdict = str(row["verdict"]).split(";")[0]
        lines.append(f"| {row['case']} | {expected[row['case']]} | {test} | {alarms} | {verdict} |")
    return "\n".join(lines) + "\n"


def checkpoint_classes(run_dir: Path) -> int | None:
    """num_classes from the run's own checkpoint (TensorBoard's hparams of older runs do not hold it)."""
    from doran_lightning.checkpointing import read_checkpoint

    found = sorted(Path(run_dir).glob("checkpoints/*.ckpt"))
    if not found:
        return None
    classes = read_checkpoint(found[-1]).get("hyper_parameters", {}).get("num_classes")
    return classes if isinstance(classes, int) else None


def classify(run: Any, metric: str | None) -> dict[str, Any]:
    """One existing run: its outcome by the shared stability rules, and the alarms it logged."""
    from doran_lightning.report.analysis import alarm_counts, run_stability
    from doran_lightning import tags
    from doran_lightning.stability import SPIKE_FACTOR, SPIKE_WINDOW, at_chance, loss_collapsed, unrecovered_spikes

    numbers = run_stability(run, metric, SPIKE_FACTOR, SPIKE_WINDOW)
    classes = run.hparam("num_classes") or checkpoint_classes(run.path)
    losses = run.scalars[tags.TRAIN_LOSS].values
    late = [float(value) for value in losses[len(losses) // 2:]]  # the second half: past any warm-up
    reasons = [reason for reason, failed in (
        ("diverged", numbers["diverged"]), ("non-finite step", numbers["nonfinite_steps"] > 0),
        # A spike that came back is an episode (issue 31), the alarms' own rule: only one that did not fails a run.
        ("loss spike that did not come back", len(unrecovered_spikes(losses)) > 0),
        ("loss at the uninformed level", bool(late) and loss_collapsed(late, classes)),
        ("ended at chance", metric is not None and at_chance(metric, numbers["final_val"], classes)),
    ) if failed]
    alarms = {kind: count for kind, count in alarm_counts(run).items() if count}
    return {"run": str(run.path), "variant": run.variant, "lr": numbers["lr"], "test": numbers["test"],
            "final_val": numbers["final_val"], "outcome": "fails" if reasons else "healthy", "reasons": reasons,
            "alarms": alarms, "alarm_messages": run.alarm_messages}


def started_at(event_dirs: list[Path]) -> float:
    """When a run began: the Unix time TensorBoard writes into its first event file's name."""
    stamps = [float(path.name.split(".")[3]) for folder in event_dirs for path in folder.glob("events.out.tfevents.*")]
    return min(stamps, default=0.0)


def measure_runs(patterns: list[str], since: float = 0.0) -> list[dict[str, Any]]:
    """`classify` every run found under `patterns` (TensorBoard run folders, as `report` finds them) that began
    at or after `since` (Unix time: runs made by the alarm code being measured)."""
    from doran_lightning.report.analysis import choose_metric
    from doran_lightning.report.runs import find_run_dirs, load_alarm_messages, load_run

    runs = []
    for run_dir, event_dirs in find_run_dirs(patterns).items():
        if started_at(event_dirs) < since:
            continue
        run = load_run(run_dir, event_dirs)
        run.alarm_messages = load_alarm_messages(event_dirs)
        runs.append(run)
    from doran_lightning import tags

    # A run still being written (or killed before its first logged step) has no training loss to judge.
    runs = [run for run in runs if tags.TRAIN_LOSS in run.scalars]
    metric = choose_metric(runs, None)
    return [classify(run, metric) for run in runs]


def runs_markdown(rows: list[dict[str, Any]]) -> str:
    """Precision and recall over existing runs: per outcome, how many runs alarmed, and by which kinds."""
    lines = ["| outcome | runs | runs with ≥ 1 alarm | alarms by kind |", "|---|---|---|---|"]
    for outcome in ("healthy", "fails"):
        chosen = [row for row in rows if row["outcome"] == outcome]
        kinds: dict[str, int] = {}
        for row in chosen:
            for kind, count in row["alarms"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        alarmed = sum(1 for row in chosen if row["alarms"])
        shown = ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds.items())) or "none"
        lines.append(f"| {outcome} | {len(chosen)} | {alarmed} | {shown} |")
    failing = [row for row in rows if row["outcome"] == "fails"]
    if failing:
        lines += ["", "| failing run | why | alarms |", "|---|---|---|"]
        lines += [f"| {row['run']} | {', '.join(row['reasons'])} | "
                  f"{', '.join(f'{k} ×{c}' for k, c in row['alarms'].items()) or '**none**'} |" for row in failing]
    false_alarms = [row for row in rows if row["outcome"] == "healthy" and row["alarms"]]
    if false_alarms:
        lines += ["", "| healthy run with an alarm | alarms | first message |", "|---|---|---|"]
        lines += [f"| {row['run']} | {', '.join(f'{k} ×{c}' for k, c in row['alarms'].items())} | "
                  f"{(row['alarm_messages'] or [''])[0]} |" for row in false_alarms]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    parser.add_argument("--runs", nargs="+", help="measure existing runs (folders or globs, as `report` takes) "
                        "instead of running the cases")
    parser.add_argument("--since", type=datetime.fromisoformat, help="with --runs: only runs begun at or after this "
                        "time (ISO, e.g. 2026-11-30T14:13, local time): those made by the alarm code being measured")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        measured = measure_runs(args.runs, args.since.timestamp() if args.since else 0.0)
        (args.out / "runs.json").write_text(json.dumps(measured, indent=2))
        (args.out / "runs.md").write_text(runs_markdown(measured))
        print(runs_markdown(measured))
        return
    rows = []
    for name, (outcome, case_args) in CASES.items():
        if args.only and name not in args.only:
            continue
        rows.append(run_case(name, case_args, args.out))
        print(json.dumps(rows[-1]), flush=True)
    expected = {name: outcome for name, (outcome, _) in CASES.items()}
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows, expected))
    print(markdown(rows, expected))


if __name__ == "__main__":
    main()
