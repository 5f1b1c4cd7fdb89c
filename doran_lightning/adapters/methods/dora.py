"""DoRA (Liu et al., 2024): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row, m0 = ‖W0‖_row.

Its projections also hold the magnitude m (trained) and m0 (a buffer, for Δm statistics); the row scale
g = m / ‖V‖_row is `variants.Magnitude` over the row norm of `magnitude.py`, made for every projection of equal
shape in one batched pass (`engine.compute_step`). DoRAN (`doran.py`) adds σ to the denominator.
"""

from __future__ import annotations

from doran_lightning.adapters.methods.base import AdapterMethod
from doran_lightning.adapters.methods.lora import LoRA
from doran_lightning.adapters.registry import register_method
from doran_lightning.adapters.tensors import MAGNITUDE_INIT, MAGNITUDE_VECTOR


@register_method
class DoRA(AdapterMethod):
    """DoRA (Liu et al.): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row, m0 = ‖W0‖_row."""

    name = "dora"
    rescales = True
    tensors = LoRA.tensors + (MAGNITUDE_VECTOR, MAGNITUDE_INIT)
