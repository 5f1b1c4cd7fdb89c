"""The non-finite guard: the global gradient norm of every step, and what to do when it is NaN/inf.

`NonFiniteGuard` runs right before each optimiser step, after the statistics callbacks have measured
the gradients. It logs ``train/grad_norm`` and ``train/nonfinite_steps`` and, on a non-finite loss or
gradient, applies ``model.nonfinite_policy``: "skip" the step (gradients dropped, counted), "stop" with
a `NonFiniteError` naming the layers, or "ignore". Under DDP the gradients are already all-reduced
there, so every rank decides alike; FSDP's gradient shards are combined into one global norm.
The count travels in checkpoints (``checkpoint["doran_lightning"]["nonfinite_steps"]``).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from doran_lightning import tags
from doran_lightning.adapters import adapter_histograms
from doran_lightning.adapters.params import named_gradients
from doran_lightning.adapters.stats import gradient_norm
from doran_lightning.checkpointing import CHECKPOINT_KEY
from doran_lightning.sharding import is_fsdp_v1, is_sharded, local_gradient_square_sum

Policy = Literal["skip", "stop", "ignore"]
POLICIES = ("skip", "stop", "ignore")


def check_policy(policy: str) -> Policy:
    """Return `policy` if it is one of `POLICIES`, else fail naming the key."""
    if policy not in POLICIES:
        raise ValueError(f"model.nonfinite_policy={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy  # type: ignore[return-value]


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (model.nonfinite_policy=stop)."""


def _layer_names(parameter_names: list[str]) -> list[str]:
    """Module paths of parameters (``blocks.0.attn.qkv.adapters.q.magnitude`` -> ``…adapters.q``), in order."""
    return list(dict.fromkeys(name.rpartition(".")[0] or name for name in parameter_names))


class NonFiniteGuard(pl.Callback):
    """Measures the global gradient norm before every optimiser step and applies the non-finite policy.

    Attributes:
        nonfinite_steps: steps skipped so far because the loss or a gradient was non-finite.
        max_grad_norm: largest finite global gradient norm of this fit (the run summary prints it).
    """

    def __init__(self, policy: Policy = "skip") -> None:
        self.policy = check_policy(policy)
        self.nonfinite_steps = 0
        self.max_grad_norm: float | None = None
        self._loss_finite = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.max_grad_norm = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        backbone = pl_module.backbone
        grads = {name: p.grad for name, p in backbone.named_parameters() if p.grad is not None}
        if not grads:
            return
        grad_norm = self.global_norm(trainer, backbone, grads)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.max_grad_norm = max(float(grad_norm), self.max_grad_norm or 0.0)
        # fp16 AMP's GradScaler expects overflows while it calibrates its scale: it skips those steps itself.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not finite and scaler is None and self.policy != "ignore":
            self._handle(trainer, backbone, grads)
        pl_module.log(tags.TRAIN_GRAD_NORM, grad_norm)
        pl_module.log(tags.TRAIN_NONFINITE_STEPS, float(self.nonfinite_steps))

    @staticmethod
    def global_norm(trainer: pl.Trainer, backbone: torch.nn.Module, grads: dict[str, Tensor]) -> Tensor:
        """The L2 norm of all gradients across ranks (FSDP2 and FSDP v1 hold shards of them)."""
        if is_sharded(backbone):
            # FSDP2: sharded gradients (DTensor) and whole generator gradients; sum each rank's share.
            square_sum = local_gradient_square_sum(list(grads.values()), trainer.world_size)
            return trainer.strategy.reduce(square_sum, reduce_op="sum").sqrt()
        norm = gradient_norm(grads.values())
        if is_fsdp_v1(trainer.strategy, trainer.world_size):
            norm = trainer.strategy.reduce(norm.pow(2), reduce_op="sum").sqrt()
        return norm

    def report(self, backbone: torch.nn.Module, grads: dict[str, Tensor]) -> str:
        """Which layers had a non-finite gradient or adapter denominator ‖V‖+σ, for the error message."""
        named = named_gradients(backbone, grads)  # by state-dict key: a bank's gradient split into its members
        bad_grads = _layer_names([name for name, g in named.items() if not torch.isfinite(g).all()])
        bad_denominators = [projection for projection, values in adapter_histograms(backbone).items()
                            if not torch.isfinite(values["denominator"]).all()]
        parts = [f"loss {'finite' if self._loss_finite else 'non-finite'}",
                 f"non-finite gradient in {len(bad_grads)} layer(s): {', '.join(bad_grads[:10]) or 'none'}"
                 f"{' …' if len(bad_grads) > 10 else ''}"]
        if bad_denominators:
            parts.append(f"non-finite denominator ‖V‖+σ in {', '.join(bad_denominators[:10])}")
        return "; ".join(parts)

    def _handle(self, trainer: pl.Trainer, backbone: torch.nn.Module, grads: dict[str, Tensor]) -> None:
        if self.policy == "stop":
            raise NonFiniteError(
                f"Non-finite loss/gradient at step {trainer.global_step} (model.nonfinite_policy=stop): "
                f"{self.report(backbone, grads)}. Lower model.lr, set trainer.gradient_clip_val, check the "
                "batch for NaN/inf inputs, or use model.nonfinite_policy=skip to skip such steps."
            )
        self.nonfinite_steps += 1
        for parameter in backbone.parameters():
            parameter.grad = None  # torch optimisers leave parameters without a gradient untouched

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get(CHECKPOINT_KEY, {}).get("nonfinite_steps", 0))


def find_guard(trainer: Any) -> "NonFiniteGuard | None":
    """The trainer's `NonFiniteGuard` callback, or None (no trainer, or the guard was not installed)."""
    callbacks = trainer.callbacks if trainer is not None else []
    return next((callback for callback in callbacks if isinstance(callback, NonFiniteGuard)), None)
