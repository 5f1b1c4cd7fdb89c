"""The parts an adapted projection is built from, one small object each (METHOD.md §1-4).

`AdaptedLinear` is method-agnostic: at construction it picks

* where A and B come from — `StaticFactors` (trained tensors, LoRA's init) or `GeneratedFactors`
  (the step's output of an auxiliary generator);
* how its adapted rows lie — `WholeRows` (one projection) or `FusedSlices` (row slices of a fused
  ``qkv``: A stacked, B block-structured, g exactly 1 on rows no slice adapts);
* whether it rescales rows — `Magnitude` (DoRA's m and g = m / (‖V‖ + σ)), with `methods.doran.Noise` (σ) or without.

Each object creates its own declared tensors (`tensors.py`) on a `SliceAdapter` (state-dict keys
``adapters.<slice>.lora_A``, ``lora_B``, ``magnitude``, ``magnitude_init``, ``rho``), initialises them and knows its part of the
scale. They hold no tensors themselves, so one object serves every projection of a model. All methods
take stacked tensors (a leading dimension over projections) so that a step computes every projection
of equal shape in one call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.magnitude import scale
from doran_lightning.adapters.slice_state import SliceAdapter
from doran_lightning.adapters.tensors import LORA_A, LORA_B, MAGNITUDE_INIT, MAGNITUDE_VECTOR

if TYPE_CHECKING:
    from doran_lightning.adapters.projection import Sigma


class StaticFactors:
    """A and B are trained tensors: Kaiming-uniform A, zero B, so ΔW = 0 at step 0 (LoRA, PEFT)."""

    generated = False

    def create(self, adapter: SliceAdapter, rank: int, in_features: int, rows: int, factory: dict) -> None:
        lora_A = torch.empty(rank, in_features, **factory)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        adapter.declare(LORA_A, lora_A)
        adapter.declare(LORA_B, torch.zeros(rows, rank, **factory))


class GeneratedFactors:
    """A and B come from an auxiliary generator's output of the step (`generators.py`); nothing is stored here."""

    generated = True

    def create(self, adapter: SliceAdapter, rank: int, in_features: int, rows: int, factory: dict) -> None:
        return None


class WholeRows:
    """One projection: every output row is adapted."""

    fused = False

    def combine(self, lora_A: Tensor, lora_B: Tensor, count: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """([L, r, d_in], [L, d_out, r]) from [L·1, …] stacks (views)."""
        return lora_A, lora_B

    def adapted(self, rows: Tensor, adapted_rows: Tensor) -> Tensor:
        """[L, slices, rows] view of a per-row tensor [L, d_out]."""
        return rows.unsqueeze(1)

    def spread(self, scale: Tensor, adapted_rows: Tensor) -> Tensor:
        """[L, d_out] from [L, slices, rows]."""
        return scale.squeeze(1)


class FusedSlices:
    """Row slices of a fused projection (timm ``qkv[q,v]``), like adapting separate Linears.

    A of every slice is stacked into ``A_cat`` [n·r, d_in] and B into a block-structured ``B_full``
    [d_out, n·r]: each row's B lives in its slice's block, so ``x·A_catᵀ·B_fullᵀ`` adds each slice's update
    to its own rows and zero elsewhere, in one product. Both are built for all projections of a step at
    once by one index_copy; g is exactly 1 on rows no slice adapts.
    """

    fused = True

    def __init__(self, out_features: int, bounds: list[tuple[int, int]], rank: int) -> None:
        self.out_features = out_features
        self.count = len(bounds)
        self.rank = rank

    def indices(self, bounds: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """(adapted rows, positions of every B entry in the flattened B_full) — the layer keeps them as buffers."""
        rows = torch.cat([torch.arange(start, stop, device=device) for start, stop in bounds])
        # B_k[i, j] sits at row start_k + i, column k·r + j of B_full [d_out, n·r].
        first_columns = (torch.arange(self.count, device=device) * self.rank).view(-1, 1, 1)
        columns = first_columns + torch.arange(self.rank, device=device)
        positions = rows.view(self.count, -1, 1) * (self.count * self.rank) + columns
        return rows, positions.reshape(-1)

    def combine(self, lora_A: Tensor, lora_B: Tensor, count: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(A_cat [L, n·r, d_in], B_full [L, d_out, n·r]) from [L·n, r, d_in] and [L·n, rows, r] stacks."""
        full = lora_B.new_zeros(count, self.out_features * self.count * self.rank)
        full = full.index_copy(1, positions, lora_B.reshape(count, -1))
        return lora_A.reshape(count, -1, lora_A.shape[-1]), full.view(count, self.out_features, -1)

    def adapted(self, rows: Tensor, adapted_rows: Tensor) -> Tensor:
        return rows.index_select(1, adapted_rows).view(rows.shape[0], self.count, -1)

    def spread(self, scale: Tensor, adapted_rows: Tensor) -> Tensor:
        ones = scale.new_ones(scale.shape[0], self.out_features)
        return ones.index_copy(1, adapted_rows, scale.reshape(scale.shape[0], -1))


class Magnitude:
    """DoRA's magnitude m (m0 = ‖W0‖_row, + σ0 with noise so that W' = W0 at step 0) and g = m / (‖V‖ + σ)."""

    def __init__(self, cfg: AdapterConfig, noise: Optional["Sigma"]) -> None:
        self.noise = noise
        self.detach_norm = cfg.detach_norm
        self.factored_norm = cfg.factored_norm
        self.init_with_sigma = noise is not None and cfg.magnitude_init == "norm_plus_sigma"

    def create(self, adapter: SliceAdapter, rows: int, factory: dict) -> None:
        if self.noise is not None:
            self.noise.create(adapter, rows, factory)
        adapter.declare(MAGNITUDE_VECTOR, torch.zeros(rows, **factory))
        adapter.declare(MAGNITUDE_INIT, torch.zeros(rows, **factory), trainable=False)

    @torch.no_grad()
    def reset(self, adapter: SliceAdapter, weight_row_norm: Tensor) -> None:
        if self.noise is not None:
            self.noise.reset(adapter, weight_row_norm)
        initial = weight_row_norm.to(adapter.magnitude.dtype).clone()
        if self.init_with_sigma:
            initial = initial + self.noise.sigma(adapter.rho, self.noise.unit(adapter), training=False,
                                                 rows=initial.numel())
        adapter.magnitude.copy_(initial)
        adapter.magnitude_init.copy_(initial)

    def scale(self, magnitude: Tensor, norm: Tensor, sigma: Optional[Tensor]) -> Tensor:
        """g = m / (‖V‖_row + σ) (`magnitude.scale`)."""
        return scale(magnitude, norm, sigma)
