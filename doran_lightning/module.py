"""`DoranModule`: the LightningModule that trains and evaluates LoRA / DoRA / DoRAN adapters on a backbone.

It owns the backbone (built by `models.build_backbone`, patched by `adapters.apply_adapters`), the
loss and metrics of the task (`tasks`), the optimiser over trainable tensors only, and the callbacks
a run gets by default. Checkpoints hold only what training changed (`checkpointing.TrainableState`);
the non-finite guard is a callback of its own (`nonfinite.NonFiniteGuard`).

The backbone is built in `configure_model`, the one place that builds it: Lightning calls it inside
the strategy's initialisation context (on the target device directly; under FSDP before the frozen
weights are sharded), so the magnitudes are initialised from the weights that were actually loaded.
Outside `deferred_build` (notebooks, tests) the constructor calls it at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from doran_lightning import tags
from doran_lightning.adapters import AdapterConfig, adapter_param_groups, apply_adapters
from doran_lightning.adapters.bank import tie_banks, unbank
from doran_lightning.alarms import AlarmConfig, StabilityAlarms
from doran_lightning.callbacks import AdapterStatisticsLogger
from doran_lightning.checkpointing import CHECKPOINT_KEY, TrainableState, check_classes, read_checkpoint, storage_ids
from doran_lightning.console import say
from doran_lightning.dashboard import StabilityDashboard
from doran_lightning.domains import check_number
from doran_lightning.lightning_compat import restore_train_loader_position
from doran_lightning.models import BackboneConfig, build_backbone, validate_backbone
from doran_lightning.nonfinite import NonFiniteError, NonFiniteGuard, Policy, check_policy, find_guard
from doran_lightning.resume import reapply_optimizer_settings, restack_optimizer_state
from doran_lightning.stability import warmup_length
from doran_lightning.sharding import (
    all_reduce_ignored_gradients,
    check_fsdp_v1,
    check_strategy,
    is_fsdp,
    is_sharded,
    shard_backbone,
)
from doran_lightning.summary import RunSummary, announce_run
from doran_lightning.test_predictions import TestPredictionRecorder
from doran_lightning.tasks import EVAL_STAGES, GenerationScorer, Metric, build_metrics, generate_text

__all__ = ["DoranModule", "deferred_build", "lr_factor", "build_metrics", "Metric", "NonFiniteError",
           "BackboneNotBuiltError"]


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


def _check_options(hp: Any) -> None:
    """Fail on out-of-range optimiser / label / policy settings now, naming the key, not at the first step."""
    # The numeric ranges are checked first by _check_settings.
    if hp.label_names is not None and len(hp.label_names) != hp.num_classes:
        raise ValueError(f"model.label_names has {len(hp.label_names)} names for num_classes={hp.num_classes}")
    check_policy(hp.nonfinite_policy)


class BackboneNotBuiltError(RuntimeError):
    """`DoranModule.backbone` was used before `configure_model` built it (inside `deferred_build`)."""


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


def default_callbacks(hp: Any, alarm_config: AlarmConfig) -> list[pl.Callback]:
    """Statistics, non-finite guard, dashboard, run summary and alarms. The guard follows the statistics,
    which measure the gradients first."""
    callbacks: list[pl.Callback] = [
        AdapterStatisticsLogger(hp.stats_every_n_steps, hp.histogram_every_n_steps),
        NonFiniteGuard(hp.nonfinite_policy),
        StabilityDashboard(hp.heatmap_every_n_stats),
        RunSummary(),
        TestPredictionRecorder(),
    ]
    if alarm_config.enabled:
        callbacks.append(StabilityAlarms(alarm_config))
    return callbacks


class DoranModule(pl.LightningModule):
    """LoRA / DoRA / DoRAN fine-tuning of a timm or Hugging Face backbone.

    Args:
        backbone: what to build (see `BackboneConfig`).
        adapter: adapter settings (`AdapterConfig`); the task head is added to `trainable_modules`.
        task, num_classes, tokenizer, metric, label_names: linked from the datamodule by the CLI;
            `label_names` (one per class) name the classes in predictions and exports.
        lr, weight_decay, betas, optimizer: optimiser settings. Per-group overrides: `aux_lr` (None:
            lr × adapter.aux_lr_factor) and `aux_weight_decay` (None: weight_decay) for the auxiliary
            generators, `sigma_lr` (None: lr) for the noise σ (METHOD.md §3, §6).
        scheduler: "cosine" (default), "linear" or "constant", after `warmup_steps` (or
            `warmup_ratio` of the total steps when warmup_steps is 0), decaying to `min_lr_ratio`.
        stats_every_n_steps: cadence of the per-projection statistics (None: trainer's
            log_every_n_steps); histogram_every_n_steps: histogram cadence (`callbacks.histogram_cadence`).
        max_new_tokens: generation length for causal-LM evaluation and prediction.
        nonfinite_policy: on a non-finite loss/gradient, "skip" the step (counted and logged),
            "stop" with an error naming the layers, or "ignore" (`nonfinite.NonFiniteGuard`).
        compile: `torch.compile` the adapted backbone in place (docs/PERFORMANCE.md).
        compile_mode: its `mode`: "default", or "reduce-overhead" (CUDA graphs: the step replays as one
            launch; for fixed input shapes), "max-autotune", "max-autotune-no-cudagraphs".
        alarms: thresholds of the stability alarms (`alarms.AlarmConfig`; `enabled: false` turns them off).
        heatmap_every_n_stats: σ/ΔM/ΔD/radial-gain heat-map images every this many statistics steps (0: none).
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
        nonfinite_policy: Policy = "skip",
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        alarms: AlarmConfig = AlarmConfig(),
        heatmap_every_n_stats: int = 10,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        # The tokenizer is rebuilt by the datamodule; hparams go to the loggers in on_fit_start
        # (not by Lightning, whose merge with the datamodule's hparams would clash on "task").
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        _check_settings(locals())
        _check_options(self.hparams)
        self.tokenizer = tokenizer
        self.backbone_config = backbone  # hparams may hold the CLI's dict form; keep the dataclass
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint verifies
        if compile_mode != "default" and not compile:
            raise ValueError(f"model.compile_mode={compile_mode!r} needs model.compile=true")
        alarms.validate()
        self.alarm_config = alarms
        validate_backbone(backbone, task, num_classes)  # bad names fail now, not after the trainer started
        self.adapter_config = adapter  # gains the head names in configure_model
        self.trainable_state = TrainableState()
        if not _DEFER_BUILD.get():
            self.configure_model()
        self.metrics = nn.ModuleDict(
            {stage: MetricCollection(build_metrics(metric, num_classes), prefix=f"{stage}/") for stage in EVAL_STAGES}
        )
        self.generation_scorer = GenerationScorer()
        self._announced = False

    # ------------------------------------------------------------------ building
    @property
    def backbone(self) -> nn.Module:
        """The adapted backbone, once `configure_model` has built it."""
        if "backbone" not in self._modules:
            raise BackboneNotBuiltError(
                "DoranModule.backbone is not built yet: it is built by configure_model(), which Lightning calls "
                "at the start of fit/validate/test/predict; call module.configure_model() first, or create the "
                "module outside deferred_build()")
        return self._modules["backbone"]

    def configure_model(self) -> None:
        """Build the backbone, attach the adapters and record which tensors checkpoints hold (idempotent)."""
        if "backbone" in self._modules:
            return
        hp = self.hparams
        target_device = torch.empty(0).device  # the strategy's init context (e.g. cuda:N) or cpu
        build = partial(build_backbone, self.backbone_config, hp.task, hp.num_classes, validated=True)
        if self.backbone_config.pretrained or self.backbone_config.checkpoint_path:
            model, heads = build()
        else:
            # Random weights are drawn on the CPU so that every device rebuilds the same frozen backbone.
            with torch.device("cpu"):
                model, heads = build()
            model = model.to(target_device)
        tokenizer = self.tokenizer
        if hp.task != "causal_lm" and tokenizer is not None and getattr(model.config, "pad_token_id", 0) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # LLaMA-style models need it to pool
        frozen_storages = storage_ids(model)
        adapter = self.adapter_config
        self.adapter_config = dataclasses.replace(
            adapter, trainable_modules=sorted(set(adapter.trainable_modules) | set(heads))
        )
        self.backbone = apply_adapters(model, self.adapter_config)
        if self._trainer is not None:
            check_fsdp_v1(self.trainer.strategy, self.trainer.world_size, self.adapter_config)
            if is_fsdp(self.trainer.strategy):
                unbank(self.backbone)  # FSDP shards parameters per block: no stacked banks across blocks
        self.trainable_state = TrainableState.of(self.backbone, frozen_storages)
        if self._device_mesh is not None:  # ModelParallelStrategy: FSDP2, after the row norms saw the whole W0
            check_strategy(self.trainer.strategy)
            shard_backbone(self.backbone, self._device_mesh)
        if hp.compile:
            # In place (nn.Module.compile): parameter and state-dict names stay those of the backbone.
            self.backbone.compile(mode=None if hp.compile_mode == "default" else hp.compile_mode)

    # ------------------------------------------------------------------ checkpoint contents
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state.filter(checkpoint["state_dict"])
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update(
            frozen_fingerprint=self.trainable_state.fingerprint, variant=self.adapter_config.variant,
            tokenizer=getattr(self.tokenizer, "name_or_path", None))  # what `predict` uses when given none

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = self.hparams
        hp.label_names = check_classes(checkpoint.get("hyper_parameters", {}), hp.num_classes, hp.label_names)
        if self._trainer is not None and self.trainer.state.fn != "fit":
            # Callback states (ModelCheckpoint's best scores, its old run folder) matter only to a resumed fit.
            checkpoint.pop("callbacks", None)
        self.configure_model()  # LightningModule.load_from_checkpoint loads before any trainer exists
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming and restack_optimizer_state(checkpoint, self.backbone, self._param_groups(),
                                                self._param_groups(unbanked=True)):
            say("The checkpoint's optimizer state has one entry per adapter tensor (written before banking): "
                "stacked into the banks' layout")
        if "state_dict" not in checkpoint and is_sharded(self.backbone) and self.trainer.ckpt_path:
            # ModelParallelStrategy has loaded the tensors itself and removed them: check the file's.
            checkpoint = {**checkpoint, "state_dict": read_checkpoint(self.trainer.ckpt_path)["state_dict"]}
        self.verify_checkpoint_state(checkpoint)

    def verify_checkpoint_state(self, checkpoint: dict[str, Any]) -> None:
        """Raise if the checkpoint does not match this model's trainable tensors or frozen backbone."""
        saved_variant = checkpoint.get(CHECKPOINT_KEY, {}).get("variant", "?")
        where = (f"checkpoint (trained as {saved_variant!r}) vs this model ({self.adapter_config.variant!r}, "
                 f"r={self.adapter_config.r}, backbone {self.backbone_config.name!r})")
        self.trainable_state.verify(checkpoint, self.state_dict(), where)

    @property
    def label_names(self) -> list[str]:
        """One name per class: the data module's (or the checkpoint's) label names, else "0", "1", …"""
        names = self.hparams.get("label_names")
        return list(names) if names else [str(index) for index in range(self.hparams.num_classes or 0)]

    # ------------------------------------------------------------------ forward, loss, metrics
    def forward(self, batch: dict[str, Any]) -> Any:
        if self.hparams.compile:
            tie_banks(self.backbone)  # the eager forward hook checks the banks' ties; a compiled one cannot
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
        # Averaged over ranks (one scalar all-reduce), so the logged curve is the global batch's loss.
        self.log(tags.TRAIN_LOSS, loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log(tags.TRAIN_LR, self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> Tensor | None:
        """Log the stage's loss and metrics; return the predictions (`TestPredictionRecorder` keeps the test's)."""
        loss, predictions = self._loss(batch)
        batch_size = len(batch["labels"])
        self.log(tags.stage_tag(stage, "loss"), loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if predictions is not None:
            self.metrics[stage].update(predictions, batch["labels"])
            self.log_dict(self.metrics[stage], batch_size=batch_size, prog_bar=stage == "val")
        if self.hparams.task == "causal_lm":
            self.log(tags.stage_tag(stage, "perplexity"), loss.exp(), sync_dist=True, batch_size=batch_size)
            if "prompt_input_ids" in batch:
                texts = self.generate_text(batch)
                self.generation_scorer.update(stage, batch, texts, self.trainer.datamodule, self.device)
        return predictions

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._eval_step("test", batch)

    def generate_text(self, batch: dict[str, Any]) -> list[str]:
        """Greedy continuation of the (left-padded) prompts, decoded without the prompt."""
        return generate_text(self.backbone, self.tokenizer, batch, self.hparams.max_new_tokens)

    def _log_generation_accuracy(self, stage: str) -> None:
        mean_tag = tags.stage_tag(stage, "accuracy")
        for tag, value in self.generation_scorer.compute(stage).items():
            self.log(tag, value, prog_bar=tag == mean_tag)

    def on_validation_epoch_end(self) -> None:
        self._log_generation_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_generation_accuracy("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | list[str]:
        """Class probabilities [B, C] (softmax), the value [B] for regression, or generated text (causal LM)."""
        if self.hparams.task == "causal_lm":
            return self.generate_text(batch)
        logits = self(batch).float()
        return logits.squeeze(-1) if self.hparams.num_classes == 1 else logits.softmax(dim=-1)

    # ------------------------------------------------------------------ optimisation
    def _param_groups(self, unbanked: bool = False) -> list[dict[str, Any]]:
        """This run's optimizer groups (`adapter_param_groups`); `unbanked`: as a model without banks has them."""
        hp = self.hparams
        return adapter_param_groups(self.backbone, weight_decay=hp.weight_decay, lr=hp.lr, aux_lr=hp.aux_lr,
                                    sigma_lr=hp.sigma_lr, aux_weight_decay=hp.aux_weight_decay, unbanked=unbanked)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self._param_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.betas[0])
        else:
            optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(groups, lr=hp.lr, betas=tuple(hp.betas))
        total_steps = int(self.trainer.estimated_stepping_batches)
        if hp.warmup_steps and hp.warmup_steps >= total_steps and self.trainer.is_global_zero:
            # A note, not an error: smoke runs of the shipped configs are this short on purpose.
            say(f"note: model.warmup_steps={hp.warmup_steps} is not shorter than this run ({total_steps} optimizer "
                f"steps): the lr never reaches model.lr={hp.lr:g}; lower it or use model.warmup_ratio")
        warmup_steps = warmup_length(hp.warmup_steps, hp.warmup_ratio, total_steps)
        schedule = partial(lr_factor, schedule=hp.scheduler, warmup_steps=warmup_steps,
                           total_steps=total_steps, min_lr_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_after_backward(self) -> None:
        if is_sharded(self.backbone):
            all_reduce_ignored_gradients(self.backbone)  # FSDP2 leaves the generators' gradients per rank

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped so far because the loss or a gradient was non-finite (policy "skip")."""
        guard = find_guard(self._trainer)
        return guard.nonfinite_steps if guard is not None else 0

    @property
    def max_grad_norm(self) -> float | None:
        """Largest finite global gradient norm of this fit (the run summary prints it)."""
        guard = find_guard(self._trainer)
        return guard.max_grad_norm if guard is not None else None

    def configure_callbacks(self) -> list[pl.Callback]:
        """`default_callbacks`; one the user put in `trainer.callbacks` is kept."""
        # Lightning replaces trainer callbacks of the same type by these: skip the types already there.
        present = {type(callback) for callback in self.trainer.callbacks} if self._trainer is not None else set()
        return [callback for callback in default_callbacks(self.hparams, self.alarm_config) if type(callback) not in present]

    # ------------------------------------------------------------------ run description
    def on_fit_start(self) -> None:
        self._announce()

    def on_train_start(self) -> None:
        # Lightning hands a resumable train loader its saved position in FitLoop.setup_data, but
        # configure_optimizers (estimated_stepping_batches) ran setup_data before the checkpoint was
        # restored, so that position would be dropped. No batch has been drawn yet: apply it now.
        if not restore_train_loader_position(self.trainer):
            say("Could not restore the train loader's position; the epoch restarts from its start")
        if self.trainer.ckpt_path:
            self._apply_optimizer_hparams()

    def _apply_optimizer_hparams(self) -> None:
        """Put this run's lr / weight decay / betas into the restored optimiser (`resume.reapply_optimizer_settings`)."""
        hp = self.hparams
        fresh = self._param_groups()
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        reapply_optimizer_settings(self.optimizers(use_pl_optimizer=False), scheduler, fresh, hp.lr, tuple(hp.betas))

    def on_test_start(self) -> None:
        # A test right after fit (the CLI's --test_after_fit) keeps the fit's hparams and hp_metric.
        if self.trainer.state.fn == "test" and not self._announced:
            self._announce()

    def _announce(self) -> None:
        self._announced = True
        announce_run(self)
