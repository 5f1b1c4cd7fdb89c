"""What the batch engine and the methods read of an adapted projection and its parts, as interfaces.

`layer.AdaptedLinear` (and `variants`, `methods.doran.Noise` for the parts) implement them structurally. Declaring
them here, importing nothing of the package, keeps the import graph a tree: `layer` imports `engine` and
`methods`; they import these protocols, never `layer` (not even for type checking; tests/test_import_graph.py
holds the package to no cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from doran_lightning.adapters.config import AdapterConfig


class Sigma(Protocol):
    """σ of the denominator (`methods.doran.Noise`): its tensors on a slice and its value."""

    relative: bool  # σ in units of the slice's median row norm (``sigma_unit``)

    def create(self, adapter: nn.Module, rows: int, factory: dict) -> None: ...

    def reset(self, adapter: nn.Module, weight_row_norm: Tensor) -> None: ...

    def unit(self, adapter: nn.Module) -> Optional[Tensor]: ...

    def sigma(self, rho: Tensor, unit: Optional[Tensor], training: bool, rows: int) -> Tensor: ...


class Rescaling(Protocol):
    """A row rescaling g = m / (‖V‖_row + σ) (`variants.Magnitude`)."""

    noise: Optional[Sigma]
    detach_norm: bool
    factored_norm: bool

    def scale(self, magnitude: Tensor, norm: Tensor, sigma: Optional[Tensor]) -> Tensor: ...


class Layout(Protocol):
    """How a projection's adapted rows lie (`variants.WholeRows` / `FusedSlices`)."""

    fused: bool

    def combine(self, lora_A: Tensor, lora_B: Tensor, count: int, positions: Tensor) -> tuple[Tensor, Tensor]: ...

    def adapted(self, rows: Tensor, adapted_rows: Tensor) -> Tensor: ...

    def spread(self, scale: Tensor, adapted_rows: Tensor) -> Tensor: ...


class StepInputs(Protocol):
    """What `engine.compute_step` reads of each projection of a group (its static layout and its tensors)."""

    weight: Tensor  # W0 (its device and dtype; `frozen_weight()` for the values)
    weight_norm_sq: Tensor  # ‖W0_i‖², cached
    adapted_rows: Tensor  # fused slices: the adapted rows; b_positions: where B's entries sit in B_full
    b_positions: Tensor
    layout: Layout
    rescale: Optional[Rescaling]  # None: no row rescaling (LoRA)
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
