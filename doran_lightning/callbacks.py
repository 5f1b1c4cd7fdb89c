"""Callbacks: per-projection stability statistics (METHOD.md §5) written to the loggers.

The statistics are computed by `adapters.adapter_statistics` under `torch.no_grad()`, on rank zero
only, right before the optimiser step (so the adapter gradients are still there to be measured).
Under DDP every rank holds the same all-reduced tensors, so rank zero's view is the global one.
Under FSDP the frozen weights are sharded: every rank takes part in gathering them
(`summon_full_params`; under FSDP2 `sharding.gathered_parameters`) and rank zero computes. Their cost is printed at the end of `fit`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_deprecation

from doran_lightning.console import say
from doran_lightning.tags import HISTOGRAM_CADENCE_FACTOR, STATISTIC_BY_KEY, histogram_tag

Statistics = dict[str, dict[str, float]]  # {projection: {stat key: value}}
CONSUMER_METHOD = "consume_adapter_statistics"
_DEPRECATED_CONSUMER_METHOD = "on_adapter_statistics"  # the old name: it looked like a Lightning hook


def histogram_cadence(every_n_steps: int, histogram_every_n_steps: int | None) -> int:
    """Steps between histograms: `histogram_every_n_steps`, or None -> 10x the statistics cadence (0: off)."""
    if histogram_every_n_steps is None:
        return HISTOGRAM_CADENCE_FACTOR * every_n_steps
    return histogram_every_n_steps


def statistics_consumer(callback: Any) -> Any:
    """The callback's statistics method, or None; the old `on_adapter_statistics` name works with a warning."""
    method = getattr(callback, CONSUMER_METHOD, None)
    if method is None and hasattr(callback, _DEPRECATED_CONSUMER_METHOD):
        rank_zero_deprecation(
            f"{type(callback).__name__}.{_DEPRECATED_CONSUMER_METHOD} is deprecated (it is not a Lightning hook); "
            f"rename it to {CONSUMER_METHOD}(trainer, pl_module, step, stats)")
        method = getattr(callback, _DEPRECATED_CONSUMER_METHOD)
    return method


class StatisticsConsumer:
    """Base of callbacks fed by `AdapterStatisticsLogger` (which calls them; Lightning does not)."""

    def consume_adapter_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                                   stats: Statistics) -> None:
        raise NotImplementedError

    def on_adapter_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                              stats: Statistics) -> None:
        """Deprecated name of `consume_adapter_statistics`."""
        rank_zero_deprecation(f"{type(self).__name__}.{_DEPRECATED_CONSUMER_METHOD} is deprecated; "
                              f"call {CONSUMER_METHOD}")
        self.consume_adapter_statistics(trainer, pl_module, step, stats)


def statistics_to_floats(stats: dict[str, dict[str, torch.Tensor]]) -> Statistics:
    """{projection: {stat: tensor}} -> the same with Python floats, known statistics only (one host copy)."""
    return {projection: {stat: float(value) for stat, value in values.items() if stat in STATISTIC_BY_KEY}
            for projection, values in stats.items()}


def flatten_statistics(stats: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{projection: {stat: value}} -> {"sigma/<projection>": value, ..., "sigma/mean": value}."""
    scalars: dict[str, float] = {}
    per_stat: dict[str, list[float]] = {}
    for projection, projection_stats in stats.items():
        for key, value in projection_stats.items():
            if key not in STATISTIC_BY_KEY:
                continue
            number = float(value)
            scalars[STATISTIC_BY_KEY[key].tag(projection)] = number
            per_stat.setdefault(key, []).append(number)
    for key, values in per_stat.items():
        stat = STATISTIC_BY_KEY[key]
        if stat.aggregate == "mean":
            scalars[stat.aggregate_tag] = sum(values) / len(values)
        elif stat.aggregate == "min":
            scalars[stat.aggregate_tag] = min(values)
    return scalars


class AdapterStatisticsLogger(pl.Callback):
    """Logs σ, ΔM, ΔD, min denominator, update ratio and grad norm per adapted projection.

    After writing, every callback of the trainer that defines
    ``consume_adapter_statistics(trainer, pl_module, step, stats)`` receives the same statistics as
    floats (the dashboard's heat maps and the stability alarms use it), so they are computed once.
    That method is called by this logger, not by Lightning (the name says so; the old name
    ``on_adapter_statistics`` still works, with a deprecation warning).

    Args:
        every_n_steps: scalar cadence; None uses the trainer's `log_every_n_steps`.
        histogram_every_n_steps: cadence of the m / denominator histograms (TensorBoard only);
            see `histogram_cadence` for the default, 0 disables them.
    """

    def __init__(self, every_n_steps: int | None = None, histogram_every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"stats_every_n_steps must be >= 1 or null, got {every_n_steps}")
        if histogram_every_n_steps is not None and histogram_every_n_steps < 0:
            raise ValueError(f"histogram_every_n_steps must be >= 0, got {histogram_every_n_steps}")
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.seconds_spent = 0.0
        self._fit_started = 0.0

    def _due(self, step: int, every: int | None) -> bool:
        return bool(every) and step % every == 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds_spent = 0.0
        self._fit_started = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Every condition here is the same on all ranks, so FSDP's collective gather is entered by all.
        if not trainer.loggers or trainer.sanity_checking:
            return
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        write_scalars = self._due(step, every)
        write_histograms = self._due(step, histogram_cadence(every, self.histogram_every_n_steps))
        if not (write_scalars or write_histograms):
            return
        from doran_lightning.adapters import adapter_histograms, adapter_statistics

        stats = None
        with full_parameters(trainer):
            if trainer.is_global_zero:
                stats = self._write(trainer, pl_module, step, write_scalars, write_histograms,
                                    adapter_statistics, adapter_histograms)
        if stats is not None:  # outside the timing above: the consumers report their own cost
            for callback in trainer.callbacks:
                consume = statistics_consumer(callback)
                if consume is not None:
                    consume(trainer, pl_module, step, stats)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, write_scalars: bool,
               write_histograms: bool, adapter_statistics: Any, adapter_histograms: Any) -> Statistics | None:
        started = time.perf_counter()
        backbone = pl_module.backbone
        stats = None
        if write_scalars:
            stats = statistics_to_floats(adapter_statistics(backbone))
            scalars = flatten_statistics(stats)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        if write_histograms:
            histograms = adapter_histograms(backbone)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    _write_histograms(logger, histograms, step)
        self.seconds_spent += time.perf_counter() - started
        return stats

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = time.perf_counter() - self._fit_started
        if total > 0 and trainer.is_global_zero:
            say(
                f"Adapter statistics took {self.seconds_spent:.2f} s of {total:.1f} s "
                f"({100 * self.seconds_spent / total:.1f}% of fit time)"
            )


def full_parameters(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """A context in which rank zero sees whole weights and gradients (FSDP gathers them; others need nothing)."""
    from doran_lightning.sharding import gathered_parameters, is_fsdp_v1, is_sharded

    backbone = trainer.lightning_module.backbone
    if is_sharded(backbone):  # FSDP2 (ModelParallelStrategy)
        return gathered_parameters(backbone, keep=trainer.is_global_zero)
    if is_fsdp_v1(trainer.strategy, trainer.world_size):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # with_grads needs use_orig_params=True, which Lightning's FSDPStrategy sets by default.
        return FullyShardedDataParallel.summon_full_params(
            trainer.strategy.model, writeback=False, rank0_only=True, with_grads=True)
    return contextlib.nullcontext()


def _write_histograms(logger: TensorBoardLogger, histograms: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    for projection, values in histograms.items():
        for name, tensor in values.items():
            logger.experiment.add_histogram(histogram_tag(name, projection), tensor.detach().float().cpu(), step)
