"""Command line: `python -m doran_lightning {fit,validate,test,predict,export,report,sweep} …`.

LightningCLI drives everything; this file adds:
- a bare `--config name.yaml` falls back to the shipped configs when no such file is in the cwd;
- `export`, a Trainer method writing adapter files, the merged backbone and (when possible) PEFT files;
- `report` and `sweep`, routed to `doran_lightning.report.main` / `doran_lightning.sweep.main` (their exit
  code is the process's);
- `fit --test_after_fit=true`: test right after fit in the same process, then the run summary;
- `predict` writes `predictions.csv` / `.jsonl` (`predictions.PredictionWriter`) to the run folder or `--out`;
- crash-safe checkpoints (`AtomicCheckpointIO`) unless the user configures another CheckpointIO;
- a quiet console (`console.quiet_libraries`) unless `--verbose` is given;
- bad input (unknown names, missing or malformed data and checkpoint files) ends with one
  `error:` line and exit code 2 instead of a traceback (`DORAN_TRACEBACK=1` shows it).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from doran_lightning import protocol
from doran_lightning.adapters.registry import method_names
from doran_lightning.ckpt_forms import resolve_ckpt_path
from doran_lightning.checkpointing import CHECKPOINT_KEY, AtomicCheckpointIO, CheckpointError, read_checkpoint
from doran_lightning.commands import HELP_FLAGS, PROG, top_help, wants_top_help
from doran_lightning.console import quiet_libraries, say, with_progress_bar
from doran_lightning.domains import check_number
from doran_lightning.env_settings import environment_notes
from doran_lightning.lightning_compat import subcommand_defaults
from doran_lightning.models import BackboneLoadError, resolve_name
from doran_lightning.module import DoranModule, deferred_build
from doran_lightning.nonfinite import NonFiniteError
from doran_lightning.outputs import check_output_folder, staged_folder
from doran_lightning.peft_export import export_peft_folders
from doran_lightning.run_folders import RunFolders
from doran_lightning.resume import ResumeConflictError, checked_hparams, conflict_message, flatten, plan_resume
from doran_lightning.run_checks import (
    guard_outputs, refuse_checkpoints_switched_off, refuse_empty_fit, refuse_image_size_mismatch, refuse_twin_callbacks,
    refuse_unfaithful_precision,
)
from doran_lightning.safe_files import error_text
from doran_lightning.summary import RunSummary
from doran_lightning.yaml_files import read_yaml

_LINKED_FROM_DATA = ("task", "num_classes", "tokenizer", "metric")
VERBOSE_FLAG = "--verbose"
EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 1
# Errors whose message is the whole story for a user: printed as one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                CheckpointError, BackboneLoadError, MisconfigurationException)


def shipped_configs_dir() -> Path:
    """The packaged `configs/` folder (works for editable and regular installs)."""
    return Path(str(resources.files("doran_lightning") / "configs"))


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace `--config NAME` by the shipped config's path when NAME is not a file in the cwd."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = _resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + _resolve_config(arg[len("--config="):])
    return resolved


def _resolve_config(value: str) -> str:
    if Path(value).is_file():
        _check_yaml(Path(value))
    if Path(value).exists() or Path(value).name != value:
        return value
    shipped = shipped_configs_dir() / value
    if shipped.is_file():
        return str(shipped)
    available = ", ".join(sorted(p.name for p in shipped_configs_dir().glob("*.yaml")))
    raise ValueError(f"Config {value!r} is neither a file in {Path.cwd()} nor a shipped config ({available})")


def _check_yaml(path: Path) -> None:
    """Fail naming the file (and line) on what jsonargparse reports without it ("<unicode string>", "Unexpected
    config"): a YAML syntax error, bytes that are not UTF-8 text, an empty file, a top level that is not a mapping."""
    try:
        content = read_yaml(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"Config {path}: not UTF-8 text (byte {error.start}); is it a YAML file?") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"Config {where}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if content is None:
        raise ValueError(f"Config {path} is empty; give it settings (e.g. `trainer:` and `model:` sections) or drop "
                         "--config")
    if not isinstance(content, dict):
        raise ValueError(f"Config {path}: the top level is a {type(content).__name__}, not a mapping of settings "
                         "(`trainer:`, `model:`, `data:`)")


class DoranTrainer(pl.Trainer):
    """Lightning's Trainer plus `export`, writing checkpoints atomically by default, in a run folder of its own."""

    def __init__(self, *args: Any, plugins: Any = None, **kwargs: Any) -> None:
        accumulate = kwargs.get("accumulate_grad_batches", 1)
        if isinstance(accumulate, int):  # Lightning divides by it before checking it
            check_number("trainer.accumulate_grad_batches", accumulate, at_least=1, integer=True)
        listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in listed):
            listed.append(AtomicCheckpointIO())
        refuse_twin_callbacks(kwargs.get("callbacks"))
        refuse_checkpoints_switched_off(kwargs.get("callbacks"), kwargs.get("barebones", False),
                                        kwargs.get("enable_checkpointing"))
        kwargs["callbacks"] = with_progress_bar(kwargs.get("callbacks"), kwargs.get("enable_progress_bar"))
        super().__init__(*args, plugins=listed, **kwargs)
        refuse_unfaithful_precision(self)
        self._run_folders = RunFolders()
        self.callbacks.append(self._run_folders.marker)

    def _in_run_folder(self, stage: str, run: Any, ckpt_path: Any = None) -> Any:
        """Run `run()` in this command's folder (`run_folders`); a failure before any result leaves no folder."""
        folder = self._run_folders.claim(self, stage, ckpt_path) if rank_zero_only.rank == 0 else None
        if folder is not None:
            say(f"{stage}: writing to {folder}")
        try:
            return run()
        except BaseException:
            if rank_zero_only.rank == 0:
                self._run_folders.discard_if_empty(stage)
            raise

    def fit(self, *args: Any, **kwargs: Any) -> None:
        refuse_empty_fit(self)
        return self._in_run_folder("fit", lambda: super(DoranTrainer, self).fit(*args, **kwargs))

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        return self._in_run_folder("validate", lambda: super(DoranTrainer, self).validate(*args, **kwargs),
                                   kwargs.get("ckpt_path"))

    def test(self, *args: Any, **kwargs: Any) -> Any:
        return self._in_run_folder("test", lambda: super(DoranTrainer, self).test(*args, **kwargs),
                                   kwargs.get("ckpt_path"))

    def predict(self, model: Any = None, dataloaders: Any = None, datamodule: Any = None,
                return_predictions: bool | None = None, ckpt_path: str | None = None,
                weights_only: bool | None = None, out: str | None = None, overwrite: bool = False) -> Any:
        """Lightning's predict, plus ``predictions.csv`` / ``predictions.jsonl`` written by `PredictionWriter`.

        Args:
            out: folder for the two files (default: this run's folder, ``lightning_logs/version_N``).
            overwrite: replace predictions already in `out` (refused otherwise, before anything runs).
        """
        from doran_lightning.predictions import PredictionWriter, check_prediction_folder

        if out is not None:
            check_prediction_folder(Path(out), overwrite, getattr(datamodule, "predict_file", None))

        writer = next((c for c in self.callbacks if isinstance(c, PredictionWriter)), None)
        if writer is None:
            writer = PredictionWriter()
            self.callbacks.append(writer)
        writer.out = None if out is None else Path(out)
        return self._in_run_folder("predict", lambda: super(DoranTrainer, self).predict(
            model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only), ckpt_path)

    def export(self, model: DoranModule, ckpt_path: str, out: str, datamodule: Any = None,
               overwrite: bool = False) -> Path:
        """Write `adapters/` (our format), `merged/` (backbone with adapters folded in), `peft/` and its `base/`.

        Args:
            ckpt_path: a checkpoint written by `fit`.
            out: output folder, built beside it under a temporary name and renamed into place when complete.
            overwrite: replace a non-empty `out` as a whole (refused otherwise).
        """
        from doran_lightning.adapters import export_peft, merge_adapters, save_adapters

        out_dir = Path(out)
        inputs = [*export_inputs(model, ckpt_path), *getattr(self, "config_inputs", [])]
        check_output_folder(out_dir, overwrite, inputs=inputs)  # before the (slow) load, so a typo costs nothing
        load_trained_state(model, ckpt_path)
        _name_labels(model)
        with staged_folder(out_dir, overwrite, inputs=inputs, note=say) as staging:
            save_adapters(model.backbone, staging / "adapters")
            peft_note = export_peft_folders(model, staging, out_dir, export_peft)
            merge_adapters(model.backbone, unload=True)
            _save_merged_backbone(model, staging / "merged")
        say(f"Exported to {out_dir}: adapters/, merged/, " + (
            peft_note or "peft/" + (", base/" if (out_dir / "base").is_dir() else "")))
        return out_dir


def export_inputs(model: DoranModule, ckpt_path: str) -> list[Path]:
    """What `export` reads and `--out` must not touch: the checkpoint, its run folder, local backbone weights."""
    checkpoint = Path(ckpt_path)
    # <run folder>/checkpoints/x.ckpt: the run folder (its events, config, other checkpoints) is an input too.
    run_folder = [checkpoint.parent.parent] if checkpoint.parent.name == "checkpoints" else []
    backbone = model.backbone_config
    names = [backbone.checkpoint_path, resolve_name(backbone.name) if backbone.source == "hf" else None]
    return [checkpoint, *run_folder, *(Path(name) for name in names if name and Path(name).exists())]


def load_trained_state(model: DoranModule, ckpt_path: str) -> None:
    """Load a trainable-only checkpoint onto a freshly built model, verifying every key."""
    checkpoint = read_checkpoint(ckpt_path)
    try:
        model.on_load_checkpoint(checkpoint)
    except RuntimeError as error:
        raise CheckpointError(f"--ckpt_path={ckpt_path}: {error}") from None
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    model.eval()


def _name_labels(model: DoranModule) -> None:
    """Put the class names into the HF backbone's config (``id2label`` / ``label2id``), so that exports name
    them: a transformers ``pipeline`` then prints ``sport``, not ``LABEL_1``."""
    config = getattr(model.backbone, "config", None)
    if config is None or model.hparams.task == "causal_lm" or not model.hparams.get("label_names"):
        return
    config.id2label = dict(enumerate(model.label_names))
    config.label2id = {name: index for index, name in config.id2label.items()}


def _save_merged_backbone(model: DoranModule, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    if model.backbone_config.source == "hf":
        backbone.save_pretrained(directory)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(directory)
        return
    from safetensors.torch import save_model

    save_model(backbone, str(directory / "model.safetensors"))
    spec = {"backbone": asdict(model.backbone_config), "num_classes": model.hparams.num_classes,
            "load_with": "timm.create_model(name, num_classes=num_classes, **overrides) then "
                         "safetensors.torch.load_model(model, 'model.safetensors')"}
    (directory / "backbone.json").write_text(json.dumps(spec, indent=2))


def _label_names(datamodule: Any) -> list[str] | None:
    names = getattr(datamodule, "label_names", None)
    return list(names) if names else None


class DoranCLI(LightningCLI):
    """LightningCLI for DoranModule with any LightningDataModule (class_path in YAML)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self.command_line: list[str] = list(sys.argv[1:] if given is None else given)  # which settings were named
        kwargs.setdefault("model_class", DoranModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", DoranTrainer)
        kwargs.setdefault("auto_configure_optimizers", False)  # DoranModule owns its param groups
        # Any setting may also come from the environment, e.g. PL_FIT__TRAINER__MAX_STEPS=2 (a --config file or
        # the command line wins): how the README's commands are run with tiny limits in CI.
        kwargs.setdefault("parser_kwargs", {"default_env": True, "prog": PROG,
                                            "description": "LoRA, DoRA and DoRAN fine-tuning with PyTorch Lightning"})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        list_method_choices(parser)
        # Lightning's default logger is already TensorBoard under <default_root_dir>/lightning_logs.
        for name in _LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        # Optional on a datamodule: one written before label names existed links None.
        parser.link_arguments("data", "model.label_names", compute_fn=_label_names, apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: test (best checkpoint, else final weights) right after fit, "
                                 "then print the run summary with the test metric")

    def _test_after_fit(self) -> bool:
        return bool(self.config.get(self.subcommand, {}).get("test_after_fit")) if self.subcommand else False

    def before_fit(self) -> None:
        protocol.check_selection(self.trainer, self.datamodule)
        if self._test_after_fit():
            self._run_summary().defer_to_test = True  # one summary, after the test

    def after_fit(self) -> None:
        if not self._test_after_fit():
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", None) or None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best and "best")
        self._run_summary().print(self.trainer, self.model)

    def _run_summary(self) -> RunSummary:
        """The trainer's RunSummary callback, added here when absent (the module then adds none)."""
        summary = next((c for c in self.trainer.callbacks if isinstance(c, RunSummary)), None)
        if summary is None:
            summary = RunSummary()
            self.trainer.callbacks.append(summary)
        return summary

    def _parse_ckpt_path(self) -> None:
        """Merge `--ckpt_path`'s hyperparameters into this run's model settings (`resume.plan_resume`).

        LightningCLI would replace the model settings by the checkpoint's, silently dropping e.g. a new
        lr; here a given setting is kept where that is safe (noted) and refused where it would change
        the trained tensors. The file is read with our verified loader, so a corrupt one is named.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand and "ckpt_path" in self.config[subcommand]:  # "last", "best", "~/…", a folder: `ckpt_forms`
            root = Path(self.config[subcommand].get("trainer", {}).get("default_root_dir") or Path.cwd())
            self.config[subcommand]["ckpt_path"] = ckpt_path = resolve_ckpt_path(ckpt_path, subcommand, root)
            if ckpt_path is None and subcommand in ("test", "validate", "predict"):
                say(f"note: {subcommand} without --ckpt_path: the adapters and head are as built, untrained")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return  # a missing file is reported by name when the trainer reads it
        checkpoint = read_checkpoint(ckpt_path)
        hparams = checked_hparams(ckpt_path, checkpoint, inspect.signature(DoranModule.__init__).parameters)
        if hparams:
            self._merge_checkpoint_hparams(subcommand, ckpt_path, hparams)
        # A text data module given no tokenizer uses the one the checkpoint was trained with.
        saved_tokenizer = (checkpoint.get(CHECKPOINT_KEY) or {}).get("tokenizer")
        key = f"{subcommand}.data.init_args.tokenizer"
        if saved_tokenizer and key in self.config and self.config[key] is None:
            if not isinstance(saved_tokenizer, str):
                raise ValueError(f"--ckpt_path={ckpt_path}: its saved tokenizer is a {type(saved_tokenizer).__name__}, "
                                 "not a name or folder; pass --data.tokenizer")
            self.config[key] = saved_tokenizer

    def _merge_checkpoint_hparams(self, subcommand: str, ckpt_path: str, hparams: dict[str, Any]) -> None:
        plan = plan_resume(hparams, _as_dict(self.config[subcommand].get("model")),
                           _as_dict(subcommand_defaults(self, subcommand).get("model")), _named_model_settings(self.command_line))
        if plan.refused:
            raise ResumeConflictError(conflict_message(ckpt_path, plan.refused))
        if plan.applied:
            print(f"doran_lightning: note: --ckpt_path={ckpt_path}: this run's settings replace the checkpoint's: "
                  + "; ".join(f"model.{item}" for item in plan.applied), file=sys.stderr)
        self.config = self.parser.parse_object({subcommand: {"model": plan.hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            for note in environment_notes(subcommand, _as_dict(self.config[subcommand]), os.environ):
                print(f"doran_lightning: {note}", file=sys.stderr)

    def instantiate_classes(self) -> None:
        # The backbone is built later, in configure_model, inside the strategy's init context (FSDP).
        with deferred_build():
            super().instantiate_classes()
        if self.subcommand:
            guard_outputs(self.trainer, _as_dict(self.config[self.subcommand]), self.subcommand, self.datamodule)
            if self.subcommand != "export":  # export reads no images
                refuse_image_size_mismatch(self.model, self.datamodule)


def list_method_choices(parser: LightningArgumentParser) -> None:
    """Show `--model.adapter.method`'s registered names in `--help` (`{lora,dora,…}`); AdapterConfig validates the
    value against the registry when it is built, so a method registered later is still accepted."""
    action = parser._option_string_actions.get("--model.adapter.method")  # no public lookup in jsonargparse
    if action is not None:
        names = method_names()
        action.metavar = "{" + ",".join(names) + "}"
        action.help = "a registered adapter method: " + ", ".join(names)


def export_help() -> str:
    """`export --help`: what export reads (a config, a checkpoint) and writes, not the trainer's ~800 lines."""
    parser = LightningArgumentParser(prog=f"{PROG} export", description=_short_doc(DoranTrainer.export), epilog=(
        "The model is rebuilt from the settings fit used: give the same --config (and any --model.* you changed), "
        f"e.g. `{PROG} export --config minilm_text.yaml --ckpt_path=lightning_logs/version_0/checkpoints/last.ckpt "
        f"--out=exported/`. `{PROG} fit --help` lists the --model.* and --data.* settings; export accepts the "
        "--trainer.* settings but does not use them."))
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="the fit run's YAML config: a file, or the name of a shipped config")
    parser.add_method_arguments(DoranTrainer, "export", skip={"model", "datamodule"}, as_group=False)
    return parser.format_help()


def _short_doc(function: Any) -> str:
    return (function.__doc__ or "").strip().split("\n", 1)[0]


def _as_dict(section: Any) -> dict[str, Any]:
    """A jsonargparse Namespace (or None) as nested plain dicts."""
    if section is None:
        return {}
    return section.as_dict() if hasattr(section, "as_dict") else dict(section)


def _named_model_settings(args: list[str]) -> list[str]:
    """Dotted model settings the user named: `--model.adapter.r=16` -> "adapter.r", and every key under
    `model:` in the `--config` files (a config's `r: 8` counts even where 8 is also the default)."""
    named = [arg.split("=", 1)[0][len("--model."):] for arg in args if arg.startswith("--model.")]
    for index, arg in enumerate(args):
        path = arg[len("--config="):] if arg.startswith("--config=") else (
            args[index + 1] if arg == "--config" and index + 1 < len(args) else None)
        if path is None or not Path(path).is_file():
            continue
        content = read_yaml(Path(path)) or {}
        model = content.get("model") if isinstance(content, dict) else None
        if isinstance(model, dict):
            named += list(flatten(model.get("init_args", model)))
    return named


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m doran_lightning` and the `doran-lightning` script; returns the exit code.

    0 on success, 2 for bad input (after one `error:` line), 1 when training was stopped by the
    non-finite policy. Set DORAN_TRACEBACK=1 to get the full traceback instead. A bare ``--verbose``
    anywhere shows every library line and warning that the quiet console leaves out.
    """
    code = _run(argv)
    if argv is None and code:
        raise SystemExit(code)  # `python -m doran_lightning` ignores a returned value
    return code


def split_verbose(args: list[str]) -> tuple[list[str], bool]:
    """Remove our bare ``--verbose`` switch; ``--verbose=…`` / ``--verbose true`` stay (Trainer.test's own flag)."""
    kept, verbose = [], False
    for index, arg in enumerate(args):
        following = args[index + 1].lower() if index + 1 < len(args) else ""
        if arg == VERBOSE_FLAG and following not in ("true", "false"):
            verbose = True
        else:
            kept.append(arg)
    return kept, verbose


def _run(argv: list[str] | None) -> int:
    args, verbose = split_verbose(list(sys.argv[1:] if argv is None else argv))
    quiet_libraries(quiet=not verbose)
    if wants_top_help(args):
        print(top_help())
        return 0
    if args and args[0] == "export" and any(arg in HELP_FLAGS for arg in args):
        print(export_help())
        return 0
    if args and args[0] == "report":
        from doran_lightning import report

        return report.main(args[1:])
    if args and args[0] == "sweep":
        from doran_lightning import sweep

        return sweep.main(args[1:])
    try:
        if argv is None:  # LightningCLI warns when given args while sys.argv holds others
            sys.argv[1:] = resolve_config_args(args)
            DoranCLI()
        else:
            DoranCLI(args=resolve_config_args(args))
    except (*_USER_ERRORS, NonFiniteError, OSError) as error:
        if os.environ.get("DORAN_TRACEBACK"):
            raise
        code = EXIT_TRAINING_STOPPED if isinstance(error, NonFiniteError) else EXIT_BAD_INPUT
        print(f"doran_lightning: error: {error_text(_unwrapped(error))}", file=sys.stderr)
        return code
    return 0


_UNION_DUMP = "Does not validate against any of the Union subtypes"


def _unwrapped(error: BaseException) -> BaseException:
    """Our own error when jsonargparse wrapped it in its Union-subtypes dump (a datamodule's __init__ failing)."""
    while _UNION_DUMP in str(error) and isinstance(error.__cause__, _USER_ERRORS):
        error = error.__cause__
    return error
