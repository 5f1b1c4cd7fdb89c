"""One frozen Linear (or row slices of a fused one) with LoRA / DoRA / DoRAN adapters (METHOD.md §1-4).

The layer is method-agnostic: its parts (`variants.py`) say where A/B come from, how the adapted rows
lie and whether rows are rescaled. What does not depend on the tokens — A/B (stacked over slices),
the row norms and g = m / (‖V‖_row + σ) — is computed by `compute_step` for many projections of equal
shape at once, once per step (`step.StepCache`, from the adapted model's forward pre-hook). The
per-projection forward is then LoRA's plus one elementwise scale:

    out = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doran_lightning.adapters.bank import live
from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.engine import StepValues
from doran_lightning.adapters.magnitude import dense_row_norm, denominator, norm_terms, row_norm
from doran_lightning.adapters.methods import method_for
from doran_lightning.adapters.slice_state import SliceAdapter, math_dtype
from doran_lightning.adapters.tensors import LORA_A, LORA_B, RHO, SIGMA_UNIT
from doran_lightning.adapters.variants import FusedSlices, WholeRows

if TYPE_CHECKING:
    from doran_lightning.adapters.generators import AuxGenerator

MAIN_SLICE = "main"


class StepSource(Protocol):
    """What a projection reads from the model's per-step cache (`step.StepCache`, which imports this module)."""

    def current(self, slot: int) -> Optional["StepValues"]: ...

    def matrices(self, generator: "AuxGenerator") -> dict: ...


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
        self.dropout_p = cfg.dropout
        self.train(base.training)
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1][0]))
        self.merged = False
        self._original_weight: Optional[Tensor] = None
        self.method = method_for(cfg)  # what LoRA / DoRA / DoRAN / … is (`methods/`): parts, init, step, merge, export
        self.source = self.method.factors()
        bounds = list(self.slices.values())
        fused = len(bounds) > 1 or next(iter(self.slices)) != MAIN_SLICE
        self.layout = FusedSlices(self.out_features, bounds, cfg.r) if fused else WholeRows()
        self.rescale = self.method.rescaling()
        # ‖W0_i‖² is reused by every factored norm; W0 is frozen so it is computed once.
        self.register_buffer("weight_norm_sq", self._weight_norm_sq(), persistent=False)
        device = self.weight.device
        rows, positions = (self.layout.indices(bounds, device) if fused
                           else (torch.zeros(0, dtype=torch.long, device=device),) * 2)
        self.register_buffer("adapted_rows", rows, persistent=False)
        self.register_buffer("b_positions", positions, persistent=False)
        # Adapters of a half/bf16 backbone are kept in float32 (as PEFT does); float64 stays float64.
        factory = dict(device=device, dtype=self.math_dtype)
        self.adapters = nn.ModuleDict()
        for name, (start, stop) in self.slices.items():
            adapter = SliceAdapter()
            self.source.create(adapter, cfg.r, self.in_features, stop - start, factory)
            if self.rescale is not None:
                self.rescale.create(adapter, stop - start, factory)
            self.adapters[name] = adapter
        self.generator: Optional["AuxGenerator"] = None
        self.generator_keys: list[tuple[int, str]] = []
        self._cache: Optional[StepSource] = None
        self._slot = -1
        self.method.initialise(self)

    # ------------------------------------------------------------------ set-up
    @property
    def math_dtype(self) -> torch.dtype:
        """Norm, σ and magnitude math runs in float32 (float64 for a float64 backbone), never in half."""
        return math_dtype(self.weight.dtype)

    @property
    def is_fused(self) -> bool:
        return self.layout.fused

    def _weight_norm_sq(self) -> Tensor:
        return self.weight.detach().to(self.math_dtype).pow(2).sum(dim=1)

    def attach_generator(self, generator: "AuxGenerator", keys: dict[str, tuple[int, str]]) -> None:
        """Take A/B of each slice from a generator (held by reference: it lives elsewhere in the tree)."""
        object.__setattr__(self, "generator", generator)
        self.generator_keys = [keys[name] for name in self.slices]

    def attach_cache(self, cache: StepSource, slot: int) -> None:
        """Read this projection's per-step values from the model's `StepCache` (held by reference)."""
        object.__setattr__(self, "_cache", cache)
        self._slot = slot

    def cache_weight_norm(self) -> None:
        """(Re)compute the cached ‖W0_i‖² from the current frozen weight (a method that rewrites W0 calls it)."""
        self.weight_norm_sq = self._weight_norm_sq().to(self.weight.device)

    def reset_magnitude(self) -> None:
        """(Re)initialise m from the current W0 — call again after weights are materialised (meta/FSDP)."""
        self.cache_weight_norm()
        if self.rescale is None:
            return
        row_norm_ = self.weight_norm_sq.sqrt()
        for name, (start, stop) in self.slices.items():
            self.rescale.reset(self.adapters[name], row_norm_[start:stop])

    # ------------------------------------------------------------------ the factors
    def slice_factors(self) -> list[tuple[Tensor, Tensor]]:
        """(A [r, d_in], B [rows, r]) of every slice in row order; generated ones come from the step's cache."""
        if self.generator is None:  # a banked A/B is read as its slice of the bank, where its gradient goes
            return [(live(adapter, LORA_A.name), live(adapter, LORA_B.name)) for adapter in self.adapters.values()]
        generated = self._cache.matrices(self.generator) if self._cache is not None else self.generator.matrices()
        return [generated[key] for key in self.generator_keys]

    def lowrank_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{slice: (A, B)}."""
        return dict(zip(self.slices, self.slice_factors()))

    def frozen_weight(self) -> Tensor:
        """W0 (the kept original while merged)."""
        weight = self._original_weight if self.merged else self.weight
        assert weight is not None
        return weight

    def sigma(self, name: str, training: bool = False) -> Optional[Tensor]:
        """σ of one slice in the math dtype (eval: its value, or its expectation for gaussian); None without noise."""
        noise = None if self.rescale is None else self.rescale.noise
        if noise is None:
            return None
        start, stop = self.slices[name]
        adapter = self.adapters[name]
        unit = live(adapter, SIGMA_UNIT.name) if noise.relative else None
        return noise.sigma(live(adapter, RHO.name), unit, training, stop - start)

    def norm_terms(self, name: str, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row of one slice: ‖W0_i‖², (B ⊙ W0Aᵀ)_i·1, ((B·AAᵀ) ⊙ B)_i·1 (see `magnitude.norm_terms`)."""
        rows = slice(*self.slices[name])
        dtype = self.math_dtype
        terms = norm_terms(self.frozen_weight()[rows].unsqueeze(0), self.weight_norm_sq[rows].unsqueeze(0),
                           lora_A.to(dtype).unsqueeze(0), lora_B.to(dtype).unsqueeze(0))
        return terms[0][0], terms[1][0], terms[2][0]

    def row_norm(self, name: str, lora_A: Tensor, lora_B: Tensor, with_grad: bool = False) -> Tensor:
        """‖W0 + s·B·A‖_row of one slice by the forward's own formula (statistics and export)."""
        rows = slice(*self.slices[name])
        dtype = self.math_dtype
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()), torch.autocast(
            device_type=self.weight.device.type, enabled=False
        ):
            weight, lora_A, lora_B = self.frozen_weight()[rows].unsqueeze(0), lora_A.to(dtype)[None], lora_B.to(dtype)[None]
            if not self.cfg.factored_norm:
                return dense_row_norm(weight, lora_A, lora_B, self.scaling)[0]
            return row_norm(weight, self.weight_norm_sq[rows][None], lora_A, lora_B, self.scaling, detach_norm=False)[0]

    @torch.no_grad()
    def denominators(self) -> dict[str, Tensor]:
        """{slice: ‖V‖_row + σ} with eval-mode σ, for statistics, histograms and export."""
        return {name: denominator(self.row_norm(name, lora_A, lora_B), self.sigma(name))
                for name, (lora_A, lora_B) in self.lowrank_factors().items()}

    def step_values(self) -> StepValues:
        """(A_cat, B_full, g) of this step: from the model's `StepCache` when it holds them, else computed now."""
        if self.rescale is None and not self.layout.fused:  # LoRA on a whole projection: the factors themselves
            lora_A, lora_B = self.slice_factors()[0]
            return lora_A, lora_B, None
        values = None if self._cache is None else self._cache.current(self._slot)
        if values is not None:
            return values
        lora_A, lora_B, scale = self.method.step([self], self.training)
        return lora_A[0], lora_B[0], None if scale is None else scale[0]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        lora_A, lora_B, scale = self.step_values()
        flat = x.reshape(-1, self.in_features)
        # Base path on x, adapter path on dropout(x) (PEFT's DoRA semantics); exact when dropout is off.
        dropped = F.dropout(flat, self.dropout_p, self.training) if self.dropout_p else flat
        down = F.linear(dropped, lora_A.to(x.dtype))
        base = F.linear(flat, self.weight, self.bias if scale is None else None)
        out = torch.addmm(base, down, lora_B.to(x.dtype).T, alpha=self.scaling)  # one kernel: base + s·(xAᵀ)Bᵀ
        if scale is not None:
            # mul then add, not addcmul: addcmul's backward multiplies both factors by its `value` again.
            out = out * scale.to(out.dtype)
            out = out if self.bias is None else out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The merged weight of the method (LoRA/DoRA: g ⊙ (W0 + s·B·A)) in W0's dtype."""
        return self.method.merged_weight(self)

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
