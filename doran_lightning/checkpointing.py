"""Crash-safe checkpoints and mid-epoch resume.

- `AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder and renames
  it into place, so a crash (kill -9, node loss, full disk) while saving never leaves a truncated
  `last.ckpt`: the previous one stays intact. Reading a truncated or corrupt file raises a
  `CheckpointError` naming the file instead of a stack trace from deep inside torch.
- Every checkpoint is read with `torch.load(weights_only=True)`: tensors, containers, strings and
  numbers, plus the types in `SAFE_GLOBALS`, and nothing else. A file naming any other global (a
  pickle whose `__reduce__` calls `os.system`, say) is refused before that global is looked up.
- `TrainableState` decides what a checkpoint holds (trainable tensors and buffers the adapters created,
  never the frozen backbone) and verifies a checkpoint against the model it is loaded into.
- `ResumableDataLoader` is a DataLoader that Lightning saves and restores (its `state_dict` /
  `load_state_dict` protocol): it records the epoch and how many batches of it were handed out, and
  after a resume skips exactly those, so a run killed mid-epoch continues on the batch it would
  have seen next. Lightning does not fast-forward a plain DataLoader.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader

from doran_lightning.adapters.io import nonfinite_tensors
from doran_lightning.console import say
from doran_lightning.resume import restack_optimizer_state
from doran_lightning.safe_files import atomic_write
from doran_lightning.sharding import is_sharded


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file."""


# Types beyond torch's weights_only defaults that checkpoints we read may hold. Lightning's own
# checkpoints (loops, callbacks, optimizer, hyperparameters as dicts) need none; timm's training
# checkpoints, accepted as backbone weights, keep their command line as an argparse.Namespace.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
CHECKPOINT_KEY = "doran_lightning"  # the project's own entry in a Lightning checkpoint
_BLOCKED_GLOBAL = re.compile(r"(?:unsupported )?GLOBAL ([\w.]+)", re.IGNORECASE)


def safe_globals() -> contextlib.AbstractContextManager:
    """A context in which `torch.load(weights_only=True)` also accepts `SAFE_GLOBALS` (torch >= 2.5)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(list(SAFE_GLOBALS)) if allow is not None else contextlib.nullcontext()


def safe_load(file: Path, map_location: Any = "cpu", what: str = "Checkpoint") -> Any:
    """`torch.load(weights_only=True)` with `SAFE_GLOBALS`; any other global is refused in one line, unrun."""
    try:
        with safe_globals(), warnings.catch_warnings():
            # A raw pickle (not torch.save's zip) draws torch's note about its unpickler before being refused.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = _BLOCKED_GLOBAL.search(str(error))
        if blocked is None:
            raise
        raise CheckpointError(
            f"{what} {file} refused: it names {blocked.group(1)}, which is not a tensor, container or allowed type, "
            "and unpickling it could run code. Use a file written by this project (or convert it to safetensors)."
        ) from None


_CORRUPT_FIX = "Resume from an earlier checkpoint in the same folder, or delete it and start again."


def read_checkpoint(path: _PATH, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load a Lightning checkpoint, verified; missing, truncated, corrupt or non-finite files raise a CheckpointError.

    torch.load does not check the zip's CRC-32s, so flipped bytes inside a tensor would load as
    wrong weights: the archive is tested first. A NaN/inf weight is refused, naming the tensor.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"Checkpoint {file} does not exist; pass a .ckpt written by `fit` "
                              "(e.g. <run dir>/checkpoints/last.ckpt)")
    if file.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {file} is empty (0 bytes). {_CORRUPT_FIX}")
    verify_zip(file)
    try:
        checkpoint = safe_load(file, map_location)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        if not _starts_as_zip(file):  # torch's advice (retry with weights_only off) would run the file's code
            raise CheckpointError(f"Checkpoint {file} is not a file written by torch.save (no zip archive: a raw "
                                  "pickle or another format) and is not loaded; pass a .ckpt written by `fit`") from None
        raise CheckpointError(
            f"Checkpoint {file} is truncated or corrupt ({type(error).__name__}: {_first_line(error)}). {_CORRUPT_FIX}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"Checkpoint {file} is not a Lightning checkpoint (no 'state_dict' entry)")
    bad = nonfinite_tensors(checkpoint["state_dict"]) if isinstance(checkpoint["state_dict"], dict) else []
    if bad:
        raise CheckpointError(f"Checkpoint {file}: tensor {bad[0]} holds NaN or infinite values"
                              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + f". {_CORRUPT_FIX}")
    return checkpoint


def _starts_as_zip(file: Path) -> bool:
    """Whether the file begins like torch.save's zip archive (a truncated one keeps its first bytes)."""
    with open(file, "rb") as handle:
        return handle.read(2) == b"PK"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no message"


def verify_zip(file: Path) -> None:
    """Check every member's CRC-32 of a zip-format checkpoint (torch's format since 1.6); other files pass through."""
    if not zipfile.is_zipfile(file):
        return  # a legacy (pre-zip) torch file, or not a checkpoint at all: torch.load says which
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise CheckpointError(f"Checkpoint {file} is truncated or corrupt ({type(error).__name__}: "
                              f"{_first_line(error)}). {_CORRUPT_FIX}") from None
    if bad is not None:
        raise CheckpointError(f"Checkpoint {file} is corrupt: member {bad} fails its CRC-32 check (bytes changed after "
                              f"it was written). {_CORRUPT_FIX}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save CheckpointIO, made atomic (`safe_files.atomic_write`: temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options, got "
                            f"{storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


def storage_ids(module: nn.Module) -> set[int]:
    """Identities of the tensor storages of `module`'s state (taken before adapters are attached)."""
    return {tensor.data_ptr() for tensor in module.state_dict().values() if tensor.numel()}


def _fingerprint(state: dict[str, torch.Tensor], names: set[str]) -> float:
    """A cheap checksum of the frozen tensors, to detect a checkpoint loaded onto another backbone."""
    return float(sum(state[name].flatten()[:64].double().sum() for name in sorted(names) if state[name].numel()))


@dataclass
class TrainableState:
    """What a checkpoint of an adapted model holds, and the check that a checkpoint fits the model.

    Attributes:
        keys: state-dict keys written (trainable tensors, and buffers the adapters created).
        fingerprint: checksum of the frozen backbone tensors the checkpoint was trained on.
    """

    keys: set[str] = field(default_factory=set)
    fingerprint: float = 0.0

    @classmethod
    def of(cls, backbone: nn.Module, frozen_storages: set[int], prefix: str = "backbone.") -> "TrainableState":
        """Split `backbone`'s state: kept keys (under `prefix`) vs frozen tensors (storages seen before adapting)."""
        # Trained banks (adapters/bank.py) are never saved: their members are, and their storage is not frozen.
        trainable = {name for name, parameter in backbone.named_parameters() if parameter.requires_grad}
        keep, frozen = set(), set()
        for name, tensor in backbone.state_dict(keep_vars=True).items():
            if name in trainable:
                keep.add(name)
                continue
            if tensor.numel() and tensor.data_ptr() in frozen_storages:
                frozen.add(name)
            else:
                keep.add(name)
        return cls({prefix + name for name in keep}, _fingerprint(backbone.state_dict(), frozen))

    def filter(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The entries of a full state dict that a checkpoint keeps."""
        return {key: value for key, value in state_dict.items() if key in self.keys}

    def verify(self, checkpoint: dict[str, Any], own: dict[str, torch.Tensor], where: str) -> None:
        """Raise a RuntimeError if `checkpoint` misses, adds or reshapes a kept tensor, or was trained on
        other frozen weights; `own` is the model's state dict, `where` describes both for the message."""
        state = checkpoint.get("state_dict", {})
        missing = sorted(self.keys - state.keys())
        unexpected = sorted(k for k in state.keys() - own.keys())
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in sorted(self.keys & state.keys()) if state[k].shape != own[k].shape]
        problems = [f"{label} {items[:8]}{' …' if len(items) > 8 else ''}"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", mismatched)) if items]
        if problems:
            raise CheckpointError(f"Checkpoint does not fit this model — {where}: " + "; ".join(problems))
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("frozen_fingerprint")
        if saved is not None and not math.isclose(saved, self.fingerprint, rel_tol=1e-6, abs_tol=1e-6):
            raise CheckpointError(
                f"Checkpoint was trained on different frozen backbone weights — {where}. Build the same "
                "backbone (model.backbone.name / checkpoint_path / init_seed / overrides) as in training."
            )


def check_classes(saved: dict[str, Any], num_classes: int | None, label_names: list[str] | None) -> list[str] | None:
    """The label names to use with a checkpoint whose hyperparameters are `saved`; raises if it was
    trained for other classes than the data module's (`num_classes`, `label_names`)."""
    saved_names = saved.get("label_names")
    if saved.get("num_classes", num_classes) != num_classes or (
            saved_names and label_names and list(saved_names) != list(label_names)):
        trained = f"{saved.get('num_classes')} classes" + (f" {list(saved_names)}" if saved_names else "")
        data = f"{num_classes}" + (f" {list(label_names)}" if label_names else "")
        raise CheckpointError(f"the checkpoint was trained for {trained} but the data module has {data}; "
                           "use the data settings (--config) the checkpoint was trained with")
    return list(label_names or saved_names or []) or None


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the current epoch travels in Lightning checkpoints.

    Lightning calls `state_dict()` when it writes a checkpoint and `load_state_dict()` only when it
    resumes mid-epoch, before the epoch's iterator is drawn. The skip then uses the sampler's
    `fast_forward(num_samples)` when it has one (no data is loaded for the skipped batches) and
    otherwise draws and discards the batches (e.g. under Lightning's DistributedSampler).
    Counting happens where batches leave the loader, so worker prefetching does not shift it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resume: tuple[int, int] = (0, 0)  # (batches already seen, batches still to draw and discard)

    def _order_sampler(self) -> Any:
        return getattr(self.batch_sampler, "sampler", self.sampler)

    def state_dict(self) -> dict[str, Any]:
        epoch = getattr(self._order_sampler(), "epoch", None)
        return {"epoch": None if epoch is None else int(epoch), "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batches_yielded" not in state:
            raise CheckpointError(f"the checkpoint's data-loader state {sorted(state)} has no 'batches_yielded'; "
                                  "it was written by another loader class")
        sampler = self._order_sampler()
        if state.get("epoch") is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state["epoch"])  # worker processes read the order as soon as they start
        seen = int(state["batches_yielded"])
        if hasattr(sampler, "fast_forward") and self.batch_size is not None:
            sampler.fast_forward(seen * self.batch_size)  # skipped batches are never loaded
            self._resume = (seen, 0)
        else:
            self._resume = (seen, seen)

    def __iter__(self) -> Iterator[Any]:
        return self._counted()

    def _counted(self) -> Iterator[Any]:
        # A generator: nothing runs before the first batch is requested, i.e. after Lightning's set_epoch.
        (self._yielded, discard), self._resume = self._resume, (0, 0)
        batches = super().__iter__()
        for _ in range(discard):
            if next(batches, None) is None:
                return
        for batch in batches:
            self._yielded += 1
            yield batch


def resumable(loader: DataLoader) -> ResumableDataLoader:
    """The same loader (dataset, sampler, batching, workers, collate) as a `ResumableDataLoader`."""
    if isinstance(loader, ResumableDataLoader):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not torch.utils.data.BatchSampler:
        raise TypeError(f"resumable(): a custom batch_sampler ({type(loader.batch_sampler).__name__}) is not "
                        "supported; pass sampler= and batch_size= instead")
    return ResumableDataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor,
    )


# ---------------------------------------------------------------------- a DoranModule's checkpoint hooks
def save_trainable_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """`DoranModule.on_save_checkpoint`: keep the trainable tensors only, and what checks them on loading."""
    checkpoint["state_dict"] = module.trainable_state.filter(checkpoint["state_dict"])
    checkpoint.setdefault(CHECKPOINT_KEY, {}).update(
        frozen_fingerprint=module.trainable_state.fingerprint, variant=module.adapter_config.variant,
        tokenizer=getattr(module.tokenizer, "name_or_path", None))  # what `predict` uses when given none


def load_trainable_state(module: Any, checkpoint: dict[str, Any], param_groups: Callable[[Any], list]) -> None:
    """`DoranModule.on_load_checkpoint` (the backbone built): class names, a pre-banking optimizer state, the check."""
    hp = module.hparams
    hp.label_names = check_classes(checkpoint.get("hyper_parameters", {}), hp.num_classes, hp.label_names)
    trainer = module._trainer
    if trainer is not None and trainer.state.fn != "fit":
        # Callback states (ModelCheckpoint's best scores, its old run folder) matter only to a resumed fit.
        checkpoint.pop("callbacks", None)
    if trainer is not None and trainer.state.fn == "fit" and restack_optimizer_state(
            checkpoint, module.backbone, param_groups(module)):
        say("The checkpoint's optimizer state has one entry per adapter tensor (written before banking): "
            "stacked into the banks' layout")
    if "state_dict" not in checkpoint and is_sharded(module.backbone) and trainer.ckpt_path:
        # ModelParallelStrategy has loaded the tensors itself and removed them: check the file's.
        checkpoint = {**checkpoint, "state_dict": read_checkpoint(trainer.ckpt_path)["state_dict"]}
    verify_trainable_state(module, checkpoint)


def verify_trainable_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Raise if the checkpoint does not match the module's trainable tensors or frozen backbone."""
    saved_variant = checkpoint.get(CHECKPOINT_KEY, {}).get("variant", "?")
    cfg = module.adapter_config
    where = (f"checkpoint (trained as {saved_variant!r}) vs this model ({cfg.variant!r}, "
             f"r={cfg.r}, backbone {module.backbone_config.name!r})")
    module.trainable_state.verify(checkpoint, module.state_dict(), where)
