"""Distributed training on CPU (gloo): DDP and FSDP2 equal a single process with the doubled batch.

One `python -m doran_lightning fit --trainer.devices=2` run per strategy (Lightning relaunches the
module for rank 1), with DoRAN's aux generators (shared by the q and v slices of each block) and
activation checkpointing on, against one in-process single-device run shared by both tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
from doran_lightning.sharding import check_fsdp_v1, check_strategy, repeated_blocks

TESTS_DIR = Path(__file__).parent
# 88 training images (fraction 0.08 of the digits train split): one step of the whole split per epoch,
# so the 2 x 44 DDP shards and the single 88-image batch hold exactly the same samples.
TRAIN_FRACTION, TRAIN_SIZE, EPOCHS = "0.08", 88, 3
# FSDP2: data-parallel sharding over both processes, one full checkpoint file written by rank 0.
FSDP2_ARGS = ("--trainer.strategy=ModelParallelStrategy", "--trainer.strategy.data_parallel_size=2",
              "--trainer.strategy.tensor_parallel_size=1", "--trainer.strategy.save_distributed_checkpoint=false")


def fit_args(root: Path, batch_size: int, *extra: str) -> list[str]:
    options = [f"--data.fraction={TRAIN_FRACTION}", f"--data.batch_size={batch_size}", "--model.adapter.method=doran",
               "--model.backbone.gradient_checkpointing=true", *extra]
    return tiny_fit_args(root, *options, steps_per_epoch=1, epochs=EPOCHS)


def last_values(run_dir: Path, tags: list[str]) -> dict[str, float]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in tags}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The one-process reference: the same samples as two ranks' halves, in one batch."""
    root = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["doran_lightning"])
        assert main(fit_args(root, TRAIN_SIZE)) == 0
    return only_run_dir(root)


def run_two_ranks(root: Path, *strategy: str) -> list[dict]:
    """`fit` with two CPU processes (Lightning relaunches the module for rank 1); each rank's saved state."""
    command = [sys.executable, "-m", "doran_lightning", *fit_args(
        root, TRAIN_SIZE // 2, *strategy, "--trainer.devices=2", "--trainer.callbacks+=run_helpers.SaveRankState")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=root.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "marked ready twice" not in result.stderr and "unused parameters" not in result.stderr
    ranks = [torch.load(root / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs between ranks"
    # Statistics are computed (and written) by rank zero only.
    assert ranks[0]["stats_seconds"] > 0 and ranks[1]["stats_seconds"] == 0
    return ranks


def assert_matches_single(run_dir: Path, single_dir: Path, rank_state: dict[str, torch.Tensor]) -> None:
    """Checkpointed and in-memory trainable tensors, and synchronised metrics, equal the one-process run's."""
    single_state = read_checkpoint(single_dir / "checkpoints" / "last.ckpt")["state_dict"]
    state = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert state.keys() == single_state.keys()
    assert {key for key in rank_state if "doran_aux" in key}  # the generators are compared too
    moved = 0
    for key, value in single_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
        if key in rank_state:
            torch.testing.assert_close(rank_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += key.endswith("magnitude") and not torch.equal(value, single_state[key.replace(
            "magnitude", "magnitude_init")])
    assert moved > 0  # the comparison is about trained tensors, not the initial ones
    # Statistics and the gradient norm need whole weights and gradients: under FSDP2 they are gathered.
    tags = ["train/loss", "val/loss", "val/accuracy", "train/grad_norm", "sigma/blocks.0.attn.qkv.q",
            "delta_d/blocks.1.attn.qkv.v", "adapter_grad_norm/blocks.0.attn.qkv.q"]
    metrics, single_metrics = last_values(run_dir, tags), last_values(single_dir, tags)
    for tag in tags:
        assert metrics[tag] == pytest.approx(single_metrics[tag], rel=1e-4, abs=1e-7), tag
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # one writer: rank zero
    scalars = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert "sigma/blocks.0.attn.qkv.q" in scalars  # canonical names, no wrapper components


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path: Path, single_run: Path):
    ranks = run_two_ranks(tmp_path / "ddp", "--trainer.strategy=ddp")
    assert_matches_single(only_run_dir(tmp_path / "ddp"), single_run, ranks[0]["state"])


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_and_checkpoint_reads_on_one(tmp_path: Path, single_run: Path,
                                                                         monkeypatch):
    """FSDP2 (fully_shard via ModelParallelStrategy, gloo): the frozen base is sharded and gets no gradient,
    adapters and generators train exactly as in one process, and `test` reads the checkpoint on one process."""
    root = tmp_path / "fsdp2"
    ranks = run_two_ranks(root, *FSDP2_ARGS)
    for rank in ranks:
        frozen = rank["frozen"]
        assert frozen["with_grad"] == 0 and frozen["numel"] > 0
        assert frozen["local_numel"] < 0.6 * frozen["numel"]  # each rank holds about half of the frozen base
    run_dir = only_run_dir(root)
    assert_matches_single(run_dir, single_run, ranks[0]["state"])
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    assert main(["test", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
                 "--data.image_size=16", f"--data.fraction={TRAIN_FRACTION}", "--trainer.limit_test_batches=1",
                 f"--trainer.default_root_dir={tmp_path / 'test'}", "--trainer.enable_progress_bar=false",
                 "--model.adapter.method=doran", f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]) == 0


class _Mesh:
    """A stand-in for a 2-D DeviceMesh: only what `check_strategy` reads."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tensor_parallel: int) -> None:
        self.tensor_parallel = tensor_parallel

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.tensor_parallel if name == "tensor_parallel" else 1)


def test_fsdp2_rejects_tensor_parallel_and_distributed_checkpoints():
    strategy = SimpleNamespace(device_mesh=_Mesh(tensor_parallel=2), _save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2; set --trainer.strategy.data_parallel_size"):
        check_strategy(strategy)
    strategy = SimpleNamespace(device_mesh=_Mesh(tensor_parallel=1), _save_distributed_checkpoint=True)
    with pytest.raises(ValueError, match=r"save_distributed_checkpoint=false; DoranModule writes one full"):
        check_strategy(strategy)
    check_strategy(SimpleNamespace(device_mesh=_Mesh(tensor_parallel=1), _save_distributed_checkpoint=False))


def test_fsdp_v1_across_ranks_refuses_generated_matrices_and_names_fsdp2():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    doran, dora = AdapterConfig(method="doran"), AdapterConfig(method="dora")
    with pytest.raises(ValueError, match=r"FSDP v1\) on several devices cannot shard DoRAN's A/B generators.*"
                                         r"ModelParallelStrategy \(FSDP2"):
        check_fsdp_v1(FSDPStrategy(), 2, doran)
    check_fsdp_v1(FSDPStrategy(), 1, doran)  # one device: nothing is sharded
    check_fsdp_v1(FSDPStrategy(), 2, dora)  # static A/B live in their blocks
    check_fsdp_v1(DDPStrategy(), 2, doran)


def test_fsdp2_shards_the_repeated_blocks(tiny_vit_overrides):
    """The units `fully_shard` wraps: each transformer block holding adapters (timm and HF layouts)."""
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=tiny_vit_overrides)
    vit = DoranModule(backbone, AdapterConfig(method="doran", r=4, alpha=8), num_classes=4).backbone
    assert repeated_blocks(vit) == list(vit.blocks)
    bert = apply_adapters(tiny_bert(), AdapterConfig(method="dora", r=2, alpha=4))
    assert repeated_blocks(bert) == list(bert.bert.encoder.layer)


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
