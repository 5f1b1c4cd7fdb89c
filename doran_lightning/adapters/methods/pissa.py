"""PiSSA (Meng et al., 2024): LoRA and DoRA started from W0's principal singular directions — a method in one file.

With W0 = U·S·Vᵀ (per adapted row slice, in float32 or float64), PiSSA starts the adapter on the top r
singular triplets and freezes the rest, the semantics of HF PEFT's ``init_lora_weights="pissa"``:

    A = diag(√(S_r / s))·V_rᵀ      B = U_r·diag(√(S_r / s))      W_res = W0 − s·B·A   (W0 replaced by W_res)

so W_res + s·B·A = W0 and the adapted model equals the backbone at step 0. With DoRA (``dora-pissa``) m0 is
‖W0‖_row = ‖W_res + s·B·A‖_row, so g = 1 at step 0 as well. Merging folds into W_res and unmerging restores it
bit-exactly (the layer keeps the frozen weight it merged). The residual is recomputed from W0 when a model is
rebuilt (adapter files and checkpoints hold A, B and m, never W_res).

Export to PEFT refers to the original W0: W_res + s·B·A = W0 + s·(B·A − B0·A0), a rank-2r LoRA with
A' = [A; A0], B' = [B, −B0] and α chosen so that s is unchanged (PEFT's own conversion of a trained PiSSA
adapter). A0 and B0 are kept as non-persistent buffers ``pissa_A0`` / ``pissa_B0`` of each slice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from doran_lightning.adapters.methods.dora import DoRA
from doran_lightning.adapters.methods.lora import LoRA
from doran_lightning.adapters.registry import register_method
from doran_lightning.adapters.tensors import TensorSpec

if TYPE_CHECKING:
    from doran_lightning.adapters.projection import Projection

# The starting A0, B0 of each slice, kept (non-persistent buffers) for the PEFT export of a trained adapter.
PISSA_A0 = TensorSpec("pissa_A0", None, "[r, d_in]", "A at step 0 (not saved: rebuilt from W0)", stacks=False)
PISSA_B0 = TensorSpec("pissa_B0", None, "[rows, r]", "B at step 0 (not saved: rebuilt from W0)", stacks=False)


class PrincipalInit:
    """The PiSSA initialisation and PEFT export, mixed into LoRA (``pissa``) and DoRA (``dora-pissa``)."""

    @torch.no_grad()
    def initialise(self, layer: "Projection") -> None:
        layer.reset_magnitude()  # from W0 itself: ‖W0‖_row = ‖W_res + s·B·A‖_row
        rank, scaling = layer.cfg.r, layer.scaling
        smallest = min(min(stop - start, layer.weight.shape[1]) for start, stop in layer.slices.values())
        if rank > smallest:  # the top r singular vectors of a slice: it has only min(out, in) of them
            raise ValueError(f"AdapterConfig.r: PiSSA starts from the top r singular vectors of each adapted weight, "
                             f"but a slice here is at most rank {smallest} (got r={rank}); use --model.adapter.r <= "
                             f"{smallest}")
        for name, (start, stop) in layer.slices.items():
            adapter = layer.adapters[name]
            weight = layer.weight[start:stop]
            if weight.is_meta:  # a shape-only model: initialised when its weights are real
                continue
            # float64 stays float64; anything narrower is decomposed in float32 (as PEFT does)
            rows = weight.to(torch.promote_types(weight.dtype, torch.float32))
            left, singular, right = torch.linalg.svd(rows, full_matrices=False)
            root = (singular[:rank] / scaling).sqrt()
            lora_A, lora_B = root[:, None] * right[:rank], left[:, :rank] * root
            adapter.lora_A.copy_(lora_A)
            adapter.lora_B.copy_(lora_B)
            adapter.register_buffer(PISSA_A0.name, adapter.lora_A.detach().clone(), persistent=False)
            adapter.register_buffer(PISSA_B0.name, adapter.lora_B.detach().clone(), persistent=False)
            weight.copy_(rows - scaling * (adapter.lora_B.to(rows.dtype) @ adapter.lora_A.to(rows.dtype)))
        layer.cache_weight_norm()  # the factored row norms read ‖W_res_i‖²

    @torch.no_grad()
    def peft_tensors(self, layer: "Projection", prefix: str) -> dict[str, Tensor]:
        tensors = super().peft_tensors(layer, prefix)  # type: ignore[misc]
        adapter = next(iter(layer.adapters.values()))
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([tensors[f"{prefix}.lora_A.weight"], adapter.pissa_A0.float()])
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([tensors[f"{prefix}.lora_B.weight"], -adapter.pissa_B0.float()],
                                                       dim=1)
        return tensors

    def peft_config(self) -> dict:
        config = super().peft_config()  # type: ignore[misc]
        # Rank 2r at the same scaling s: α/r (or α/√r with rsLoRA) unchanged.
        factor = math.sqrt(2.0) if self.cfg.rslora else 2.0  # type: ignore[attr-defined]
        return {**config, "r": 2 * config["r"], "lora_alpha": factor * config["lora_alpha"]}


@register_method
class PiSSA(PrincipalInit, LoRA):
    """LoRA with A, B on W0's top-r singular directions and W0 replaced by the residual."""

    name = "pissa"
    tensors = LoRA.tensors + (PISSA_A0, PISSA_B0)


@register_method
class DoRAPiSSA(PrincipalInit, DoRA):
    """DoRA with PiSSA's A, B and residual; m0 = ‖W0‖_row."""

    name = "dora-pissa"
    tensors = DoRA.tensors + (PISSA_A0, PISSA_B0)
