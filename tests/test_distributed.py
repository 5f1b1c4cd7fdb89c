"""Distributed training on CPU (gloo): DDP equals a single process with the doubled batch.

One `python -m doran_lightning fit --trainer.strategy=ddp --trainer.devices=2` run (Lightning
relaunches the module for rank 1), with DoRAN's aux generators (shared by the q and v slices of each
block) and activation checkpointing on, against an in-process single-device run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_OVERRIDES, only_run_dir, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import tiny_bert, token_input

from doran_lightning.adapters import AdapterConfig, apply_adapters
from doran_lightning.checkpointing import read_checkpoint
from doran_lightning.cli import main
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule, deferred_build

TESTS_DIR = Path(__file__).parent
# 88 training images (fraction 0.08 of the digits train split): one step of the whole split per epoch,
# so the 2 x 44 DDP shards and the single 88-image batch hold exactly the same samples.
TRAIN_FRACTION, TRAIN_SIZE, EPOCHS = "0.08", 88, 3


def fit_args(root: Path, batch_size: int, *extra: str) -> list[str]:
    options = [f"--data.fraction={TRAIN_FRACTION}", f"--data.batch_size={batch_size}", "--model.adapter.method=doran",
               "--model.backbone.gradient_checkpointing=true", *extra]
    return tiny_fit_args(root, *options, steps_per_epoch=1, epochs=EPOCHS)


def last_values(run_dir: Path, tags: list[str]) -> dict[str, float]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in tags}


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path: Path, monkeypatch):
    ddp_root = tmp_path / "ddp"
    command = [sys.executable, "-m", "doran_lightning", *fit_args(
        ddp_root, TRAIN_SIZE // 2, "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.callbacks+=run_helpers.SaveRankState")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "marked ready twice" not in result.stderr and "unused parameters" not in result.stderr

    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    single_root = tmp_path / "single"
    assert main(fit_args(single_root, TRAIN_SIZE)) == 0

    ranks = [torch.load(ddp_root / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs between ranks"
    # Statistics are computed (and written) by rank zero only.
    assert ranks[0]["stats_seconds"] > 0 and ranks[1]["stats_seconds"] == 0

    ddp_run, single_run = only_run_dir(ddp_root), only_run_dir(single_root)
    single_state = read_checkpoint(single_run / "checkpoints" / "last.ckpt")["state_dict"]
    ddp_state = read_checkpoint(ddp_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert ddp_state.keys() == single_state.keys()
    moved = 0
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
        if key in ranks[0]["state"]:
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += key.endswith("magnitude") and not torch.equal(value, single_state[key.replace(
            "magnitude", "magnitude_init")])
    assert moved > 0  # the comparison is about trained tensors, not the initial ones

    # Metrics are synchronised: the DDP run logs the global batch's values.
    tags = ["train/loss", "val/loss", "val/accuracy"]
    ddp_metrics, single_metrics = last_values(ddp_run, tags), last_values(single_run, tags)
    for tag in tags:
        assert ddp_metrics[tag] == pytest.approx(single_metrics[tag], rel=1e-4), tag
    assert len(list(ddp_run.glob("events.out.tfevents.*"))) == 1  # one writer: rank zero
    sigma_tags = EventAccumulator(str(ddp_run)).Reload().Tags()["scalars"]
    assert "sigma/blocks.0.attn.qkv.q" in sigma_tags


def test_deferred_build_happens_in_configure_model(tiny_vit_overrides):
    """The CLI's path (and FSDP's): no weights exist until configure_model, which Lightning calls
    inside the strategy's init context; checkpoints then hold the same trainable-only state."""
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=tiny_vit_overrides)
    adapter = AdapterConfig(method="doran", r=4, alpha=8)
    with deferred_build():
        deferred = DoranModule(backbone, adapter, num_classes=4)
    assert "backbone" not in deferred._modules and not list(deferred.parameters())
    torch.manual_seed(0)  # the adapters' random init (aux seeds) draws from the global generator
    deferred.configure_model()
    torch.manual_seed(0)
    eager = DoranModule(backbone, adapter, num_classes=4)
    assert deferred.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(deferred.state_dict()[key], value), key  # random init is reproducible
    checkpoint = {"state_dict": eager.state_dict()}
    eager.on_save_checkpoint(checkpoint)
    with deferred_build():
        fresh = DoranModule(backbone, adapter, num_classes=4)
    fresh.on_load_checkpoint(checkpoint)  # builds first, then verifies every key
    assert "backbone" in fresh._modules
    with deferred_build(), pytest.raises(ValueError, match="model.backbone.name='vit_nope'"):
        DoranModule(BackboneConfig(name="vit_nope", pretrained=False), adapter, num_classes=4)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP strategy needs a GPU")
def test_fsdp_on_gpu(tmp_path: Path, monkeypatch):
    """FSDP with the ViT blocks wrapped: builds in configure_model, trains, logs statistics, and writes a
    full (adapters + head) checkpoint that `export` reads back on a single device."""
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    devices = min(2, torch.cuda.device_count())
    args = tiny_fit_args(tmp_path, "--trainer.accelerator=gpu", f"--trainer.devices={devices}",
                         "--trainer.strategy=FSDPStrategy", "--trainer.strategy.state_dict_type=full",
                         "--trainer.strategy.auto_wrap_policy=[timm.models.vision_transformer.Block]",
                         "--trainer.precision=bf16-mixed", "--model.backbone.gradient_checkpointing=true")
    assert main(args) == 0
    run_dir = only_run_dir(tmp_path)
    scalars = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert "sigma/blocks.0.attn.qkv.q" in scalars and "train/grad_norm" in scalars
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
                 "--data.image_size=16", f"--ckpt_path={ckpt}", f"--out={out}"]) == 0
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
