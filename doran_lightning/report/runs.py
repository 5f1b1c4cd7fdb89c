"""Reading runs: TensorBoard event files, ``hparams.yaml`` and the resumptions that belong together.

A run is one TensorBoard version folder; its scalars are read with TensorBoard's own
``EventAccumulator``, its hparams from the ``hparams.yaml`` beside them, and its method variant
from the hparams (``AdapterConfig.variant``) or, failing that, from the folder names.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from doran_lightning import tags
from doran_lightning.stability import natural_key  # noqa: F401  (re-exported)
from doran_lightning.adapters.config import AUX_LAYOUTS, AUX_SCOPES, NOISE_MODES, RECIPES, AdapterConfig
from doran_lightning.adapters.registry import method_class, method_names
from doran_lightning.yaml_files import YamlBoundError, read_yaml

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


def variant_in_path_pattern() -> re.Pattern[str]:
    """A variant label in a folder name: any registered method's name, a method with switches followed by any of
    `AdapterConfig.variant`'s ablation suffixes (``doran_noise_fixed``); longer names first (``dora-pissa``)."""
    suffixes = ["noise", "aux", "none", *(mode for mode in NOISE_MODES if mode != "learnable"),
                *(layout for layout in AUX_LAYOUTS if layout != "rank"), *(scope for scope in AUX_SCOPES if scope != "block"),
                *(recipe for recipe in RECIPES if recipe != "ours")]
    alternatives = []
    for name in sorted(method_names(), key=len, reverse=True):
        spelled = "[-_]".join(re.escape(part) for part in name.split("-"))
        tail = f"(?:[-_](?:{'|'.join(suffixes)}))*" if method_class(name).switches else ""
        alternatives.append(spelled + tail)
    return re.compile(rf"(?<![a-z])({'|'.join(alternatives)})(?![a-z])", re.IGNORECASE)


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
    name: str = ""  # shown in tables: the path relative to the folder given to `report`
    alarm_messages: list[str] = field(default_factory=list)
    task: str | None = None  # the data task (e.g. a VTAB-1K or GLUE task) when the run names one
    event_dirs: list[Path] = field(default_factory=list)  # where its event files (and test predictions) lie

    def hparam(self, name: str) -> Any:
        return lookup_hparam(self.hparams, name)

    def projections(self, stat: str) -> list[str]:
        """Projection names that carry ``<stat>/<projection>`` tags (aggregates like ``sigma/mean`` excluded)."""
        prefix = f"{stat}/"
        names = [tag[len(prefix):] for tag in self.scalars if tag.startswith(prefix)]
        return sorted((n for n in names if n not in tags.AGGREGATE_SUFFIXES), key=natural_key)


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
        data = read_yaml(path, _TolerantLoader)
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
    if method not in method_names() or not method_class(method).switches:  # only DoRAN's switches relabel a run
        return method
    # AdapterConfig.variant is the one labelling rule (ablation suffixes such as -fixed or -model included).
    fields: dict[str, Any] = {"noise": _as_bool(lookup_hparam(hparams, "noise")),
                              "aux": _as_bool(lookup_hparam(hparams, "aux"))}
    for name, choices in (("noise_mode", NOISE_MODES), ("aux_scope", AUX_SCOPES), ("aux_layout", AUX_LAYOUTS),
                          ("recipe", tuple(RECIPES))):
        value = lookup_hparam(hparams, name)
        if value in choices:
            fields[name] = value
    return AdapterConfig(method=method, **fields).variant


# Settings that act only in some methods: LoRA has no norm to detach; only variants with noise have a σ.
_SETTING_NEEDS = {"detach_norm": "use_magnitude", "sigma_scale": "use_noise", "sigma_init": "use_noise"}


def setting_applies(hparams: dict[str, Any], key: str) -> bool:
    """Whether setting `key` acts in the run's method (True when the method is not recorded)."""
    method = lookup_hparam(hparams, "method")
    if key not in _SETTING_NEEDS or method is None or str(method).lower() not in method_names():
        return True
    cfg = AdapterConfig(method=str(method).lower(), noise=_as_bool(lookup_hparam(hparams, "noise")),
                        aux=_as_bool(lookup_hparam(hparams, "aux")))
    return bool(getattr(cfg, _SETTING_NEEDS[key]))


def variant_from_path(run_dir: Path) -> str:
    """Variant named in the path (deepest first), else the experiment dir name (Lightning's ``name``)."""
    pattern = variant_in_path_pattern()
    for part in reversed(run_dir.parts):
        match = pattern.search(part)
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


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.yaml`` LightningCLI saved beside the run's event files ({} when absent or unreadable)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    try:
        data = read_yaml(config, _TolerantLoader)
    except YamlBoundError as error:
        raise ReportError(f"{config}: refused, {error}; fix or delete the file") from None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def resumed_from(run_dir: Path) -> Path | None:
    """The checkpoint a run was resumed from: ``ckpt_path`` in the ``config.yaml`` LightningCLI saved."""
    ckpt_path = saved_config(run_dir).get("ckpt_path")
    return Path(ckpt_path).expanduser().resolve() if isinstance(ckpt_path, str) and "/" in ckpt_path else None


def sweep_spec(run_dir: Path) -> dict[str, Any]:
    """The ``spec.json`` a sweep writes two folders above a run's version folder ({} elsewhere or unreadable)."""
    for folder in list(run_dir.parents)[:3]:
        spec = folder / "spec.json"
        if spec.is_file():
            try:
                fields = json.loads(spec.read_text(encoding="utf-8"))
            except ValueError:
                return {}
            return fields if isinstance(fields, dict) else {}
    return {}


def task_of(run_dir: Path) -> str | None:
    """The run's task: the data module's ``task`` in its saved config, else the sweep's label for it.

    The sweep writes ``spec.json`` two folders up (``runs/<variant>/<key>/<variant>/<version>``); its task,
    or the config's file name when the sweep's tasks are several configs.
    """
    data = saved_config(run_dir).get("data") or {}
    task = (data.get("init_args") or {}).get("task", data.get("task")) if isinstance(data, dict) else None
    if isinstance(task, str) and task:
        return task
    fields = sweep_spec(run_dir)
    return (fields.get("task") or Path(str(fields.get("config", ""))).stem or None) if fields else None


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


def truncated_event_files(event_dirs: Sequence[Path]) -> list[Path]:
    """Event files whose last record is cut short (a run killed mid-write, an incomplete copy).

    TensorBoard's reader stops silently at such a record; here the TFRecord framing (8-byte length,
    4-byte CRC, data, 4-byte CRC) is walked by its lengths alone, without reading the data.
    """
    cut = []
    for folder in event_dirs:
        for file in sorted(folder.glob("events.out.tfevents*")):
            size, position = file.stat().st_size, 0
            with file.open("rb") as handle:
                while position + 12 <= size:
                    handle.seek(position)
                    (length,) = struct.unpack("<Q", handle.read(8))
                    position += 12 + length + 4
            if position != size:
                cut.append(file)
    return cut


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



# Settings that `hparams.yaml` does not hold but that tell runs of one variant apart (report conditions): read
# from the ``config.yaml`` LightningCLI saved beside the run, under these paths.
CONFIG_SETTINGS = {"optimizer": "model.optimizer", "detach_norm": "model.adapter.detach_norm",
                   "sigma_scale": "model.adapter.sigma_scale", "sigma_init": "model.adapter.sigma_init"}


def config_settings(run_dir: Path) -> dict[str, Any]:
    """`CONFIG_SETTINGS` found in the run's saved ``config.yaml`` ({} without one)."""
    flat = flatten(saved_config(run_dir))
    return {name: flat[path] for name, path in CONFIG_SETTINGS.items() if path in flat}


def load_run(run_dir: Path, event_dirs: Sequence[Path] | None = None) -> Run:
    """One run: hparams of ``run_dir`` (with `config_settings`) and the scalars of ``event_dirs`` (default: ``run_dir``)."""
    hparams = {**config_settings(run_dir), **load_hparams(run_dir)}
    variant = variant_from_hparams(hparams) or variant_from_path(run_dir)
    event_dirs = list(event_dirs or [run_dir])
    return Run(path=run_dir, variant=variant, hparams=hparams, scalars=load_scalars(event_dirs),
               task=task_of(run_dir), event_dirs=event_dirs)

