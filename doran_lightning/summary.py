"""The run summary: `hp_metric` = best validation metric, and a short table at the end of fit / test.

The table names the best and last validation metric, the test metric when a test ran, the stability
verdict (alarms, non-finite steps, max global grad norm), the run folder and the exact
``tensorboard --logdir …`` line to look at it, and the TensorBoard address that opens Scalars on the loss.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from doran_lightning import tags
from doran_lightning.console import say
from doran_lightning.stability import at_chance


TENSORBOARD_URL = "http://localhost:6006/"  # tensorboard's default port


def scalars_url(metric: str) -> str:
    """TensorBoard's Scalars (time series) view with the losses and the validation metric pinned above the
    per-layer cards, which it would otherwise open on (its groups sort by name: ``adapter_grad_norm`` first)."""
    pinned = [{"plugin": "scalars", "tag": tag} for tag in (tags.TRAIN_LOSS, tags.VAL_LOSS, tags.stage_tag("val", metric))]
    return f"{TENSORBOARD_URL}?pinnedCards=" + quote(json.dumps(pinned, separators=(",", ":")), safe="[]{}:,/") \
        + "#timeseries"


def _shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (what a user would type)."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(absolute)


class RunSummary(pl.Callback):
    """Tracks the primary validation metric, logs it as ``hp_metric`` and prints the summary table.

    The table is printed when `fit` is torn down (after the progress bar's last line) and at the
    end of a test. With `defer_to_test` (the CLI's ``--test_after_fit``) neither prints: the CLI
    calls `print` once, after the test, so the one table holds the test metric.
    """

    def __init__(self) -> None:
        self.defer_to_test = False
        self.best: float | None = None
        self.best_step: int | None = None
        self.last: float | None = None
        self.test: float | None = None
        self._fitted = False
        self._tested = False

    @staticmethod
    def metric_name(pl_module: pl.LightningModule) -> str:
        return tags.PRIMARY_METRIC.get(getattr(pl_module.hparams, "metric", "accuracy"), "accuracy")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning has computed the epoch's metrics (they are not final in on_validation_epoch_end).
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(tags.stage_tag("val", self.metric_name(pl_module)))
        if value is None:
            return
        self.last = float(value)
        if math.isfinite(self.last) and (self.best is None or self.last > self.best):
            self.best, self.best_step = self.last, trainer.global_step
        if self.best is not None:
            for logger in trainer.loggers:
                logger.log_metrics({tags.HP_METRIC: self.best}, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run of fewer optimizer steps than `log_every_n_steps` wrote no train/loss at all (Lightning writes at
        # steps n-1, 2n-1, …): `report` and the sweeps then had nothing to judge it by. Write its last loss.
        loss = trainer.callback_metrics.get(tags.TRAIN_LOSS)
        if 0 < trainer.global_step < trainer.log_every_n_steps and loss is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({tags.TRAIN_LOSS: float(loss)}, step=trainer.global_step - 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitted = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After Lightning's own lines (a test's metric table is printed after on_test_end).
        ended = self._fitted if stage == "fit" else self._tested if stage == "test" else False
        if ended and not self.defer_to_test:
            self.print(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(tags.stage_tag("test", self.metric_name(pl_module)))
        self.test = float(value) if value is not None else None
        self._tested = True

    def print(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            say(self.table(trainer, pl_module))

    def table(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The summary as aligned text lines."""
        name = self.metric_name(pl_module)
        rows: list[tuple[str, str]] = []
        if self._fitted:
            best = "–" if self.best is None else f"{self.best:.4f} (step {self.best_step})"
            rows += [(f"best val/{name}", best), (f"last val/{name}", "–" if self.last is None else f"{self.last:.4f}")]
        if self.test is not None:
            rows.append((f"test/{name}", f"{self.test:.4f}"))
        if self._fitted:
            rows.append(("stability", self.verdict(trainer, pl_module, self.last)))
        # The logger's own folder, not trainer.log_dir: that one broadcasts, and only rank zero is here.
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None)
        if log_dir is not None:
            rows.append(("run folder", _shown_path(log_dir)))
            root = getattr(logger, "root_dir", None) or log_dir
            rows.append(("look at it", f"tensorboard --logdir {shlex.quote(_shown_path(root))}"))
            rows.append(("loss first", scalars_url(name)))
        width = max(len(label) for label, _ in rows)
        variant = getattr(getattr(pl_module, "adapter_config", None), "variant", None)
        title = "Run summary" + (f" — {variant}" if variant else "")
        return "\n".join([title] + [f"  {label:<{width}}  {value}" for label, value in rows])

    @classmethod
    def verdict(cls, trainer: pl.Trainer, pl_module: pl.LightningModule, last: float | None = None) -> str:
        """"stable" or "N alarm(s)", then the non-finite steps and the max global grad norm.

        A run whose last validation metric `last` is at chance is never called stable, alarms or not.
        """
        from doran_lightning.alarms import StabilityAlarms

        watchers = [callback for callback in trainer.callbacks if isinstance(callback, StabilityAlarms)]
        alarms = [alarm for callback in watchers for alarm in callback.alarms]
        from doran_lightning.nonfinite import NonFiniteGuard

        guard = next((callback for callback in trainer.callbacks if isinstance(callback, NonFiniteGuard)), None)
        nonfinite = guard.nonfinite_steps if guard is not None else 0
        max_grad = guard.max_grad_norm if guard is not None else None
        counts = {kind: sum(callback.counts()[kind] for callback in watchers) for kind in tags.ALARM_KINDS}
        counts = {kind: count for kind, count in counts.items() if count}
        name = cls.metric_name(pl_module)
        ended_at_chance = at_chance(name, last, getattr(pl_module.hparams, "num_classes", None))
        head = "stable, no alarms" if not alarms and not nonfinite and not ended_at_chance else (
            f"{len(alarms)} alarm(s)" + (f" ({', '.join(f'{k} ×{n}' for k, n in counts.items())})" if counts else ""))
        if ended_at_chance:
            head = f"ended at chance (last val/{name} {last:.4f}); {head}"
        episodes = [episode for callback in watchers for episode in callback.episodes]
        parts = [head, *([f"{len(episodes)} recovered loss-spike episode(s), not alarms"] if episodes else []),
                 f"{nonfinite} non-finite step(s)",
                 f"max grad norm {max_grad:.3g}" if max_grad is not None else "max grad norm –"]
        lines = ["; ".join(parts)]
        lines += [f"    {alarm.message()}" for alarm in alarms[:5]]
        if len(alarms) > 5:
            lines.append(f"    … {len(alarms) - 5} more (TensorBoard text tab, tag '{tags.ALARM_TEXT}')")
        return "\n".join(lines)


def run_hparams(module: Any) -> dict[str, Any]:
    """Flat hyperparameters and parameter counts of a DoranModule, logged to every logger."""
    from doran_lightning.adapters import count_parameters

    cfg, hp = module.adapter_config, module.hparams
    counts = count_parameters(module.backbone)
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    seed = getattr(datamodule, "seed", None)
    return {
        "method": cfg.method, "variant": cfg.variant, "noise": cfg.use_noise, "aux": cfg.use_aux,
        "r": cfg.r, "alpha": cfg.alpha, "lr": hp.lr, "weight_decay": hp.weight_decay, "aux_lr": hp.aux_lr,
        "aux_weight_decay": hp.aux_weight_decay, "sigma_lr": hp.sigma_lr,
        "fraction": getattr(datamodule, "fraction", 1.0),
        "seed": seed if seed is not None else os.environ.get("PL_GLOBAL_SEED"),
        "backbone": module.backbone_config.name, "task": hp.task, "metric": hp.metric, "num_classes": hp.num_classes,
        "params/trainable": counts["trainable"], "params/total": counts["total"],
        "params/adapter": counts["adapter"], "params/aux": counts["aux"], "params/head": counts["other_trainable"],
    }


def announce_run(module: Any) -> None:
    """Print the parameter counts and log the run's hyperparameters (at the start of fit, or of a lone test)."""
    hparams = run_hparams(module)
    say(
        f"{hparams['variant']} on {hparams['backbone']}: trainable {hparams['params/trainable']:,} of "
        f"{hparams['params/total']:,} parameters (adapters {hparams['params/adapter']:,}, "
        f"aux {hparams['params/aux']:,}, head {hparams['params/head']:,})"
    )
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            # Declares hp_metric for the HPARAMS tab without Lightning's -1 placeholder value;
            # RunSummary logs the best validation metric under it after every validation.
            logger.log_hyperparams(hparams, metrics={tags.HP_METRIC: float("nan")})
        else:
            logger.log_hyperparams(hparams)
