"""`--help` shows the tool (issue 43): every verb with one line, the method's choices, a short `export --help`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from doran_lightning.adapters import registry
from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.methods import LoRA
from doran_lightning.cli import main
from doran_lightning.commands import PROG, VERBS

ROOT = Path(__file__).resolve().parents[1]
EVERY_VERB = ("fit", "validate", "test", "predict", "export", "report", "sweep")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI(args=…) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])


def test_top_help_names_the_program_and_lists_every_verb_with_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "doran_lightning", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"usage: {PROG} ") and "__main__.py" not in done.stdout
    assert tuple(VERBS) == EVERY_VERB
    for verb in EVERY_VERB:
        described = [line for line in lines if line.split()[:1] == [verb] and len(line.split()) > 3]
        assert len(described) == 1, f"{verb}: {described}"


def test_fit_help_lists_the_registered_methods_including_one_registered_later(monkeypatch, capsys):
    class Mine(LoRA):
        name = "mine"

    monkeypatch.setitem(registry._METHODS, "mine", Mine)
    with pytest.raises(SystemExit) as exited:  # LightningCLI's help exits
        main(["fit", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {PROG} " in out
    assert "--model.adapter.method {lora,dora,doran,pissa,dora-pissa,mine}" in out
    # Listing the choices changes no validation: the config still checks the registry when it is built.
    assert AdapterConfig(method="mine").method == "mine"
    with pytest.raises(ValueError, match="must be one of .*mine \(got 'nope'\)"):
        AdapterConfig(method="nope")


def test_export_help_shows_what_export_needs_not_the_trainer(capsys):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG} export ")
    for flag in ("--config", "--ckpt_path", "--out", "--overwrite"):
        assert flag in out
    assert "--trainer." not in out.replace("--trainer.* settings", "") and len(out.splitlines()) < 60


def test_the_readme_own_data_line_and_its_error_spell_the_flag_alike(tmp_path: Path, monkeypatch, capsys):
    from test_quickstart import readme_blocks

    (line,) = readme_blocks("Quickstart")[1]
    flags = re.findall(r"(--data\.[a-z_.]*root)=", line)
    assert flags, line
    monkeypatch.chdir(tmp_path)
    args = shlex.split(line)[3:]  # after `python -m doran_lightning`
    missing = str(tmp_path / "no-vtab")
    assert main([arg.replace("/data/vtab-1k", missing) for arg in args]) == 2
    (error,) = [text for text in capsys.readouterr().err.splitlines() if "error:" in text]
    assert f"set {flags[0]} to the folder" in error and missing in error
