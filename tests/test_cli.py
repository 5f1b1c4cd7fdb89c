"""End-to-end runs of the CLI on the shipped tiny config: logging, checkpoints, resume, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT_OVERRIDES, only_run_dir, tiny_fit_args
from safetensors.torch import load_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from doran_lightning.adapters import AdapterConfig, adapter_statistics, load_adapters
from doran_lightning.adapters.bank import logical_parameters
from doran_lightning.checkpointing import read_checkpoint
from doran_lightning.cli import load_trained_state, main, resolve_config_args, shipped_configs_dir
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI(args=…) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])


def tiny_module(method: str) -> DoranModule:
    """The model the tiny fit args build (same backbone seed, same adapters)."""
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=dict(TINY_VIT_OVERRIDES))
    adapter = AdapterConfig(method=method, r=8, alpha=16, target_modules=["qkv[q,v]"])
    return DoranModule(backbone, adapter, num_classes=10)


def scalar_tags(run_dir: Path) -> tuple[set[str], set[str], EventAccumulator]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["histograms"]), events


def test_bare_config_name_resolves_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(shipped_configs_dir() / "vit_tiny_digits.yaml")
    assert resolve_config_args(["fit", "--config", "vit_tiny_digits.yaml"])[2] == shipped
    assert resolve_config_args(["fit", "--config=vit_tiny_digits.yaml"])[1] == "--config=" + shipped
    (tmp_path / "vit_tiny_digits.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_args(["fit", "--config", "vit_tiny_digits.yaml"])[2] == "vit_tiny_digits.yaml"
    with pytest.raises(ValueError, match="vit_vtab.yaml"):
        resolve_config_args(["fit", "--config", "nope.yaml"])


@pytest.mark.parametrize("method", ["lora", "dora", "doran"])
def test_fit_logs_every_projection_and_saves_adapters_only(tmp_path: Path, method: str):
    assert main(tiny_fit_args(tmp_path, f"--model.adapter.method={method}", steps_per_epoch=3)) == 0
    run_dir = only_run_dir(tmp_path)
    scalars, histograms, events = scalar_tags(run_dir)
    reference = tiny_module(method)
    projections = set(adapter_statistics(reference.backbone))
    assert projections == {f"blocks.{i}.attn.qkv.{s}" for i in range(2) for s in "qv"}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/nonfinite_steps", "val/loss", "val/accuracy"} <= scalars
    per_projection = ["update_ratio", "adapter_grad_norm"]
    if method != "lora":
        per_projection += ["delta_m", "delta_d", "denominator_min"]
        assert "hist/magnitude/blocks.0.attn.qkv.q" in histograms
    if method == "doran":
        per_projection.append("sigma")
        assert {"sigma/mean", "delta_m/mean", "delta_d/mean", "denominator_min/min"} <= scalars
    for prefix in per_projection:
        assert {f"{prefix}/{p}" for p in projections} <= scalars, prefix
    assert len(events.Scalars("train/loss")) == 3

    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    saved = checkpoint["state_dict"]
    # Trained tensors by their own names (a banked one is trained through its bank, which is never saved).
    trainable = {f"backbone.{n}" for n, _, trained in logical_parameters(reference.backbone) if trained}
    assert trainable <= saved.keys() and not any("doran_bank" in key for key in saved)
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in reference.parameters()) / 5
    hparams = (run_dir / "hparams.yaml").read_text()
    assert f"method: {method}" in hparams and "params/trainable:" in hparams


def test_resume_continues_exactly(tmp_path: Path):
    # One batch holding the whole (10%) train split per epoch: the batch content does not depend on
    # the loader's shuffling, so the comparison isolates what the checkpoint restores.
    common = ("--data.fraction=0.1", "--data.batch_size=256", "--model.adapter.method=doran")
    assert main(tiny_fit_args(tmp_path / "straight", *common, steps_per_epoch=1, epochs=4)) == 0
    assert main(tiny_fit_args(tmp_path / "resumed", *common, steps_per_epoch=1, epochs=2)) == 0
    half_way = only_run_dir(tmp_path / "resumed") / "checkpoints" / "last.ckpt"
    resume = tiny_fit_args(tmp_path / "resumed", *common, f"--ckpt_path={half_way}", steps_per_epoch=1, epochs=4)
    assert main(resume) == 0

    straight = only_run_dir(tmp_path / "straight")
    resumed = sorted((tmp_path / "resumed" / "lightning_logs").glob("version_*"))[-1]
    straight_losses = {e.step: e.value for e in scalar_tags(straight)[2].Scalars("train/loss")}
    resumed_losses = {e.step: e.value for e in scalar_tags(resumed)[2].Scalars("train/loss")}
    assert sorted(resumed_losses) == [2, 3]  # continues at the step it stopped
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(straight_losses[step], rel=1e-5)
    end_straight = read_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    end_resumed = read_checkpoint(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert end_resumed.keys() == end_straight.keys()
    for key, value in end_straight.items():
        torch.testing.assert_close(end_resumed[key], value, rtol=1e-4, atol=1e-6)


def test_export_loads_back_and_matches(tmp_path: Path, capfd):
    assert main(tiny_fit_args(tmp_path, "--model.adapter.method=doran")) == 0
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    export = ["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
              "--data.image_size=16", f"--ckpt_path={ckpt}", f"--out={out}"]
    assert main(export) == 0

    trained = tiny_module("doran")
    load_trained_state(trained, str(ckpt))
    untrained_head = tiny_module("doran").backbone.head.weight
    assert not torch.equal(trained.backbone.head.weight, untrained_head)  # the head trained: comparing it means something
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = trained.backbone(images)
        from_adapters = load_adapters(tiny_module("doran").backbone, out / "adapters")  # adapters and head
        merged = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT_OVERRIDES)
        load_model(merged, str(out / "merged" / "model.safetensors"))
        torch.testing.assert_close(from_adapters.eval()(images), expected)
        torch.testing.assert_close(merged.eval()(images), expected, rtol=1e-5, atol=1e-5)
    assert not (out / "peft").exists()  # timm's fused qkv has no PEFT equivalent

    (out / "peft").mkdir()  # e.g. left by an earlier export of another model
    capfd.readouterr()
    assert main(export) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"doran_lightning: error: --out={out} is not empty; pass --overwrite to replace it as a whole, "
        "or choose another folder")
    assert main([*export, "--overwrite=true"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "merged"]  # replaced whole: no stale peft/
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left

    assert main(["test", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
                 "--data.image_size=16", f"--trainer.default_root_dir={tmp_path / 'test'}",
                 "--trainer.limit_test_batches=2", f"--ckpt_path={ckpt}"]) == 0
    assert not (tmp_path / "test").exists()  # a run's checkpoint: the results go inside that run
    test_scalars, _, _ = scalar_tags(ckpt.parent.parent / "test")
    assert {"test/loss", "test/accuracy"} <= test_scalars


def test_module_entry_point_prints_config(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "doran_lightning", "fit", "--config", "vit_tiny_digits.yaml", "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "method: doran" in result.stdout and "DigitsDataModule" in result.stdout


def test_minilm_text_config_trains_offline(tmp_path: Path):
    pytest.importorskip("doran_lightning.data.language")
    assert main(["fit", "--config", "minilm_text.yaml", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                 "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]) == 0
    run_dir = only_run_dir(tmp_path)
    scalars, _, _ = scalar_tags(run_dir)
    for layer in range(6):
        for projection in ("query", "value"):
            assert f"sigma/bert.encoder.layer.{layer}.attention.self.{projection}" in scalars
    assert "val/accuracy" in scalars
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.stat().st_size < 3_000_000  # the 22M-parameter encoder itself is ~90 MB
