"""Checks before a run starts (issue 31): each refuses, in one line, a run that could not be faithful — outputs
aimed at inputs, an explicit logger version over a finished run, twin checkpoint callbacks, float16 on a CPU, a fit
of 0 steps, an image size the backbone cannot take. Called by `cli.DoranCLI` / `cli.DoranTrainer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from doran_lightning.lightning_compat import finished_run_folder
from doran_lightning.outputs import config_inputs, refuse_overlap


def refuse_twin_callbacks(callbacks: Any) -> None:
    """Two stateful callbacks with one state key (a second `ModelCheckpoint` with the config's settings): Lightning
    cannot keep both in a checkpoint and fails with a traceback; say which and how to tell them apart."""
    listed = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    seen: set[str] = set()
    for callback in listed:
        if type(callback).state_dict is pl.Callback.state_dict:
            continue  # keeps no state: twins are harmless
        key = callback.state_key
        if key in seen:
            raise ValueError(f"trainer.callbacks: two {type(callback).__name__} callbacks with the same settings "
                             f"({key}); a checkpoint cannot hold both — drop one (the config may already have it) or "
                             "give the second its own monitor / filename / dirpath")
        seen.add(key)


def refuse_checkpoints_switched_off(callbacks: Any, barebones: bool, enable_checkpointing: Any) -> None:
    """``barebones`` / ``enable_checkpointing=false`` with the config's ModelCheckpoint: Lightning's message does not
    say where the callback comes from; name the flag and the config."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    listed = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not (barebones or enable_checkpointing is False) or not any(isinstance(c, ModelCheckpoint) for c in listed):
        return
    flag = "--trainer.barebones=true" if barebones else "--trainer.enable_checkpointing=false"
    raise ValueError(f"{flag} runs without checkpoints, but trainer.callbacks (the config's) hold a ModelCheckpoint: "
                     "remove it from the config's trainer.callbacks (a run without checkpoints cannot be tested or "
                     "resumed), or drop the flag")


def refuse_unfaithful_precision(trainer: pl.Trainer) -> None:
    """float16 weights on a CPU (`16-true`): its half kernels overflow and give NaN losses at once; refuse
    instead of training on them. (`16-mixed` on a CPU runs as bf16-mixed, which Lightning says.)"""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.plugins.precision import HalfPrecision

    plugin = trainer.precision_plugin
    if isinstance(trainer.accelerator, CPUAccelerator) and isinstance(plugin, HalfPrecision) \
            and plugin.precision.startswith("16"):
        raise ValueError(f"trainer.precision={plugin.precision} on a CPU: float16 weights there give NaN losses; "
                         "use 32-true or bf16-mixed on a CPU, or 16-mixed on a GPU")


def refuse_empty_fit(trainer: pl.Trainer) -> None:
    """A fit that cannot take one optimizer step would end 'stable' with no checkpoint: say so, before any
    folder is made."""
    for flag, value in (("limit_train_batches", trainer.limit_train_batches), ("max_steps", trainer.max_steps),
                        ("max_epochs", trainer.max_epochs)):
        if value == 0 and not isinstance(value, bool):
            raise ValueError(f"--trainer.{flag}=0 trains nothing (0 optimizer steps); to evaluate without training "
                             "use `validate` or `test`, to train give a value > 0")


def refuse_image_size_mismatch(model: Any, datamodule: Any) -> None:
    """A ViT-like timm backbone takes one input size (`fixed_input_size`); another `data.image_size` fails deep in
    timm with an AssertionError. Compare them before anything runs."""
    backbone = getattr(model, "backbone_config", None)
    size = getattr(datamodule, "image_size", None)
    if backbone is None or backbone.source != "timm" or not isinstance(size, int):
        return
    import timm

    overrides = dict(backbone.overrides or {})
    pretrained_cfg = timm.models.get_pretrained_cfg(backbone.name)
    if pretrained_cfg is None or not pretrained_cfg.fixed_input_size or overrides.get("dynamic_img_size"):
        return
    expected = overrides.get("img_size", pretrained_cfg.input_size[-1])
    expected = expected[-1] if isinstance(expected, (list, tuple)) else expected
    if isinstance(expected, int) and expected != size:
        raise ValueError(f"data.image_size={size} but the backbone {backbone.name} takes {expected}×{expected} images "
                         f"(model.backbone.overrides img_size); set --data.image_size={expected}, or img_size: {size} "
                         "in model.backbone.overrides")


def guard_outputs(trainer: pl.Trainer, config: dict[str, Any], subcommand: str, datamodule: Any = None) -> None:
    """Outputs never touch inputs (issue 31): before anything is written, refuse a run folder (`default_root_dir`,
    a logger's `save_dir`) or predict `--out` that is a path the config reads or lies inside a folder read
    entry by entry (`listed_folders`), and hand those paths to `export` (whose `--out` may not even contain one)."""
    inputs = config_inputs(config)
    trainer.config_inputs = inputs  # type: ignore[attr-defined]
    if subcommand == "export":
        return  # export writes only `--out`, checked against these inputs and the checkpoint's run in `export`
    outputs = [("--trainer.default_root_dir", trainer.default_root_dir)]
    outputs += [("--trainer.logger.save_dir", logger.save_dir) for logger in trainer.loggers
                if getattr(logger, "save_dir", None)]
    if subcommand == "predict" and config.get("out"):
        outputs.append(("--out", config["out"]))  # the folder of predictions.csv / .jsonl
    listed = datamodule.listed_folders() if hasattr(datamodule, "listed_folders") else []
    for flag, folder in outputs:
        refuse_overlap(Path(folder), inputs, flag, adds_only=True, listed=listed)
    ckpt_path = config.get("ckpt_path")
    for logger in trainer.loggers:
        finished = finished_run_folder(logger)
        run = finished.parent if finished is not None and getattr(logger, "sub_dir", None) else finished
        # Resuming a run (its checkpoint lies in that version folder) continues it: allowed.
        if run is not None and not (ckpt_path and Path(ckpt_path).resolve().is_relative_to(run.resolve())):
            raise FileExistsError(f"--trainer.logger.version={logger.version}: {finished} already holds the logs of "
                                  "another run; writing there would mix two runs — drop the version (the next free "
                                  "version_N is taken) or name a new one")
