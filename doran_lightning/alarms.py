"""Stability alarms: say during training, in one line, which layer is heading for trouble and when.

Six kinds (names in `tags.ALARM_KINDS`; the rules themselves live in `stability.py`, shared with
`report` and the sweeps):

- ``denominator``: a projection's min ‖V‖_row + σ fell below ``min_denominator`` (DoRA's norm is about
  to divide by ~0; DoRAN's σ should keep it away);
- ``sigma_collapse`` / ``sigma_explosion``: a projection's σ left [``sigma_min``, ``sigma_max``] (bounds
  unset by default: σ → 0 is DoRA and a large σ a small radial step, neither a failure — with the bounds
  [1e-4, 1] they fired in 9 of 11 healthy runs of the issue-17 grid — so only a non-finite σ is alarmed
  unless the bounds are set);
- ``loss_spike``: a finite training loss above ``loss_spike_factor`` × the median of the previous
  ``loss_window`` losses that has not come back: the median of the next ``spike_recovery`` losses is still above
  the threshold (or one is non-finite, or the run ends first). A spike that comes back is an *episode*, not an
  alarm: counted in ``episode/loss_spike``, printed as a note and shown in the run summary (issue 31: one noisy
  batch of a healthy run at lr 0.01 was alarmed);
  neither this nor ``grad_jump`` judges a batch shorter than the largest seen (an epoch's last
  batch): its mean over fewer samples is noisier by √(B/b), which fired both in healthy runs;
- ``grad_jump``: a projection's adapter gradient norm above ``grad_jump_factor`` × the largest of its
  previous ``grad_window`` values and above ``grad_jump_min``, or non-finite. Checked after the lr
  warm-up only: while B leaves zero the norms rise 10-50× in healthy runs, and a median of the early
  values called that a jump (8 false alarms in a healthy 4-class MiniLM run);
- ``collapse`` (classification): ``collapse_after`` steps past the warm-up, the running median of the
  training loss is still at or above the uninformed level ln C, or a validation accuracy is at chance
  (1/C): the run has stopped learning, often without any spike or non-finite value (DoRA at lr 0.1 on
  the built-in topics ends at 0.25 = 1 of 4 classes).

Per-projection checks run on the statistics the `AdapterStatisticsLogger` computes (its
``consume_adapter_statistics`` call, every ``stats_every_n_steps``); the loss is checked every step. A
condition that persists fires once and re-arms when it clears, so a collapsed σ is one line, not one
per step. Every alarm is counted in ``alarm/<kind>``, written as text under ``alarms`` (TensorBoard)
and kept in `StabilityAlarms.alarms` for the run summary; `report` lists them from the event files.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from doran_lightning import stability
from doran_lightning.callbacks import StatisticsConsumer
from doran_lightning.console import say
from doran_lightning.tags import ALARM_KINDS, ALARM_TEXT, EPISODE_KINDS, alarm_tag, episode_tag, stage_tag


@dataclass(frozen=True)
class AlarmConfig:
    """Thresholds of the stability alarms (`--model.alarms.<field>=…`; ``enabled: false`` turns them off)."""

    enabled: bool = True
    min_denominator: float = 1e-3
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    loss_spike_factor: float = stability.SPIKE_FACTOR
    loss_window: int = stability.SPIKE_WINDOW
    grad_jump_factor: float = stability.GRAD_JUMP_FACTOR
    grad_window: int = stability.GRAD_WINDOW
    grad_jump_min: float = stability.GRAD_JUMP_MIN
    min_history: int = stability.MIN_HISTORY
    collapse_after: int = 20
    spike_recovery: int = stability.SPIKE_RECOVERY

    def validate(self) -> None:
        """One line naming each field outside its range, with the value given."""
        numbers = {field.name: getattr(self, field.name) for field in fields(self)
                   if field.name != "enabled" and getattr(self, field.name) is not None}
        problems = [f"{name}={value!r} is not a finite number" for name, value in numbers.items()
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)]
        if problems:
            raise ValueError(f"model.alarms: {'; '.join(problems)}")
        problems = [f"{rule} (got {got})" for rule, ok, got in (
            ("min_denominator >= 0", self.min_denominator >= 0, self.min_denominator),
            ("0 <= sigma_min < sigma_max", 0 <= (self.sigma_min or 0.0) < (math.inf if self.sigma_max is None else
                                                                        self.sigma_max), (self.sigma_min, self.sigma_max)),
            ("loss_spike_factor > 1", self.loss_spike_factor > 1, self.loss_spike_factor),
            ("grad_jump_factor > 1", self.grad_jump_factor > 1, self.grad_jump_factor),
            ("grad_jump_min >= 0", self.grad_jump_min >= 0, self.grad_jump_min),
            ("collapse_after >= 0", self.collapse_after >= 0, self.collapse_after),
            *((f"{name} an integer >= 1", isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
               getattr(self, name)) for name in ("loss_window", "grad_window", "min_history", "spike_recovery")),
        ) if not ok]
        if problems:
            raise ValueError(f"model.alarms: need {'; '.join(problems)}")


@dataclass(frozen=True)
class Alarm:
    """One fired alarm."""

    kind: str
    step: int
    layer: str
    value: float
    threshold: float

    def message(self) -> str:
        what = {
            "denominator": f"min ‖V‖+σ = {self.value:.3g} < {self.threshold:.3g}",
            "sigma_collapse": f"σ = {self.value:.3g} < {self.threshold:.3g}",
            "sigma_explosion": (f"σ = {self.value:.3g} > {self.threshold:.3g}" if math.isfinite(self.value)
                                else f"σ = {self.value} (not finite)"),
            "loss_spike": f"loss = {self.value:.4g} > {self.threshold:.4g} (k × running median), not back "
                          "within the next steps",
            "grad_jump": f"adapter grad norm = {self.value:.3g} > {self.threshold:.3g} (k × recent maximum)",
            "collapse": (f"running median {self.value:.4g} >= {self.threshold:.4g} (the uninformed level ln C)"
                         if self.layer == "loss" else f"{self.value:.4g} <= {self.threshold:.4g} (at chance: "
                         f"within {stability.CHANCE_MARGIN:g}/C of guessing)"),
        }[self.kind]
        return f"ALARM {self.kind} at step {self.step}: {self.layer}: {what}"


def batch_size(batch: Any) -> int | None:
    """Samples in a batch (a tensor, or a dict/list/tuple whose first tensor leads with the batch dim)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((size for size in map(batch_size, values) if size is not None), None)


class StabilityAlarms(StatisticsConsumer, pl.Callback):
    """Watches the statistics and the loss; see the module docstring for the conditions."""

    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()
        self.config.validate()
        self.alarms: list[Alarm] = []
        self.episodes: list[Alarm] = []  # loss spikes that came back (not alarms)
        self._pending_spike: Optional[tuple[Alarm, list[float]]] = None  # a spike and the losses after it
        self._active: set[tuple[str, str]] = set()  # (kind, layer) conditions that fired and still hold
        self._spikes = stability.SpikeDetector(self.config.loss_spike_factor, self.config.loss_window,
                                               self.config.min_history)
        self._recent: deque = deque(maxlen=self.config.loss_window)  # losses after warm-up (collapse)
        self._grads: dict[str, deque] = {}
        self._batch_step = 0
        self._largest_batch = 0
        self._short_batch = False  # the current batch is shorter than the largest seen (an epoch's last)
        self.warmup_steps = 0
        self.num_classes: int | None = None  # classification tasks: the collapse checks' C
        self.metric = "accuracy"

    # ---------------------------------------------------------------- Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hp = getattr(pl_module, "hparams", {})
        self.warmup_steps = stability.warmup_length(int(hp.get("warmup_steps", 0) or 0),
                                                    float(hp.get("warmup_ratio", 0.0) or 0.0),
                                                    int(trainer.estimated_stepping_batches))
        classes = hp.get("num_classes")
        classification = hp.get("task", "image_classification") != "causal_lm" and isinstance(classes, int)
        self.num_classes = classes if classification and classes >= 2 else None
        self.metric = hp.get("metric", "accuracy")

    def _past_warmup(self, step: int) -> bool:
        return step >= self.warmup_steps + self.config.collapse_after

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit" or self.num_classes is None:
            return
        name = "accuracy" if self.metric in ("accuracy", "f1_accuracy") else self.metric
        value = trainer.callback_metrics.get(stage_tag("val", name))
        bound = stability.chance_bound(name, self.num_classes)  # the threshold the message prints is the one tested
        if value is None or bound is None or not self._past_warmup(trainer.global_step):
            return
        value = float(value)
        self._check(trainer, "collapse", trainer.global_step, stage_tag("val", name), value, bound,
                    stability.at_chance(name, value, self.num_classes))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Zeros at the first step make "no alarm" visible in TensorBoard and in `report`.
        self._log_counts(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The counts again at the last step: the dashboard's alarm charts draw a line over the whole run, not one
        # point at step 0 that looks like a broken chart.
        self._log_counts(trainer)

    def _log_counts(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            counts = self.counts()
            zeros = {episode_tag(kind): 0.0 for kind in EPISODE_KINDS}
            for logger in trainer.loggers:
                logger.log_metrics({**{alarm_tag(kind): float(counts[kind]) for kind in ALARM_KINDS}, **zeros},
                                   step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_spike is not None:  # the run ended before the spike's losses came back: judged on what came
            self._resolve_spike(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the step this batch's statistics are logged at
        size = batch_size(batch)
        self._largest_batch = max(self._largest_batch, size or 0)
        self._short_batch = size is not None and size < self._largest_batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return
        # Rank zero's own batch loss: no extra all-reduce every step just for the alarm.
        self.check_loss(trainer, self._batch_step, float(loss.detach()), short_batch=self._short_batch)

    def consume_adapter_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                                   stats: dict[str, dict[str, float]]) -> None:
        """Per-projection checks; called by `AdapterStatisticsLogger` on rank zero."""
        cfg = self.config
        for layer, values in stats.items():
            if "denominator_min" in values:
                value = values["denominator_min"]
                self._check(trainer, "denominator", step, layer, value, cfg.min_denominator,
                            not value >= cfg.min_denominator)
            if "sigma" in values:
                value = values["sigma"]
                if cfg.sigma_min is not None:
                    self._check(trainer, "sigma_collapse", step, layer, value, cfg.sigma_min, value < cfg.sigma_min)
                upper = math.inf if cfg.sigma_max is None else cfg.sigma_max
                self._check(trainer, "sigma_explosion", step, layer, value, upper, not value <= upper)
            if "grad_norm" in values:
                self._check_grad(trainer, step, layer, values["grad_norm"],
                                 short_batch=self._short_batch and step == self._batch_step)

    def state_dict(self) -> dict[str, Any]:
        return {"alarms": [asdict(alarm) for alarm in self.alarms],
                "episodes": [asdict(episode) for episode in self.episodes]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alarms = [Alarm(**alarm) for alarm in state_dict.get("alarms", [])]
        self.episodes = [Alarm(**episode) for episode in state_dict.get("episodes", [])]

    # ---------------------------------------------------------------- checks
    def check_loss(self, trainer: pl.Trainer, step: int, loss: float, short_batch: bool = False) -> None:
        """Loss-spike and collapse checks of one step's loss (non-finite losses are counted as non-finite steps);
        a `short_batch` loss is neither judged nor kept as history for the spike rule."""
        if self._pending_spike is not None and not short_batch:
            later = self._pending_spike[1]
            later.append(loss)
            if len(later) >= self.config.spike_recovery or not math.isfinite(loss):
                self._resolve_spike(trainer)
        if not math.isfinite(loss):
            return
        threshold = None if short_batch else self._spikes.update(loss)
        if threshold is not None and loss > threshold and self._pending_spike is None:
            self._pending_spike = (Alarm("loss_spike", step, "loss", loss, threshold), [])
        if self.num_classes is None or step < self.warmup_steps:
            return
        self._recent.append(loss)
        if self._past_warmup(step):
            level = stability.COLLAPSE_LOSS_RATIO * stability.uninformed_loss(self.num_classes)
            median = statistics.median(self._recent)
            self._check(trainer, "collapse", step, "loss", median, level,
                        stability.loss_collapsed(self._recent, self.num_classes))

    def _check_grad(self, trainer: pl.Trainer, step: int, layer: str, value: float, short_batch: bool = False) -> None:
        # During the warm-up B (or its generator head) leaves zero and A's and σ's gradients rise from
        # zero by construction: neither a baseline for "normal" nor a jump. Nor is a short batch's noisier
        # gradient. Non-finite is always reported.
        if (step < self.warmup_steps or short_batch) and math.isfinite(value):
            return
        history = self._grads.setdefault(layer, deque(maxlen=self.config.grad_window))
        threshold = (stability.grad_jump_threshold(history, self.config.grad_jump_factor, self.config.grad_jump_min)
                     if len(history) >= self.config.min_history else None)
        if math.isfinite(value) and step > 0:
            history.append(value)
        if threshold is not None or not math.isfinite(value):
            self._check(trainer, "grad_jump", step, layer, value, threshold or 0.0,
                        not math.isfinite(value) or value > threshold)

    def _check(self, trainer: pl.Trainer, kind: str, step: int, layer: str, value: float, threshold: float,
               firing: bool) -> None:
        key = (kind, layer)
        if not firing:
            self._active.discard(key)
            return
        if key in self._active:
            return
        self._active.add(key)
        alarm = Alarm(kind, step, layer, float(value), float(threshold))
        self.alarms.append(alarm)
        self._announce(trainer, alarm)

    def _resolve_spike(self, trainer: pl.Trainer) -> None:
        """A pending spike becomes an episode (its losses came back) or an alarm (they did not)."""
        assert self._pending_spike is not None
        spike, later = self._pending_spike
        self._pending_spike = None
        if not stability.spike_recovered(spike.threshold, later):
            self.alarms.append(spike)
            self._announce(trainer, spike)
            return
        self.episodes.append(spike)
        self._print(trainer, f"note: loss spike at step {spike.step} ({spike.value:.4g} > {spike.threshold:.4g}, "
                             f"k × running median) came back within {len(later)} steps: an episode, not an alarm")
        count = sum(1 for episode in self.episodes if episode.kind == spike.kind)
        for logger in trainer.loggers:
            logger.log_metrics({episode_tag(spike.kind): float(count)}, step=spike.step)

    # ---------------------------------------------------------------- output
    def counts(self) -> dict[str, int]:
        """Alarms fired so far, per kind (every kind present)."""
        counts = dict.fromkeys(ALARM_KINDS, 0)
        for alarm in self.alarms:
            counts[alarm.kind] += 1
        return counts

    @staticmethod
    def _print(trainer: pl.Trainer, line: str) -> None:
        progress_bar = getattr(trainer, "progress_bar_callback", None)
        if progress_bar is not None and hasattr(progress_bar, "print") and progress_bar.is_enabled:
            progress_bar.print(line)  # above the bar instead of through it
        else:
            say(line)

    def _announce(self, trainer: pl.Trainer, alarm: Alarm) -> None:
        line = alarm.message()
        self._print(trainer, line)
        count = self.counts()[alarm.kind]
        for logger in trainer.loggers:
            logger.log_metrics({alarm_tag(alarm.kind): float(count)}, step=alarm.step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(ALARM_TEXT, line, alarm.step)
