"""Shared fixtures for the training tests: offline mode, tiny models, CLI helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A timm ViT small enough for CPU tests: 2 blocks, width 32, 16x16 input, 16 patches.
TINY_VIT_OVERRIDES = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_fit_args(root: Path, *extra: str, steps_per_epoch: int = 2, epochs: int = 1) -> list[str]:
    """`fit` on the shipped digits config, shrunk to a few steps of a tiny ViT, logging every step."""
    return [
        "fit", "--config", "vit_tiny_digits.yaml",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.limit_train_batches={steps_per_epoch}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
        "--model.histogram_every_n_steps=2",
        "--data.image_size=16",
        "--data.batch_size=16",
        *extra,
    ]


def only_run_dir(root: Path) -> Path:
    """The single TensorBoard version folder a run wrote under `root`."""
    runs = sorted((root / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, f"expected one run under {root}, found {runs}"
    return runs[0]


@pytest.fixture
def tiny_vit_overrides() -> dict[str, int]:
    return dict(TINY_VIT_OVERRIDES)


def fit_then_test(model, datamodule, max_epochs: int, root: Path) -> None:
    """A quiet CPU Trainer (no logger, checkpoints or validation) that fits, then tests, `model`."""
    import lightning as L

    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
