"""Faults: non-finite steps (skip / stop), kill -9 mid-epoch then resume, atomic and corrupt checkpoints."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import TINY_VIT_OVERRIDES, only_run_dir
from torch.utils.data import DataLoader

from doran_lightning.adapters import AdapterConfig
from doran_lightning.safe_files import atomic_write, host_tag
from doran_lightning.checkpointing import AtomicCheckpointIO, CheckpointError, read_checkpoint
from doran_lightning.cli import main, shipped_configs_dir
from doran_lightning.data.vision import DigitsDataModule
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule, NonFiniteError

TESTS_DIR = Path(__file__).parent


# ---------------------------------------------------------------------- non-finite policies
class ParameterSnapshots(pl.Callback):
    """Trainable tensors before every training batch, to see which steps changed them."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def batches_with_nan(nan_batch: int, count: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        pixels = torch.randn(4, 3, 16, 16, generator=generator)
        if index == nan_batch:
            pixels[0, 0, 0, 0] = math.nan
        batches.append({"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 3])})
    return DataLoader(batches, batch_size=None)


def tiny_module(policy: str) -> DoranModule:
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=dict(TINY_VIT_OVERRIDES))
    return DoranModule(backbone, AdapterConfig(method="doran", r=4, alpha=8), num_classes=4, lr=1e-2,
                       nonfinite_policy=policy)


def fit(module: DoranModule, loader: DataLoader, root: Path, *callbacks: pl.Callback) -> pl.Trainer:
    trainer = pl.Trainer(default_root_dir=root, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_skip_policy_skips_and_counts_the_nan_step(tmp_path: Path):
    module, snapshots = tiny_module("skip"), ParameterSnapshots()
    trainer = fit(module, batches_with_nan(nan_batch=1), tmp_path, snapshots)
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    first, nan_step, last = snapshots.before
    assert any(not torch.equal(first[n], nan_step[n]) for n in first)  # step 0 trained
    assert all(torch.equal(nan_step[n], last[n]) for n in first)  # step 1 (NaN batch) skipped
    assert any(not torch.equal(last[n], after[n]) for n in first)  # step 2 trained again
    assert all(torch.isfinite(p).all() for p in after.values())
    assert module.nonfinite_steps == 1
    assert trainer.logged_metrics["train/nonfinite_steps"] == 1


def test_stop_policy_names_the_step_and_the_layers(tmp_path: Path):
    with pytest.raises(NonFiniteError, match=r"at step 1 .*loss non-finite.*blocks\.0\.attn\.qkv\.adapters\.q"):
        fit(tiny_module("stop"), batches_with_nan(nan_batch=1), tmp_path)


def test_stop_policy_names_a_non_finite_denominator(tmp_path: Path):
    module = tiny_module("stop")
    with torch.no_grad():
        module.backbone.blocks[1].attn.qkv.adapters["v"].rho.fill_(math.nan)  # σ = softplus(NaN)
    with pytest.raises(NonFiniteError, match=r"at step 0 .*denominator ‖V‖\+σ in blocks\.1\.attn\.qkv\.v"):
        fit(module, batches_with_nan(nan_batch=-1), tmp_path)


# ---------------------------------------------------------------------- checkpoints on disk
def test_atomic_save_keeps_the_previous_checkpoint_when_a_save_crashes(tmp_path: Path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)

    def crash_half_way(obj, target, *args, **kwargs):
        with open(target, "wb") as stream:  # torch.save is handed the temporary file's path
            stream.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_atomic_write_syncs_the_folder_keeps_the_umask_and_clears_a_killed_save(tmp_path: Path, monkeypatch):
    target = tmp_path / "adapter_model.safetensors"
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(killed.stdout)  # a process that has exited: its temporary file is litter
    litter = tmp_path / f".{target.name}.{host_tag()}-{dead_pid}.abc123.tmp"
    litter.write_bytes(b"half")
    alive = tmp_path / f".{target.name}.{host_tag()}-{os.getpid()}.def456.tmp"  # a save in progress
    alive.write_bytes(b"busy")
    synced_folders = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced_folders.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    previous = os.umask(0o027)
    try:
        atomic_write(target, lambda temporary: Path(temporary).write_bytes(b"new"))
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0666 minus the umask, not mkstemp's 0600
    assert synced_folders == [False, True]  # the file, then the folder holding the rename
    assert not litter.exists() and alive.exists()


def test_truncated_or_foreign_checkpoint_is_named(tmp_path: Path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*truncated or corrupt"):
        read_checkpoint(path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


class RunsCode:
    """A pickle that runs a shell command when unpickled without weights_only (the issue's evil.ckpt)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refused(path: Path, what: str = "Checkpoint") -> str:
    return (f"{what} {path} refused: it names {os.system.__module__}.system, which is not a tensor, container or "
            "allowed type, and unpickling it could run code. Use a file written by this project (or convert it "
            "to safetensors).")


def test_a_checkpoint_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path):
    marker, evil = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, evil)
    for load in (read_checkpoint, AtomicCheckpointIO().load_checkpoint):  # our reads and Lightning's resume
        with pytest.raises(CheckpointError) as error:
            load(evil)
        assert str(error.value) == refused(evil)
    assert not marker.exists()


def test_timm_weights_that_run_code_are_refused_before_timm_reads_them(tmp_path: Path):
    marker, evil = tmp_path / "ran", tmp_path / "weights.pth"
    torch.save({"model": RunsCode(marker)}, evil)
    backbone = BackboneConfig(name="vit_tiny_patch16_224", checkpoint_path=str(evil), overrides=dict(TINY_VIT_OVERRIDES))
    with pytest.raises(CheckpointError) as error:
        DoranModule(backbone, AdapterConfig(method="lora", r=2), num_classes=3)
    assert str(error.value) == refused(evil, "model.backbone.checkpoint_path")
    assert not marker.exists()


def test_no_checkpoint_is_ever_unpickled_without_weights_only():
    sources = [path for folder in ("doran_lightning", "tests", "benchmarks")
               for path in (TESTS_DIR.parent / folder).rglob("*.py")]
    offending = [str(path) for path in sources if "weights_only=" + "False" in path.read_text(encoding="utf-8")]
    assert not offending


# ---------------------------------------------------------------------- kill -9 and resume
def write_config(path: Path, root: Path, datamodule: str, kill_at: int | None) -> Path:
    """The shipped digits config shrunk to 2 epochs x 5 steps, checkpointing every 3 steps."""
    config = yaml.safe_load((shipped_configs_dir() / "vit_tiny_digits.yaml").read_text())
    config["trainer"].update(default_root_dir=str(root), max_epochs=2, limit_train_batches=5, limit_val_batches=1,
                             log_every_n_steps=1, enable_progress_bar=False)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": 3}},
        *([{"class_path": "run_helpers.KillAt", "init_args": {"step": kill_at}}] if kill_at is not None else []),
    ]
    config["model"]["backbone"]["overrides"] = dict(TINY_VIT_OVERRIDES)
    config["model"]["histogram_every_n_steps"] = 0
    config["data"] = {"class_path": datamodule,
                      "init_args": {"image_size": 16, "batch_size": 16, "fraction": 0.1, "seed": 0}}
    path.write_text(yaml.safe_dump(config))
    return path


def trained_state(root: Path) -> dict[str, torch.Tensor]:
    runs = sorted((root / "lightning_logs").glob("version_*"))
    return read_checkpoint(runs[-1] / "checkpoints" / "last.ckpt")["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("datamodule", ["doran_lightning.data.vision.DigitsDataModule"])
def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch, datamodule: str):
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    straight = tmp_path / "straight"
    assert main(["fit", "--config", str(write_config(tmp_path / "straight.yaml", straight, datamodule, None))]) == 0

    killed = tmp_path / "killed"
    # Killed before step 8, i.e. in the 2nd epoch; the last checkpoint is from step 6 (1 batch into that epoch).
    config = write_config(tmp_path / "killed.yaml", killed, datamodule, kill_at=8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "doran_lightning", "fit", "--config", str(config)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    last = only_run_dir(killed) / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 6

    resume_config = write_config(tmp_path / "resume.yaml", killed, datamodule, None)
    assert main(["fit", "--config", str(resume_config), f"--ckpt_path={last}"]) == 0
    expected, resumed = trained_state(straight), trained_state(killed)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
