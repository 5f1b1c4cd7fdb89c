"""Train/eval modes inside a real fit: every module trains in training and evaluates in validation.

Hugging Face's `from_pretrained` returns an eval-mode model and Lightning (>= 2.2) keeps the modes it
finds, so a backbone built without switching it to train mode would train with dropout, adapter dropout
and gaussian noise silently off. The real pretrained MiniLM is the case that exposed it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from doran_lightning.adapters import AdapterConfig, adapted_modules
from doran_lightning.data.language import BuiltinTextDataModule
from doran_lightning.data.vision import DigitsDataModule
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule


class RecordModes(L.Callback):
    """At the first training and validation batch: how many modules (and dropout/adapters) train."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, tuple[int, int]]] = {}

    def _record(self, stage: str, module: L.LightningModule) -> None:
        if stage in self.seen:
            return
        kinds = {"all": nn.Module, "dropout": nn.Dropout, "adapted": type(next(iter(adapted_modules(module.backbone).values())))}
        self.seen[stage] = {
            kind: (sum(m.training for m in module.backbone.modules() if isinstance(m, cls)),
                   sum(1 for m in module.backbone.modules() if isinstance(m, cls)))
            for kind, cls in kinds.items()
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record("train", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._record("val", pl_module)


def _fit_modes(module: DoranModule, datamodule: L.LightningDataModule, root: Path) -> dict[str, dict[str, tuple[int, int]]]:
    recorder = RecordModes()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], default_root_dir=root)
    trainer.fit(module, datamodule=datamodule)
    return recorder.seen


def test_pretrained_hf_backbone_trains_in_train_mode_and_validates_in_eval_mode(tmp_path: Path):
    adapter = AdapterConfig(method="doran", r=4, alpha=8, dropout=0.1, noise_mode="gaussian")
    module = DoranModule(BackboneConfig(source="hf", name="minilm", pretrained=True), adapter,
                         task="text_classification", num_classes=4)
    seen = _fit_modes(module, BuiltinTextDataModule(max_length=16, batch_size=4), tmp_path)
    for kind, (training, total) in seen["train"].items():
        assert total > 0 and training == total, f"train: {training} of {total} {kind} modules in train mode"
    assert seen["val"]["all"][0] == 0, f"val: {seen['val']['all'][0]} modules still in train mode"


def test_timm_backbone_trains_in_train_mode_and_validates_in_eval_mode(tmp_path: Path, tiny_vit_overrides):
    adapter = AdapterConfig(method="doran", r=4, alpha=8, dropout=0.1)
    module = DoranModule(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=tiny_vit_overrides),
                         adapter, num_classes=10)
    seen = _fit_modes(module, DigitsDataModule(image_size=16, batch_size=8), tmp_path)
    for kind, (training, total) in seen["train"].items():
        assert total > 0 and training == total, f"train: {training} of {total} {kind} modules in train mode"
    assert seen["val"]["all"][0] == 0


def test_gaussian_noise_and_adapter_dropout_act_in_training(tmp_path: Path):
    """The effect, not only the flag: in train mode two forwards differ (dropout, |ε|), in eval they agree."""
    module = DoranModule(BackboneConfig(source="hf", name="minilm", pretrained=True),
                         AdapterConfig(method="doran", r=4, alpha=8, noise_mode="gaussian"),
                         task="text_classification", num_classes=4)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    assert module.backbone.training, "a freshly built backbone must be in train mode"
    with torch.no_grad():
        assert not torch.equal(module(batch), module(batch))
        module.eval()
        torch.testing.assert_close(module(batch), module(batch))
