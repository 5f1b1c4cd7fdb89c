"""Callbacks and a datamodule that the subprocess runs of the distributed/fault tests load by class path.

The subprocesses get this folder on PYTHONPATH; nothing here is imported by the package itself.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch

from doran_lightning.callbacks import AdapterStatisticsLogger


class KillAt(pl.Callback):
    """SIGKILL this process (no cleanup, like a lost node) when `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveRankState(pl.Callback):
    """At the end of fit, each rank writes its trainable tensors, whether it computed statistics, and
    (from the last optimizer step) how many frozen tensors had a gradient and how much of them it held."""

    def __init__(self) -> None:
        self.frozen: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        frozen = [p for p in pl_module.parameters() if not p.requires_grad]
        self.frozen = {"with_grad": sum(p.grad is not None for p in frozen), "numel": sum(p.numel() for p in frozen),
                       "local_numel": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in frozen)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats_seconds = sum(c.seconds_spent for c in trainer.callbacks if isinstance(c, AdapterStatisticsLogger))
        # FSDP2 parameters are DTensors: every rank gathers each whole tensor (a collective, same order).
        state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for name, p in pl_module.named_parameters() if p.requires_grad}
        out = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt"
        torch.save({"state": state, "stats_seconds": stats_seconds, "world_size": trainer.world_size,
                    "frozen": self.frozen}, out)
