"""The noise variant: σ added to the row norm, and its parametrization (METHOD.md §2).

`Noise` creates ρ (a parameter; a buffer for ``noise_mode: fixed``) — and for ``row_norm`` the unit u —
on each `SliceAdapter`, and turns them into σ: learnable, fixed, or gaussian (σ·|ε| in training, its
expectation σ·sqrt(2/π) in eval), one per projection or per row.

``sigma_scale: absolute`` (as shipped): σ = softplus(ρ), σ0 = ``sigma_init``. Near σ0 = 0.01 softplus
behaves like exp, so an Adam step of size lr in ρ changes log σ by about lr: σ cannot travel to row
norms of order 1 within a fine-tuning run.

``sigma_scale: row_norm``: σ = u·softplus(β·ρ)/β, with u the slice's median ‖W0_i‖ (a buffer, set from
the frozen weight) and β = `RELATIVE_SHARPNESS`. ρ is then σ in units of the layer's row norm: above
the knee (σ ≳ u/β) dσ/dρ ≈ u, so an Adam step of lr moves σ by about lr·u whatever σ0 is; below it σ
decays geometrically and stays positive. σ0 = ``sigma_init``·u.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.slice_state import SliceAdapter, math_dtype
from doran_lightning.adapters.tensors import RHO, SIGMA_UNIT

# β of the relative parametrization: the softplus knee sits at 1 % of the row norm, the smallest σ0/‖W0‖ of
# the issue-17 grid, so every σ0 ≥ 1 % starts where dσ/dρ ≥ 0.63·u (linear, not log-space).
RELATIVE_SHARPNESS = 100.0
HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)  # E|ε| for ε ~ N(0, 1)


def inverse_softplus(value: float) -> float:
    """ρ such that softplus(ρ) = value (stable for small and large values)."""
    return value + math.log(-math.expm1(-value))


def is_relative(cfg: AdapterConfig) -> bool:
    return cfg.sigma_scale == "row_norm"


def initial_rho(cfg: AdapterConfig) -> float:
    """ρ0 with σ(ρ0) = σ0; for ``row_norm`` it does not depend on the weight (u only multiplies)."""
    if is_relative(cfg):
        return inverse_softplus(RELATIVE_SHARPNESS * cfg.sigma_init) / RELATIVE_SHARPNESS
    return inverse_softplus(cfg.sigma_init)


def median_row_norm(weight_row_norm: Tensor) -> Tensor:
    """u: the median ‖W0_i‖ of a slice (a 1-element tensor), the scale of a ``row_norm`` σ."""
    return weight_row_norm.detach().median().reshape(1).clone()


def sigma_value(rho: Tensor, unit: Optional[Tensor]) -> Tensor:
    """σ from ρ: softplus(ρ) (absolute, ``unit`` None) or u·softplus(β·ρ)/β (``row_norm``)."""
    if unit is None:
        return F.softplus(rho)
    return unit.to(rho.dtype) * F.softplus(rho, beta=RELATIVE_SHARPNESS)


class Noise:
    """σ of the denominator ‖V‖_row + σ: its tensors, its initialisation and its value (see the module docstring)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        self.mode = cfg.noise_mode
        self.per_row = cfg.noise_granularity == "row"
        self.relative = is_relative(cfg)
        self.rho0 = initial_rho(cfg)

    def create(self, adapter: SliceAdapter, rows: int, factory: dict) -> None:
        rho = torch.full((rows if self.per_row else 1,), self.rho0, **factory)
        adapter.declare(RHO, rho, trainable=self.mode != "fixed")
        if self.relative:  # σ in units of the slice's median row norm, set from W0 by `reset`
            adapter.declare(SIGMA_UNIT, torch.ones(1, **factory), trainable=False)

    @torch.no_grad()
    def reset(self, adapter: SliceAdapter, weight_row_norm: Tensor) -> None:
        if self.relative:
            adapter.sigma_unit.copy_(median_row_norm(weight_row_norm))

    def unit(self, adapter: SliceAdapter) -> Optional[Tensor]:
        """u of a ``row_norm`` σ (None for ``absolute``)."""
        return adapter.sigma_unit if self.relative else None

    def sigma(self, rho: Tensor, unit: Optional[Tensor], training: bool, rows: int) -> Tensor:
        """σ in the math dtype, shaped like `rho` ([…, 1] or […, rows]), or […, rows] for gaussian training."""
        sigma = sigma_value(rho.to(math_dtype(rho.dtype)), unit)
        if self.mode != "gaussian":
            return sigma
        if training:
            return sigma * torch.randn(*rho.shape[:-1], rows, device=rho.device, dtype=sigma.dtype).abs()
        return sigma * HALF_NORMAL_MEAN
