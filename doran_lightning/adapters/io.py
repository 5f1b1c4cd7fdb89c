"""Adapter files: safetensors + JSON (only adapter tensors), and export to HF PEFT's LoRA/DoRA format."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from doran_lightning.adapters.config import STRUCTURAL_FIELDS, AdapterConfig
from doran_lightning.adapters.inject import (
    STEP_CACHE_ATTRIBUTE,
    adapted_modules,
    adapter_config,
    adapter_root,
    apply_adapters,
    name_matches,
)
from doran_lightning.adapters.params import adapter_modules
from doran_lightning.console import say
from doran_lightning.safe_files import atomic_write

FORMAT = "doran_lightning.adapters/1"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DIGEST_KEY = "sha256"  # safetensors metadata entry written by _write_tensors
CONFIG_DIGEST_KEY = "config_sha256"  # the manifest's digest, in the same metadata (written by save_adapters)
W0_KEY = "frozen_fingerprint"  # per projection, a fingerprint of the frozen weight (`frozen_fingerprint`)
PathLike = Union[str, os.PathLike]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors (m, ρ, A/B, generators, trainable_modules), keyed relative to the adapted root."""
    root = adapter_root(model)
    cfg = adapter_config(root)
    kept = [name for name, _ in root.named_modules() if name and any(name_matches(name, keep)
                                                                     for keep in cfg.trainable_modules)]
    prefixes = list(adapter_modules(root)) + kept
    state = root.state_dict()
    return {key: value for key, value in state.items()
            if any(key.startswith(prefix + ".") for prefix in prefixes)}


def _manifest(model: nn.Module) -> dict[str, Any]:
    projections = {
        name: {"in_features": layer.in_features, "out_features": layer.out_features,
               "slices": {slice_name: list(bounds) for slice_name, bounds in layer.slices.items()}}
        for name, layer in adapted_modules(adapter_root(model)).items()
    }
    return {"format": FORMAT, "config": adapter_config(model).to_dict(), "projections": projections}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
    atomic_write(path, write)


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (safetensors has no checksum of its own)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `tensors` holding a NaN or an infinity."""
    return [name for name, value in tensors.items()
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    contiguous = {key: value.detach().contiguous().cpu().clone() for key, value in tensors.items()}
    # The digest is checked when the file is read: flipped bytes in a tensor are refused, not loaded.
    metadata = {**(metadata or {}), DIGEST_KEY: tensor_digest(contiguous)}
    atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def save_adapters(model: nn.Module, directory: PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter tensors only) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(model)
    # The manifest's digest travels with the tensors: an edited adapter_config.json (alpha, σ, …) is refused;
    # so does a fingerprint of the frozen weights they were trained on (another backbone of the same shapes is).
    _write_tensors(directory / WEIGHTS_FILE, adapter_state_dict(model),
                   metadata={"format": FORMAT, CONFIG_DIGEST_KEY: manifest_digest(manifest),
                             W0_KEY: json.dumps(frozen_fingerprint(model))})
    _write_json(directory / CONFIG_FILE, manifest)
    return directory


def frozen_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """Per adapted projection, (‖W‖_F, the sum of every 97th entry) of its frozen weight, in float64: tells another
    backbone of the same shapes apart, yet survives a cast to the same precision (compared with a tolerance)."""
    prints = {}
    for name, layer in adapted_modules(adapter_root(model)).items():
        weight = layer.weight.detach()
        if weight.is_meta:
            continue
        flat = weight.double().flatten()
        prints[name] = [float(flat.norm()), float(flat[::97].sum())]
    return prints


def _check_frozen_weights(model: nn.Module, path: Path) -> None:
    """ValueError when the adapters were trained on other frozen weights than `model`'s; a note for a file
    written before the fingerprint existed (it still loads)."""
    with safe_open(str(path), framework="pt") as handle:
        saved = (handle.metadata() or {}).get(W0_KEY)
    if saved is None:
        say(f"note: {path} holds no fingerprint of the frozen weights it was trained on (written by an older "
            "release): it loads, but cannot be checked against this model's backbone; export it again to add one")
        return
    ours = frozen_fingerprint(model)
    for name, (norm, sample) in json.loads(saved).items():
        if name not in ours:
            continue
        tolerance = 1e-3 * max(1.0, abs(norm))
        if abs(ours[name][0] - norm) > tolerance or abs(ours[name][1] - sample) > tolerance:
            raise ValueError(f"load_adapters: {path} was trained on other frozen weights than this model's ({name}: "
                             f"‖W0‖ {norm:.6g} in the file, {ours[name][0]:.6g} here); build the backbone it was "
                             "trained on (same name / checkpoint_path / init_seed / overrides)")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _check_manifest_against_tensors(manifest: Mapping[str, Any], path: Path) -> None:
    """Before the config builds anything (issue 31: r = 10**9 would allocate 4e18 bytes): the manifest must be
    the one saved with the tensors (digest), and its rank must be a dimension of the saved tensors."""
    with safe_open(str(path), framework="pt") as handle:
        saved = (handle.metadata() or {}).get(CONFIG_DIGEST_KEY)
        dims = {size for name in handle.keys() for size in handle.get_slice(name).get_shape()}
    config_file = path.parent / CONFIG_FILE
    if saved is not None and saved != manifest_digest(manifest):
        raise ValueError(f"load_adapters: {config_file} was changed after {path.name} was saved (its digest differs); "
                         "export the adapters again from the checkpoint")
    rank = manifest.get("config", {}).get("r")
    if isinstance(rank, int) and rank not in dims:
        raise ValueError(f"load_adapters: {config_file} says r={rank}, but no tensor in {path.name} has a dimension of "
                         "that size; the config does not describe these tensors")


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_adapters: {path} does not exist (expected a directory written by save_adapters)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"load_adapters: {path} is not valid JSON (truncated or corrupt?): {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"load_adapters: {path} is not a doran_lightning adapter file (format "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}); "
                         "PEFT adapters load with peft.PeftModel.from_pretrained")
    return manifest


def _compare_configs(saved: AdapterConfig, current: AdapterConfig) -> None:
    differences = [f"{field}: file has {getattr(saved, field)!r}, model has {getattr(current, field)!r}"
                   for field in STRUCTURAL_FIELDS if getattr(saved, field) != getattr(current, field)]
    differences += [f"{name}: file has {getattr(saved, name)}, model has {getattr(current, name)}"
                    for name in ("use_noise", "use_aux") if getattr(saved, name) != getattr(current, name)]
    if differences:
        raise ValueError("load_adapters: the adapter file was made with a different adapter config:\n  "
                         + "\n  ".join(differences))


def _compare_projections(saved: dict[str, Any], model: nn.Module) -> None:
    current = _manifest(model)["projections"]
    problems = [f"missing in model: {name}" for name in sorted(set(saved) - set(current))]
    problems += [f"not in file: {name}" for name in sorted(set(current) - set(saved))]
    for name in sorted(set(saved) & set(current)):
        if saved[name] != current[name]:
            problems.append(f"{name}: file has {saved[name]}, model has {current[name]}")
    if problems:
        raise ValueError("load_adapters: the adapted projections differ (different backbone or targets?):\n  "
                         + "\n  ".join(problems[:20]) + ("\n  …" if len(problems) > 20 else ""))


def read_adapter_tensors(path: PathLike) -> dict[str, Tensor]:
    """Load a safetensors file, verified: its digest (when written by us) and finite values; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"{path} cannot be read (truncated or corrupt file?): {error}") from None
    if DIGEST_KEY in metadata and tensor_digest(tensors) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path} is corrupt: its tensors do not match the SHA-256 written when it was saved; "
                         "export it again from the checkpoint")
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} holds NaN or infinite values"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + "; it cannot be loaded")
    return tensors


def load_state_strictly(model: nn.Module, tensors: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    """Copy `tensors` into the model's `expected` tensors; every key and shape must agree."""
    refuse_misfit(tensors, expected, source)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def refuse_misfit(tensors: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    """ValueError listing missing, unexpected and reshaped tensors (nothing is copied)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in sorted(set(expected) & set(tensors)) if tensors[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        lines = ([f"missing: {k}" for k in missing[:10]] + [f"unexpected: {k}" for k in unexpected[:10]]
                 + [f"shape mismatch {m}" for m in mismatched[:10]])
        raise ValueError(f"{source} does not fit this model:\n  " + "\n  ".join(lines))


def load_adapters(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load adapters saved by `save_adapters`; applies them first if `model` has none. Returns model."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    tensors = read_adapter_tensors(directory / WEIGHTS_FILE)  # verified before the config is applied
    saved_config = AdapterConfig.from_dict(manifest["config"])
    try:
        current = adapter_config(model)
    except ValueError:
        _check_manifest_against_tensors(manifest, directory / WEIGHTS_FILE)  # before the config builds anything
        apply_adapters(model, saved_config)
        current = saved_config
    _compare_configs(saved_config, current)  # a model already adapted: which field differs, by name
    _check_manifest_against_tensors(manifest, directory / WEIGHTS_FILE)
    _compare_projections(manifest["projections"], model)
    refuse_misfit(tensors, adapter_state_dict(model), str(directory / WEIGHTS_FILE))  # named before the weights are
    _check_frozen_weights(model, directory / WEIGHTS_FILE)
    load_state_strictly(model, tensors, adapter_state_dict(model), str(directory / WEIGHTS_FILE))
    cache = getattr(adapter_root(model), STEP_CACHE_ATTRIBUTE, None)
    if cache is not None:
        cache.clear()  # the next use regenerates from the loaded parameters
    return model


@torch.no_grad()
def export_peft(model: nn.Module, directory: PathLike, base_model_name_or_path: Optional[str] = None,
                task_type: Optional[str] = None) -> Path:
    """Write HF PEFT's adapter format: each projection's tensors as its method exports them
    (`methods.AdapterMethod.peft_tensors`: static A/B, σ folded into the magnitude). Fused slices
    (timm ``qkv[q,v]``) have no PEFT equivalent and are refused.

    ``task_type`` (PEFT's, e.g. ``SEQ_CLS``) and ``base_model_name_or_path`` let PEFT's ``AutoPeftModelFor…``
    classes build the base themselves.
    """
    cfg = adapter_config(model)
    root = adapter_root(model)
    layers = adapted_modules(root)
    fused = [name for name, layer in layers.items() if layer.is_fused]
    if fused:
        raise ValueError(f"export_peft: PEFT cannot adapt row slices of a fused projection ({fused[0]} …); "
                         "use save_adapters, or export the merged model instead")
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        was_training = layer.training
        layer.eval()
        try:
            tensors.update(layer.method.peft_tensors(layer, f"base_model.model.{name}"))
        finally:
            layer.train(was_training)
    trainable = {key: value for key, value in adapter_state_dict(root).items()
                 if not any(part in key for part in (".adapters.", "doran_aux"))}
    tensors.update({f"base_model.model.{key}": value for key, value in trainable.items()})
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "use_dora": cfg.use_magnitude,
        "target_modules": sorted(layers), "modules_to_save": list(cfg.trainable_modules) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    config.update(next(iter(layers.values())).method.peft_config())  # r, lora_alpha, use_dora, init_lora_weights
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_tensors(directory / WEIGHTS_FILE, tensors)
    _write_json(directory / CONFIG_FILE, config)
    return directory
