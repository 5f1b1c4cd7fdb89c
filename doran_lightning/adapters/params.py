"""Which tensors are adapter tensors, and what the optimizer and the counts make of them (METHOD.md §3, §6).

Modules that hold adapter tensors declare them (torchtune's adapter-params protocol): a method
``adapter_params() -> {parameter name: role}`` with roles from `tensors` (lora, magnitude, sigma,
generator). Files, optimizer groups, parameter counts and statistics ask the modules instead of
matching names or types.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import Tensor, nn

from doran_lightning.adapters.bank import find_bank, named_gradients as banked_gradients, stack_optimizer_state, unbanked_params
from doran_lightning.adapters.inject import adapter_config
from doran_lightning.adapters.tensors import GENERATOR, LORA, MAGNITUDE, SIGMA

# The optimizer group of each role (trainable_modules and everything else: "decay").
GROUP_OF_ROLE = {LORA: "decay", MAGNITUDE: "no_decay", SIGMA: "sigma", GENERATOR: "aux"}


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: module} of every module that declares adapter tensors."""
    return {name: module for name, module in model.named_modules() if callable(getattr(module, "adapter_params", None))}


def adapter_roles(model: nn.Module) -> dict[Tensor, str]:
    """{parameter: role} of every declared adapter parameter."""
    roles: dict[Tensor, str] = {}
    for module in adapter_modules(model).values():
        for name, role in module.adapter_params().items():
            roles[module.get_parameter(name)] = role
    return roles


def count_parameters(model: nn.Module) -> dict[str, int]:
    """trainable / total, and trainable split into adapter (per projection), aux (generators), other."""
    roles = adapter_roles(model)
    counts = {"trainable": 0, "total": 0, "adapter": 0, "aux": 0, "other_trainable": 0}
    for parameter in model.parameters():  # a banked tensor once, as its bank (`bank.py`)
        size = parameter.numel()
        counts["total"] += size
        if not parameter.requires_grad:
            continue
        counts["trainable"] += size
        role = roles.get(parameter)
        counts["other_trainable" if role is None else "aux" if role == GENERATOR else "adapter"] += size
    return counts


def adapter_param_groups(model: nn.Module, weight_decay: float, aux_lr: float | None = None, *,
                         lr: float | None = None, sigma_lr: float | None = None,
                         aux_weight_decay: float | None = None, unbanked: bool = False) -> list[dict]:
    """Optimizer groups over trainable tensors (METHOD.md §3, §6).

    ``decay``: static A/B and the task head; ``no_decay``: the magnitudes m; ``sigma``: the noise ρ,
    without decay and with its own `sigma_lr` (Adam moves log σ by about the lr per step, so σ needs
    a larger one to travel from 1e-2 towards row norms of order 1); ``aux``: the generators, with
    `aux_weight_decay` (default: `weight_decay`) and `aux_lr`, by default ``lr ×
    AdapterConfig.aux_lr_factor`` (1/sqrt(aux_hidden + 1)): Adam moves every generator weight by about
    the lr, and a generated entry sums h of them. Pass the optimizer's `lr` for that default; a group
    without an lr takes the optimizer's. (`aux_lr` stays the third positional argument, as shipped.)
    Banked tensors (`bank.py`) are trained as their banks; with `unbanked` the groups list the members
    instead, as a model without banks had them (how checkpoints written before banking index them).
    """
    roles = adapter_roles(model)
    if aux_lr is None and GENERATOR in roles.values():
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
        if parameter.requires_grad:
            groups[GROUP_OF_ROLE.get(roles.get(parameter, ""), "decay")]["params"].append(parameter)
    kept = [group for group in groups.values() if group["params"]]
    if unbanked:
        for group, params in zip(kept, unbanked_params(model, [group["params"] for group in kept])):
            group["params"] = params
    return kept


def named_gradients(model: nn.Module, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """`grads` ({parameter name: gradient}) named by state-dict keys: a bank's gradient split into its members'
    slices (`bank.py`), so that messages name layers."""
    return banked_gradients(model) if find_bank(model) is not None else grads


def restack_optimizer_state(state: dict[str, Any], model: nn.Module, groups: list[dict]) -> Optional[dict[str, Any]]:
    """An optimizer state dict written before banking (one entry per banked tensor), laid out for this model's
    `groups` (its banks); None when the state already fits them or fits neither layout."""
    sizes = [len(group["params"]) for group in state.get("param_groups", [])]
    unbanked = unbanked_params(model, [group["params"] for group in groups])
    if sizes == [len(group["params"]) for group in groups] or sizes != [len(params) for params in unbanked]:
        return None
    return stack_optimizer_state(state, unbanked, [group["params"] for group in groups], model)
