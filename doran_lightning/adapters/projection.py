"""What the batch engine and the methods read of an adapted projection, as interfaces (no import of `layer`).

`layer.AdaptedLinear` implements both structurally. Declaring them here, beside nothing, keeps the import graph
a tree: `layer` imports `engine` and `methods`; they import these protocols, never `layer` (not even for type
checking; tests/test_import_graph.py holds the package to no cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from doran_lightning.adapters.config import AdapterConfig
    from doran_lightning.adapters.variants import FusedSlices, Magnitude, WholeRows


class StepInputs(Protocol):
    """What `engine.compute_step` reads of each projection of a group (its static layout and its tensors)."""

    weight: Tensor  # W0 (its device and dtype; `frozen_weight()` for the values)
    weight_norm_sq: Tensor  # ‖W0_i‖², cached
    adapted_rows: Tensor  # fused slices: the adapted rows; b_positions: where B's entries sit in B_full
    b_positions: Tensor
    layout: Union["WholeRows", "FusedSlices"]
    rescale: Optional["Magnitude"]  # None: no row rescaling (LoRA)
    scaling: float
    slices: dict[str, tuple[int, int]]
    adapters: nn.ModuleDict  # {slice: SliceAdapter}

    @property
    def math_dtype(self) -> torch.dtype: ...

    def frozen_weight(self) -> Tensor: ...

    def slice_factors(self) -> list[tuple[Tensor, Tensor]]: ...


class Projection(StepInputs, Protocol):
    """What a method (`methods.AdapterMethod`) reads and sets of a projection: initialisation, merge, export."""

    cfg: "AdapterConfig"
    training: bool

    def reset_magnitude(self) -> None: ...

    def cache_weight_norm(self) -> None: ...

    def lowrank_factors(self) -> dict[str, tuple[Tensor, Tensor]]: ...

    def row_norm(self, name: str, lora_A: Tensor, lora_B: Tensor, with_grad: bool = False) -> Tensor: ...

    def sigma(self, name: str, training: bool = False) -> Optional[Tensor]: ...
