"""The row norm ‖W0 + s·B·A‖_row, the denominator ‖V‖_row + σ and the scale g = m / denominator (METHOD.md §2, §4).

Every function here takes stacked tensors — ``[L, rows, d_in]`` W0, ``[L, r, d_in]`` A, ``[L, rows, r]`` B —
so that one call serves every projection of equal shape in a step (L = 1 for one projection):

    S_i   = ‖W0_i‖² + s·Σ_k B_ik·(2·W0Aᵀ + s·B·AAᵀ)_ik        (= ‖V‖²_row, never a [rows, d_in] matrix)
    g_i   = m_i / (√S_i + σ_i)

With ``detach_norm`` (DoRA §4.3, the default) √S is a constant in backward: it is computed without
autograd and only m and σ get a gradient (through one division). Without it, `_RowNorm` returns √S with
a hand-derived backward — e = (∂L/∂√S)/(2√S) gives ∂L/∂B = 2s·e ⊙ (W0Aᵀ + s·B·AAᵀ) and
∂L/∂A = 2s·(EᵀW0 + s·(EᵀB)·A) with E = e ⊙ B — instead of autograd's record of twenty small kernels.
`scale_reference` is the same g written densely with plain autograd: the tests compare both (gradcheck
in float64). This module is the one home of the row norm (factored `row_norm`, dense `dense_row_norm`, from
statistics' terms `norm_squared_from_terms`), of the denominator ‖V‖_row + σ (`denominator`) and of g (`scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
import warnings
from typing import Any, Optional

import torch
from torch import Tensor


def denominator(norm: Tensor, sigma: Optional[Tensor]) -> Tensor:
    """‖V‖_row + σ (‖V‖_row alone without noise): the one definition used by forward, statistics and export."""
    return norm if sigma is None else norm + sigma


def scale(magnitude: Tensor, norm: Tensor, sigma: Optional[Tensor]) -> Tensor:
    """g = m / (‖V‖_row + σ): the row scale of DoRA (σ None) and DoRAN."""
    return magnitude / denominator(norm, sigma)


def dense_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B·A‖_row from the dense matrix in `lora_A`'s dtype, with plain autograd (``factored_norm: false``)."""
    return (weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A)).norm(dim=-1)


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


def low_rank_products(weight: Tensor | Sequence[Tensor], lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """(W0Aᵀ [L, rows, r], AAᵀ [L, r, r]) in the dtype of `lora_A`: everything the row norms need from W0 and A.

    `weight` is W0 stacked [L, rows, d_in] (one batched product: one dispatch on a GPU) or the L frozen weights
    as a sequence (one product each, W0 never stacked: on a CPU, copying BERT-base's 24 q/v weights into a stack
    took 29-42 ms a step on one thread against 7-9 ms for the 24 products).
    """
    if isinstance(weight, Tensor):
        weight_a = (weight @ lora_A.to(weight.dtype).mT).to(lora_A.dtype)
    else:
        weight_a = torch.stack([(w @ a.to(w.dtype).mT).to(lora_A.dtype) for w, a in zip(weight, lora_A)])
    return weight_a, lora_A @ lora_A.mT


def norm_squared(weight: Tensor | Sequence[Tensor], weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor,
                 scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(S = ‖W0 + s·B·A‖²_row [L, rows], W0Aᵀ, AAᵀ) in the dtype of `lora_A`, from [rows, r] and [r, r] products."""
    weight_a, gram = low_rank_products(weight, lora_A)
    inner = torch.baddbmm(weight_a, lora_B, gram, beta=2.0, alpha=scaling)  # 2·W0Aᵀ + s·B·AAᵀ
    rank = lora_B.shape[-1]
    # One batched row-dot: S_i = ‖W0_i‖² + s·B_i·inner_i
    norm_sq = torch.baddbmm(weight_norm_sq.to(lora_A.dtype).reshape(-1, 1, 1), lora_B.reshape(-1, 1, rank),
                            inner.reshape(-1, rank, 1), alpha=scaling)
    return norm_sq.view(lora_B.shape[:-1]), weight_a, gram


def norm_terms(weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: ‖W0_i‖², (B ⊙ W0Aᵀ)_i·1 and ((B·AAᵀ) ⊙ B)_i·1 (``S = first + 2s·second + s²·third``), for statistics."""
    weight_a, gram = low_rank_products(weight, lora_A)
    return weight_norm_sq.to(lora_A.dtype), (lora_B * weight_a).sum(-1), ((lora_B @ gram) * lora_B).sum(-1)


def norm_squared_from_terms(first: Tensor, second: Tensor, third: Tensor, scaling: float) -> Tensor:
    """S = ‖W0 + s·B·A‖²_row from `norm_terms` (rounding can push an exact zero slightly negative: clamped)."""
    return (first + 2 * scaling * second + scaling**2 * third).clamp_min(0)


class _RowNorm(torch.autograd.Function):
    """√S with the hand-derived backward into A and B (used when the norm is not detached)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
        norm_sq, weight_a, gram = norm_squared(weight, weight_norm_sq, lora_A, lora_B, scaling)
        norm = norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny).sqrt()  # √ has an infinite slope at 0
        ctx.scaling = scaling
        ctx.save_for_backward(norm, norm_sq, weight, lora_A, lora_B, weight_a, gram)
        return norm

    @staticmethod
    def backward(ctx: Any, grad_norm: Tensor) -> tuple[Optional[Tensor], ...]:
        norm, norm_sq, weight, lora_A, lora_B, weight_a, gram = ctx.saved_tensors
        s = ctx.scaling
        half_slope = torch.where(norm_sq > torch.finfo(norm_sq.dtype).tiny, grad_norm / (2 * norm), 0.0).unsqueeze(-1)
        grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = (2 * s) * half_slope * torch.baddbmm(weight_a, lora_B, gram, alpha=s)
        if ctx.needs_input_grad[2]:
            weighted_B = (half_slope * lora_B).mT  # Eᵀ: [L, r, rows]
            e_weight = (weighted_B.to(weight.dtype) @ weight).to(lora_A.dtype)  # Eᵀ W0: [L, r, d_in]
            grad_A = (2 * s) * torch.baddbmm(e_weight, weighted_B @ lora_B, lora_A, alpha=s)
        return None, None, grad_A, grad_B, None


def row_norm(weight: Tensor | Sequence[Tensor], weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor,
             scaling: float, detach_norm: bool) -> Tensor:
    """‖W0 + s·B·A‖_row [L, rows]; a constant for autograd when `detach_norm` (or when nothing needs a gradient).

    W0 may be a sequence of the L weights (`low_rank_products`) only for a detached norm: the norm's own
    backward keeps a stacked W0.
    """
    if detach_norm or not torch.is_grad_enabled() or not (lora_A.requires_grad or lora_B.requires_grad):
        with torch.no_grad():
            norm_sq, _, _ = norm_squared(weight, weight_norm_sq, lora_A, lora_B, scaling)
            return norm_sq.clamp_min(0).sqrt()  # rounding can push an exact zero slightly negative
    return _RowNorm.apply(weight, weight_norm_sq, lora_A, lora_B, scaling)


def magnitude_scale(weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    sigma: Optional[Tensor], scaling: float, detach_norm: bool) -> Tensor:
    """Deprecated (reached only from tests): ``scale(m, row_norm(W0[None], …)[0], σ)``.

    g = m / (‖W0 + s·B·A‖_row + σ) of one projection: W0 [rows, d_in], A [r, d_in], B [rows, r], m and σ per row.
    """
    warnings.warn("doran_lightning.adapters.magnitude.magnitude_scale is deprecated and will be removed; use "
                  "scale(magnitude, row_norm(...)[0], sigma) on stacked tensors", DeprecationWarning, stacklevel=2)
    norm = row_norm(weight.unsqueeze(0), weight_norm_sq.unsqueeze(0), lora_A.unsqueeze(0), lora_B.unsqueeze(0),
                    scaling, detach_norm)[0]
    return scale(magnitude, norm, sigma)


def scale_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, sigma: Optional[Tensor],
                    scaling: float, detach_norm: bool) -> Tensor:
    """The same g from the dense [rows, d_in] matrix with plain autograd (`factored_norm: false`, and the tests)."""
    norm = dense_row_norm(weight, lora_A, lora_B, scaling)
    if detach_norm:
        norm = norm.detach()
    return scale(magnitude, norm, sigma)
