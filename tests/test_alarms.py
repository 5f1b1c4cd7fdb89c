"""Stability alarms fed through their public hooks (the end-to-end run is in test_dashboard.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from doran_lightning import stability
from doran_lightning.alarms import Alarm, AlarmConfig, StabilityAlarms, batch_size
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


def test_loss_spike_over_k_times_running_median_that_stays_is_an_alarm():
    alarms, trainer = StabilityAlarms(AlarmConfig(loss_spike_factor=3, min_history=5, spike_recovery=3)), fake_trainer()
    losses = [1.0, 0.9, 1.1, 0.95, 1.0, 2.5, math.nan, 3.5, 4.0, 1.0, 5.0]
    for step, loss in enumerate(losses):
        alarms.check_loss(trainer, step, loss)
    (alarm,) = alarms.alarms
    assert (alarm.kind, alarm.step, alarm.layer) == ("loss_spike", 7, "loss")
    assert alarm.threshold == pytest.approx(3 * 1.0)  # median of the finite losses before it
    assert alarms.episodes == []


def test_a_spike_that_comes_back_is_an_episode_not_an_alarm():
    """Issue 31: one batch at 1.22 against a running median of 0.28 in a healthy run, recovered at once."""
    alarms, trainer = StabilityAlarms(AlarmConfig(loss_spike_factor=3, min_history=5)), fake_trainer()
    for step, loss in enumerate([0.3, 0.28, 0.29, 0.27, 0.28, 1.22, 0.27, 0.26, 0.3, 0.25, 0.24, 0.25]):
        alarms.check_loss(trainer, step, loss)
    assert alarms.alarms == []
    assert [(e.kind, e.step, e.value) for e in alarms.episodes] == [("loss_spike", 5, 1.22)]
    restored = StabilityAlarms()
    restored.load_state_dict(alarms.state_dict())
    assert restored.episodes == alarms.episodes


@pytest.mark.parametrize("after", [[], [0.3, math.nan]], ids=["run ends at the spike", "non-finite after it"])
def test_a_spike_that_cannot_come_back_is_an_alarm(after):
    alarms, trainer = StabilityAlarms(AlarmConfig(loss_spike_factor=3, min_history=5)), fake_trainer()
    for step, loss in enumerate([0.3, 0.28, 0.29, 0.27, 0.28, 1.22, *after]):
        alarms.check_loss(trainer, step, loss)
    alarms.on_train_end(trainer, None)
    assert [(a.kind, a.step) for a in alarms.alarms] == [("loss_spike", 5)] and alarms.episodes == []


def test_grad_jump_per_layer_and_on_non_finite_gradients():
    alarms, trainer = StabilityAlarms(AlarmConfig(grad_jump_factor=10, min_history=3)), fake_trainer()
    feed(alarms, trainer, [1.0, 1.2, 0.8, 9.0, 150.0, 1.0, math.inf], "grad_norm")
    # 9.0 is 7.5x the window's largest value (not a jump at k=10); 150 is 16.7x the largest, 9.0.
    assert [(a.kind, a.step) for a in alarms.alarms] == [("grad_jump", 4), ("grad_jump", 6)]
    assert "adapter grad norm = 150 > 90" in alarms.alarms[0].message()


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


def test_grad_norms_rising_as_b_leaves_zero_stay_quiet():
    """The healthy pattern that fired 8 alarms: norms rising ~50x over the first stats steps, during and after warm-up."""
    alarms, trainer = StabilityAlarms(AlarmConfig(grad_jump_factor=10, min_history=3)), fake_trainer()
    alarms.warmup_steps = 3
    feed(alarms, trainer, [0.0, 1e-4, 1e-3, 0.004, 0.01, 0.03, 0.08, 0.2, 0.5, 0.45, 0.5, 0.4], "grad_norm")
    assert alarms.alarms == []


def test_grad_jump_needs_a_minimum_absolute_level():
    alarms, trainer = StabilityAlarms(AlarmConfig(grad_jump_factor=10, min_history=3, grad_jump_min=0.05)), fake_trainer()
    feed(alarms, trainer, [1e-4, 1e-4, 1e-4, 1e-4, 0.004, 1e-4, 1.0], "grad_norm")  # 40x at step 4, but tiny
    assert [(a.kind, a.step, a.threshold) for a in alarms.alarms] == [("grad_jump", 6, 0.05)]


def test_loss_spike_is_the_same_rule_as_reports():
    losses = [1.0, 0.9, 1.1, 0.95, 1.0, 2.5, math.nan, 3.5, 1.0, *[0.2] * 12, 0.9, 0.5]
    alarms, trainer = StabilityAlarms(), fake_trainer()
    for step, loss in enumerate(losses):
        alarms.check_loss(trainer, step, loss)
    alarms.on_train_end(trainer, None)
    seen = sorted(spike.step for spike in [*alarms.alarms, *alarms.episodes])
    assert seen == list(stability.spike_indices(np.array(losses))) == [7, 21]
    # both came back (7: to 1.0 and 0.2; 21: to 0.5 < 3 × 0.2): episodes, by the same rule `report` applies
    assert [alarm.step for alarm in alarms.alarms] == list(stability.unrecovered_spikes(np.array(losses))) == []
    diverging = [*losses[:21], 0.9, 1.5, 2.0, 3.0, 4.0, 5.0]  # 21 never comes back; 26 opens a new spike at the end
    streaming, trainer = StabilityAlarms(), fake_trainer()
    for step, loss in enumerate(diverging):
        streaming.check_loss(trainer, step, loss)
    streaming.on_train_end(trainer, None)
    assert [a.step for a in streaming.alarms] == list(stability.unrecovered_spikes(np.array(diverging))) == [21, 26]


def collapse_watcher(num_classes: int = 4, warmup: int = 2, after: int = 5) -> tuple[StabilityAlarms, SimpleNamespace]:
    alarms = StabilityAlarms(AlarmConfig(collapse_after=after))
    alarms.num_classes, alarms.warmup_steps = num_classes, warmup
    trainer = fake_trainer()
    trainer.sanity_checking, trainer.state, trainer.callback_metrics = False, SimpleNamespace(fn="fit"), {}
    return alarms, trainer


def test_collapse_when_the_loss_stays_at_ln_c_after_warm_up():
    alarms, trainer = collapse_watcher()
    for step in range(30):  # 4 classes: ln 4 = 1.386; a stuck run hovers at or above it
        alarms.check_loss(trainer, step, 1.40 + 0.02 * (-1) ** step)
    (alarm,) = alarms.alarms
    assert (alarm.kind, alarm.step, alarm.layer) == ("collapse", 7, "loss")  # warm-up 2 + collapse_after 5
    assert alarm.threshold == pytest.approx(0.97 * math.log(4))
    assert "running median 1.4" in alarm.message()


def test_no_collapse_while_a_healthy_loss_falls():
    alarms, trainer = collapse_watcher()
    for step in range(40):
        alarms.check_loss(trainer, step, 1.45 * 0.93 ** step)  # starts above ln 4 (fresh head), then learns
    assert alarms.alarms == []


def test_collapse_when_validation_accuracy_is_at_chance():
    alarms, trainer = collapse_watcher(after=10)
    for step, accuracy in ((5, 0.25), (20, 0.38), (40, 0.25), (60, 0.26), (80, 0.9)):
        trainer.global_step, trainer.callback_metrics = step, {"val/accuracy": accuracy}
        alarms.on_validation_end(trainer, None)
    # step 5 is inside warm-up + collapse_after; 0.26 is within the 0.1/C margin of 0.25 (still the same alarm)
    assert [(a.kind, a.step, a.layer, a.value) for a in alarms.alarms] == [("collapse", 40, "val/accuracy", 0.25)]
    # The text states the comparison that fired, and it reads true: 0.25 <= 0.275 (not "0.26 <= 0.25").
    assert alarms.alarms[0].message() == ("ALARM collapse at step 40: val/accuracy: 0.25 <= 0.275 (at chance: within "
                                          "0.1/C of guessing)")
    ten_classes = Alarm("collapse", 9, "val/accuracy", 0.1057, stability.chance_bound("accuracy", 10))
    assert "0.1057 <= 0.11 (at chance" in ten_classes.message()  # issue 43 read "0.1057 <= 0.1 (chance)"


def test_alarm_config_values_outside_their_domain_are_named():
    with pytest.raises(ValueError, match=r"^model.alarms: loss_window=nan is not a finite number$"):
        AlarmConfig(loss_window=math.nan).validate()
    with pytest.raises(ValueError, match=r"^model.alarms: need grad_jump_min >= 0 \(got -1\.0\); "
                                         r"grad_window an integer >= 1 \(got 0\)$"):
        AlarmConfig(grad_jump_min=-1.0, grad_window=0).validate()


def test_sigma_range_is_not_alarmed_by_default_but_non_finite_sigma_is():
    # σ → 0 is DoRA and a large σ a small radial step: with the old bounds [1e-4, 1] 9 of 11 healthy runs of the
    # issue-17 grid alarmed. A NaN σ is always a fault.
    alarms, trainer = StabilityAlarms(), fake_trainer()
    feed(alarms, trainer, [1e-2, 1e-7, 50.0, 1e-2], "sigma")
    assert alarms.alarms == []
    alarms.consume_adapter_statistics(trainer, None, 7, {LAYER: {"sigma": math.nan}})
    (alarm,) = alarms.alarms
    assert (alarm.kind, alarm.step) == ("sigma_explosion", 7)
    assert alarm.message().endswith("σ = nan (not finite)")


def test_batch_size_of_tensors_dicts_and_tuples():
    assert batch_size(torch.zeros(5, 3)) == 5
    assert batch_size({"labels": torch.zeros(7), "pixel_values": torch.zeros(7, 3)}) == 7
    assert batch_size((torch.zeros(4, 2), torch.zeros(4))) == 4
    assert batch_size({"text": ["a", "b"]}) is None and batch_size(torch.tensor(1.0)) is None


def test_short_last_batch_is_neither_a_spike_nor_a_jump():
    """An epoch's short last batch (10 of 32 samples) has a noisier loss and gradient: not judged, not history."""
    alarms, trainer = StabilityAlarms(AlarmConfig(min_history=3)), fake_trainer()
    full, short = {"labels": torch.zeros(32)}, {"labels": torch.zeros(10)}
    for step, (batch, loss, grad) in enumerate([(full, 1.0, 0.5), (full, 0.9, 0.5), (full, 0.8, 0.4), (full, 0.8, 0.5),
                                                (short, 3.0, 6.0), (full, 0.7, 0.5)]):
        trainer.global_step = step
        alarms.on_train_batch_start(trainer, None, batch, 0)
        alarms.on_train_batch_end(trainer, None, torch.tensor(loss), batch, 0)
        alarms.consume_adapter_statistics(trainer, None, step, {LAYER: {"grad_norm": grad}})
    assert alarms.alarms == []
    # The same values in a full batch are a spike and a jump: the rule itself is unchanged.
    trainer.global_step = 6
    alarms.on_train_batch_start(trainer, None, full, 0)
    alarms.on_train_batch_end(trainer, None, torch.tensor(3.0), full, 0)
    alarms.consume_adapter_statistics(trainer, None, 6, {LAYER: {"grad_norm": 6.0}})
    alarms.on_train_end(trainer, None)  # the spike is the run's last loss: it never came back
    assert sorted(a.kind for a in alarms.alarms) == ["grad_jump", "loss_spike"]
