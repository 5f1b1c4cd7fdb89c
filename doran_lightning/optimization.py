"""The optimiser and lr schedule of a `DoranModule` run, and their settings on a resumed run (METHOD.md §3, §6).

The groups come from `adapters.adapter_param_groups` (magnitudes and σ without decay, the generators at their
own lr); the schedule is a linear warm-up then cosine / linear decay or constant (`lr_factor`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch

from doran_lightning.adapters import adapter_param_groups
from doran_lightning.console import say
from doran_lightning.resume import reapply_optimizer_settings
from doran_lightning.stability import warmup_length


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine / linear decay or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def param_groups(module: pl.LightningModule) -> list[dict[str, Any]]:
    """The run's optimizer groups over the backbone's trained tensors (`adapter_param_groups`)."""
    hp = module.hparams
    return adapter_param_groups(module.backbone, weight_decay=hp.weight_decay, lr=hp.lr, aux_lr=hp.aux_lr,
                                sigma_lr=hp.sigma_lr, aux_weight_decay=hp.aux_weight_decay)


def configure_optimizers(module: pl.LightningModule) -> dict[str, Any]:
    """AdamW / Adam / SGD over `param_groups`, with the warm-up + decay schedule stepped per optimizer step."""
    hp, trainer = module.hparams, module.trainer
    groups = param_groups(module)
    if hp.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.betas[0])
    else:
        optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(groups, lr=hp.lr, betas=tuple(hp.betas))
    total_steps = int(trainer.estimated_stepping_batches)
    if hp.warmup_steps and hp.warmup_steps >= total_steps and trainer.is_global_zero:
        # A note, not an error: smoke runs of the shipped configs are this short on purpose.
        say(f"note: model.warmup_steps={hp.warmup_steps} is not shorter than this run ({total_steps} optimizer "
            f"steps): the lr never reaches model.lr={hp.lr:g}; lower it or use model.warmup_ratio")
    warmup_steps = warmup_length(hp.warmup_steps, hp.warmup_ratio, total_steps)
    schedule = partial(lr_factor, schedule=hp.scheduler, warmup_steps=warmup_steps,
                       total_steps=total_steps, min_lr_ratio=hp.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def apply_optimizer_hparams(module: pl.LightningModule) -> None:
    """Put this run's lr / weight decay / betas into the restored optimiser (`resume.reapply_optimizer_settings`)."""
    hp = module.hparams
    schedulers = module.lr_schedulers()
    scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
    reapply_optimizer_settings(module.optimizers(use_pl_optimizer=False), scheduler, param_groups(module), hp.lr,
                               tuple(hp.betas))
