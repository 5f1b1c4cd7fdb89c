"""`model.compile=true` end to end on CPU: the same training as eager, statistics, resume, export, DDP.

Compile is the GPU fast path (docs/PERFORMANCE.md); here it must change nothing but speed. One tiny
ViT DoRAN run is trained eager and compiled (in process); the compiled run is then resumed and exported,
and a 2-process DDP run (gloo) compiles on each rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import only_run_dir, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from doran_lightning.checkpointing import read_checkpoint
from doran_lightning.cli import main

TESTS_DIR = Path(__file__).parent


def _fit(root: Path, *extra: str) -> Path:
    assert main(tiny_fit_args(root, "--model.adapter.method=doran", "--data.fraction=0.1", *extra,
                              steps_per_epoch=2, epochs=2)) == 0
    return only_run_dir(root)


@pytest.mark.slow
def test_compiled_training_equals_eager_and_resumes_exports_and_logs(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    eager_run = _fit(tmp_path / "eager")
    compiled_run = _fit(tmp_path / "compiled", "--model.compile=true")
    eager = read_checkpoint(eager_run / "checkpoints" / "last.ckpt")["state_dict"]
    compiled = read_checkpoint(compiled_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert compiled.keys() == eager.keys()  # in-place compile: no _orig_mod. in any key
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)
    tags = EventAccumulator(str(compiled_run)).Reload().Tags()["scalars"]
    assert {"sigma/blocks.0.attn.qkv.q", "delta_d/blocks.1.attn.qkv.v", "train/loss"} <= set(tags)

    checkpoint = compiled_run / "checkpoints" / "last.ckpt"
    resumed_root = tmp_path / "resumed"
    assert main([*tiny_fit_args(resumed_root, "--model.adapter.method=doran", "--data.fraction=0.1",
                                "--model.compile=true", steps_per_epoch=2, epochs=3), f"--ckpt_path={checkpoint}"]) == 0
    resumed = read_checkpoint(only_run_dir(resumed_root) / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6 and resumed["state_dict"].keys() == compiled.keys()

    out = tmp_path / "export"
    export = ["export", "--config", "vit_tiny_digits.yaml", "--model.compile=true", f"--ckpt_path={checkpoint}",
              f"--out={out}", *[a for a in tiny_fit_args(tmp_path)[3:] if a.startswith(("--model.backbone", "--data.image"))]]
    assert main(export) == 0
    assert (out / "adapters" / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_compiled_ddp_ranks_stay_identical(tmp_path: Path):
    command = [sys.executable, "-m", "doran_lightning", *tiny_fit_args(
        tmp_path, "--model.adapter.method=doran", "--data.fraction=0.1", "--model.compile=true",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.callbacks+=run_helpers.SaveRankState",
        steps_per_epoch=2, epochs=1)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs between ranks"
