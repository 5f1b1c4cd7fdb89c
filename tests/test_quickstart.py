"""The README's Quickstart, run as written, in order, after `make demo`'s command, on a fresh folder (a README or
Makefile edit that breaks the path fails here).

Every `fit` is cut to five steps through the environment (LightningCLI's `default_env`, documented beside the
block), so the whole path costs about a dozen short processes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tiny limits for every command of the block (and the sweep's child runs, which inherit the environment).
TINY_LIMITS = {
    "PL_FIT__TRAINER__MAX_STEPS": "5", "PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "5",
    "PL_FIT__TRAINER__LIMIT_VAL_BATCHES": "1", "PL_FIT__TRAINER__LIMIT_TEST_BATCHES": "1",
    "PL_FIT__TRAINER__NUM_SANITY_VAL_STEPS": "0", "PL_TEST__TRAINER__LIMIT_TEST_BATCHES": "1",
}


def readme_blocks(section: str) -> list[list[str]]:
    """The ```bash blocks of a README section, as commands (continuation lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        blocks.append([line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")])
    return blocks


def run_line(line: str, folder: Path, first: list[str]) -> subprocess.CompletedProcess:
    """`line` in a fresh bash after what the README says to do first (`first`: activating the venv), with nothing of
    this interpreter on PATH: a command that needs the venv fails unless the README activates it."""
    path = os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(part).resolve() != Path(sys.executable).parent.resolve())
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, **TINY_LIMITS, "OMP_NUM_THREADS": "1",
           "PATH": path, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = " && ".join([*first, line])
    return subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def split_first(commands: list[str]) -> tuple[list[str], list[str]]:
    """(the lines to do first — `source …activate` — , the commands) of the Quickstart block."""
    first = [line.split("#", 1)[0].strip() for line in commands if line.startswith("source ")]
    return first, [line for line in commands if not line.startswith("source ")]


def make_demo_command() -> str:
    """The command `make demo` runs (its recipe in the Makefile, with `python` for the venv's interpreter)."""
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ndemo:", 1)[1].splitlines()[1]
    return recipe.strip().replace("$(PY)", "python")


@pytest.mark.slow
def test_quickstart_runs_in_order_as_written(tmp_path: Path):
    block, own_data = readme_blocks("Quickstart")
    first, commands = split_first(block)
    assert first == ["source .venv/bin/activate"], "the Quickstart starts by activating make's venv"
    # `make demo` left .venv beside the README: the interpreter running this test is that venv's.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    assert run_line("python -c 'import lightning'", tmp_path, []).returncode != 0 or \
        Path(sys.prefix) == Path(sys.base_prefix), "without activating, the venv's packages must not be reachable"
    demo = make_demo_command()
    assert demo == "python -m doran_lightning fit --config minilm_text.yaml --test_after_fit=true"
    assert f"# make demo ran: {demo}" in (ROOT / "README.md").read_text(encoding="utf-8")  # what the block says
    for line in [demo, *commands]:
        if line.startswith("tensorboard "):  # a server that never exits; activation puts it on PATH
            assert run_line("command -v tensorboard", tmp_path, first).returncode == 0
            continue
        result = run_line(line, tmp_path, first)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1", "version_2"]  # test/predict: inside
    assert list((logs / "version_1" / "test").glob("events.out.tfevents*"))
    with open(logs / "version_0" / "predict" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {row["label"] for row in rows} <= {"sport", "technology", "food", "weather"}
    assert json.loads((tmp_path / "exported" / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (tmp_path / "report" / "summary.md").is_file()
    table = (tmp_path / "sweeps" / "smoke" / "results.md").read_text()
    first_table = table.split("| variant | lr |", 1)[1].split("\n\n", 1)[0]  # the runs' table, not the comparisons
    assert [row.split("|")[1].strip() for row in first_table.splitlines() if row.startswith("| ")] == [
        "lora", "dora", "doran"]
    assert "| 0.02 |" in table  # the config's own lr, not a default grid

    # The own-data line, without the data: one error line naming the flag, and no run folder left behind.
    (line,) = own_data
    result = run_line(line, tmp_path, first)
    assert result.returncode == 2, result.stderr
    errors = [text for text in result.stderr.splitlines() if "error:" in text]
    assert len(errors) == 1 and "root" in errors[0], result.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1", "version_2"]
