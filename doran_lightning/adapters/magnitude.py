"""The DoRA/DoRAN per-row scale ``g = m / (‖W0 + s·B·A‖_row + σ)`` as one autograd Function (METHOD.md §2, §4).

Autograd would record every small step of the factored norm (about twenty kernels forward and
backward per layer); on a GPU those launches, not the FLOPs, set the cost of a DoRA step. The
Function below runs the norm in a handful of matrix products and returns hand-derived gradients:

    S_i   = ‖W0_i‖² + s·Σ_k B_ik·(2·W0Aᵀ + s·B·AAᵀ)_ik        (= ‖W0 + sBA‖²_row, never a [rows, d_in] matrix)
    g_i   = m_i / (√S_i + σ_i)
    ∂g/∂m = 1/den     ∂g/∂σ = ∂g/∂√S = −g/den              (den = √S + σ)

With ``detach_norm`` (DoRA §4.3, the default) √S is a constant in backward and only m and σ get a
gradient here. Without it, e = (∂L/∂√S)/(2√S) gives ∂L/∂B = 2s·e ⊙ (W0Aᵀ + s·B·AAᵀ) and
∂L/∂A = 2s·Eᵀ(W0 + s·B·A) with E = e ⊙ B, computed as 2s·(EᵀW0 + s·(EᵀB)·A). `scale_reference` is the
same formula written with plain autograd: the tests compare both (gradcheck in float64).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def low_rank_products(weight: Tensor, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """(W0Aᵀ [rows, r], AAᵀ [r, r]) in the dtype of `lora_A`: everything the row norms need from W0 and A."""
    weight_a = (weight @ lora_A.to(weight.dtype).T).to(lora_A.dtype)
    return weight_a, lora_A @ lora_A.T


def norm_squared(weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(S = ‖W0 + s·B·A‖²_row, W0Aᵀ, AAᵀ) in the dtype of `lora_A`, from [rows, r] and [r, r] products."""
    weight_a, gram = low_rank_products(weight, lora_A)
    inner = torch.addmm(weight_a, lora_B, gram, beta=2.0, alpha=scaling)  # 2·W0Aᵀ + s·B·AAᵀ
    # One batched row-dot: S_i = ‖W0_i‖² + s·B_i·inner_i
    norm_sq = torch.baddbmm(weight_norm_sq.to(lora_A.dtype).view(-1, 1, 1), lora_B.unsqueeze(1), inner.unsqueeze(2),
                            alpha=scaling)
    return norm_sq.view(-1), weight_a, gram


def denominator(norm: Tensor, sigma: Optional[Tensor]) -> Tensor:
    """‖V‖_row + σ (‖V‖_row alone for DoRA): the one place the denominator is written."""
    return norm if sigma is None else norm + sigma


def radial_gain(norm: Tensor, sigma: Optional[Tensor], detach_norm: bool) -> Tensor:
    """Per row, the gain of the step along V_i relative to the step across it (METHOD.md §2).

    Without detaching, ∂W'_i/∂V_i = m_i/(n_i+σ_i)·[I − n_i/(n_i+σ_i)·u_iu_iᵀ] (n = ‖V_i‖, u = V_i/n): the
    radial direction keeps σ/(n+σ) of the tangential gain — 0 is DoRA's projection, 1 a LoRA-like full step.
    With the norm detached the Jacobian is m/(n+σ)·I: gain 1 whatever σ is.
    """
    if detach_norm:
        return torch.ones_like(norm)
    if sigma is None:
        return torch.zeros_like(norm)
    return torch.broadcast_to(sigma, norm.shape) / denominator(norm, sigma)


class _MagnitudeScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                sigma: Optional[Tensor], scaling: float, detach_norm: bool, keep_rows: Optional[Tensor]) -> Tensor:
        norm_sq, weight_a, gram = norm_squared(weight, weight_norm_sq, lora_A, lora_B, scaling)
        floor = 0.0 if detach_norm else torch.finfo(norm_sq.dtype).tiny  # √ has an infinite slope at 0
        norm = norm_sq.clamp_min(floor).sqrt()
        den = denominator(norm, sigma)
        scale = magnitude / den
        if keep_rows is not None:
            scale = scale.masked_fill(keep_rows, 1.0)
        ctx.scaling, ctx.detach_norm, ctx.has_sigma = scaling, detach_norm, sigma is not None
        if detach_norm:
            ctx.save_for_backward(den, scale)
        else:
            ctx.save_for_backward(den, scale, norm, norm_sq, weight, lora_A, lora_B, weight_a, gram)
        return scale

    @staticmethod
    def backward(ctx: Any, grad_scale: Tensor) -> tuple[Optional[Tensor], ...]:
        den, scale = ctx.saved_tensors[:2]
        grad_magnitude = grad_scale / den
        needs_norm_grad = not ctx.detach_norm and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        needs_sigma_grad = ctx.has_sigma and ctx.needs_input_grad[5]
        # ∂L/∂σ = ∂L/∂‖V‖ = −∂L/∂g · g/den (computed only when someone needs it: DoRA has no σ)
        grad_denominator = -(grad_magnitude * scale) if needs_norm_grad or needs_sigma_grad else None
        grad_sigma = grad_denominator if needs_sigma_grad else None
        grad_A = grad_B = None
        if needs_norm_grad:
            _, _, norm, norm_sq, weight, lora_A, lora_B, weight_a, gram = ctx.saved_tensors
            s = ctx.scaling
            half_slope = torch.where(norm_sq > torch.finfo(norm_sq.dtype).tiny, grad_denominator / (2 * norm), 0.0)
            weighted_B = half_slope.unsqueeze(1) * lora_B  # E = e ⊙ B
            if ctx.needs_input_grad[3]:
                grad_B = (2 * s) * half_slope.unsqueeze(1) * torch.addmm(weight_a, lora_B, gram, alpha=s)
            if ctx.needs_input_grad[2]:
                e_weight = (weighted_B.T.to(weight.dtype) @ weight).to(lora_A.dtype)  # Eᵀ W0: [r, d_in]
                grad_A = (2 * s) * torch.addmm(e_weight, weighted_B.T @ lora_B, lora_A, alpha=s)
        return None, None, grad_A, grad_B, grad_magnitude, grad_sigma, None, None, None


def magnitude_scale(weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    sigma: Optional[Tensor], scaling: float, detach_norm: bool,
                    keep_rows: Optional[Tensor] = None) -> Tensor:
    """g = m / (‖W0 + s·B·A‖_row + σ), one value per row, in the dtype of `lora_A` (float32 or float64).

    `weight` is W0 ([rows, d_in], any dtype), `weight_norm_sq` its cached ‖W0_i‖², `lora_A` [r, d_in],
    `lora_B` [rows, r], `magnitude` and `sigma` per row (sigma may be None: DoRA). Rows flagged in the
    boolean `keep_rows` (not adapted: B is zero there) get exactly 1.
    """
    return _MagnitudeScale.apply(weight, weight_norm_sq, lora_A, lora_B, magnitude, sigma, scaling, detach_norm,
                                 keep_rows)


def scale_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, sigma: Optional[Tensor],
                    scaling: float, detach_norm: bool) -> Tensor:
    """The same g from the dense [rows, d_in] matrix with plain autograd (`factored_norm: false`, and the tests)."""
    dense = weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A)
    norm = dense.norm(dim=1)
    if detach_norm:
        norm = norm.detach()
    return magnitude / denominator(norm, sigma)
