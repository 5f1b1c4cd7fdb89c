"""A TensorBoard dashboard for one run: every layer of a statistic on one chart, plus heat-map images.

At the first statistics step of a fit (the first optimiser step) `StabilityDashboard` writes a
custom-scalars layout (TensorBoard's CUSTOM SCALARS tab)
through the `TensorBoardLogger`'s `SummaryWriter`:

- "training": loss (train and val), the evaluation metrics with ``hp_metric``, learning rate,
  global grad norm with the non-finite step count, and the alarm counts;
- "adapter statistics (every layer)": one multi-line chart per statistic holding every projection
  and the aggregate (σ, ΔM, ΔD, min denominator, update ratio, adapter grad norm) — six charts
  whether the model has 4 adapted projections or 64, because the entries are regular expressions;
- "q vs v": when the adapted projections are of several kinds (``q`` and ``v``, ``query`` and
  ``value``, ``q_proj`` and ``v_proj``), σ, ΔM, ΔD and min denominator per kind, side by side.

Every ``heatmap_every_n_stats`` statistics steps (and at the end of fit) it also logs a
projection × step heat map of σ, ΔM and ΔD as images (``heatmap/<statistic>``), rendered with
matplotlib's Agg canvas from the statistics the `AdapterStatisticsLogger` already computed.
"""

from __future__ import annotations

import re
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from doran_lightning import tags
from doran_lightning.callbacks import StatisticsConsumer
from doran_lightning.stability import natural_key  # one ordering of layer names everywhere

Layout = dict[str, dict[str, list[Any]]]
# Statistics that get a q-vs-v comparison: the ones that tell whether one projection kind drifts.
_COMPARED = ("sigma", "delta_m", "delta_d", "denominator_min", "radial_gain")
# At most this many steps per heat map: older columns are thinned so rendering stays cheap.
_MAX_COLUMNS = 200


def _all_under(prefix: str) -> str:
    return f"^{re.escape(prefix)}/"


def projection_kinds(projections: list[str]) -> list[str]:
    """Last name component of each projection, in first-seen order (``q``, ``v`` or ``query``, ``value``)."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in projections))


def dashboard_layout(projections: list[str]) -> Layout:
    """The custom-scalars layout for a model whose adapted projections are ``projections``."""
    training = {
        "loss (train, val)": ["Multiline", [f"^{re.escape(tags.TRAIN_LOSS)}$", f"^{re.escape(tags.VAL_LOSS)}$"]],
        "validation and test metric, hp_metric (best val)": [
            "Multiline", [r"^(val|test)/(?!loss$)", f"^{re.escape(tags.HP_METRIC)}$"]],
        "learning rate": ["Multiline", [f"^{re.escape(tags.TRAIN_LR)}$"]],
        "global grad norm, non-finite steps": [
            "Multiline", [f"^{re.escape(tags.TRAIN_GRAD_NORM)}$", f"^{re.escape(tags.TRAIN_NONFINITE_STEPS)}$"]],
        "stability alarms (count per kind)": ["Multiline", [_all_under("alarm")]],
        "recovered episodes (count per kind)": ["Multiline", [_all_under("episode")]],
    }
    every_layer = {f"{stat.symbol} ({stat.prefix}), every layer": ["Multiline", [_all_under(stat.prefix)]]
                   for stat in tags.STATISTICS}
    layout: Layout = {"training": training, "adapter statistics (every layer)": every_layer}
    kinds = projection_kinds(projections)
    if len(kinds) > 1:
        compared = {}
        for key in _COMPARED:
            stat = tags.STATISTIC_BY_KEY[key]
            for kind in kinds:
                compared[f"{stat.symbol}: {kind}"] = [
                    "Multiline", [f"^{re.escape(stat.prefix)}/.*\\.{re.escape(kind)}$"]]
        layout[" vs ".join(kinds)] = compared
    return layout


def heatmap_image(title: str, projections: list[str], steps: list[int], matrix: np.ndarray) -> np.ndarray:
    """An RGB image (H, W, 3 uint8) of ``matrix`` (projections × steps), projections top to bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from doran_lightning.report.figures import draw_heatmap  # the report's σ figure uses the same drawer

    height = 1.4 + 0.14 * len(projections)
    fig = Figure(figsize=(7, min(height, 12)), dpi=72, layout="constrained")
    FigureCanvasAgg(fig)
    draw_heatmap(fig.subplots(), title, projections, steps, matrix)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class StabilityDashboard(StatisticsConsumer, pl.Callback):
    """Writes the custom-scalars layout at fit start and the heat-map images during training.

    Args:
        heatmap_every_n_stats: an image every this many statistics steps (and one at the end of fit);
            0 writes no images.
    """

    def __init__(self, heatmap_every_n_stats: int = 10) -> None:
        if heatmap_every_n_stats < 0:
            raise ValueError(f"heatmap_every_n_stats must be >= 0, got {heatmap_every_n_stats}")
        self.heatmap_every_n_stats = heatmap_every_n_stats
        self.seconds_spent = 0.0
        self._history: dict[str, dict[str, dict[int, float]]] = {}  # prefix -> projection -> step -> value
        self._received = 0
        self._last_drawn = -1
        self._last_step = -1
        self._layout_written = False

    @staticmethod
    def _writers(trainer: pl.Trainer) -> list[Any]:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layout_written = False

    def consume_adapter_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                                   stats: dict[str, dict[str, float]]) -> None:
        """Writes the layout once; collects σ, ΔM, ΔD per projection and draws the heat maps."""
        if not self._layout_written:
            # From the statistics themselves: the chart entries match the projection names exactly as
            # logged, with no extra statistics pass (nor, under FSDP, an extra gather) at fit start.
            for writer in self._writers(trainer):
                writer.add_custom_scalars(dashboard_layout(list(stats)))
            self._layout_written = True
        if not self.heatmap_every_n_stats:
            return
        for projection, values in stats.items():
            for prefix in tags.HEATMAP_STATISTICS:
                key = tags.STATISTIC_BY_PREFIX[prefix].key
                if key in values:
                    self._history.setdefault(prefix, {}).setdefault(projection, {})[step] = values[key]
        self._received += 1
        self._last_step = step
        if (self._received - 1) % self.heatmap_every_n_stats == 0 and self._received > 1:
            self.draw(trainer, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap_every_n_stats and self._last_step > self._last_drawn:
            self.draw(trainer, self._last_step)

    def draw(self, trainer: pl.Trainer, step: int) -> None:
        """Log one heat map per collected statistic at ``step``."""
        writers = self._writers(trainer)
        if not writers or not self._history:
            return
        started = time.perf_counter()
        for prefix, per_projection in self._history.items():
            projections = sorted(per_projection, key=natural_key)
            steps = sorted({s for values in per_projection.values() for s in values})
            if len(steps) > _MAX_COLUMNS:
                steps = steps[:: -(-len(steps) // _MAX_COLUMNS)]
            matrix = np.array([[per_projection[p].get(s, np.nan) for s in steps] for p in projections])
            stat = tags.STATISTIC_BY_PREFIX[prefix]
            image = heatmap_image(f"{stat.symbol} per projection (step {step})", projections, steps, matrix)
            for writer in writers:
                writer.add_image(tags.heatmap_tag(prefix), image, step, dataformats="HWC")
        self._last_drawn = step
        self.seconds_spent += time.perf_counter() - started
