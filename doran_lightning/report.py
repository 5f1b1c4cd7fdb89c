"""`python -m doran_lightning report`: stability and sample-efficiency evidence from TensorBoard runs.

Reads the event files of one or many runs with TensorBoard's own ``EventAccumulator``, groups the
runs by method variant (lora, dora, doran, doran-noise, doran-aux) and by the hparams that differ
between runs (fraction, lr, r), treating seeds as replicates, and writes PNG figures plus
``summary.md`` / ``summary.json`` into ``--out``, including the stability alarms each run fired during
training. Runs are named relative to the folders given on the command line, and footers show the
command without the absolute prefix of folders outside the working directory.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import re
import shlex
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from doran_lightning.outputs import OutputExistsError, check_output_folder, staged_folder
from doran_lightning import tags
from doran_lightning.adapters.config import AUX_SCOPES, NOISE_MODES, AdapterConfig

VARIANTS = ("lora", "dora", "doran", "doran-noise", "doran-aux", "doran-fixed", "doran-gaussian", "doran-model")
# Hparams that split runs into separate conditions when they differ; seeds are replicates.
CONDITION_KEYS = ("fraction", "lr", "r", "optimizer", "detach_norm", "sigma_scale", "sigma_init")
# Keys that are the x-axis or the cell of a table rather than part of a setting's name.
AXIS_KEYS = ("fraction", "lr")
# The lr-sensitivity table: the lr range whose mean metric stays within this of the setting's best.
LR_RANGE_TOLERANCE = 0.01  # one point of accuracy
# Preferred validation metric tags, in order, when --metric is not given.
METRIC_PRIORITY = ("accuracy", "matthews", "pearson_spearman", "pearson", "spearman", "f1", "generation_accuracy")
# Lookup names per hparam, first match wins; nested keys are matched by their last component.
HPARAM_ALIASES = {
    "variant": ("variant",),
    "method": ("method",),
    "noise": ("noise",),
    "aux": ("aux",),
    "fraction": ("fraction",),
    "seed": ("seed", "seed_everything"),
    "lr": ("lr", "learning_rate"),
    "r": ("r", "rank"),
}
SIGMA, DELTA_M, DELTA_D, RADIAL_GAIN = (tags.STATISTIC_BY_KEY[key] for key in ("sigma", "delta_m", "delta_d", "radial_gain"))
# A variant label in a folder name: lora, dora, or doran with any ablation suffixes (AdapterConfig.variant).
_VARIANT_IN_PATH = re.compile(r"(?<![a-z])(doran(?:[-_](?:noise|aux|none|fixed|gaussian|model))*|dora|lora)(?![a-z])",
                              re.IGNORECASE)
# A run diverged when its loss ends non-finite or this many times above where it started.
DIVERGE_FACTOR = 1.5
DIVERGE_WINDOW = 5  # logged steps averaged at the start and at the end
# Loss spike: a loss above SPIKE_FACTOR × the median of the previous SPIKE_WINDOW logged losses.
SPIKE_FACTOR = 2.0
SPIKE_WINDOW = 50
EXIT_USER_ERROR = 2


class ReportError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


@dataclass
class Series:
    """One scalar tag of one run: steps and values (the last value wins for a repeated step)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Run:
    """One run directory (a TensorBoard version dir) with its hparams and scalar series."""

    path: Path
    variant: str
    hparams: dict[str, Any]
    scalars: dict[str, Series]
    warnings: list[str] = field(default_factory=list)
    name: str = ""  # shown in tables: the path relative to the folder given to `report`
    alarm_messages: list[str] = field(default_factory=list)

    def hparam(self, name: str) -> Any:
        return lookup_hparam(self.hparams, name)

    def projections(self, stat: str) -> list[str]:
        """Projection names that carry ``<stat>/<projection>`` tags (aggregates like ``sigma/mean`` excluded)."""
        prefix = f"{stat}/"
        names = [tag[len(prefix):] for tag in self.scalars if tag.startswith(prefix)]
        return sorted((n for n in names if n not in tags.AGGREGATE_SUFFIXES), key=natural_key)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class _TolerantLoader(yaml.SafeLoader):
    """SafeLoader that reads Python-tagged nodes (written by ``yaml.dump`` of objects) as plain data."""


def _construct_untagged(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("", _construct_untagged)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with ``a.b.c`` keys (keys that already hold ``/`` are kept)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def lookup_hparam(hparams: dict[str, Any], name: str) -> Any:
    """Value of a logical hparam (see HPARAM_ALIASES): exact key first, then the shallowest nested key."""
    for alias in HPARAM_ALIASES.get(name, (name,)):
        if alias in hparams:
            return hparams[alias]
        nested = sorted((k for k in hparams if k.endswith(f".{alias}")), key=lambda k: k.count("."))
        if nested:
            return hparams[nested[0]]
    return None


def load_hparams(run_dir: Path) -> dict[str, Any]:
    """Flattened ``hparams.yaml`` beside the event files ({} when there is none)."""
    path = run_dir / "hparams.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    except yaml.YAMLError as error:
        raise ReportError(f"{path}: not valid YAML ({error}); fix or delete the file") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping of hparams, got {type(data).__name__}")
    return flatten(data)


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    return None  # "null"/"None": the method's default applies


def variant_from_hparams(hparams: dict[str, Any]) -> str | None:
    """Method variant label from ``method``/``noise``/``aux``, as ``AdapterConfig.variant`` names it.

    DoRAN's switches default to on; DoRAN with both off is labelled ``doran-none``.
    """
    explicit = lookup_hparam(hparams, "variant")
    if isinstance(explicit, str) and explicit:
        return explicit
    method = lookup_hparam(hparams, "method")
    if method is None:
        return None
    method = str(method).lower()
    if method != "doran":
        return method
    # AdapterConfig.variant is the one labelling rule (ablation suffixes such as -fixed or -model included).
    fields: dict[str, Any] = {"noise": _as_bool(lookup_hparam(hparams, "noise")),
                              "aux": _as_bool(lookup_hparam(hparams, "aux"))}
    for name, choices in (("noise_mode", NOISE_MODES), ("aux_scope", AUX_SCOPES)):
        value = lookup_hparam(hparams, name)
        if value in choices:
            fields[name] = value
    return AdapterConfig(method="doran", **fields).variant


def variant_from_path(run_dir: Path) -> str:
    """Variant named in the path (deepest first), else the experiment dir name (Lightning's ``name``)."""
    for part in reversed(run_dir.parts):
        match = _VARIANT_IN_PATH.search(part)
        if match:
            return match.group(1).lower().replace("_", "-")
    parent = run_dir.parent.name if run_dir.name.startswith("version_") else run_dir.name
    return parent or "unknown"


def find_run_dirs(patterns: Sequence[str]) -> dict[Path, list[Path]]:
    """Run dir -> the dirs whose event files it owns, for every dir/glob given.

    A run dir directly holds ``events.out.tfevents.*`` files. Event dirs nested inside a run dir
    (TensorBoardLogger's ``sub_dir``, e.g. a later ``test`` call) belong to that run.
    """
    run_dirs: set[Path] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise ReportError(f"'{pattern}' matches no file or directory; pass TensorBoard log dirs or a glob")
        for match in map(Path, matches):
            if match.is_file():
                if match.name.startswith("events.out.tfevents"):
                    run_dirs.add(match.parent.resolve())
                continue
            for event_file in match.rglob("events.out.tfevents*"):
                run_dirs.add(event_file.parent.resolve())
    owners: dict[Path, list[Path]] = {}
    for run_dir in sorted(run_dirs, key=lambda p: (len(p.parts), natural_key(str(p)))):
        owner = next((o for o in owners if o in run_dir.parents), None)
        owners.setdefault(owner or run_dir, []).append(run_dir)
    return merge_resumptions(dict(sorted(owners.items(), key=lambda item: natural_key(str(item[0])))))


def resumed_from(run_dir: Path) -> Path | None:
    """The checkpoint a run was resumed from: ``ckpt_path`` in the ``config.yaml`` LightningCLI saved."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        ckpt_path = (yaml.load(config.read_text(encoding="utf-8"), Loader=_TolerantLoader) or {}).get("ckpt_path")
    except (yaml.YAMLError, AttributeError):
        return None
    return Path(ckpt_path).expanduser().resolve() if isinstance(ckpt_path, str) and "/" in ckpt_path else None


def merge_resumptions(owners: dict[Path, list[Path]]) -> dict[Path, list[Path]]:
    """Fold a run resumed from another run's checkpoint into that run: one replicate, later steps win.

    A killed run and its resumption are one training run; counting them twice would double a seed.
    (Only ``fit --ckpt_path=<file>`` runs of the CLI are recognised; ``--ckpt_path=last`` names no file.)
    """
    merged: dict[Path, list[Path]] = {}
    root_of: dict[Path, Path] = {}
    for run_dir, event_dirs in owners.items():
        checkpoint = resumed_from(run_dir)
        parent = next((root_of[o] for o in root_of if checkpoint is not None and o in checkpoint.parents), None)
        if parent is None:
            merged[run_dir] = list(event_dirs)
            root_of[run_dir] = run_dir
        else:
            merged[parent] += event_dirs
            root_of[run_dir] = parent
    return merged


def load_scalars(event_dirs: Sequence[Path]) -> dict[str, Series]:
    """All scalar tags of the event files in ``event_dirs`` (merged by step; later dirs win)."""
    from tensorboard.backend.event_processing import event_accumulator

    points: dict[str, dict[int, float]] = defaultdict(dict)
    for event_dir in event_dirs:
        accumulator = event_accumulator.EventAccumulator(
            str(event_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 1}
        )
        accumulator.Reload()
        for tag in accumulator.Tags()[event_accumulator.SCALARS]:
            points[tag].update((event.step, event.value) for event in accumulator.Scalars(tag))
    scalars = {}
    for tag, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return scalars


def load_alarm_messages(event_dirs: Sequence[Path]) -> list[str]:
    """The one-line alarm messages (TensorBoard text under ``alarms``) of a run, in step order."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    messages: list[tuple[int, str]] = []
    for event_dir in event_dirs:
        accumulator = event_accumulator.EventAccumulator(
            str(event_dir), size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 1,
                                           event_accumulator.HISTOGRAMS: 1, event_accumulator.IMAGES: 1})
        accumulator.Reload()
        for tag in accumulator.Tags()[event_accumulator.TENSORS]:
            if tag.split("/")[0] == tags.ALARM_TEXT:  # the writer stores text as "<tag>/text_summary"
                for event in accumulator.Tensors(tag):
                    for value in np.atleast_1d(tensor_util.make_ndarray(event.tensor_proto)):
                        messages.append((event.step, value.decode("utf-8") if isinstance(value, bytes) else str(value)))
    return [message for _, message in sorted(messages)]


def shown_name(path: Path, folders: Sequence[Path]) -> str:
    """``path`` relative to the first of ``folders`` (the folders given to `report`) that holds it."""
    for folder in folders:
        if path == folder:
            return folder.name
        if folder in path.parents:
            return str(path.relative_to(folder))
    return str(path)


def _split_pattern(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """(the path before the first glob component, the components from there on)."""
    parts = Path(pattern).parts
    fixed = len(list(itertools.takewhile(lambda part: not glob.has_magic(part), parts)))
    return Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]


def given_folders(patterns: Sequence[str]) -> list[Path]:
    """The folder each pattern names: its part before the first glob character, resolved."""
    folders = []
    for pattern in patterns:
        folder, _ = _split_pattern(pattern)
        folders.append((folder.parent if folder.is_file() else folder).resolve())
    return folders


def shown_command(argv: Sequence[str]) -> str:
    """The command for figure footers: paths relative to the working directory, never an absolute prefix.

    A path outside the working directory (e.g. a temporary folder) keeps only the given folder's name
    and what follows it (``…/runs/*/version_0``).
    """
    cwd = Path.cwd().resolve()
    shown = []
    for arg in argv:
        if os.path.isabs(arg):
            folder, tail = _split_pattern(arg)
            folder = folder.resolve()
            if folder == cwd or cwd in folder.parents:
                arg = str(Path(folder.relative_to(cwd), *tail))
            else:
                arg = str(Path("…", folder.name, *tail))
        shown.append(arg)
    return shlex.join(["python", "-m", "doran_lightning", "report", *shown])


def load_run(run_dir: Path, event_dirs: Sequence[Path] | None = None) -> Run:
    """One run: hparams of ``run_dir`` and the scalars of ``event_dirs`` (default: ``run_dir`` alone)."""
    hparams = load_hparams(run_dir)
    variant = variant_from_hparams(hparams) or variant_from_path(run_dir)
    return Run(path=run_dir, variant=variant, hparams=hparams, scalars=load_scalars(event_dirs or [run_dir]))


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", text)]


def spike_indices(values: np.ndarray, factor: float, window: int, min_history: int = 5) -> np.ndarray:
    """Indices where a finite value exceeds ``factor`` × the median of the previous ``window`` finite values.

    Non-finite values are not spikes (they are counted as non-finite steps) and do not enter the median.
    """
    history: list[float] = []
    spikes = []
    for index, value in enumerate(values):
        if not math.isfinite(value):
            continue
        if len(history) >= min_history and value > factor * float(np.median(history[-window:])):
            spikes.append(index)
        history.append(float(value))
    return np.array(spikes, dtype=np.int64)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over finite pairs; NaN with fewer than 3 pairs or a constant coordinate."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, population std and count of the finite values (NaNs when none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def choose_metric(runs: Sequence[Run], requested: str | None) -> str | None:
    """Validation metric name (``val/<name>``) shared by the runs: ``--metric`` or the first by priority."""
    names = {tag[4:] for run in runs for tag in run.scalars if tag.startswith(("val/", "test/"))}
    names = {name.split("/", 1)[-1] for name in names} - {"loss"}
    if requested:
        if requested not in names:
            raise ReportError(
                f"--metric {requested}: no run logs val/{requested} or test/{requested}; available: {sorted(names) or 'none'}"
            )
        return requested
    for name in METRIC_PRIORITY:
        if name in names:
            return name
    return sorted(names)[0] if names else None


def loss_diverged(losses: np.ndarray) -> bool:
    """The loss ends non-finite, or its last steps average DIVERGE_FACTOR × its first steps' or more."""
    head, tail = losses[:DIVERGE_WINDOW], losses[-DIVERGE_WINDOW:]
    return bool(not np.isfinite(tail).all() or float(np.mean(tail)) > DIVERGE_FACTOR * float(np.nanmean(head)))


def run_stability(run: Run, metric: str | None, spike_factor: float, spike_window: int) -> dict[str, Any]:
    """Per-run stability numbers: spikes, max grad norm, non-finite steps, divergence, val/test metric."""
    loss = run.scalars[tags.TRAIN_LOSS]
    spikes = spike_indices(loss.values, spike_factor, spike_window)
    nonfinite_loss = int(np.sum(~np.isfinite(loss.values)))
    counter = run.scalars.get(tags.TRAIN_NONFINITE_STEPS)
    # The module logs a running count; a non-finite loss the counter missed still counts.
    logged_nonfinite = int(np.nanmax(counter.values)) if counter is not None and np.isfinite(counter.values).any() else 0
    grad = run.scalars.get(tags.TRAIN_GRAD_NORM)
    finite_grad = grad.values[np.isfinite(grad.values)] if grad is not None else np.array([])
    diverged = loss_diverged(loss.values)
    val_loss = run.scalars.get(tags.VAL_LOSS)
    if val_loss is not None and not math.isfinite(val_loss.values[-1]):
        diverged = True
    val = run.scalars.get(tags.stage_tag("val", metric)) if metric else None
    test = run.scalars.get(tags.stage_tag("test", metric)) if metric else None
    gain = run.scalars.get(RADIAL_GAIN.aggregate_tag)
    return {
        "path": str(run.path),
        "run": run.name or run.path.name,
        "variant": run.variant,
        "seed": run.hparam("seed"),
        "fraction": run.hparam("fraction"),
        "lr": run.hparam("lr"),
        "r": run.hparam("r"),
        "steps": int(loss.steps[-1]),
        "loss_spikes": len(spikes),
        "spike_steps": [int(loss.steps[i]) for i in spikes],
        "max_grad_norm": float(finite_grad.max()) if finite_grad.size else None,
        "nonfinite_steps": max(logged_nonfinite, nonfinite_loss),
        "diverged": bool(diverged),
        "final_loss": float(loss.values[-1]),
        "final_val": float(val.values[-1]) if val is not None else None,
        "best_val": float(np.nanmax(val.values)) if val is not None and np.isfinite(val.values).any() else None,
        "test": float(test.values[-1]) if test is not None else None,
        # Where the layers' steps ended between DoRA's projection (0) and LoRA's full step (1).
        "radial_gain": float(gain.values[-1]) if gain is not None else None,
        "alarms": alarm_counts(run),
        "alarm_messages": run.alarm_messages,
    }


def alarm_counts(run: Run) -> dict[str, int]:
    """Alarms per kind that the run fired (``alarm/<kind>`` holds the running count); kinds never logged are absent."""
    counts = {}
    for kind in tags.ALARM_KINDS:
        series = run.scalars.get(tags.alarm_tag(kind))
        if series is not None and np.isfinite(series.values).any():
            counts[kind] = int(np.nanmax(series.values))
    return counts


def condition_keys(runs: Sequence[Run]) -> list[str]:
    """The CONDITION_KEYS whose values differ between runs of the same variant."""
    varying = []
    for key in CONDITION_KEYS:
        per_variant = defaultdict(set)
        for run in runs:
            per_variant[run.variant].add(repr(run.hparam(key)))
        if any(len(values) > 1 for values in per_variant.values()):
            varying.append(key)
    return varying


def condition_label(run: Run, keys: Sequence[str]) -> str:
    parts = [run.variant] + [f"{key}={run.hparam(key)}" for key in keys]
    return " ".join(parts)


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, list[Run]]:
    """Runs grouped by condition label, variants in VARIANTS order, seeds sorted."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[condition_label(run, keys)].append(run)
    return {
        label: sorted(groups[label], key=lambda r: (str(r.hparam("seed")), str(r.path)))
        for label in sorted(groups, key=lambda label: (variant_rank(label.split(" ")[0]), natural_key(label)))
    }


def variant_rank(variant: str) -> int:
    """Position in VARIANTS (unknown labels last), so tables and legends read lora → doran-aux."""
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def on_common_grid(series: Sequence[Series], smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Series interpolated on the union of their steps up to the shortest run's end: ``[runs, steps]``.

    After a run's first non-finite value it stays NaN (the run diverged there).
    """
    end = min(int(s.steps[-1]) for s in series)
    grid = np.unique(np.concatenate([s.steps[s.steps <= end] for s in series]))
    rows = []
    for s in series:
        values = ema(s.values, smooth) if smooth > 0 else s.values
        finite = np.isfinite(values)
        row = np.interp(grid, s.steps[finite], values[finite]) if finite.any() else np.full(len(grid), np.nan)
        if not finite.all():
            row[grid >= s.steps[np.argmin(finite)]] = np.nan
        rows.append(row)
    return grid, np.array(rows)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing (non-finite values pass through unchanged)."""
    smoothed = values.copy()
    last = None
    for index, value in enumerate(values):
        if math.isfinite(value):
            last = value if last is None else weight * last + (1 - weight) * value
            smoothed[index] = last
    return smoothed


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's object API + Agg canvas: no global backend state)
# ----------------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float, height: float, command: str) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(rows, cols)
    if len(command) > 200:  # e.g. a sweep listing every run dir; summary.md keeps the full command
        command = f"{command[:140]} … {command[-50:]} (full command in summary.md)"
    fig.supxlabel(f"made by: {command}", fontsize=6, color="gray")
    return fig, axes


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(index % cmap.N) for index, label in enumerate(labels)}


def plot_training_curves(groups: dict[str, list[Run]], out: Path, command: str, smooth: float) -> Path:
    """Loss and global grad-norm vs step: thin line per run, thick mean, band = min–max over seeds."""
    fig, axes = _figure(1, 2, 12, 4.5, command)
    colors = _colors(list(groups))
    for ax, tag, title in zip(axes[0], (tags.TRAIN_LOSS, tags.TRAIN_GRAD_NORM), ("training loss", "global grad norm")):
        for label, runs in groups.items():
            series = [run.scalars[tag] for run in runs if tag in run.scalars]
            if not series:
                continue
            for s in series:
                ax.plot(s.steps, ema(s.values, smooth) if smooth > 0 else s.values, color=colors[label], lw=0.5, alpha=0.35)
            grid, matrix = on_common_grid(series, smooth)
            with warnings.catch_warnings():  # all-NaN columns after every seed diverged are expected
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(matrix, axis=0)
                ax.fill_between(grid, np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0), color=colors[label], alpha=0.15)
            ax.plot(grid, mean, color=colors[label], lw=1.8, label=f"{label} (n={len(series)})")
        ax.set(title=f"{title} (mean, band = min–max over seeds)", xlabel="step", yscale="log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no '{tag}' logged", ha="center", transform=ax.transAxes)
    path = out / "training_curves.png"
    fig.savefig(path)
    return path


def plot_projection_statistic(groups: dict[str, list[Run]], out: Path, command: str, stat: tags.Statistic) -> list[Path]:
    """Heat map (projection × step) and a few curves of one statistic: one run per variant (its first group, lowest seed).

    Writes ``<prefix>_heatmap.png`` and ``<prefix>_curves.png`` (e.g. σ, or the radial gain σ/(‖V‖+σ)).
    """
    shown: dict[str, Run] = {}
    for label, runs in groups.items():
        if runs[0].projections(stat.prefix) and all(run.variant != runs[0].variant for run in shown.values()):
            shown[label] = runs[0]
    if not shown:
        return []
    heat, heat_axes = _figure(len(shown), 1, 10, 1.2 + 2.8 * len(shown), command)
    curves, curve_axes = _figure(len(shown), 1, 8, 1.0 + 2.6 * len(shown), command)
    for row, (label, run) in enumerate(shown.items()):
        names = run.projections(stat.prefix)
        grid, matrix = on_common_grid([run.scalars[stat.tag(name)] for name in names])
        ax = heat_axes[row, 0]
        mesh = ax.pcolormesh(grid, np.arange(len(names)), matrix, shading="nearest", cmap="viridis")
        ax.set_yticks(np.arange(len(names)), names, fontsize=max(4, 8 - len(names) // 12))
        ax.set(title=f"{stat.symbol} per projection — {label} (seed {run.hparam('seed')})", xlabel="step")
        heat.colorbar(mesh, ax=ax, label=stat.symbol)
        ax = curve_axes[row, 0]
        picks = sorted({round(i) for i in np.linspace(0, len(names) - 1, min(4, len(names)))})
        for index in picks:
            ax.plot(grid, matrix[index], lw=1, label=names[index])
        if stat.aggregate_tag in run.scalars:
            aggregate = run.scalars[stat.aggregate_tag]
            ax.plot(aggregate.steps, aggregate.values, "k-", lw=2, label=stat.aggregate)
        ax.set(title=f"{stat.symbol} trajectories — {label} (seed {run.hparam('seed')})", xlabel="step",
               ylabel=stat.symbol)
        ax.legend(fontsize=7)
    paths = [out / f"{stat.prefix}_heatmap.png", out / f"{stat.prefix}_curves.png"]
    heat.savefig(paths[0])
    curves.savefig(paths[1])
    return paths


def delta_points(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (ΔD, ΔM, step) points over projections and logged steps; the all-zero init point is dropped."""
    d_all, m_all, step_all = [], [], []
    for run in runs:
        for name in run.projections(DELTA_M.prefix):
            dm, dd = run.scalars[DELTA_M.tag(name)], run.scalars.get(DELTA_D.tag(name))
            if dd is None:
                continue
            steps = np.intersect1d(dm.steps, dd.steps)
            m = dm.values[np.searchsorted(dm.steps, steps)]
            d = dd.values[np.searchsorted(dd.steps, steps)]
            keep = (m != 0) | (d != 0)
            d_all.append(d[keep]), m_all.append(m[keep]), step_all.append(steps[keep])
    if not d_all:
        return np.array([]), np.array([]), np.array([])
    return np.concatenate(d_all), np.concatenate(m_all), np.concatenate(step_all)


def plot_delta_scatter(by_variant: dict[str, list[Run]], out: Path, command: str) -> tuple[Path | None, dict[str, Any]]:
    """ΔM vs ΔD per variant (DoRA's Figure 2), colour = step, with Pearson r over all points."""
    points = {variant: delta_points(runs) for variant, runs in by_variant.items()}
    points = {variant: p for variant, p in points.items() if p[0].size}
    correlations = {v: {"pearson_r": pearson(d, m), "points": int(d.size)} for v, (d, m, _) in points.items()}
    if not points:
        return None, correlations
    fig, axes = _figure(1, len(points), 4 * len(points), 4, command)
    for ax, (variant, (d, m, steps)) in zip(axes[0], points.items()):
        sc = ax.scatter(d, m, c=steps, s=6, cmap="plasma", alpha=0.7)
        ax.set(title=f"{variant}: r = {correlations[variant]['pearson_r']:.2f}", xlabel="ΔD (1 − cos)", ylabel="ΔM")
    fig.colorbar(sc, ax=axes[0, -1], label="step")
    path = out / "delta_m_vs_delta_d.png"
    fig.savefig(path)
    return path, correlations


def fraction_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant: {fraction: cell}}: test metric (best val when no test) mean ± std over seeds.

    Where a (variant, fraction) cell holds several lrs, the lr with the best mean validation metric is used.
    """
    cells: dict[tuple[str, float], dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["fraction"] is not None:
            cells[(row["variant"], float(row["fraction"]))][row["lr"]].append(row)
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (variant, fraction), by_lr in sorted(cells.items()):
        def val_score(lr: Any) -> float:
            mean = mean_std(r["best_val"] for r in by_lr[lr])[0]
            return mean if math.isfinite(mean) else -math.inf

        lr = max(by_lr, key=val_score)
        chosen = by_lr[lr]
        source = "test" if any(r["test"] is not None for r in chosen) else "best_val"
        mean, std, count = mean_std(r[source] for r in chosen)
        table[variant][f"{fraction:g}"] = {"mean": mean, "std": std, "n": count, "lr": lr, "source": source}
    return {variant: table[variant] for variant in sorted(table, key=variant_rank)}


def plot_fraction(table: dict[str, dict[str, dict[str, Any]]], metric: str, out: Path, command: str) -> Path | None:
    if not table:
        return None
    fig, axes = _figure(1, 1, 6, 4.5, command)
    ax = axes[0, 0]
    colors = _colors(list(table))
    for variant, cells in table.items():
        fractions = sorted(cells, key=float)
        ax.errorbar(
            [float(f) for f in fractions], [cells[f]["mean"] for f in fractions], yerr=[cells[f]["std"] for f in fractions],
            color=colors[variant], marker="o", capsize=3, label=variant,
        )
    sources = {cell["source"] for cells in table.values() for cell in cells.values()}
    ax.set(title=f"{metric} vs training fraction (mean ± std over seeds)", xlabel="fraction of training data",
           ylabel=f"{'/'.join(sorted(sources))} {metric}", xscale="log")
    ax.legend(fontsize=8)
    path = out / "metric_vs_fraction.png"
    fig.savefig(path)
    return path


def lr_sensitivity(rows: Sequence[dict[str, Any]], tolerance: float = LR_RANGE_TOLERANCE) -> list[dict[str, Any]]:
    """Per setting and fraction with several lrs: metric vs lr, the best lr, and the lr range within `tolerance`.

    The range is the contiguous run of grid lrs around the best whose mean metric (test, else best val) is at
    least best − tolerance; its width is hi/lo (1 when only the best lr qualifies), also given relative to the
    best lr (lo/best, hi/best), so that methods whose best lrs differ are compared on their own scale.
    Diverged runs count in `diverged` and score as missing (a lr where every seed diverged is out of range).
    """
    cells: dict[tuple[str, Any], dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("lr") is not None:
            cells[(row.get("setting") or row["variant"], row["fraction"])][float(row["lr"])].append(row)
    table = []
    for (setting, fraction), by_lr in cells.items():
        if len(by_lr) < 2:
            continue
        lrs = sorted(by_lr)
        points = []
        for lr in lrs:
            members = by_lr[lr]
            source = "test" if any(r["test"] is not None for r in members) else "best_val"
            mean, std, count = mean_std(r[source] for r in members if not r["diverged"])
            points.append({"lr": lr, "mean": mean, "std": std, "n": count, "runs": len(members),
                           "diverged": sum(bool(r["diverged"]) for r in members)})
        finite = [i for i, p in enumerate(points) if math.isfinite(p["mean"])]
        if not finite:
            continue
        best = max(finite, key=lambda i: points[i]["mean"])
        low = high = best
        floor = points[best]["mean"] - tolerance
        while low > 0 and math.isfinite(points[low - 1]["mean"]) and points[low - 1]["mean"] >= floor:
            low -= 1
        while high < len(points) - 1 and math.isfinite(points[high + 1]["mean"]) and points[high + 1]["mean"] >= floor:
            high += 1
        table.append({
            "setting": setting, "fraction": fraction, "points": points, "best_lr": lrs[best],
            "best": points[best]["mean"], "best_std": points[best]["std"], "range": [lrs[low], lrs[high]],
            "width": lrs[high] / lrs[low], "relative_range": [lrs[low] / lrs[best], lrs[high] / lrs[best]],
            "diverged": sum(p["diverged"] for p in points), "runs": sum(p["runs"] for p in points),
        })
    return sorted(table, key=lambda t: (variant_rank(t["setting"].split(" ")[0]), natural_key(t["setting"]),
                                        str(t["fraction"])))


def plot_lr_sensitivity(table: Sequence[dict[str, Any]], metric: str, out: Path, command: str) -> Path | None:
    """Metric vs lr (log x) per setting, mean ± std over seeds; lrs with diverged runs are marked ×."""
    if not table:
        return None
    fig, axes = _figure(1, 1, 7, 4.5, command)
    ax = axes[0, 0]
    labels = [f"{t['setting']} (fraction {t['fraction']})" for t in table]
    colors = _colors(labels)
    for label, entry in zip(labels, table):
        points = entry["points"]
        ax.errorbar([p["lr"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                    color=colors[label], marker="o", capsize=3, label=f"{label}: width ×{entry['width']:.3g}")
        for p in points:
            if p["diverged"]:
                ax.plot(p["lr"], p["mean"] if math.isfinite(p["mean"]) else ax.get_ylim()[0], "x", color=colors[label],
                        markersize=10)
    ax.set(title=f"{metric} vs learning rate (mean ± std over seeds; × = diverged runs)", xlabel="lr", xscale="log",
           ylabel=metric)
    ax.legend(fontsize=7)
    path = out / "metric_vs_lr.png"
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _pm(values: Iterable[Any]) -> str:
    mean, std, count = mean_std(values)
    return "–" if count == 0 else f"{mean:.4f} ± {std:.4f}"


def _alarm_cell(counts: dict[str, int]) -> str:
    """``loss_spike 2, grad_jump 1``; ``0`` when watched and quiet; ``–`` when the run logged no alarm tags."""
    if not counts:
        return "–"
    fired = [f"{kind} {count}" for kind, count in counts.items() if count]
    return ", ".join(fired) or "0"


def group_summary(label: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    grads = [r["max_grad_norm"] for r in rows if r["max_grad_norm"] is not None]
    return {
        "group": label,
        "runs": len(rows),
        "seeds": [r["seed"] for r in rows],
        "loss_spikes_total": sum(r["loss_spikes"] for r in rows),
        "max_grad_norm": max(grads) if grads else None,
        "nonfinite_steps_total": sum(r["nonfinite_steps"] for r in rows),
        "diverged_runs": sum(r["diverged"] for r in rows),
        "final_val": mean_std(r["final_val"] for r in rows),
        "best_val": mean_std(r["best_val"] for r in rows),
        "test": mean_std(r["test"] for r in rows),
        "radial_gain": mean_std(r.get("radial_gain") for r in rows),
    }


def markdown_summary(summary: dict[str, Any], groups_rows: dict[str, list[dict[str, Any]]]) -> str:
    metric = summary["metric"] or "(no validation metric logged)"
    lines = [
        "# Training report",
        "",
        f"Made by: `{summary['command']}`",
        "",
        f"{len(summary['runs'])} runs; metric: `{metric}`; loss spike = step with loss > {summary['spike_factor']:g}× "
        f"the median of the previous {summary['spike_window']} steps; diverged = final loss non-finite or > "
        f"{DIVERGE_FACTOR:g}× the initial loss (means of the last/first {DIVERGE_WINDOW} logged steps).",
        "",
        "## Stability (per condition, seeds pooled)",
        "",
        "| condition | runs | loss spikes | max grad norm | non-finite steps | diverged | final val | best val | test "
        "| radial gain (end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in groups_rows.items():
        g = group_summary(label, rows)
        lines.append(
            f"| {label} | {g['runs']} | {g['loss_spikes_total']} | {_fmt(g['max_grad_norm'])} | {g['nonfinite_steps_total']} "
            f"| {g['diverged_runs']}/{g['runs']} | {_pm(r['final_val'] for r in rows)} | {_pm(r['best_val'] for r in rows)} "
            f"| {_pm(r['test'] for r in rows)} | {_pm(r.get('radial_gain') for r in rows)} |"
        )
    if summary["correlations"]:
        lines += ["", "## ΔM vs ΔD (DoRA's learning pattern)", "", "| variant | points | Pearson r |", "|---|---|---|"]
        for variant, c in summary["correlations"].items():
            lines.append(f"| {variant} | {c['points']} | {_fmt(c['pearson_r'], 3)} |")
    if summary["fraction_table"]:
        fractions = sorted({f for cells in summary["fraction_table"].values() for f in cells}, key=float)
        lines += ["", f"## {metric} vs training fraction (mean ± std over seeds, n)", ""]
        lines += ["| variant | " + " | ".join(fractions) + " |", "|---|" + "---|" * len(fractions)]
        for variant, cells in summary["fraction_table"].items():
            row = [
                f"{cells[f]['mean']:.4f} ± {cells[f]['std']:.4f} ({cells[f]['n']}, lr {cells[f]['lr']})" if f in cells else "–"
                for f in fractions
            ]
            lines.append(f"| {variant} | " + " | ".join(row) + " |")
    if summary.get("lr_sensitivity"):
        lines += ["", f"## Learning-rate sensitivity ({metric} mean over seeds; range = lrs within "
                      f"{LR_RANGE_TOLERANCE:g} of the best, contiguous around it)", "",
                  "| setting | fraction | best lr | best | lr range (×best) | width | diverged | metric per lr |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in summary["lr_sensitivity"]:
            per_lr = ", ".join(f"{p['lr']:g}: {_fmt(p['mean'], 3)}" + (f" ({p['diverged']} div.)" if p["diverged"] else "")
                               for p in t["points"])
            lines.append(
                f"| {t['setting']} | {_fmt(t['fraction'])} | {t['best_lr']:g} | {t['best']:.4f} ± {t['best_std']:.4f} "
                f"| {t['range'][0]:g}–{t['range'][1]:g} (×{t['relative_range'][0]:.3g}–×{t['relative_range'][1]:.3g}) "
                f"| ×{t['width']:.3g} | {t['diverged']}/{t['runs']} | {per_lr} |")
    lines += ["", "## Figures", ""]
    lines += [f"- ![{Path(p).stem}]({Path(p).name}) `{Path(p).name}`" for p in summary["figures"]] or ["- none"]
    lines += ["", "## Runs", "", "| run | variant | seed | fraction | lr | spikes | max grad norm | non-finite | diverged "
              "| alarms | best val | test |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["runs"]:
        lines.append(
            f"| {r['run']} | {r['variant']} | {_fmt(r['seed'])} | {_fmt(r['fraction'])} | {_fmt(r['lr'])} | {r['loss_spikes']} "
            f"| {_fmt(r['max_grad_norm'])} | {r['nonfinite_steps']} | {r['diverged']} | {_alarm_cell(r['alarms'])} "
            f"| {_fmt(r['best_val'])} | {_fmt(r['test'])} |"
        )
    alarmed = [r for r in summary["runs"] if any(r["alarms"].values())]
    lines += ["", "## Stability alarms (logged during training)", ""]
    if not alarmed:
        watched = sum(bool(r["alarms"]) for r in summary["runs"])
        lines.append(f"None fired ({watched} of {len(summary['runs'])} runs were watched by the alarms callback).")
    for r in alarmed:
        lines.append(f"- **{r['run']}**: {_alarm_cell(r['alarms'])}")
        lines += [f"  - {message}" for message in r["alarm_messages"][:20]]
        if len(r["alarm_messages"]) > 20:
            lines.append(f"  - … {len(r['alarm_messages']) - 20} more")
    if summary["warnings"]:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m doran_lightning report",
        description="Stability and sample-efficiency figures + Markdown summary from TensorBoard runs.",
    )
    parser.add_argument("logdirs", nargs="+", help="TensorBoard log dirs or globs (searched recursively for event files)")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="output directory, written whole or not at all (default: ./report)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
    parser.add_argument("--spike-factor", type=float, default=SPIKE_FACTOR,
                        help=f"loss spike = loss > k × running median (default {SPIKE_FACTOR:g})")
    parser.add_argument("--spike-window", type=int, default=SPIKE_WINDOW,
                        help=f"running-median window in logged steps (default {SPIKE_WINDOW})")
    parser.add_argument("--metric", default=None, help="validation/test metric name, e.g. accuracy (default: auto)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves (default 0: raw)")
    return parser


def make_report(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Load the runs, write figures and summaries into ``args.out``; return the summary dict."""
    if args.spike_factor <= 1 or args.spike_window < 1 or not 0 <= args.smooth < 1:
        raise ReportError("need --spike-factor > 1, --spike-window >= 1 and 0 <= --smooth < 1")
    check_output_folder(args.out, args.overwrite)  # before the (slow) loading, so a typo costs nothing
    run_dirs = find_run_dirs(args.logdirs)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {', '.join(args.logdirs)}")
    runs, warnings = [], []
    folders = given_folders(args.logdirs)
    for run_dir, event_dirs in run_dirs.items():
        run = load_run(run_dir, event_dirs)
        run.name = shown_name(run.path, folders)
        if any(alarm_counts(run).values()):  # the messages are only read where the counts say there are some
            run.alarm_messages = load_alarm_messages(event_dirs)
        if tags.TRAIN_LOSS not in run.scalars or run.scalars[tags.TRAIN_LOSS].steps.size == 0:
            warnings.append(f"{run_dir}: skipped, no 'train/loss' scalars (tags: {sorted(run.scalars) or 'none'})")
            continue
        if tags.TRAIN_GRAD_NORM not in run.scalars:
            warnings.append(f"{run_dir}: no 'train/grad_norm' tag; max grad norm unknown")
        runs.append(run)
    if not runs:
        raise ReportError("no run logs 'train/loss':\n  " + "\n  ".join(warnings))
    metric = choose_metric(runs, args.metric)
    if metric is None:
        warnings.append("no val/<metric> or test/<metric> tags: metric columns and the fraction plot are empty")
    keys = condition_keys(runs)
    groups = group_runs(runs, keys)
    rows_by_run = {run.path: run_stability(run, metric, args.spike_factor, args.spike_window) for run in runs}
    for run in runs:  # the setting without its lr and fraction: the unit of the lr-sensitivity table
        rows_by_run[run.path]["setting"] = condition_label(run, [key for key in keys if key not in AXIS_KEYS])
    groups_rows = {label: [rows_by_run[run.path] for run in members] for label, members in groups.items()}
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for members in groups.values():
        for run in members:
            by_variant[run.variant].append(run)

    with staged_folder(args.out, args.overwrite) as out:
        summary = _write_outputs(out, command, args, metric, keys, groups, groups_rows, by_variant, warnings)
    return summary


def _write_outputs(out: Path, command: str, args: argparse.Namespace, metric: str | None, keys: list[str],
                   groups: dict[str, list[Run]], groups_rows: dict[str, list[dict[str, Any]]],
                   by_variant: dict[str, list[Run]], warnings: list[str]) -> dict[str, Any]:
    """Figures, summary.json and summary.md into `out` (the staging folder that becomes ``--out``)."""
    figures = [plot_training_curves(groups, out, command, args.smooth)]
    for stat, missing in ((SIGMA, "no noise-σ runs"), (RADIAL_GAIN, "no DoRA/DoRAN runs, or logged before issue 17")):
        paths = plot_projection_statistic(groups, out, command, stat)
        figures += paths
        if not paths:
            warnings.append(f"no {stat.prefix}/<projection> tags ({missing}): no {stat.prefix} figures")
    scatter, correlations = plot_delta_scatter(by_variant, out, command)
    if scatter is None:
        warnings.append("no delta_m/<projection> + delta_d/<projection> tags: no ΔM-vs-ΔD scatter")
    figures += [scatter] if scatter else []
    all_rows = [row for rows in groups_rows.values() for row in rows]
    table = fraction_table(all_rows) if metric else {}
    fraction_plot = plot_fraction(table, metric, out, command) if metric else None
    figures += [fraction_plot] if fraction_plot else []
    sensitivity = lr_sensitivity(all_rows) if metric else []
    lr_plot = plot_lr_sensitivity(sensitivity, metric, out, command) if metric else None
    figures += [lr_plot] if lr_plot else []

    summary = {
        "command": command,
        "metric": metric,
        "spike_factor": args.spike_factor,
        "spike_window": args.spike_window,
        "condition_keys": keys,
        "runs": all_rows,
        "groups": [group_summary(label, rows) for label, rows in groups_rows.items()],
        "correlations": correlations,
        "fraction_table": table,
        "lr_sensitivity": sensitivity,
        "figures": [str(args.out / p.name) for p in figures],
        "warnings": warnings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    (out / "summary.md").write_text(markdown_summary(summary, groups_rows), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the report; 0 on success, 2 with a one-line reason for bad input (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help or a usage error already printed by argparse
        return int(exit_request.code or 0)
    command = shown_command(argv)
    try:
        summary = make_report(args, command)
    except (ReportError, OutputExistsError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    for warning in summary["warnings"]:
        print(f"report: note: {warning}", file=sys.stderr)
    print(f"report: {len(summary['runs'])} runs -> {args.out / 'summary.md'} and {len(summary['figures'])} figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
