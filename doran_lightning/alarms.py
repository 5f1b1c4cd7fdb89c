"""Stability alarms: say during training, in one line, which layer is heading for trouble and when.

Five kinds (names in `tags.ALARM_KINDS`):

- ``denominator``: a projection's min ‖V‖_row + σ fell below ``min_denominator`` (DoRA's norm is about
  to divide by ~0; DoRAN's σ should keep it away);
- ``sigma_collapse`` / ``sigma_explosion``: a projection's σ left [``sigma_min``, ``sigma_max``];
- ``loss_spike``: a finite training loss above ``loss_spike_factor`` × the median of the previous
  ``loss_window`` losses;
- ``grad_jump``: a projection's adapter gradient norm above ``grad_jump_factor`` × the median of its
  previous ``grad_window`` values, or non-finite.

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
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from doran_lightning.callbacks import StatisticsConsumer
from doran_lightning.console import say
from doran_lightning.tags import ALARM_KINDS, ALARM_TEXT, alarm_tag


@dataclass(frozen=True)
class AlarmConfig:
    """Thresholds of the stability alarms (`--model.alarms.<field>=…`; ``enabled: false`` turns them off)."""

    enabled: bool = True
    min_denominator: float = 1e-3
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    loss_spike_factor: float = 3.0
    loss_window: int = 50
    grad_jump_factor: float = 10.0
    grad_window: int = 20
    min_history: int = 5

    def validate(self) -> None:
        problems = [name for name, ok in (
            ("min_denominator >= 0", self.min_denominator >= 0),
            ("0 <= sigma_min < sigma_max", 0 <= self.sigma_min < self.sigma_max),
            ("loss_spike_factor > 1", self.loss_spike_factor > 1),
            ("grad_jump_factor > 1", self.grad_jump_factor > 1),
            ("loss_window, grad_window, min_history >= 1", min(self.loss_window, self.grad_window, self.min_history) >= 1),
        ) if not ok]
        if problems:
            raise ValueError(f"model.alarms: need {'; '.join(problems)} (got {asdict(self)})")


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
            "sigma_explosion": f"σ = {self.value:.3g} > {self.threshold:.3g}",
            "loss_spike": f"loss = {self.value:.4g} > {self.threshold:.4g} (k × running median)",
            "grad_jump": f"adapter grad norm = {self.value:.3g} > {self.threshold:.3g} (k × running median)",
        }[self.kind]
        return f"ALARM {self.kind} at step {self.step}: {self.layer}: {what}"


def _median_threshold(history: deque, factor: float, min_history: int) -> float | None:
    """factor × median of the history, or None while it is too short or the median is 0."""
    if len(history) < min_history:
        return None
    median = statistics.median(history)
    return factor * median if median > 0 else None


class StabilityAlarms(StatisticsConsumer, pl.Callback):
    """Watches the statistics and the loss; see the module docstring for the conditions."""

    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()
        self.config.validate()
        self.alarms: list[Alarm] = []
        self._active: set[tuple[str, str]] = set()  # (kind, layer) conditions that fired and still hold
        self._losses: deque = deque(maxlen=self.config.loss_window)
        self._grads: dict[str, deque] = {}
        self._batch_step = 0

    # ---------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Zeros at the first step make "no alarm" visible in TensorBoard and in `report`.
        if trainer.is_global_zero:
            counts = self.counts()
            for logger in trainer.loggers:
                logger.log_metrics({alarm_tag(kind): float(counts[kind]) for kind in ALARM_KINDS},
                                   step=trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the step this batch's statistics are logged at

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return
        # Rank zero's own batch loss: no extra all-reduce every step just for the alarm.
        self.check_loss(trainer, self._batch_step, float(loss.detach()))

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
                self._check(trainer, "sigma_collapse", step, layer, value, cfg.sigma_min, value < cfg.sigma_min)
                self._check(trainer, "sigma_explosion", step, layer, value, cfg.sigma_max,
                            not value <= cfg.sigma_max)
            if "grad_norm" in values:
                self._check_grad(trainer, step, layer, values["grad_norm"])

    def state_dict(self) -> dict[str, Any]:
        return {"alarms": [asdict(alarm) for alarm in self.alarms]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alarms = [Alarm(**alarm) for alarm in state_dict.get("alarms", [])]

    # ---------------------------------------------------------------- checks
    def check_loss(self, trainer: pl.Trainer, step: int, loss: float) -> None:
        """Loss-spike check of one step's loss (non-finite losses are counted as non-finite steps instead)."""
        if not math.isfinite(loss):
            return
        threshold = _median_threshold(self._losses, self.config.loss_spike_factor, self.config.min_history)
        self._losses.append(loss)
        if threshold is not None:
            self._check(trainer, "loss_spike", step, "loss", loss, threshold, loss > threshold)

    def _check_grad(self, trainer: pl.Trainer, step: int, layer: str, value: float) -> None:
        history = self._grads.setdefault(layer, deque(maxlen=self.config.grad_window))
        threshold = _median_threshold(history, self.config.grad_jump_factor, self.config.min_history)
        # At step 0 B (or its generator head) is zero, so A's and σ's gradients are zero by construction:
        # such a value is no baseline for "normal", and the first real ones would look like a jump.
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

    # ---------------------------------------------------------------- output
    def counts(self) -> dict[str, int]:
        """Alarms fired so far, per kind (every kind present)."""
        counts = dict.fromkeys(ALARM_KINDS, 0)
        for alarm in self.alarms:
            counts[alarm.kind] += 1
        return counts

    def _announce(self, trainer: pl.Trainer, alarm: Alarm) -> None:
        line = alarm.message()
        progress_bar = getattr(trainer, "progress_bar_callback", None)
        if progress_bar is not None and hasattr(progress_bar, "print") and progress_bar.is_enabled:
            progress_bar.print(line)  # above the bar instead of through it
        else:
            say(line)
        count = self.counts()[alarm.kind]
        for logger in trainer.loggers:
            logger.log_metrics({alarm_tag(alarm.kind): float(count)}, step=alarm.step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(ALARM_TEXT, line, alarm.step)
