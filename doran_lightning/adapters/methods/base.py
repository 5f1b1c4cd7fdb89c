"""The base of every adapter method (METHOD.md §1-4, issues 30 and 41); each method is one file beside it.

A method is one `AdapterMethod` subclass, registered under the name `AdapterConfig.method` gives it
(`registry.register_method`). It

* declares its tensors (`tensors`: `tensors.TensorSpec`s — name, role, shape rule, init, whether they stack —
  `trained_tensors` those a config trains) and builds the parts its projections create them with: where A and B
  come from (`variants.StaticFactors` / `GeneratedFactors`) and whether rows are rescaled (`variants.Magnitude`,
  with σ from `noise()` or without);
* initialises them once the projection exists: it receives the frozen W0 (`initialise`);
* makes its per-step values in the batched pass (`step`, by default the batch engine `engine.compute_step`);
* merges (`merged_weight`; unmerging restores the kept W0 bit-exactly) and exports to HF PEFT
  (`peft_tensors`, `peft_config`).

`AdaptedLinear`, the step cache, the files and the report ask the method (and the config's switches it
defines: `rescales`, `switches`) instead of matching method names. docs/ADAPTERS.md "Adding a method" walks
through adding one (PiSSA, `methods/pissa.py`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar, Optional, Union

import torch
from torch import Tensor

from doran_lightning.adapters.engine import StepValues, compute_step
from doran_lightning.adapters.magnitude import denominator
from doran_lightning.adapters.registry import method_class
from doran_lightning.adapters.tensors import GENERATOR, LORA_A, LORA_B, MAGNITUDE_VECTOR, RHO, TensorSpec
from doran_lightning.adapters.variants import GeneratedFactors, Magnitude, StaticFactors

if TYPE_CHECKING:
    from doran_lightning.adapters.config import AdapterConfig
    from doran_lightning.adapters.projection import Projection, Sigma


class AdapterMethod:
    """The base: LoRA's update ΔW = s·B·A with trained A, B (see the module docstring for what a method does)."""

    name: ClassVar[str]
    rescales: ClassVar[bool] = False  # rows rescaled by a trained magnitude m (DoRA's decomposition)
    switches: ClassVar[tuple[str, ...]] = ()  # the config switches of its parts it accepts ("noise", "aux")
    peft_init: ClassVar[Union[bool, str]] = True  # ``init_lora_weights`` of an exported PEFT adapter
    tensors: ClassVar[tuple[TensorSpec, ...]] = (LORA_A, LORA_B)  # what its slices may hold (`tensors.py`)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A "noise" switch the config accepts but no σ is built for would be a silent wrong answer.
        if "noise" in getattr(cls, "switches", ()) and cls.noise is AdapterMethod.noise:
            raise TypeError(f"{cls.__name__} accepts the 'noise' switch but builds no σ: override noise() "
                            "(or subclass methods.doran.DoRAN)")

    def __init__(self, cfg: "AdapterConfig") -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ tensors and roles
    def factors(self) -> Union[StaticFactors, GeneratedFactors]:
        """Where A and B come from: trained tensors, or an auxiliary generator's output (``aux``)."""
        return GeneratedFactors() if self.cfg.use_aux else StaticFactors()

    def rescaling(self) -> Optional[Magnitude]:
        """The row rescaling g = m / (‖V‖_row + σ), with σ when the config's noise is on; None without."""
        if not self.rescales:
            return None
        return Magnitude(self.cfg, self.noise())

    def noise(self) -> Optional["Sigma"]:
        """σ of the denominator (DoRAN's, `methods/doran.py`); None: no noise."""
        return None

    def trained_tensors(self) -> tuple[TensorSpec, ...]:
        """The declared tensors (`tensors.py`) each adapted slice trains (generated A/B are their generator's)."""
        specs = [] if self.cfg.use_aux else [LORA_A, LORA_B]
        if self.rescales:
            specs.append(MAGNITUDE_VECTOR)
        if self.cfg.use_noise and self.cfg.noise_mode != "fixed":
            specs.append(RHO)
        return tuple(specs)

    def tensor_roles(self) -> dict[str, str]:
        """Deprecated: {tensor: role} of what each slice trains, "generator" with generated A/B (`trained_tensors`)."""
        warnings.warn("AdapterMethod.tensor_roles is deprecated and will be removed; use trained_tensors() (and "
                      "cfg.use_aux for the generator)", DeprecationWarning, stacklevel=2)
        roles = {spec.name: str(spec.role) for spec in self.trained_tensors()}
        return {GENERATOR: GENERATOR, **roles} if self.cfg.use_aux else roles

    # ------------------------------------------------------------------ initialisation
    def initialise(self, layer: "Projection") -> None:
        """Set what depends on W0 (``layer.weight``): the cached ‖W0_i‖², and m0 (and σ's unit) when rescaling."""
        layer.reset_magnitude()

    # ------------------------------------------------------------------ per-step values
    def step(self, layers: list["Projection"], training: bool) -> StepValues:
        """A_cat, B_full and g of projections of equal shape, stacked (the batch engine)."""
        return compute_step(layers, training)

    # ------------------------------------------------------------------ merge and export
    @torch.no_grad()
    def merged_weight(self, layer: "Projection") -> Tensor:
        """g ⊙ (W0 + s·B·A) in W0's dtype (computed in the math dtype; eval-mode σ)."""
        lora_A, lora_B, scale = self.step([layer], training=False)
        dtype = layer.math_dtype
        weight = layer.frozen_weight().to(dtype) + layer.scaling * (lora_B[0].to(dtype) @ lora_A[0].to(dtype))
        if scale is not None:
            weight = weight * scale[0, :, None]
        return weight.to(layer.weight.dtype)

    @torch.no_grad()
    def peft_tensors(self, layer: "Projection", prefix: str) -> dict[str, Tensor]:
        """PEFT's tensors of one whole projection (eval mode): static A/B, and with rescaling the magnitude with
        σ folded in — PEFT's DoRA computes m/‖V‖, ours m/(‖V‖+σ), so m_eff = m ⊙ ‖V‖/(‖V‖+σ)."""
        slice_name, (lora_A, lora_B) = next(iter(layer.lowrank_factors().items()))
        tensors = {f"{prefix}.lora_A.weight": lora_A.float(), f"{prefix}.lora_B.weight": lora_B.float()}
        if self.rescales:
            norm, sigma = layer.row_norm(slice_name, lora_A, lora_B), layer.sigma(slice_name)
            magnitude = layer.adapters[slice_name].magnitude.float()
            tensors[f"{prefix}.lora_magnitude_vector"] = (
                magnitude if sigma is None else magnitude * norm / denominator(norm, sigma))
        return tensors

    def peft_config(self) -> dict:
        """The method's entries of PEFT's ``adapter_config.json``."""
        cfg = self.cfg
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "use_dora": self.rescales, "init_lora_weights": self.peft_init}


def method_for(cfg: "AdapterConfig") -> AdapterMethod:
    """The method object of a config (one per projection; they hold no tensors)."""
    return method_class(cfg.method)(cfg)

