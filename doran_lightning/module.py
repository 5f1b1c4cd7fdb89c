"""`DoranModule`: the LightningModule that trains LoRA / DoRA / DoRAN adapters on a backbone.

It owns the backbone (built by `models.build_backbone`, patched by `adapters.apply_adapters`),
the loss and torchmetrics metrics of the task, the optimiser over trainable tensors only, and
checkpoints that hold only what training changed (adapters, head, adapter buffers).

The backbone is built in `configure_model` (see `deferred_build`), which Lightning runs inside the strategy's
initialisation context: on the target device directly, and under FSDP before the frozen weights
are sharded. The magnitudes are initialised from the weights that were actually loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal


import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from doran_lightning import tags
from doran_lightning.adapters import (
    AdapterConfig,
    adapter_histograms,
    adapter_param_groups,
    apply_adapters,
    count_parameters,
)
from doran_lightning.adapters.stats import gradient_norm
from doran_lightning.alarms import AlarmConfig, StabilityAlarms
from doran_lightning.callbacks import AdapterStatisticsLogger
from doran_lightning.checkpointing import CheckpointError, read_checkpoint
from doran_lightning.lightning_compat import restore_train_loader_position
from doran_lightning.dashboard import StabilityDashboard
from doran_lightning.domains import check_number
from doran_lightning.models import BackboneConfig, build_backbone, validate_backbone
from doran_lightning.summary import RunSummary
from doran_lightning.stability import warmup_length
from doran_lightning.sharding import (
    all_reduce_ignored_gradients,
    check_fsdp_v1,
    check_strategy,
    is_sharded,
    local_gradient_square_sum,
    shard_backbone,
)

Metric = Literal["accuracy", "matthews", "pearson_spearman", "f1_accuracy", "generation_accuracy"]
_EVAL_STAGES = ("val", "test")
_CKPT_EXTRA = "doran_lightning"


def build_metrics(metric: str, num_classes: int | None) -> dict[str, nn.Module]:
    """The torchmetrics objects of one evaluation stage, keyed by the name logged after `<stage>/`."""
    if metric == "generation_accuracy":
        return {}  # scored from generated text per subset (see DoranModule._score_generations)
    if num_classes is None:
        raise ValueError(f"metric={metric!r} needs num_classes (linked from the datamodule)")
    if metric == "pearson_spearman":
        return {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
    if num_classes < 2:
        raise ValueError(f"metric={metric!r} needs num_classes >= 2, got {num_classes}")
    if metric == "accuracy":
        return {"accuracy": MulticlassAccuracy(num_classes)}
    if metric == "matthews":
        return {"matthews": MatthewsCorrCoef(task="multiclass", num_classes=num_classes)}
    if metric == "f1_accuracy":
        f1 = BinaryF1Score() if num_classes == 2 else MulticlassF1Score(num_classes, average="macro")
        return {"f1": f1, "accuracy": MulticlassAccuracy(num_classes)}
    raise ValueError(f"metric={metric!r}: expected one of accuracy, matthews, pearson_spearman, f1_accuracy, "
                     "generation_accuracy")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine / linear decay or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


_DEFER_BUILD = contextvars.ContextVar("doran_defer_backbone_build", default=False)


@contextlib.contextmanager
def deferred_build() -> Iterator[None]:
    """Create DoranModules whose backbone is built only in `configure_model` (the CLI always does).

    Lightning calls `configure_model` inside the strategy's init context, so the weights go straight
    to the target device and FSDP can shard the frozen backbone. Outside this context the backbone
    is built at once, which is handier in notebooks and tests.
    """
    token = _DEFER_BUILD.set(True)
    try:
        yield
    finally:
        _DEFER_BUILD.reset(token)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (model.nonfinite_policy=stop)."""


def _check_settings(settings: dict[str, Any]) -> None:
    """Every numeric model setting in its domain (one line naming key, range and value; `domains.check_number`)."""
    ranges: dict[str, dict[str, Any]] = {
        "lr": dict(above=0), "weight_decay": dict(at_least=0), "warmup_ratio": dict(at_least=0, below=1),
        "aux_lr": dict(above=0, optional=True), "sigma_lr": dict(above=0, optional=True),
        "aux_weight_decay": dict(at_least=0, optional=True), "warmup_steps": dict(at_least=0, integer=True),
        "min_lr_ratio": dict(at_least=0, at_most=1),
        "stats_every_n_steps": dict(at_least=1, integer=True, optional=True),
        "histogram_every_n_steps": dict(at_least=0, integer=True, optional=True),
        "max_new_tokens": dict(at_least=1, integer=True), "heatmap_every_n_stats": dict(at_least=0, integer=True),
    }
    for name, bounds in ranges.items():
        check_number(f"model.{name}", settings[name], **bounds)
    betas = settings["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"model.betas must be two numbers in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_number(f"model.betas[{index}]", beta, at_least=0, below=1)


def _storage_ids(module: nn.Module) -> set[int]:
    return {tensor.data_ptr() for tensor in module.state_dict().values() if tensor.numel()}


def _fingerprint(module: nn.Module, names: set[str]) -> float:
    """A cheap checksum of the frozen tensors, to detect a checkpoint loaded onto another backbone."""
    state = module.state_dict()
    return float(sum(state[name].flatten()[:64].double().sum() for name in sorted(names) if state[name].numel()))


def _layer_names(parameter_names: list[str]) -> list[str]:
    """Module paths of parameters (``blocks.0.attn.qkv.adapters.q.magnitude`` -> ``…adapters.q``), in order."""
    return list(dict.fromkeys(name.rpartition(".")[0] or name for name in parameter_names))


class DoranModule(pl.LightningModule):
    """LoRA / DoRA / DoRAN fine-tuning of a timm or Hugging Face backbone.

    Args:
        backbone: what to build (see `BackboneConfig`).
        adapter: adapter settings (`AdapterConfig`); the task head is added to `trainable_modules`.
        task, num_classes, tokenizer, metric: linked from the datamodule by the CLI.
        lr, weight_decay, betas, optimizer: optimiser settings. Per-group overrides: `aux_lr` (None:
            lr × adapter.aux_lr_factor) and `aux_weight_decay` (None: weight_decay) for the auxiliary
            generators, `sigma_lr` (None: lr) for the noise σ (METHOD.md §3, §6).
        scheduler: "cosine" (default), "linear" or "constant", after `warmup_steps` (or
            `warmup_ratio` of the total steps when warmup_steps is 0), decaying to `min_lr_ratio`.
        stats_every_n_steps: cadence of the per-projection statistics (None: trainer's
            log_every_n_steps); histogram_every_n_steps: histogram cadence (None: 10x, 0: off).
        max_new_tokens: generation length for causal-LM evaluation.
        nonfinite_policy: on a non-finite loss/gradient, "skip" the step (counted and logged),
            "stop" with an error naming the layers, or "ignore".
        compile: `torch.compile` (mode default) the adapted backbone in place; fewer kernel launches
            on GPUs (see benchmarks/RESULTS.md), a one-off compilation cost at the first steps.
        alarms: thresholds of the stability alarms (`alarms.AlarmConfig`; `enabled: false` turns them off).
        heatmap_every_n_stats: σ/ΔM/ΔD heat-map images every this many statistics steps (0: none).
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        adapter: AdapterConfig,
        task: Literal["image_classification", "text_classification", "causal_lm"] = "image_classification",
        num_classes: int | None = None,
        tokenizer: Any = None,
        metric: Metric = "accuracy",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        aux_lr: float | None = None,
        aux_weight_decay: float | None = None,
        sigma_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        min_lr_ratio: float = 0.0,
        stats_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        max_new_tokens: int = 32,
        nonfinite_policy: Literal["skip", "stop", "ignore"] = "skip",
        compile: bool = False,
        alarms: AlarmConfig = AlarmConfig(),
        heatmap_every_n_stats: int = 10,
    ) -> None:
        super().__init__()
        # The tokenizer is rebuilt by the datamodule; hparams go to the loggers in on_fit_start
        # (not by Lightning, whose merge with the datamodule's hparams would clash on "task").
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        _check_settings(locals())
        self.tokenizer = tokenizer
        self.backbone_config = backbone  # hparams may hold the CLI's dict form; keep the dataclass
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint verifies
        adapter.validate()
        alarms.validate()
        self.alarm_config = alarms
        validate_backbone(backbone, task, num_classes)  # bad names fail now, not after the trainer started
        self.adapter_config = adapter  # gains the head names in configure_model
        self._checkpoint_keys: set[str] = set()
        self._frozen_fingerprint = 0.0
        self._last_loss_finite = True
        if not _DEFER_BUILD.get():
            self.configure_model()

        self.metrics = nn.ModuleDict(
            {stage: MetricCollection(build_metrics(metric, num_classes), prefix=f"{stage}/") for stage in _EVAL_STAGES}
        )
        self._generation_scores: dict[str, dict[str, MeanMetric]] = {stage: {} for stage in _EVAL_STAGES}
        self._nonfinite_steps = 0
        self._announced = False
        self.max_grad_norm: float | None = None  # largest finite global grad norm of this fit (run summary)

    # ------------------------------------------------------------------ building
    @property
    def backbone(self) -> nn.Module:
        """The adapted backbone; built on first use when Lightning has not called configure_model yet."""
        if "backbone" not in self._modules:
            self.configure_model()
        return self._modules["backbone"]

    def configure_model(self) -> None:
        """Build the backbone, attach the adapters and record which tensors checkpoints hold (idempotent)."""
        if "backbone" in self._modules:
            return
        hp = self.hparams
        target_device = torch.empty(0).device  # the strategy's init context (e.g. cuda:N) or cpu
        if self.backbone_config.pretrained or self.backbone_config.checkpoint_path:
            model, heads = build_backbone(self.backbone_config, hp.task, hp.num_classes)
        else:
            # Random weights are drawn on the CPU so that every device rebuilds the same frozen backbone.
            with torch.device("cpu"):
                model, heads = build_backbone(self.backbone_config, hp.task, hp.num_classes)
            model = model.to(target_device)
        tokenizer = self.tokenizer
        if hp.task != "causal_lm" and tokenizer is not None and getattr(model.config, "pad_token_id", 0) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # LLaMA-style models need it to pool
        frozen_storages = _storage_ids(model)
        adapter = self.adapter_config
        self.adapter_config = dataclasses.replace(
            adapter, trainable_modules=sorted(set(adapter.trainable_modules) | set(heads))
        )
        self.backbone = apply_adapters(model, self.adapter_config)
        self._checkpoint_keys, frozen_names = self._split_state(frozen_storages)
        self._frozen_fingerprint = _fingerprint(self.backbone, frozen_names)
        if self._trainer is not None:
            check_fsdp_v1(self.trainer.strategy, self.trainer.world_size, self.adapter_config)
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2, after the row norms saw the whole W0
            check_strategy(self.trainer.strategy)
            shard_backbone(self.backbone, self._device_mesh)
        if hp.compile:
            # In place (nn.Module.compile): parameter and state-dict names stay those of the backbone.
            self.backbone.compile()

    # ------------------------------------------------------------------ checkpoint contents
    def _split_state(self, frozen_storages: set[int]) -> tuple[set[str], set[str]]:
        """State-dict keys to checkpoint (trainable or created by the adapters) vs frozen backbone keys."""
        trainable = {f"backbone.{name}" for name, p in self.backbone.named_parameters() if p.requires_grad}
        keep, frozen = set(trainable), set()
        for name, tensor in self.backbone.state_dict(keep_vars=True).items():
            if f"backbone.{name}" in trainable:
                continue
            if tensor.numel() and tensor.data_ptr() in frozen_storages:
                frozen.add(name)
            else:
                keep.add(f"backbone.{name}")
        return keep, frozen

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self._checkpoint_keys}
        checkpoint[_CKPT_EXTRA] = {
            "nonfinite_steps": self._nonfinite_steps,
            "frozen_fingerprint": self._frozen_fingerprint,
            "variant": self.adapter_config.variant,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # LightningModule.load_from_checkpoint loads before any trainer exists
        if "state_dict" not in checkpoint and is_sharded(self.backbone) and self.trainer.ckpt_path:
            # ModelParallelStrategy has loaded the tensors itself and removed them: check the file's.
            checkpoint = {**checkpoint, "state_dict": read_checkpoint(self.trainer.ckpt_path)["state_dict"]}
        self.verify_checkpoint_state(checkpoint)
        extra = checkpoint.get(_CKPT_EXTRA, {})
        self._nonfinite_steps = int(extra.get("nonfinite_steps", 0))

    def verify_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        """Raise if the checkpoint does not match this model's trainable tensors or frozen backbone."""
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        saved_variant = checkpoint.get(_CKPT_EXTRA, {}).get("variant", "?")
        where = (f"checkpoint (trained as {saved_variant!r}) vs this model ({self.adapter_config.variant!r}, "
                 f"r={self.adapter_config.r}, backbone {self.backbone_config.name!r})")
        missing = sorted(self._checkpoint_keys - state.keys())
        unexpected = sorted(k for k in state.keys() - own.keys())
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in sorted(self._checkpoint_keys & state.keys()) if state[k].shape != own[k].shape]
        problems = [f"{label} {items[:8]}{' …' if len(items) > 8 else ''}"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", mismatched)) if items]
        if problems:
            raise CheckpointError(f"Checkpoint does not fit this model — {where}: " + "; ".join(problems))
        saved_print = checkpoint.get(_CKPT_EXTRA, {}).get("frozen_fingerprint")
        if saved_print is not None and not math.isclose(saved_print, self._frozen_fingerprint, rel_tol=1e-6, abs_tol=1e-6):
            raise CheckpointError(
                f"Checkpoint was trained on different frozen backbone weights — {where}. Build the same "
                "backbone (model.backbone.name / checkpoint_path / init_seed / overrides) as in training."
            )

    # ------------------------------------------------------------------ forward, loss, metrics
    def forward(self, batch: dict[str, Any]) -> Any:
        if self.hparams.task == "image_classification":
            return self.backbone(batch["pixel_values"])
        keys = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: batch[k] for k in keys if k in batch}
        if self.hparams.task == "causal_lm":
            return self.backbone(**inputs, labels=batch["labels"])
        return self.backbone(**inputs).logits

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Loss and the predictions the metrics consume (None for causal LM)."""
        if self.hparams.task == "causal_lm":
            return self(batch).loss, None
        logits = self(batch)
        labels = batch["labels"]
        if self.hparams.num_classes == 1:
            predictions = logits.squeeze(-1).float()
            return F.mse_loss(predictions, labels.float()), predictions
        return F.cross_entropy(logits.float(), labels), logits.argmax(dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        batch_size = len(batch["labels"])
        self._last_loss_finite = bool(torch.isfinite(loss.detach()))
        # Averaged over ranks (one scalar all-reduce), so the logged curve is the global batch's loss.
        self.log(tags.TRAIN_LOSS, loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log(tags.TRAIN_LR, self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        loss, predictions = self._loss(batch)
        batch_size = len(batch["labels"])
        self.log(tags.stage_tag(stage, "loss"), loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if predictions is not None:
            self.metrics[stage].update(predictions, batch["labels"])
            self.log_dict(self.metrics[stage], batch_size=batch_size, prog_bar=stage == "val")
        if self.hparams.task == "causal_lm":
            self.log(tags.stage_tag(stage, "perplexity"), loss.exp(), sync_dist=True, batch_size=batch_size)
            if "prompt_input_ids" in batch:
                self._score_generations(stage, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def generate_text(self, batch: dict[str, Any]) -> list[str]:
        """Greedy continuation of the (left-padded) prompts, decoded without the prompt."""
        if self.tokenizer is None:
            raise ValueError("causal_lm generation needs the datamodule's tokenizer (model.tokenizer is None)")
        prompts = batch["prompt_input_ids"]
        generated = self.backbone.generate(
            input_ids=prompts, attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(generated[:, prompts.shape[1]:], skip_special_tokens=True)

    def _score_generations(self, stage: str, batch: dict[str, Any]) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "extract_answer"):
            raise ValueError("generation_accuracy needs a datamodule with extract_answer(subset, text)")
        for subset, text, answer in zip(batch["subset"], self.generate_text(batch), batch["answers"]):
            predicted = datamodule.extract_answer(subset, text)
            scores = self._generation_scores[stage]
            if subset not in scores:
                scores[subset] = MeanMetric().to(self.device)
            scores[subset].update(float(predicted.strip().lower() == str(answer).strip().lower()))

    def _log_generation_accuracy(self, stage: str) -> None:
        scores = self._generation_scores[stage]
        if not scores:
            return
        per_subset = {subset: metric.compute() for subset, metric in sorted(scores.items())}
        for subset, value in per_subset.items():
            self.log(tags.stage_tag(stage, f"accuracy/{subset}"), value)
        self.log(tags.stage_tag(stage, "accuracy"), torch.stack(list(per_subset.values())).mean(), prog_bar=True)
        for metric in scores.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_generation_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_generation_accuracy("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        if self.hparams.task == "causal_lm":
            return self.generate_text(batch)
        logits = self(batch)
        return logits.squeeze(-1) if self.hparams.num_classes == 1 else logits.argmax(dim=-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = adapter_param_groups(self.backbone, weight_decay=hp.weight_decay, lr=hp.lr, aux_lr=hp.aux_lr,
                                      sigma_lr=hp.sigma_lr, aux_weight_decay=hp.aux_weight_decay)
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.betas[0])
        else:
            optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(groups, lr=hp.lr, betas=tuple(hp.betas))
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = warmup_length(hp.warmup_steps, hp.warmup_ratio, total_steps)
        schedule = partial(lr_factor, schedule=hp.scheduler, warmup_steps=warmup_steps,
                           total_steps=total_steps, min_lr_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_after_backward(self) -> None:
        if is_sharded(self.backbone):
            all_reduce_ignored_gradients(self.backbone)  # FSDP2 leaves the generators' gradients per rank

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Under DDP the gradients are already all-reduced here, so every rank takes the same decision.
        grads = {name: p.grad for name, p in self.backbone.named_parameters() if p.grad is not None}
        if not grads:
            return
        if is_sharded(self.backbone):
            # FSDP2: sharded gradients (DTensor) and whole generator gradients; sum each rank's share.
            square_sum = local_gradient_square_sum(list(grads.values()), self.trainer.world_size)
            grad_norm = self.trainer.strategy.reduce(square_sum, reduce_op="sum").sqrt()
        else:
            grad_norm = gradient_norm(grads.values())
            sharded_v1 = self._trainer is not None and self.trainer.world_size > 1 and not isinstance(
                self.trainer.strategy, DDPStrategy)
            if sharded_v1:  # FSDP holds a shard of each gradient: combine the shards' norms.
                grad_norm = self.trainer.strategy.reduce(grad_norm.pow(2), reduce_op="sum").sqrt()
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.max_grad_norm = max(float(grad_norm), self.max_grad_norm or 0.0)
        # fp16 AMP's GradScaler expects overflows while it calibrates its scale: it skips those steps itself.
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        if not finite and scaler is None and self.hparams.nonfinite_policy != "ignore":
            self._handle_nonfinite(grads)
        self.log(tags.TRAIN_GRAD_NORM, grad_norm)
        self.log(tags.TRAIN_NONFINITE_STEPS, float(self._nonfinite_steps))

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped so far because the loss or a gradient was non-finite (policy "skip")."""
        return self._nonfinite_steps

    def nonfinite_report(self, grads: dict[str, Tensor]) -> str:
        """Which layers had a non-finite gradient or adapter denominator ‖V‖+σ, for the error message."""
        bad_grads = _layer_names([name for name, g in grads.items() if not torch.isfinite(g).all()])
        bad_denominators = [projection for projection, values in adapter_histograms(self.backbone).items()
                            if not torch.isfinite(values["denominator"]).all()]
        parts = [f"loss {'finite' if self._last_loss_finite else 'non-finite'}",
                 f"non-finite gradient in {len(bad_grads)} layer(s): {', '.join(bad_grads[:10]) or 'none'}"
                 f"{' …' if len(bad_grads) > 10 else ''}"]
        if bad_denominators:
            parts.append(f"non-finite denominator ‖V‖+σ in {', '.join(bad_denominators[:10])}")
        return "; ".join(parts)

    def _handle_nonfinite(self, grads: dict[str, Tensor]) -> None:
        if self.hparams.nonfinite_policy == "stop":
            raise NonFiniteError(
                f"Non-finite loss/gradient at step {self.global_step} (model.nonfinite_policy=stop): "
                f"{self.nonfinite_report(grads)}. Lower model.lr, set trainer.gradient_clip_val, check the "
                "batch for NaN/inf inputs, or use model.nonfinite_policy=skip to skip such steps."
            )
        self._nonfinite_steps += 1
        for parameter in self.backbone.parameters():
            parameter.grad = None  # torch optimisers leave parameters without a gradient untouched

    def configure_callbacks(self) -> list[pl.Callback]:
        """Statistics, dashboard, alarms and run summary; one the user put in `trainer.callbacks` is kept."""
        hp = self.hparams
        defaults: list[pl.Callback] = [
            AdapterStatisticsLogger(hp.stats_every_n_steps, hp.histogram_every_n_steps),
            StabilityDashboard(hp.heatmap_every_n_stats),
            RunSummary(),
        ]
        if self.alarm_config.enabled:
            defaults.append(StabilityAlarms(self.alarm_config))
        # Lightning replaces trainer callbacks of the same type by these: skip the types already there.
        present = {type(callback) for callback in self.trainer.callbacks} if self._trainer is not None else set()
        return [callback for callback in defaults if type(callback) not in present]

    # ------------------------------------------------------------------ run description
    def run_hparams(self) -> dict[str, Any]:
        """Flat hyperparameters and parameter counts logged to every logger."""
        cfg, hp = self.adapter_config, self.hparams
        counts = count_parameters(self.backbone)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        seed = getattr(datamodule, "seed", None)
        return {
            "method": cfg.method, "variant": cfg.variant, "noise": cfg.use_noise, "aux": cfg.use_aux,
            "r": cfg.r, "alpha": cfg.alpha, "lr": hp.lr, "weight_decay": hp.weight_decay, "aux_lr": hp.aux_lr,
            "aux_weight_decay": hp.aux_weight_decay, "sigma_lr": hp.sigma_lr,
            "fraction": getattr(datamodule, "fraction", 1.0),
            "seed": seed if seed is not None else os.environ.get("PL_GLOBAL_SEED"),
            "backbone": self.backbone_config.name, "task": hp.task, "metric": hp.metric,
            "params/trainable": counts["trainable"], "params/total": counts["total"],
            "params/adapter": counts["adapter"], "params/aux": counts["aux"], "params/head": counts["other_trainable"],
        }

    def on_fit_start(self) -> None:
        self._announce()

    def on_train_start(self) -> None:
        # Lightning hands a resumable train loader its saved position in FitLoop.setup_data, but
        # configure_optimizers (estimated_stepping_batches) ran setup_data before the checkpoint was
        # restored, so that position would be dropped. No batch has been drawn yet: apply it now.
        if not restore_train_loader_position(self.trainer):
            rank_zero_info("Could not restore the train loader's position; the epoch restarts from its start")
        if self.trainer.ckpt_path:
            self._apply_optimizer_hparams()

    def _apply_optimizer_hparams(self) -> None:
        """Put this run's lr / weight decay / betas into a restored optimiser and scheduler.

        Lightning restores the optimiser's param groups (lr, initial_lr, weight_decay, betas) and the
        scheduler's base_lrs from the checkpoint, which would silently undo a changed `--model.lr` on
        resume. The schedule's shape (scheduler, warm-up, total steps) is rebuilt by
        configure_optimizers and is not in the checkpoint.
        """
        hp = self.hparams
        fresh = adapter_param_groups(self.backbone, weight_decay=hp.weight_decay, lr=hp.lr, aux_lr=hp.aux_lr,
                                     sigma_lr=hp.sigma_lr, aux_weight_decay=hp.aux_weight_decay)
        optimizer = self.optimizers(use_pl_optimizer=False)
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        if isinstance(optimizer, list) or len(fresh) != len(optimizer.param_groups) or scheduler is None:
            return
        for group, wanted in zip(optimizer.param_groups, fresh):
            group["initial_lr"] = wanted.get("lr", hp.lr)
            group["weight_decay"] = wanted["weight_decay"]
            if "betas" in group:
                group["betas"] = tuple(hp.betas)
            elif "momentum" in group:
                group["momentum"] = hp.betas[0]
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    def on_test_start(self) -> None:
        # A test right after fit (the CLI's --test_after_fit) keeps the fit's hparams and hp_metric.
        if self.trainer.state.fn == "test" and not self._announced:
            self._announce()

    def _announce(self) -> None:
        self._announced = True
        hparams = self.run_hparams()
        rank_zero_info(
            f"{hparams['variant']} on {hparams['backbone']}: trainable {hparams['params/trainable']:,} of "
            f"{hparams['params/total']:,} parameters (adapters {hparams['params/adapter']:,}, "
            f"aux {hparams['params/aux']:,}, head {hparams['params/head']:,})"
        )
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Declares hp_metric for the HPARAMS tab without Lightning's -1 placeholder value;
                # RunSummary logs the best validation metric under it after every validation.
                logger.log_hyperparams(hparams, metrics={tags.HP_METRIC: float("nan")})
            else:
                logger.log_hyperparams(hparams)
