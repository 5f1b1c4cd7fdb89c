"""The batch engine: one projection group's per-step values — A_cat, B_full and g — in one batched pass.

`step.StepCache` calls `compute_step` once per group of projections of equal shape when the adapted model's
forward starts (and a projection calls it alone when nothing cached serves it). What does not depend on the
tokens is computed here for all L projections of the group at once:

    A_cat [L, n·r, d_in], B_full [L, d_out, n·r]   (`variants.WholeRows` / `FusedSlices` lay the slices out)
    g = m / (‖W0 + s·B·A‖_row + σ)   [L, d_out]     (`variants.Magnitude`, `methods.doran.Noise`; None for LoRA)

It reads what `projection.StepInputs` declares of each projection (its layout, rescaling, W0 and ‖W0_i‖², its
slices' tensors) and the banks that serve the group (`bank.serving`); it never imports the layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from doran_lightning.adapters.bank import live, serving
from doran_lightning.adapters.magnitude import dense_row_norm, row_norm
from doran_lightning.adapters.projection import StepInputs
from doran_lightning.adapters.slice_state import stack
from doran_lightning.adapters.tensors import LORA_A, LORA_B, MAGNITUDE_VECTOR, RHO, SIGMA_UNIT

StepValues = tuple[Tensor, Tensor, Optional[Tensor]]  # A_cat [n·r, d_in], B_full [d_out, n·r], g [d_out] or None


def stacks_frozen_weights(device: torch.device) -> bool:
    """Whether a group's detached norm reads W0 through one stacked copy (a GPU: one dispatch) or through one
    product per projection (a CPU, where the copy costs more than the products)."""
    return device.type != "cpu"


def compute_step(layers: list[StepInputs], training: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A_cat [L, n·r, d_in], B_full [L, d_out, n·r] and g [L, d_out] (None for LoRA) of projections of equal shape.

    One stack per tensor kind (none for m, ρ and u when the group is banked: `bank.serving`), one batched norm
    and one division serve all L projections. W0 is read by one batched product on a GPU (a temporary stacked
    copy for L > 1, freed before the step's blocks run: with the default detached norm nothing keeps it for
    backward) and by one product per projection on a CPU, where the copy costs more than the products
    (`magnitude.low_rank_products`).
    """
    first = layers[0]
    count = len(layers)
    banked = serving(layers)  # the group's banks (bank.py): its stacked tensors without a kernel
    if LORA_A.name in banked:
        stacked_A, stacked_B = banked[LORA_A.name].stacked(), banked[LORA_B.name].stacked()
    else:
        pairs = [pair for layer in layers for pair in layer.slice_factors()]
        stacked_A, stacked_B = stack([a for a, _ in pairs]), stack([b for _, b in pairs])
    lora_A, lora_B = first.layout.combine(stacked_A, stacked_B, count, first.b_positions)
    rule = first.rescale
    if rule is None:
        return lora_A, lora_B, None
    dtype = first.math_dtype
    with torch.autocast(device_type=first.weight.device.type, enabled=False):
        frozen = [layer.frozen_weight() for layer in layers]
        each = rule.factored_norm and rule.detach_norm and count > 1 and not stacks_frozen_weights(first.weight.device)
        weight = frozen if each else stack(frozen)  # the L weights as they are, or one stacked copy
        a32, b32 = lora_A.to(dtype), lora_B.to(dtype)
        if rule.factored_norm:
            weight_norm_sq = stack([layer.weight_norm_sq for layer in layers])
            norm = row_norm(weight, weight_norm_sq, a32, b32, first.scaling, rule.detach_norm)
        else:
            norm = dense_row_norm(weight, a32, b32, first.scaling)
            norm = norm.detach() if rule.detach_norm else norm
        del weight, frozen
        adapters = [adapter for layer in layers for adapter in layer.adapters.values()]
        shape = (count, len(first.slices), -1)

        def gathered(name: str) -> Tensor:
            return (banked[name].stacked() if name in banked
                    else stack([live(adapter, name) for adapter in adapters])).view(shape)

        magnitude = gathered(MAGNITUDE_VECTOR.name).to(dtype)
        norm = first.layout.adapted(norm, first.adapted_rows)
        noise, sigma = rule.noise, None
        if noise is not None:
            sigma = noise.sigma(gathered(RHO.name), gathered(SIGMA_UNIT.name) if noise.relative else None, training,
                                norm.shape[-1])
        scale = rule.scale(magnitude, norm, sigma)
        return lora_A, lora_B, first.layout.spread(scale, first.adapted_rows)
