"""LoRA / DoRA / DoRAN math for one frozen Linear, or for row slices of a fused one (METHOD.md §1-4).

One adapted Linear holds one `SliceAdapter` per adapted row range. For a plain projection there is a
single slice (named ``main``) covering every row; for timm's fused ``qkv`` there is one per adapted
part (``q``, ``v``). All slices share one base matmul: the low-rank updates of every slice are
stacked into ``A_cat`` (``[n·r, d_in]``) and a block-structured ``B_full`` (``[d_out, n·r]``), and the
per-row scale ``g = m / (‖V‖_row + σ)`` becomes one vector over all output rows (1 on rows that are
not adapted). Because every norm is per row, this is the same as adapting separate Linears.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.magnitude import low_rank_products, magnitude_scale, norm_squared, scale_reference
from doran_lightning.adapters.noise import initial_rho, is_relative, median_row_norm, sigma_value

if TYPE_CHECKING:
    from doran_lightning.adapters.aux import AuxGenerator, GeneratorBank

MAIN_SLICE = "main"
HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)  # E|ε| for ε ~ N(0, 1)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 tensors, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


class SliceAdapter(nn.Module):
    """Trainable state of one adapted row range: A/B (unless generated), magnitude m, noise ρ."""

    def __init__(self, cfg: AdapterConfig, in_features: int, rows: int, weight_row_norm: Tensor) -> None:
        super().__init__()
        # Adapters of a half/bf16 backbone are kept in float32 (as PEFT does); float64 stays float64.
        factory = dict(device=weight_row_norm.device, dtype=weight_row_norm.dtype)
        if not cfg.use_aux:
            self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(rows, cfg.r, **factory))
            # PEFT's/the LoRA paper's choice: Kaiming-uniform A, zero B, so ΔW = 0 at step 0.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if cfg.use_noise:
            count = 1 if cfg.noise_granularity == "projection" else rows
            rho = torch.full((count,), initial_rho(cfg), **factory)
            if cfg.noise_mode == "fixed":
                self.register_buffer("rho", rho)
            else:
                self.rho = nn.Parameter(rho)
            if is_relative(cfg):  # σ in units of the slice's median row norm (adapters/noise.py)
                self.register_buffer("sigma_unit", median_row_norm(weight_row_norm))
        if cfg.use_magnitude:
            self.magnitude = nn.Parameter(torch.zeros(rows, **factory))
            self.register_buffer("magnitude_init", torch.zeros(rows, **factory))

    def sigma(self, cfg: AdapterConfig, training: bool, rows: int) -> Optional[Tensor]:
        """The noise added to the denominator, float32, per row or broadcastable; None without noise."""
        if not cfg.use_noise:
            return None
        sigma = sigma_value(self.rho.to(math_dtype(self.rho.dtype)), getattr(self, "sigma_unit", None))
        if cfg.noise_mode != "gaussian":
            return sigma
        if training:
            return sigma * torch.randn(rows, device=sigma.device).abs()
        return sigma * HALF_NORMAL_MEAN

    def reset_magnitude(self, cfg: AdapterConfig, weight_row_norm: Tensor) -> None:
        """m0 = ‖W0‖_row (+ σ0, the expected noise), so the adapted layer equals the frozen one."""
        if not cfg.use_magnitude:
            return
        if is_relative(cfg) and cfg.use_noise:
            self.sigma_unit.copy_(median_row_norm(weight_row_norm))
        initial = weight_row_norm.to(self.magnitude.dtype).clone()
        if cfg.use_noise and cfg.magnitude_init == "norm_plus_sigma":
            sigma = self.sigma(cfg, training=False, rows=initial.numel()).detach()
            initial = initial + sigma
        with torch.no_grad():
            self.magnitude.copy_(initial)
            self.magnitude_init.copy_(initial)


class AdaptedLinear(nn.Module):
    """A frozen Linear plus LoRA/DoRA/DoRAN adapters on one or more of its row slices.

    The frozen ``weight``/``bias`` keep their names, so the backbone's state-dict keys are unchanged
    and adapter tensors live under ``<name>.adapters.<slice>.*``.
    """

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, slices: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.cfg = cfg
        self.scaling = cfg.scaling
        self.train(base.training)
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1][0]))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self._original_weight: Optional[Tensor] = None
        # ‖W0_i‖² is reused by every factored norm; W0 is frozen so it is computed once.
        self.register_buffer("weight_norm_sq", self._weight_norm_sq(), persistent=False)
        row_norm = self.weight_norm_sq.sqrt()
        self.adapters = nn.ModuleDict(
            {name: SliceAdapter(cfg, self.in_features, stop - start, row_norm[start:stop])
             for name, (start, stop) in self.slices.items()}
        )
        self.generator: Optional["AuxGenerator"] = None
        self.generator_keys: dict[str, tuple[int, str]] = {}
        self._bank: Optional["GeneratorBank"] = None
        # The block-structured B of a fused projection is built each step by one index_copy into zeros.
        self.register_buffer("_zero_rows", torch.zeros(0, 1), persistent=False)
        if self.is_fused:
            rank_columns = len(self.slices) * cfg.r
            self._zero_rows = torch.zeros(self.out_features, rank_columns, device=row_norm.device, dtype=row_norm.dtype)
        self.register_buffer("_adapted_rows", torch.cat([torch.arange(start, stop, device=row_norm.device)
                                                         for start, stop in self.slices.values()]), persistent=False)
        unadapted = torch.ones(self.out_features, dtype=torch.bool, device=row_norm.device)
        unadapted[self._adapted_rows] = False
        self.register_buffer("_unadapted_rows", unadapted, persistent=False)
        self.reset_magnitude()

    # ------------------------------------------------------------------ set-up
    @property
    def math_dtype(self) -> torch.dtype:
        """Norm, σ and magnitude math runs in float32 (float64 for a float64 backbone), never in half."""
        return math_dtype(self.weight.dtype)

    def _weight_norm_sq(self) -> Tensor:
        return self.weight.detach().to(self.math_dtype).pow(2).sum(dim=1)

    def attach_generator(self, generator: "AuxGenerator", keys: dict[str, tuple[int, str]],
                         bank: Optional["GeneratorBank"] = None) -> None:
        """Take A/B of each slice from a generator (held by reference: it lives elsewhere in the tree).

        With a `bank` the matrices come from the model's one batched generation per forward.
        """
        object.__setattr__(self, "generator", generator)
        object.__setattr__(self, "_bank", bank)
        self.generator_keys = dict(keys)

    def reset_magnitude(self) -> None:
        """(Re)initialise m from the current W0 — call again after weights are materialised (meta/FSDP)."""
        self.weight_norm_sq = self._weight_norm_sq().to(self.weight.device)
        row_norm = self.weight_norm_sq.sqrt()
        for name, (start, stop) in self.slices.items():
            self.adapters[name].reset_magnitude(self.cfg, row_norm[start:stop])

    @property
    def is_fused(self) -> bool:
        return len(self.slices) > 1 or next(iter(self.slices)) != MAIN_SLICE

    # ------------------------------------------------------------------ the factors
    def lowrank_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """A ([r, d_in]) and B ([rows, r]) of every slice; generated ones come from the step's cache."""
        if self.generator is not None:
            generated = self._bank.matrices(self.generator) if self._bank is not None else self.generator.matrices()
            return {name: generated[self.generator_keys[name]] for name in self.slices}
        return {name: (self.adapters[name].lora_A, self.adapters[name].lora_B) for name in self.slices}

    def _frozen(self) -> Tensor:
        """W0 (the kept original while merged)."""
        weight = self._original_weight if self.merged else self.weight
        assert weight is not None
        return weight

    def _rows(self, name: Optional[str]) -> slice:
        """The row range of a slice; None means every output row."""
        return slice(None) if name is None else slice(*self.slices[name])

    def norm_terms(self, name: Optional[str], lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row: ‖W0_i‖², (B ⊙ W0Aᵀ)_i·1 and ((B·AAᵀ) ⊙ B)_i·1, in the math dtype.

        ``‖W0 + sBA‖²_row = first + 2s·second + s²·third`` and ``V_i·W0_i = first + s·second``: the norm and
        the statistics come from ``[rows, r]`` and ``[r, r]`` products, never a ``[rows, d_in]`` matrix.
        With ``name=None`` the terms cover every row, for the stacked ``A_cat``/block-structured ``B_full``
        of all slices at once (each row's B lives in its slice's block only, so the blocks do not mix).
        """
        rows = self._rows(name)
        weight = self._frozen()[rows]
        dtype = self.math_dtype
        b32 = lora_B.to(dtype)
        weight_a, gram = low_rank_products(weight, lora_A.to(dtype))
        return self.weight_norm_sq[rows].to(dtype), (b32 * weight_a).sum(dim=1), ((b32 @ gram) * b32).sum(dim=1)

    def row_norm(self, name: Optional[str], lora_A: Tensor, lora_B: Tensor, with_grad: bool = False) -> Tensor:
        """‖W0 + s·B·A‖_row of one slice (every row for name=None), by the forward's own formula.

        For statistics and export; the training forward differentiates through `magnitude_scale` instead.
        """
        rows = self._rows(name)
        dtype = self.math_dtype
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()), torch.autocast(
            device_type=self.weight.device.type, enabled=False
        ):
            if not self.cfg.factored_norm:
                dense = self._frozen()[rows].to(dtype) + self.scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
                return dense.norm(dim=1)
            norm_sq, _, _ = norm_squared(self._frozen()[rows], self.weight_norm_sq[rows], lora_A.to(dtype),
                                         lora_B.to(dtype), self.scaling)
            return norm_sq.clamp_min(0).sqrt()  # rounding can push an exact zero slightly negative

    def _pieces(self) -> list[tuple[Optional[str], int, int]]:
        """Output rows in order: (slice name, start, stop), with None for rows no slice adapts."""
        pieces, cursor = [], 0
        for name, (start, stop) in self.slices.items():
            if start > cursor:
                pieces.append((None, cursor, start))
            pieces.append((name, start, stop))
            cursor = stop
        if cursor < self.out_features:
            pieces.append((None, cursor, self.out_features))
        return pieces

    def _per_row(self, values: dict[str, Tensor], fill: Tensor) -> Tensor:
        """One vector over all output rows from per-slice values; other rows take `fill`'s."""
        parts = [values[name].expand(stop - start) if name is not None else fill[start:stop]
                 for name, start, stop in self._pieces()]
        return torch.cat(parts)

    def combined(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(A_cat [n·r, d_in], B_full [d_out, n·r], g over all rows or None), the single slice's when unfused.

        B_full is block-structured: each row's B lives in its slice's block, so ``x·A_catᵀ·B_fullᵀ`` adds
        each slice's update to its own rows only, and unadapted rows get zero.
        """
        factors = self.lowrank_factors()
        if self.is_fused:
            lora_A = torch.cat([factors[name][0] for name in self.slices], dim=0)
            diagonal = torch.block_diag(*[factors[name][1] for name in self.slices])
            lora_B = self._zero_rows.to(diagonal.dtype).index_copy(0, self._adapted_rows, diagonal)
        else:
            lora_A, lora_B = factors[MAIN_SLICE]
        if not self.cfg.use_magnitude:
            return lora_A, lora_B, None
        return lora_A, lora_B, self._scale(lora_A, lora_B)

    def _scale(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """g = m / (‖W0 + s·B·A‖_row + σ) over all rows (exactly 1 on rows no slice adapts)."""
        rows = {name: stop - start for name, (start, stop) in self.slices.items()}
        sigmas = {name: self.adapters[name].sigma(self.cfg, self.training, rows[name]) for name in self.slices}
        if self.is_fused:
            # Unadapted rows take placeholders (m = 0, σ = 0) and are set to exactly 1 inside magnitude_scale.
            placeholder = self._zero_rows[:, 0].to(self.math_dtype)
            magnitude = self._per_row({n: a.magnitude for n, a in self.adapters.items()}, placeholder)
            sigma = None if not self.cfg.use_noise else self._per_row(sigmas, placeholder)
        else:
            magnitude, sigma = self.adapters[MAIN_SLICE].magnitude, sigmas[MAIN_SLICE]
        return self._magnitude_scale(self._frozen(), self.weight_norm_sq, lora_A, lora_B, magnitude, sigma,
                                     self._unadapted_rows if self.is_fused else None)

    def slice_scale(self, name: str, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """g = m / (‖V‖_row + σ) of one slice (float32), through the same function as the forward."""
        start, stop = self.slices[name]
        adapter = self.adapters[name]
        sigma = adapter.sigma(self.cfg, self.training, stop - start)
        return self._magnitude_scale(self._frozen()[start:stop], self.weight_norm_sq[start:stop], lora_A, lora_B,
                                     adapter.magnitude, sigma)

    def _magnitude_scale(self, weight: Tensor, weight_norm_sq: Tensor, lora_A: Tensor, lora_B: Tensor,
                         magnitude: Tensor, sigma: Optional[Tensor], keep_rows: Optional[Tensor] = None) -> Tensor:
        dtype = self.math_dtype
        args = (lora_A.to(dtype), lora_B.to(dtype), magnitude.to(dtype), None if sigma is None else sigma.to(dtype),
                self.scaling, self.cfg.detach_norm)
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            if not self.cfg.factored_norm:
                scale = scale_reference(weight, *args)
                return scale if keep_rows is None else scale.masked_fill(keep_rows, 1.0)
            return magnitude_scale(weight, weight_norm_sq, *args, keep_rows)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        lora_A, lora_B, scale = self.combined()
        flat = x.reshape(-1, self.in_features)
        # Base path on x, adapter path on dropout(x) (PEFT's DoRA semantics); exact when dropout is off.
        down = F.linear(self.dropout(flat), lora_A.to(x.dtype))
        base = F.linear(flat, self.weight, self.bias if scale is None else None)
        out = torch.addmm(base, down, lora_B.to(x.dtype).T, alpha=self.scaling)  # one kernel: base + s·(xAᵀ)Bᵀ
        if scale is not None:
            scale = scale.to(out.dtype)
            out = out * scale if self.bias is None else torch.addcmul(self.bias.to(out.dtype), out, scale)
        return out.view(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """g ⊙ (W0 + s·B·A) in W0's dtype (computed in float32; eval-mode σ)."""
        was_training = self.training
        self.eval()
        try:
            lora_A, lora_B, scale = self.combined()
        finally:
            self.train(was_training)
        dtype = self.math_dtype
        weight = self.weight.to(dtype) + self.scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
        if scale is not None:
            weight = weight * scale[:, None]
        return weight.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged = self.merged_weight()
        self._original_weight = self.weight.data
        self.weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the kept W0 (bit-exact: nothing is subtracted)."""
        if not self.merged:
            return
        assert self._original_weight is not None
        self.weight.data = self._original_weight
        self._original_weight = None
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (no adapter code left)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.data = self.merged_weight() if not self.merged else self.weight.data
        if self.bias is not None:
            linear.bias.data = self.bias.data
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        parts = ",".join(self.slices) if self.is_fused else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg.variant}, "
                f"r={self.cfg.r}{', slices=' + parts if parts else ''}{', merged' if self.merged else ''}")

