"""`export`'s ``peft/`` and ``base/`` folders: a PEFT adapter that PEFT's auto classes load by themselves.

``AutoPeftModelForSequenceClassification.from_pretrained("exported/peft")`` reads two fields of
``adapter_config.json``: ``task_type`` (which auto class builds the base) and ``base_model_name_or_path``
(where the base comes from). The base must have this run's head size and class names, which the pretrained
model's own config lacks (MiniLM's says 2 labels, the topics have 4), so the export writes ``base/``: that config
plus the tokenizer, with the pretrained weight files linked (symlinks to the local copy the run was built from:
a folder, a pip package's folder, or the Hugging Face cache of a hub id), and records ``base/``'s absolute path.
When no local copy can be found, the hub id the run was trained from is recorded instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from doran_lightning.models import resolve_name

# Our task -> PEFT's task_type (peft.TaskType values), which picks the AutoPeftModel class.
PEFT_TASK_TYPES = {"text_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
BASE_FOLDER = "base"


def local_model_folder(name: str) -> Path | None:
    """The local folder holding `name`'s weights: `name` itself, a pip package's folder, or the cached hub snapshot."""
    resolved = resolve_name(name)
    if Path(resolved).is_dir():
        return Path(resolved).resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved, local_files_only=True))  # never downloads
    except (OSError, ValueError):  # not cached, or not a hub id: the name itself is recorded instead
        return None


def write_base(model: Any, directory: Path) -> bool:
    """``directory``: the backbone's config (head size, class names), tokenizer and linked pretrained weights.

    Returns False (nothing written) when no local copy of the pretrained weights is found.
    """
    source = local_model_folder(model.backbone_config.name)
    weights = [] if source is None else [path for path in sorted(source.iterdir())
                                         if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    for path in weights:
        _link(path.resolve(), directory / path.name)
    model.backbone.config.save_pretrained(directory)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    return True


def _link(target: Path, link: Path) -> None:
    """A symlink (the weights are large and unchanged); a copy where the file system has none."""
    try:
        os.symlink(target, link)
    except OSError:
        shutil.copyfile(target, link)


def export_peft_folders(model: Any, staging: Path, final: Path, export_peft: Any) -> str | None:
    """Write ``staging/peft`` (and ``staging/base``), naming ``final/base`` — where they will be after the
    export's rename — as the base. Returns a note when PEFT's format does not apply (None when written)."""
    if model.backbone_config.source != "hf":
        return "no peft/ (PEFT export needs a Hugging Face backbone; timm's fused qkv has no PEFT equivalent)"
    task_type = PEFT_TASK_TYPES.get(model.hparams.task)
    has_base = write_base(model, staging / BASE_FOLDER)
    base = str(final.resolve() / BASE_FOLDER) if has_base else resolve_name(model.backbone_config.name)
    try:
        export_peft(model.backbone, staging / "peft", base_model_name_or_path=base, task_type=task_type)
    except (ValueError, NotImplementedError) as err:
        shutil.rmtree(staging / BASE_FOLDER, ignore_errors=True)
        return f"no peft/ ({err})"
    model.backbone.config.save_pretrained(staging / "peft")
    if model.tokenizer is not None:  # AutoPeftModel reads it from the adapter folder (else it asks the hub)
        model.tokenizer.save_pretrained(staging / "peft")
    return None
