"""A TensorBoard dashboard that stays readable and loads quickly with many runs: a chart per statistic first,
per-layer charts one click away, heat-map images per run.

At the first statistics step of a fit (the first optimiser step) `StabilityDashboard` writes a
custom-scalars layout (TensorBoard's CUSTOM SCALARS tab) through the `TensorBoardLogger`'s `SummaryWriter`
(`dashboard_layout`). TensorBoard draws every selected run's series of a chart in that chart, so each chart holds
one statistic or one layer across runs (as many lines as runs) or, with one run selected in the run selector, one
run's layers (the "select one run" categories). Open at first (a request per run and chart, docs/LOGGING.md):

- "training": loss (train and val) first, the evaluation metrics with ``hp_metric``, learning rate, global grad
  norm with the non-finite step count;
- "stability": one chart per statistic's aggregate over layers (σ mean, ΔM mean, …), the running count of every
  alarm kind on one chart, and the recovered episodes.

Collapsed at first: "stability alarms", one chart per alarm kind; and, each named after the backbone so that two
backbones' layers never share a chart:

- per statistic (σ, ΔM, ΔD, min denominator, radial gain, update ratio, adapter grad norm): the aggregate and
  one chart per adapted projection;
- "every layer of a statistic": one chart per statistic with every projection (one run at a time);
- "q vs v": when the adapted projections are of several kinds (``q`` and ``v``, ``query`` and
  ``value``, ``q_proj`` and ``v_proj``), σ, ΔM, ΔD, min denominator and radial gain per kind.

A statistic constant by construction (the radial gain with ``detach_norm: true``, `constant_statistics`) gets
no chart and no heat map; its scalars are still logged (a contract; `report` reads them).

Every ``heatmap_every_n_stats`` statistics steps (and at the end of fit) it also logs a
projection × step heat map of σ, ΔM, ΔD and the radial gain as images (``heatmap/<statistic>``): one run's layers
at a glance, rendered with matplotlib's Agg canvas from the statistics the `AdapterStatisticsLogger` already
computed.
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
HEATMAP_WIDTH_IN, HEATMAP_FONT_PT = 4.2, 10  # 302 px at 72 dpi


def _all_under(prefix: str) -> str:
    return f"^{re.escape(prefix)}/"


def _exactly(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def _one_of(*tags_: str) -> str:
    return "^(" + "|".join(re.escape(tag) for tag in tags_) + ")$"


def projection_kinds(projections: list[str]) -> list[str]:
    """Last name component of each projection, in first-seen order (``q``, ``v`` or ``query``, ``value``)."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in projections))


# Category titles. TensorBoard draws every selected run's series of a chart in it (the legend names run and tag),
# so with many runs a chart holds either one statistic or layer across runs or, with one run selected, one run's layers.
TRAINING = "training"
STATISTICS = "stability: a chart per statistic, the alarm counts (a line per run; per layer and per kind below)"
ALARMS = "stability alarms (one chart per kind, a line per run)"
EVERY_LAYER = "every layer of a statistic (select one run)"
# Open at first: what fits on a screen with many runs (one request per run and chart). The per-layer categories
# are one click away: TensorBoard fetches a category's charts when it is opened (docs/LOGGING.md, load time).
OPEN_CATEGORIES = (TRAINING, STATISTICS)


def _of(backbone: str | None) -> str:
    return f" of {backbone}" if backbone else ""


def per_layer_category(stat: tags.Statistic, backbone: str | None = None) -> str:
    return f"{stat.symbol} ({stat.prefix}) per layer{_of(backbone)} (a line per run)"


def every_layer_category(backbone: str | None = None) -> str:
    return EVERY_LAYER if not backbone else f"every layer of a statistic{_of(backbone)} (select one run)"


def constant_statistics(detach_norm: bool, rescales: bool) -> tuple[str, ...]:
    """Statistics constant by construction, which get no chart: the radial gain σ/(‖V‖+σ) is 1 at every step when
    the norm is detached (METHOD.md §2), and is not logged without a magnitude."""
    return ("radial_gain",) if detach_norm or not rescales else ()


def _any_of(prefix: str, names: list[str]) -> str:
    """A regex matching ``prefix/<name>`` for exactly these names: a chart never takes another backbone's layers."""
    return _one_of(*(f"{prefix}/{name}" for name in names))


def dashboard_layout(projections: list[str], backbone: str | None = None, constant: tuple[str, ...] = (),
                     logged: set[str] | None = None) -> Layout:
    """The custom-scalars layout for a model (`backbone`) whose adapted projections are ``projections``.

    Open at first (`OPEN_CATEGORIES`):
    - training: loss first, metric with hp_metric, lr, grad norm (one line per run and tag);
    - stability: one chart per statistic's aggregate over layers (a line per run), every alarm kind's running
      count on one chart, the recovered episodes.
    Closed at first (`closed_categories`):
    - alarms: one chart per alarm kind, its running count over steps (a line per run).
    Also closed, named after the backbone so two backbones' layers never share one:
    - per statistic, one chart per layer and one for the aggregate: that layer across runs;
    - every layer of a statistic on one chart: for one run at a time;
    - q vs v (several projection kinds): each kind's layers per statistic.
    Statistics in `constant` (`constant_statistics`), or not in `logged` (statistic keys; None: every one), get no
    chart: LoRA logs no σ, so a LoRA run's layout has no σ charts.
    """
    # One regex per chart: TensorBoard asks the server once per run and regex.
    training = {
        "loss (train, val)": ["Multiline", [_one_of(tags.TRAIN_LOSS, tags.VAL_LOSS)]],
        "validation and test metric, hp_metric (best val)": [
            "Multiline", [rf"^((val|test)/(?!loss$).*|{re.escape(tags.HP_METRIC)}$)"]],
        "learning rate": ["Multiline", [_exactly(tags.TRAIN_LR)]],
        "global grad norm, non-finite steps": ["Multiline", [_one_of(tags.TRAIN_GRAD_NORM, tags.TRAIN_NONFINITE_STEPS)]],
    }
    shown = [stat for stat in tags.STATISTICS if stat.key not in constant and (logged is None or stat.key in logged)]
    statistics = {f"{stat.symbol}: {stat.aggregate} of layers": ["Multiline", [_exactly(stat.aggregate_tag)]]
                  for stat in shown if stat.aggregate_tag}
    # Every alarm kind on one chart (a line per run and kind: flat at 0 until one fires, the legend names it), and
    # loss spikes the run came back from (alarms.py): counted beside the alarms, never one of them.
    statistics["alarms: every kind (running count)"] = [
        "Multiline", [_one_of(*(tags.alarm_tag(kind) for kind in tags.ALARM_KINDS))]]
    statistics["recovered episodes (count per kind)"] = ["Multiline", [_all_under("episode")]]
    alarms = {f"alarms: {kind}": ["Multiline", [_exactly(tags.alarm_tag(kind))]] for kind in tags.ALARM_KINDS}
    layout: Layout = {TRAINING: training, STATISTICS: statistics, ALARMS: alarms}
    ordered = sorted(projections, key=natural_key)
    for stat in shown:
        charts = {f"{stat.symbol}: {stat.aggregate} of layers": ["Multiline", [_exactly(stat.aggregate_tag)]]} \
            if stat.aggregate_tag else {}
        charts.update({f"{stat.symbol}: {name}": ["Multiline", [_exactly(stat.tag(name))]] for name in ordered})
        layout[per_layer_category(stat, backbone)] = charts
    layout[every_layer_category(backbone)] = {
        f"{stat.symbol} ({stat.prefix}), every layer": ["Multiline", [_any_of(stat.prefix, ordered)]] for stat in shown}
    kinds = projection_kinds(projections)
    if len(kinds) > 1:
        compared = {}
        for key in _COMPARED:
            if key not in {stat.key for stat in shown}:
                continue
            stat = tags.STATISTIC_BY_KEY[key]
            for kind in kinds:
                of_kind = [name for name in ordered if name.rpartition(".")[2] == kind]
                compared[f"{stat.symbol}: {kind}"] = ["Multiline", [_any_of(stat.prefix, of_kind)]]
        layout[" vs ".join(kinds) + f"{_of(backbone)} (select one run)"] = compared
    return layout


def closed_categories(layout: Layout) -> set[str]:
    """Categories shown collapsed: the per-layer and one-run views (many charts, or many lines per chart)."""
    return {title for title in layout if title not in OPEN_CATEGORIES}


def layout_summary(layout: Layout) -> Any:
    """The custom-scalars summary of `layout` (torch's), with `closed_categories` collapsed."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    summary = custom_scalars(layout)
    value = summary.value[0]
    parsed = layout_pb2.Layout()
    parsed.ParseFromString(value.tensor.string_val[0])
    closed = closed_categories(layout)
    for category in parsed.category:
        category.closed = category.title in closed
    value.tensor.string_val[0] = parsed.SerializeToString()
    return summary


def write_layout(writer: Any, layout: Layout) -> None:
    """`writer.add_custom_scalars(layout)`, with the one-run categories collapsed where the writer allows it."""
    file_writer = getattr(writer, "_get_file_writer", None)  # SummaryWriter's own path for add_custom_scalars
    if file_writer is None:
        writer.add_custom_scalars(layout)
        return
    file_writer().add_summary(layout_summary(layout))


def heatmap_image(title: str, projections: list[str], steps: list[int], matrix: np.ndarray) -> np.ndarray:
    """An RGB image (H, W, 3 uint8) of ``matrix`` (projections × steps), projections top to bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from doran_lightning.report.figures import draw_heatmap  # the report's σ figure uses the same drawer

    # TensorBoard shows an image at the width of its card (about 280-300 px at its default size): a figure that
    # narrow, with 10-pt text, keeps every label readable without "Show actual image size".
    height = 1.5 + 0.2 * len(projections)
    fig = Figure(figsize=(HEATMAP_WIDTH_IN, min(height, 14)), dpi=72, layout="constrained")
    FigureCanvasAgg(fig)
    draw_heatmap(fig.subplots(), title, projections, steps, matrix, fontsize=HEATMAP_FONT_PT)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def model_facts(pl_module: Any) -> tuple[str | None, tuple[str, ...]]:
    """The backbone's short name (``vit_tiny_patch16_224``, ``all-MiniLM-L6-v2``) and `constant_statistics`."""
    name = getattr(getattr(pl_module, "backbone_config", None), "name", None)
    adapter = getattr(pl_module, "adapter_config", None)
    constant = constant_statistics(adapter.detach_norm, adapter.use_magnitude) if adapter is not None else ()
    return (str(name).rstrip("/").rsplit("/", 1)[-1] or None) if name else None, constant


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
        self._constant: tuple[str, ...] = ()  # statistics constant by construction in this fit: no chart, no image

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
            backbone, self._constant = model_facts(pl_module)
            for writer in self._writers(trainer):
                logged = {key for values in stats.values() for key in values}
                write_layout(writer, dashboard_layout(list(stats), backbone, self._constant, logged))
            self._layout_written = True
        if not self.heatmap_every_n_stats:
            return
        for projection, values in stats.items():
            for prefix in tags.HEATMAP_STATISTICS:
                key = tags.STATISTIC_BY_PREFIX[prefix].key
                if key in values and key not in self._constant:
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
            image = heatmap_image(f"{stat.symbol} (step {step})", projections, steps, matrix)
            for writer in writers:
                writer.add_image(tags.heatmap_tag(prefix), image, step, dataformats="HWC")
        self._last_drawn = step
        self.seconds_spent += time.perf_counter() - started
