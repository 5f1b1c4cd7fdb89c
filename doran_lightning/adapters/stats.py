"""Per-projection statistics (METHOD.md §5) as tensors, computed without touching autograd.

Everything is derived from the low-rank factors, never from a dense ``[d_out, d_in]`` update:
``V_i·W0_i = ‖W0_i‖² + s·(B ⊙ W0Aᵀ)_i·1`` and ``‖sBA‖_F² = s²·Σ (B G) ⊙ B`` with ``G = A Aᵀ``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from doran_lightning.adapters.aux import AuxGenerator
from doran_lightning.adapters.inject import adapted_modules, adapter_config, generators
from doran_lightning.adapters.layer import AdaptedLinear
from doran_lightning.adapters.magnitude import denominator, radial_gain
from doran_lightning.adapters.names import canonical_name, unwrap_root


def projection_name(module_name: str, layer: AdaptedLinear, slice_name: str) -> str:
    """``blocks.3.attn.qkv.q`` for a fused slice, the module path for a whole projection."""
    module_name = canonical_name(module_name)  # the same tag under FSDP, compile, checkpointing wrappers
    return f"{module_name}.{slice_name}" if layer.is_fused else module_name


@torch.no_grad()
def _slice_statistics(layer: AdaptedLinear, slice_name: str, lora_A: Tensor, lora_B: Tensor) -> dict[str, Tensor]:
    scaling = layer.scaling
    base_sq, cross, update_sq = layer.norm_terms(slice_name, lora_A, lora_B)
    norm_sq = (base_sq + 2 * scaling * cross + scaling**2 * update_sq).clamp_min(0)
    stats = {"update_ratio": scaling * update_sq.sum().clamp_min(0).sqrt() / base_sq.sum().sqrt()}
    adapter = layer.adapters[slice_name]
    if layer.cfg.use_magnitude:
        norm = norm_sq.sqrt()
        sigma = adapter.sigma(layer.cfg, training=False, rows=norm.numel())
        cosine = (base_sq + scaling * cross) / (norm * base_sq.sqrt()).clamp_min(1e-30)
        stats["delta_m"] = (adapter.magnitude.float() - adapter.magnitude_init.float()).abs().mean()
        stats["delta_d"] = (1 - cosine.clamp(-1, 1)).mean()
        stats["denominator_min"] = denominator(norm, sigma).min()
        stats["radial_gain"] = radial_gain(norm, sigma, layer.cfg.detach_norm).mean()
        if sigma is not None:
            stats["sigma"] = sigma.mean()
    return stats


def gradient_norm(grads: Iterable[Tensor]) -> Tensor:
    """Global L2 norm of several gradients, in float32 (0 when there are none)."""
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _grad_norm(tensors: list[Tensor]) -> Tensor:
    return gradient_norm(t.grad for t in tensors if t.grad is not None)


@torch.no_grad()
def adapter_statistics(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """{projection: {sigma, delta_m, delta_d, denominator_min, radial_gain, update_ratio, grad_norm}} (0-dim tensors).

    LoRA has update_ratio and grad_norm only; DoRA has no sigma (its radial gain is 0, or 1 when detached).
    ``grad_norm`` covers the projection's own adapter tensors (m, ρ, and static A/B); generated A/B are
    credited to their generator.
    """
    result: dict[str, dict[str, Tensor]] = {}
    for module_name, layer in adapted_modules(unwrap_root(model)).items():
        factors = layer.lowrank_factors()
        for slice_name, (lora_A, lora_B) in factors.items():
            stats = _slice_statistics(layer, slice_name, lora_A, lora_B)
            stats["grad_norm"] = _grad_norm(list(layer.adapters[slice_name].parameters())).to(stats["update_ratio"].device)
            result[projection_name(module_name, layer, slice_name)] = stats
    return result


@torch.no_grad()
def generator_grad_norms(model: nn.Module) -> dict[str, Tensor]:
    """Gradient norm of every auxiliary generator, by module path."""
    return {name: _grad_norm(list(generator.parameters())) for name, generator in generators(model).items()
            if isinstance(generator, AuxGenerator)}


@torch.no_grad()
def adapter_histograms(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """{projection: {"magnitude": m, "denominator": ‖V‖_row + σ}} for DoRA/DoRAN projections."""
    result: dict[str, dict[str, Tensor]] = {}
    for module_name, layer in adapted_modules(unwrap_root(model)).items():
        if not layer.cfg.use_magnitude:
            continue
        for slice_name, (lora_A, lora_B) in layer.lowrank_factors().items():
            adapter = layer.adapters[slice_name]
            norm = layer.row_norm(slice_name, lora_A, lora_B, with_grad=False)
            sigma = adapter.sigma(layer.cfg, training=False, rows=norm.numel())
            result[projection_name(module_name, layer, slice_name)] = {
                "magnitude": adapter.magnitude.detach().float(),
                "denominator": denominator(norm, sigma),
            }
    return result


def count_parameters(model: nn.Module) -> dict[str, int]:
    """trainable / total, and trainable split into adapter (per projection), aux (generators), other."""
    adapter_ids = {id(p) for layer in adapted_modules(model).values() for p in layer.adapters.parameters()}
    aux_ids = {id(p) for g in generators(model).values() for p in g.parameters()}
    counts = {"trainable": 0, "total": 0, "adapter": 0, "aux": 0, "other_trainable": 0}
    for parameter in model.parameters():
        size = parameter.numel()
        counts["total"] += size
        if not parameter.requires_grad:
            continue
        counts["trainable"] += size
        key = "adapter" if id(parameter) in adapter_ids else "aux" if id(parameter) in aux_ids else "other_trainable"
        counts[key] += size
    return counts


def adapter_param_groups(model: nn.Module, weight_decay: float, aux_lr: float | None = None, *,
                         lr: float | None = None, sigma_lr: float | None = None,
                         aux_weight_decay: float | None = None) -> list[dict]:
    """Optimizer groups over trainable tensors (METHOD.md §3, §6).

    ``decay``: static A/B and the task head; ``no_decay``: the magnitudes m; ``sigma``: the noise ρ,
    without decay and with its own `sigma_lr` (Adam moves log σ by about the lr per step, so σ needs
    a larger one to travel from 1e-2 towards row norms of order 1); ``aux``: the generators, with
    `aux_weight_decay` (default: `weight_decay`) and `aux_lr`, by default ``lr ×
    AdapterConfig.aux_lr_factor`` (1/sqrt(aux_hidden + 1)): Adam moves every generator weight by about
    the lr, and a generated entry sums h of them. Pass the optimizer's `lr` for that default; a group
    without an lr takes the optimizer's. (`aux_lr` stays the third positional argument, as shipped.)
    """
    magnitude_ids, sigma_ids = set(), set()
    for layer in adapted_modules(model).values():
        for adapter in layer.adapters.values():
            for name, parameter in adapter.named_parameters():
                if name == "magnitude":
                    magnitude_ids.add(id(parameter))
                elif name == "rho":
                    sigma_ids.add(id(parameter))
    aux_ids = {id(p) for g in generators(model).values() for p in g.parameters()}
    if aux_lr is None and aux_ids:
        factor = adapter_config(model).aux_lr_factor
        if lr is not None:
            aux_lr = lr * factor
        elif factor != 1.0:
            # Without the base lr the rule cannot be applied: the generators would silently train at the
            # optimizer's lr, where generated A/B move ~sqrt(h+1)x as far as static ones per Adam step.
            warnings.warn(f"adapter_param_groups: aux_lr_scale='fan_in' needs the optimizer's lr to set the "
                          f"generators' lr (lr x {factor:.3g}); pass lr=... (or aux_lr=...), or set "
                          "aux_lr_scale='none' to train them at the optimizer's lr", UserWarning, stacklevel=2)
    groups: dict[str, dict] = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0},
        "sigma": {"name": "sigma", "params": [], "weight_decay": 0.0},
        "aux": {"name": "aux", "params": [],
                "weight_decay": weight_decay if aux_weight_decay is None else aux_weight_decay},
    }
    for key, group_lr in (("aux", aux_lr), ("sigma", sigma_lr)):
        if group_lr is not None:
            groups[key]["lr"] = group_lr
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        pid = id(parameter)
        key = ("no_decay" if pid in magnitude_ids else "sigma" if pid in sigma_ids
               else "aux" if pid in aux_ids else "decay")
        groups[key]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]
