"""DoRAN: DoRA with a noise σ in the denominator and generated A/B — its math top to bottom (METHOD.md §2-3).

For one adapted projection with frozen W0 [d_out, d_in] (rows i), every step:

    V     = W0 + s·B·A                                  s = α/r (α/√r with rsLoRA): LoRA's update (`lora.py`)
    ‖V‖_i = √(‖W0_i‖² + s·B_i·(2·W0Aᵀ + s·B·AAᵀ)_i)      never a dense V (`magnitude.row_norm`); a constant in
                                                         backward with ``detach_norm`` (DoRA §4.3, the default)
    σ     = softplus(ρ)                                  sigma_scale: absolute, σ0 = sigma_init     (`sigma_value`)
          = u·softplus(β·ρ)/β                            sigma_scale: row_norm, u = median ‖W0_i‖, β = 100
    σ     ← σ·|ε|, ε ~ N(0, 1) (training), σ·√(2/π) (eval)   noise_mode: gaussian; fixed: ρ is a buffer (`Noise.sigma`)
    den_i = ‖V‖_i + σ_i                                  the denominator (`magnitude.denominator`)
    g_i   = m_i / den_i                                  (`magnitude.scale`); m0 = ‖W0_i‖ + σ0_i (magnitude_init:
                                                         norm_plus_sigma, recipe ours), so g = 1 at step 0
    out   = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b0               (`layer.AdaptedLinear.forward`)

With ``aux`` A and B are not trained tensors but an auxiliary generator's output (one `generators.AuxGenerator`
per block, or one for the model with ``aux_scope: model``; one batched pass a step):

    aux_layout: rank      H = act(S W1ᵀ + b1)   A_t = H W2_A,tᵀ + b2_A,t   B_t = (H' W2_B,tᵀ + b2_B,t)ᵀ   (heads B at 0)
    aux_layout: features  A_t = C_t U_Aᵀ   B_t = U_B D_t   U_Aᵀ, U_B from the heads, shared by the group;
                          C_t, D_t [r, r] per (layer, projection), I at step 0

σ is `Noise` below: ρ (a parameter; a buffer for ``noise_mode: fixed``) and, for ``row_norm``, the unit u on each
slice. ``sigma_scale: absolute`` (as shipped): near σ0 = 0.01 softplus behaves like exp, so an Adam step of size
lr in ρ changes log σ by about lr and σ cannot travel to row norms of order 1 within a fine-tuning run.
``row_norm``: ρ is σ in units of the layer's row norm: above the knee (σ ≳ u/β) dσ/dρ ≈ u, so an Adam step
moves σ by about lr·u whatever σ0 is; below it σ decays geometrically and stays positive. σ0 = sigma_init·u.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from doran_lightning.adapters.methods.base import AdapterMethod
from doran_lightning.adapters.methods.dora import DoRA
from doran_lightning.adapters.registry import register_method
from doran_lightning.adapters.slice_state import SliceAdapter, math_dtype
from doran_lightning.adapters.tensors import RHO, SIGMA_UNIT

if TYPE_CHECKING:
    from doran_lightning.adapters.config import AdapterConfig

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


@register_method
class DoRAN(AdapterMethod):
    """DoRAN: DoRA with a noise σ in the denominator (``noise``) and generated A/B (``aux``), METHOD.md §2-3."""

    name = "doran"
    rescales = True
    switches = ("noise", "aux")
    tensors = DoRA.tensors + (RHO, SIGMA_UNIT)

    def noise(self) -> Optional[Noise]:
        """σ (`Noise`) when the config's noise is on."""
        return Noise(self.cfg) if self.cfg.use_noise else None
