"""Per-projection statistics (METHOD.md §5) as tensors, computed without touching autograd.

Everything is derived from the low-rank factors, never from a dense ``[d_out, d_in]`` update:
``V_i·W0_i = ‖W0_i‖² + s·(B ⊙ W0Aᵀ)_i·1`` and ``‖sBA‖_F² = s²·Σ (B G) ⊙ B`` with ``G = A Aᵀ``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from doran_lightning.adapters.bank import gradient, parameter_names
from doran_lightning.adapters.generators import AuxGenerator
from doran_lightning.adapters.inject import adapted_modules, generators
from doran_lightning.adapters.layer import AdaptedLinear
from doran_lightning.adapters.magnitude import denominator, norm_squared_from_terms, radial_gain
from doran_lightning.adapters.names import canonical_name, unwrap_root
from doran_lightning.adapters.tensors import MAGNITUDE_VECTOR


def projection_name(module_name: str, layer: AdaptedLinear, slice_name: str) -> str:
    """``blocks.3.attn.qkv.q`` for a fused slice, the module path for a whole projection."""
    module_name = canonical_name(module_name)  # the same tag under FSDP, compile, checkpointing wrappers
    return f"{module_name}.{slice_name}" if layer.is_fused else module_name


@torch.no_grad()
def _slice_statistics(layer: AdaptedLinear, slice_name: str, lora_A: Tensor, lora_B: Tensor) -> dict[str, Tensor]:
    scaling = layer.scaling
    base_sq, cross, update_sq = layer.norm_terms(slice_name, lora_A, lora_B)
    norm_sq = norm_squared_from_terms(base_sq, cross, update_sq, scaling)
    stats = {"update_ratio": scaling * update_sq.sum().clamp_min(0).sqrt() / base_sq.sum().sqrt()}
    adapter = layer.adapters[slice_name]
    if layer.rescale is not None:
        norm = norm_sq.sqrt()
        sigma = layer.sigma(slice_name)
        cosine = (base_sq + scaling * cross) / (norm * base_sq.sqrt()).clamp_min(1e-30)
        stats["delta_m"] = (adapter.magnitude.float() - adapter.magnitude_init.float()).abs().mean()
        stats["delta_d"] = (1 - cosine.clamp(-1, 1)).mean()
        stats["denominator_min"] = denominator(norm, sigma).min()
        stats["radial_gain"] = radial_gain(norm, sigma, layer.rescale.detach_norm).mean()
        if sigma is not None:
            stats["sigma"] = sigma.mean()
    return stats


def gradient_norm(grads: Iterable[Tensor]) -> Tensor:
    """Global L2 norm of several gradients, in float32 (0 when there are none)."""
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _grad_norm(module: nn.Module) -> Tensor:
    """The gradient norm of every parameter of `module` (a banked one's: its slice of the bank's)."""
    grads = [gradient(owner, name) for owner in module.modules() for name in parameter_names(owner)]
    return gradient_norm(grad for grad in grads if grad is not None)


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
            stats["grad_norm"] = _grad_norm(layer.adapters[slice_name]).to(stats["update_ratio"].device)
            result[projection_name(module_name, layer, slice_name)] = stats
    return result


@torch.no_grad()
def generator_grad_norms(model: nn.Module) -> dict[str, Tensor]:
    """Gradient norm of every auxiliary generator, by module path."""
    return {name: _grad_norm(generator) for name, generator in generators(model).items()
            if isinstance(generator, AuxGenerator)}


@torch.no_grad()
def adapter_histograms(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """{projection: {"magnitude": m, "denominator": ‖V‖_row + σ}} for DoRA/DoRAN projections."""
    result: dict[str, dict[str, Tensor]] = {}
    for module_name, layer in adapted_modules(unwrap_root(model)).items():
        if layer.rescale is None:
            continue
        for slice_name, denominators in layer.denominators().items():
            result[projection_name(module_name, layer, slice_name)] = {
                MAGNITUDE_VECTOR.name: layer.adapters[slice_name].magnitude.detach().float(),
                "denominator": denominators,
            }
    return result
