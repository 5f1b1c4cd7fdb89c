"""The adapter tensors a projection's slice can hold, declared once: name, role, shape, init, whether it stacks.

A method's parts (`methods`) create exactly these on a `slice_state.SliceAdapter`; the batch engine, the banks,
statistics, files and optimizer groups name them through these declarations, never by a string of their own.
The names are state-dict keys (``<projection>.adapters.<slice>.<name>``): a file-format contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The roles adapter tensors play; optimizer groups, counts and files ask modules for them (`params.py`).
LORA, MAGNITUDE, SIGMA, GENERATOR = "lora", "magnitude", "sigma", "generator"


@dataclass(frozen=True)
class TensorSpec:
    """One adapter tensor of a slice (``rows``: the slice's output rows)."""

    name: str  # attribute and state-dict key on the slice
    role: Optional[str]  # its optimizer role when trained (a buffer has none)
    shape: str  # the shape rule
    init: str  # how it starts
    stacks: bool  # read stacked over a rescaled group's projections by the batched pass (and banked)


LORA_A = TensorSpec("lora_A", LORA, "[r, d_in]", "Kaiming-uniform (a=√5)", stacks=True)
LORA_B = TensorSpec("lora_B", LORA, "[rows, r]", "zeros: ΔW = 0 at step 0", stacks=True)
MAGNITUDE_VECTOR = TensorSpec("magnitude", MAGNITUDE, "[rows]", "m0 = ‖W0‖_row (+ σ0)", stacks=True)
MAGNITUDE_INIT = TensorSpec("magnitude_init", MAGNITUDE, "[rows]", "m0 (a buffer, for Δm)", stacks=False)
RHO = TensorSpec("rho", SIGMA, "[1] or [rows]", "ρ0 with σ(ρ0) = σ0 (a buffer when fixed)", stacks=True)
SIGMA_UNIT = TensorSpec("sigma_unit", SIGMA, "[1]", "median ‖W0_i‖ (a buffer, sigma_scale: row_norm)", stacks=True)

# What a rescaled group's batched pass reads stacked, in the order its banks are planned (`step.bank_adapters`).
STACKED = (MAGNITUDE_VECTOR, RHO, SIGMA_UNIT, LORA_A, LORA_B)
