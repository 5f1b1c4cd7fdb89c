"""Every name this package writes to the loggers, in one place (docs/LOGGING.md "What is logged" is rendered from it).

The module, the statistics callback, the dashboard, the alarms, the run summary and `report` import
their tag names from here, so a rename cannot silently empty a figure or a chart. Shipped names are
a public contract: add new ones, never rename old ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ---------------------------------------------------------------- training and evaluation scalars
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_NONFINITE_STEPS = "train/nonfinite_steps"
VAL_LOSS = "val/loss"
HP_METRIC = "hp_metric"


# Per test example, beside a test stage's metrics (test_predictions.TestPredictionRecorder writes, report reads).
TEST_PREDICTIONS = "predictions.csv"
TEST_PREDICTION_COLUMNS = ("index", "target", "prediction")


def stage_tag(stage: str, name: str) -> str:
    """``val/accuracy``, ``test/matthews``, ``val/loss``: an evaluation stage's scalar."""
    return f"{stage}/{name}"


# The metric shown in the progress bar, summarised as hp_metric and named in the run summary, per
# `model.metric` setting. Every one of them is "higher is better".
PRIMARY_METRIC = {
    "accuracy": "accuracy",
    "matthews": "matthews",
    "pearson_spearman": "pearson",
    "f1_accuracy": "f1",
    "generation_accuracy": "accuracy",
}


# ---------------------------------------------------------------- per-projection statistics
@dataclass(frozen=True)
class Statistic:
    """One per-projection statistic: its key in `adapters.adapter_statistics` and how it is logged."""

    key: str
    prefix: str
    symbol: str
    aggregate: Literal["mean", "min"] | None = None

    def tag(self, projection: str) -> str:
        return f"{self.prefix}/{projection}"

    @property
    def aggregate_tag(self) -> str | None:
        return f"{self.prefix}/{self.aggregate}" if self.aggregate else None


STATISTICS: tuple[Statistic, ...] = (
    Statistic("sigma", "sigma", "σ", "mean"),
    Statistic("delta_m", "delta_m", "ΔM", "mean"),
    Statistic("delta_d", "delta_d", "ΔD", "mean"),
    Statistic("denominator_min", "denominator_min", "min ‖V‖+σ", "min"),
    Statistic("radial_gain", "radial_gain", "radial gain σ/(‖V‖+σ)", "mean"),
    Statistic("update_ratio", "update_ratio", "‖sBA‖/‖W0‖"),
    Statistic("grad_norm", "adapter_grad_norm", "adapter grad norm"),
)
STATISTIC_BY_KEY = {stat.key: stat for stat in STATISTICS}
STATISTIC_BY_PREFIX = {stat.prefix: stat for stat in STATISTICS}
# Suffixes of the aggregate tags, which are not projection names (``sigma/mean``).
AGGREGATE_SUFFIXES = ("mean", "min", "max")
HISTOGRAM_CADENCE_FACTOR = 10  # histograms default to every 10th statistics step (callbacks.histogram_cadence)


def histogram_tag(name: str, projection: str) -> str:
    return f"hist/{name}/{projection}"


# ---------------------------------------------------------------- dashboard images and alarms
HEATMAP_STATISTICS = ("sigma", "delta_m", "delta_d", "radial_gain")


def heatmap_tag(prefix: str) -> str:
    """Image tag of the layer-by-step heat map of one statistic (``heatmap/sigma``)."""
    return f"heatmap/{prefix}"


ALARM_KINDS = ("denominator", "sigma_collapse", "sigma_explosion", "loss_spike", "grad_jump", "collapse")
ALARM_TEXT = "alarms"


def alarm_tag(kind: str) -> str:
    if kind not in ALARM_KINDS:
        raise ValueError(f"unknown alarm kind {kind!r}; expected one of {', '.join(ALARM_KINDS)}")
    return f"alarm/{kind}"


EPISODE_KINDS = ("loss_spike",)  # conditions that recovered by themselves: counted and shown, not alarmed


def episode_tag(kind: str) -> str:
    if kind not in EPISODE_KINDS:
        raise ValueError(f"unknown episode kind {kind!r}; expected one of {', '.join(EPISODE_KINDS)}")
    return f"episode/{kind}"


# ---------------------------------------------------------------- the docs/LOGGING.md table
@dataclass(frozen=True)
class LoggedName:
    """One row of the "What is logged" table in docs/LOGGING.md."""

    names: tuple[str, ...]
    when: str
    what: str


_STATS_WHEN = "every `stats_every_n_steps` (default `log_every_n_steps`)"

LOGGED: tuple[LoggedName, ...] = (
    LoggedName((TRAIN_LOSS, TRAIN_LR), "every step (written every `log_every_n_steps`)",
               "training loss, learning rate of the first group"),
    LoggedName((TRAIN_GRAD_NORM,), "every step", "global L2 norm of the gradients of all trainable tensors"),
    LoggedName((TRAIN_NONFINITE_STEPS,), "every step", "steps skipped because the loss or a gradient was NaN/Inf"),
    LoggedName((VAL_LOSS, "val/<metric>", "test/<metric>"), "every epoch / test",
               "`accuracy` (the fraction of correct predictions, as `predictions.csv` counts it) and "
               "`balanced_accuracy` (mean per-class recall: what `accuracy` logged before issue 40), or the task's "
               "official metric (`matthews`, `pearson`+`spearman`, `f1`+`accuracy`); "
               "`perplexity` and per-subset `accuracy/<set>` for causal LM"),
    LoggedName((HP_METRIC,), "every validation",
               "best `val/<metric>` so far (the first of the task's metrics: accuracy, matthews, pearson, f1); "
               "the HPARAMS tab compares runs by it"),
    LoggedName(("sigma/<projection>",), _STATS_WHEN,
               "σ of the projection (mean over rows with `noise_granularity: row`)"),
    LoggedName(("delta_m/<projection>",), "same", "ΔM = mean\\|m − m0\\| (DoRA's magnitude change)"),
    LoggedName(("delta_d/<projection>",), "same", "ΔD = mean(1 − cos(V_i, W0_i)) (DoRA's direction change)"),
    LoggedName(("denominator_min/<projection>",), "same",
               "min over rows of ‖V‖_row + σ — how close the norm's denominator came to zero"),
    LoggedName(("radial_gain/<projection>",), "same",
               "mean over rows of σ/(‖V‖_row + σ), the norm in the gradient path (1 with `detach_norm: true`, "
               "0 for non-detached DoRA): where the layer's step sits between DoRA's projection (0) and LoRA's (1)"),
    LoggedName(("update_ratio/<projection>",), "same", "‖sBA‖_F / ‖W0‖_F"),
    LoggedName(("adapter_grad_norm/<projection>",), "same",
               "gradient norm of the projection's own tensors (m, σ, static A/B)"),
    LoggedName(tuple(stat.aggregate_tag for stat in STATISTICS if stat.aggregate_tag), "same",
               "aggregates over all adapted projections"),
    LoggedName((histogram_tag("magnitude", "<projection>"), histogram_tag("denominator", "<projection>")),
               f"every `histogram_every_n_steps` (default {HISTOGRAM_CADENCE_FACTOR}× the stats cadence)", "histograms of m and of ‖V‖_row + σ"),
    LoggedName((heatmap_tag("<statistic>"),), "every `heatmap_every_n_stats` statistics steps (default 10) and at the end",
               "image: projection × step heat map of " + ", ".join(f"`{name}`" for name in HEATMAP_STATISTICS)
               + " (not drawn where it is constant by construction: `detach_norm: true`)"),
    LoggedName(("alarm/<kind>",), "when an alarm fires (0 at the start)",
               "running count of stability alarms: " + ", ".join(f"`{kind}`" for kind in ALARM_KINDS)),
    LoggedName((ALARM_TEXT,), "when an alarm fires", "text: the alarm's one-line message (step, layer, value, threshold)"),
    LoggedName(("episode/<kind>",), "when a loss spike has recovered (0 at the start)",
               "running count of recovered episodes (not alarms): " + ", ".join(f"`{kind}`" for kind in EPISODE_KINDS)),
)


def markdown_table() -> str:
    """The "What is logged" table of docs/LOGGING.md, rendered from `LOGGED`."""
    lines = ["| tag | when | what |", "|---|---|---|"]
    for row in LOGGED:
        lines.append(f"| {', '.join(f'`{name}`' for name in row.names)} | {row.when} | {row.what} |")
    return "\n".join(lines)
