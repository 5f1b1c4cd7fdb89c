"""Which settings a checkpoint's hyperparameters give way to, and which they refuse (`--ckpt_path`).

LightningCLI replaces the model's whole configuration by the hyperparameters stored in the
checkpoint, so `fit --model.lr=1e-5 --ckpt_path=…` would silently train at the old lr. Here each
setting the user gave (a value that differs from the parser default, or one named on the command
line) and that differs from the checkpoint's is sorted:

- `APPLIED` settings (optimiser, schedule, logging, alarms) do not change any tensor's shape: this
  run's value is kept, with a one-line note (the module re-applies lr / weight decay / betas to the
  restored optimiser, see `DoranModule.on_train_start`);
- every other setting (adapter method, r, targets, backbone, optimiser type, …) changes what the
  trained tensors mean or their shapes: the run is refused, naming each difference.

Settings the user did not give take the checkpoint's values, as in LightningCLI. The training
length (`trainer.max_epochs`, `max_steps`) is never in the checkpoint: this run's value holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from doran_lightning.adapters.params import restack_optimizer_state as restacked

# Model settings (dotted, below `model.`) a resumed run may change: no tensor changes shape or meaning.
APPLIED = ("lr", "weight_decay", "aux_lr", "aux_weight_decay", "sigma_lr", "betas", "scheduler", "warmup_steps",
           "warmup_ratio", "min_lr_ratio", "stats_every_n_steps", "histogram_every_n_steps", "heatmap_every_n_stats",
           "max_new_tokens", "nonfinite_policy", "compile", "alarms", "adapter.dropout",
           "backbone.gradient_checkpointing")
# Linked from the datamodule at instantiation: the checkpoint's tensors are checked against them later.
LINKED = ("task", "num_classes", "tokenizer", "metric", "label_names")
_SECTIONS = ("adapter", "alarms", "backbone")  # dataclass settings, compared field by field


class ResumeConflictError(ValueError):
    """A setting given for this run changes what the checkpoint's tensors are; the message names each one."""


@dataclass
class ResumePlan:
    """The checkpoint's hyperparameters with this run's applicable settings put in, and what differed."""

    hparams: dict[str, Any]
    applied: list[str] = field(default_factory=list)  # "lr=1e-05 (checkpoint 0.02)"
    refused: list[str] = field(default_factory=list)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{"adapter": {"r": 8}, "lr": 0.1} -> {"adapter.r": 8, "lr": 0.1}; lists become tuples (YAML gives lists)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}.{name}": _plain(item) for name, item in value.items()})
        else:
            flat[key] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _covered(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def plan_resume(checkpoint_hparams: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any],
                named: Iterable[str] = ()) -> ResumePlan:
    """Merge a checkpoint's model hyperparameters with this run's model settings (see the module docstring).

    Args:
        checkpoint_hparams: `hyper_parameters` of the checkpoint (nested dicts).
        current: this run's parsed model settings (nested dicts).
        defaults: the parser's model defaults (nested dicts).
        named: dotted model settings named on the command line (given even when equal to the default).
    """
    saved, now, default = flatten(checkpoint_hparams), flatten(current), flatten(defaults)
    named = list(named)
    merged = dict(saved)
    plan = ResumePlan(hparams={})
    for name in sorted(now):
        if _covered(name, LINKED) or name not in saved:
            continue
        given = now[name] != default.get(name, now[name]) or _covered(name, named)
        if not given or now[name] == saved[name]:
            continue
        difference = f"{name}={now[name]!r} (checkpoint: {saved[name]!r})"
        if _covered(name, APPLIED):
            merged[name] = now[name]
            plan.applied.append(difference)
        else:
            plan.refused.append(difference)
    plan.hparams = unflatten(merged)
    return plan


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten` (tuples stay tuples)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


# Sizes a checkpoint's hyperparameters set (dotted below `model.`); each shapes some tensor of the file.
SIZES = ("adapter.r", "adapter.aux_hidden", "adapter.aux_seed_dim", "num_classes", "backbone.overrides.embed_dim",
         "backbone.overrides.hidden_size", "backbone.overrides.intermediate_size")
OWN_CLASS = "doran_lightning.module.DoranModule"


def checked_hparams(ckpt_path: str, checkpoint: Mapping[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """The checkpoint's hyperparameters, refused in one line naming the file before anything is built from them:
    not a mapping, written by another LightningModule class (``_class_path``), or a size that no tensor of the file
    has (``adapter.aux_hidden: 1e8`` would allocate gigabytes before any tensor is compared)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise ValueError(f"--ckpt_path={ckpt_path}: its hyper_parameters are a {type(hparams).__name__}, not a "
                         "mapping of settings; pass a checkpoint written by `fit`")
    hparams = {key: value for key, value in hparams.items() if key != "_instantiator"}
    class_path = hparams.pop("_class_path", OWN_CLASS)
    if class_path != OWN_CLASS:
        raise ValueError(f"--ckpt_path={ckpt_path} was written by another LightningModule ({class_path}), not "
                         f"{OWN_CLASS}; pass a checkpoint written by this library's `fit`")
    unknown = sorted(set(hparams) - set(known)) if known else []
    if unknown:
        raise ValueError(f"--ckpt_path={ckpt_path}: its hyperparameters hold settings this version does not know "
                         f"({', '.join(unknown)}); it was written by another version or edited")
    dims = [size for tensor in (checkpoint.get("state_dict") or {}).values() for size in getattr(tensor, "shape", ())]
    largest = max(dims, default=0)
    for key in SIZES if dims else ():  # no tensors to compare with: `inject.refuse_oversized` still bounds the build
        value = _dotted(hparams, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= largest:
            continue
        raise ValueError(f"--ckpt_path={ckpt_path}: model.{key}={value} is larger than every dimension of the "
                         f"file's tensors (at most {largest}); the file is damaged or edited, pass the checkpoint `fit` wrote")
    return hparams


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def conflict_message(ckpt_path: str, refused: list[str]) -> str:
    """One line naming every refused difference and the two ways out."""
    listed = "; ".join(f"model.{item}" for item in refused)
    return (f"--ckpt_path={ckpt_path} was trained with other settings that shape its tensors: {listed}. "
            "Drop these settings to use the checkpoint as trained, or start a new run without --ckpt_path")


def reapply_optimizer_settings(optimizer: Any, scheduler: Any, fresh_groups: list[dict[str, Any]], lr: float,
                               betas: tuple[float, float]) -> None:
    """Put this run's lr / weight decay / betas into an optimiser and LambdaLR restored from a checkpoint.

    Lightning restores the optimiser's param groups (lr, initial_lr, weight_decay, betas) and the
    scheduler's base_lrs from the checkpoint, which would silently undo a changed `--model.lr` on
    resume. The schedule's shape (scheduler, warm-up, total steps) is rebuilt by configure_optimizers
    and is not in the checkpoint. `fresh_groups` are the param groups this run's settings would build.
    """
    if isinstance(optimizer, list) or len(fresh_groups) != len(optimizer.param_groups) or scheduler is None:
        return
    for group, wanted in zip(optimizer.param_groups, fresh_groups):
        group["initial_lr"] = wanted.get("lr", lr)
        group["weight_decay"] = wanted["weight_decay"]
        if "betas" in group:
            group["betas"] = betas
        elif "momentum" in group:
            group["momentum"] = betas[0]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def restack_optimizer_state(checkpoint: dict[str, Any], model: nn.Module, groups: list[dict[str, Any]]) -> bool:
    """Lay out a checkpoint's optimizer state written before banking (one entry per banked tensor) for this
    model's optimizer `groups` (`adapters.params.restack_optimizer_state`). Returns whether it was converted."""
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1 or "param_groups" not in states[0]:
        return False
    converted = restacked(states[0], model, groups)
    if converted is not None:
        states[0] = converted
    return converted is not None
