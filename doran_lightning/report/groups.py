"""The comparison group of a run: task, data, backbone and budget. Methods are compared only within one.

`run_group` is the one place that says what makes two runs comparable. It reads the ``config.yaml`` that
LightningCLI saved beside the run (data module and its arguments, backbone, trainer budget), then the
run's logged hparams (backbone name), then a sweep's ``spec.json`` (task, epochs). A field it cannot read is
``unrecorded``: runs that record nothing are one group, since nothing tells them apart (the heading says so).
Seed, fraction and lr are not part of the group: seeds are replicates, fraction and lr are the axes the
tables compare along.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from doran_lightning.report.runs import flatten, lookup_hparam, saved_config, sweep_spec, task_of

GROUP_FIELDS = ("task", "data", "backbone", "budget")
SUITE_FIELDS = ("data", "backbone", "budget")  # a suite table's tasks are its columns
UNRECORDED = "unrecorded"
# Data-module arguments that do not change which examples a run sees (loader settings), or that are axes
# (seed, fraction) or the group's own task field.
_NOT_DATA = {"task", "seed", "fraction", "batch_size", "eval_batch_size", "num_workers", "pin_memory",
             "persistent_workers", "predict_root", "predict_file", "bad_images"}
_BUDGET_KEYS = ("max_epochs", "max_steps", "limit_train_batches")

T = TypeVar("T")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True) if isinstance(value, (list, dict)) else str(value)


def _data(config: dict[str, Any]) -> str | None:
    data = config.get("data")
    if not isinstance(data, dict):
        return None
    name = str(data.get("class_path", "data")).rsplit(".", 1)[-1]
    init = _mapping(config, "data")
    args = [f"{key}={_compact(value)}" for key, value in sorted(init.items(), key=lambda item: str(item[0]))
            if key not in _NOT_DATA and key != "class_path" and value is not None]
    return f"{name}({', '.join(args)})" if args else name


def _mapping(value: Any, key: str) -> dict[str, Any]:
    """``value[key]`` (or, for a class_path/init_args node, its init_args) when it is a mapping, else {}."""
    found = value.get(key) if isinstance(value, dict) else None
    found = found.get("init_args", found) if isinstance(found, dict) else None
    return found if isinstance(found, dict) else {}


def _backbone(config: dict[str, Any], hparams: dict[str, Any]) -> str | None:
    backbone = _mapping(_mapping(config, "model"), "backbone")
    if backbone.get("name"):
        extras = [Path(str(backbone["checkpoint_path"])).name] if backbone.get("checkpoint_path") else []
        extras += [f"{k}={_compact(v)}" for k, v in sorted(_mapping(backbone, "overrides").items(), key=lambda item: str(item[0]))]
        return f"{backbone['name']}({', '.join(extras)})" if extras else str(backbone["name"])
    name = lookup_hparam(hparams, "backbone")
    return str(name) if name not in (None, "") else None


def _budget(config: dict[str, Any], spec: dict[str, Any]) -> str | None:
    trainer = flatten(_mapping(config, "trainer"))
    parts = []
    for key in _BUDGET_KEYS:
        value = trainer.get(key)
        if key == "max_epochs" and value is None:
            value = spec.get("max_epochs")
        unset = value is None or (key == "max_steps" and value == -1) or (key == "limit_train_batches" and value == 1.0)
        if not unset:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or None


def run_group(run_dir: Path, hparams: dict[str, Any]) -> dict[str, str]:
    """{task, data, backbone, budget} of the run in `run_dir` (see the module docstring for the sources)."""
    config, spec = saved_config(run_dir), sweep_spec(run_dir)
    data = _data(config)
    # Without a named task (the built-in topics, the digits), the data module's class names it.
    task = task_of(run_dir) or (data.split("(")[0].removesuffix("DataModule") if data else None)
    fields = {"task": task, "data": data, "backbone": _backbone(config, hparams),
              "budget": _budget(config, spec)}
    return {name: value or UNRECORDED for name, value in fields.items()}


def group_label(group: dict[str, str]) -> str:
    """``task=sst2 · data=GLUEDataModule(…) · backbone=minilm · budget=max_epochs=3``."""
    return " · ".join(f"{name}={group[name]}" for name in GROUP_FIELDS if name in group)


def group_slug(index: int, group: dict[str, str]) -> str:
    """A folder name for a group's files: its number, task and backbone name, filesystem-safe."""
    words = [group.get("task", ""), group.get("backbone", "").split("(")[0]]
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(w for w in words if w and w != UNRECORDED)).strip("-")
    return f"group{index}" + (f"-{text[:40]}" if text else "")


def partition(items: Iterable[T], group_of: Callable[[T], dict[str, str]],
              fields: Sequence[str] = GROUP_FIELDS) -> dict[str, tuple[dict[str, str], list[T]]]:
    """{label: (group, members)} in first-seen order; `fields` chooses which group fields must agree."""
    parts: dict[str, tuple[dict[str, str], list[T]]] = {}
    for item in items:
        group = {name: group_of(item).get(name, UNRECORDED) for name in fields}
        parts.setdefault(group_label(group), (group, []))[1].append(item)
    return parts
