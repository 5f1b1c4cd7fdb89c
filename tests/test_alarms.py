"""Stability alarms fed through their public hooks (the end-to-end run is in test_dashboard.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from doran_lightning.alarms import AlarmConfig, StabilityAlarms
from doran_lightning.tags import ALARM_KINDS

LAYER = "blocks.3.attn.qkv.v"


class RecordingLogger:
    """Stands in for a Lightning logger: keeps what log_metrics received."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(loggers=[RecordingLogger()], progress_bar_callback=None, is_global_zero=True)


def feed(alarms: StabilityAlarms, trainer, values: list[float], stat: str) -> None:
    for step, value in enumerate(values):
        alarms.consume_adapter_statistics(trainer, None, step, {LAYER: {stat: value}})


def test_sigma_explosion_names_layer_step_and_is_counted(caplog):
    alarms, trainer = StabilityAlarms(AlarmConfig(sigma_max=0.5)), fake_trainer()
    with caplog.at_level("INFO"):
        feed(alarms, trainer, [0.01, 0.3, 0.9, 2.0], "sigma")
    (alarm,) = alarms.alarms
    assert (alarm.kind, alarm.step, alarm.layer) == ("sigma_explosion", 2, LAYER)
    assert f"sigma_explosion at step 2: {LAYER}" in caplog.text
    assert trainer.loggers[0].metrics == [(2, {"alarm/sigma_explosion": 1.0})]


def test_sigma_collapse_fires_again_only_after_recovering():
    alarms, trainer = StabilityAlarms(AlarmConfig(sigma_min=1e-3)), fake_trainer()
    feed(alarms, trainer, [1e-2, 1e-4, 1e-5, 1e-2, 1e-4], "sigma")
    assert [(a.kind, a.step) for a in alarms.alarms] == [("sigma_collapse", 1), ("sigma_collapse", 4)]


def test_denominator_below_threshold_or_non_finite():
    alarms, trainer = StabilityAlarms(AlarmConfig(min_denominator=1e-3)), fake_trainer()
    feed(alarms, trainer, [0.5, 5e-4], "denominator_min")
    alarms.consume_adapter_statistics(trainer, None, 9, {"other": {"denominator_min": math.nan}})
    assert [(a.kind, a.step, a.layer) for a in alarms.alarms] == [("denominator", 1, LAYER), ("denominator", 9, "other")]


def test_loss_spike_over_k_times_running_median():
    alarms, trainer = StabilityAlarms(AlarmConfig(loss_spike_factor=3, min_history=5)), fake_trainer()
    losses = [1.0, 0.9, 1.1, 0.95, 1.0, 2.5, math.nan, 3.5, 1.0]
    for step, loss in enumerate(losses):
        alarms.check_loss(trainer, step, loss)
    (alarm,) = alarms.alarms
    assert (alarm.kind, alarm.step, alarm.layer) == ("loss_spike", 7, "loss")
    assert alarm.threshold == pytest.approx(3 * 1.0)  # median of the finite losses before it


def test_grad_jump_per_layer_and_on_non_finite_gradients():
    alarms, trainer = StabilityAlarms(AlarmConfig(grad_jump_factor=10, min_history=3)), fake_trainer()
    feed(alarms, trainer, [1.0, 1.2, 0.8, 9.0, 15.0, 1.0, math.inf], "grad_norm")
    assert [(a.kind, a.step) for a in alarms.alarms] == [("grad_jump", 4), ("grad_jump", 6)]
    assert "adapter grad norm = 15" in alarms.alarms[0].message()


def test_grad_jump_ignores_the_zero_init_step():
    """At step 0 B is zero, so the adapters' gradients are near zero by construction, not a baseline."""
    alarms, trainer = StabilityAlarms(AlarmConfig(grad_jump_factor=10, min_history=4)), fake_trainer()
    feed(alarms, trainer, [0.0, 0.001, 0.002, 0.004, 0.02, 0.003, 0.5], "grad_norm")
    assert [(a.kind, a.step) for a in alarms.alarms] == [("grad_jump", 6)]  # not the growth at step 4


def test_counts_survive_a_checkpoint_round_trip():
    alarms, trainer = StabilityAlarms(AlarmConfig(sigma_max=0.5)), fake_trainer()
    feed(alarms, trainer, [1.0], "sigma")
    restored = StabilityAlarms()
    restored.load_state_dict(alarms.state_dict())
    assert restored.counts() == {**dict.fromkeys(ALARM_KINDS, 0), "sigma_explosion": 1}


def test_bad_thresholds_are_named():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        StabilityAlarms(AlarmConfig(sigma_min=1.0, sigma_max=0.1))
    with pytest.raises(ValueError, match="loss_spike_factor > 1"):
        AlarmConfig(loss_spike_factor=0.5).validate()
