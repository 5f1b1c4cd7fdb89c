"""LoRA (Hu et al., 2021): W' = W0 + s·B·A, s = α/r (α/√r with rsLoRA), with trained A [r, d_in] and B [d_out, r].

A starts Kaiming-uniform and B at zero (`variants.StaticFactors`), so W' = W0 at step 0. Nothing is rescaled:
its projections read A and B directly, without a per-step pass. The base `AdapterMethod` is LoRA's behaviour.
"""

from __future__ import annotations

from doran_lightning.adapters.methods.base import AdapterMethod
from doran_lightning.adapters.registry import register_method
from doran_lightning.adapters.tensors import LORA_A, LORA_B


@register_method
class LoRA(AdapterMethod):
    """LoRA (Hu et al.): W' = W0 + s·B·A."""

    name = "lora"
    tensors = (LORA_A, LORA_B)
