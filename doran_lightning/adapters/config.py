"""`AdapterConfig`: every option of METHOD.md, validated; defaults from the chosen `recipe`.

What the paper specifies and what is our own choice is listed field by field in docs/ADAPTERS.md
("What the paper fixes, what we chose"); `recipe: paper` runs the method with the framework's earlier
generator choices, `recipe: ours` (default) with the ones issues 11 and 17 measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from doran_lightning.adapters.registry import method_class, method_names

NOISE_MODES = ("learnable", "fixed", "gaussian")
NOISE_GRANULARITIES = ("projection", "row")
MAGNITUDE_INITS = ("norm_plus_sigma", "norm")
SIGMA_SCALES = ("absolute", "row_norm")
AUX_SCOPES = ("block", "model")
AUX_LAYOUTS = ("rank", "features")
AUX_ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")
AUX_LR_SCALES = ("fan_in", "none")
AUX_INITS = ("random", "orthogonal")
# The fields a recipe gives a value when the config leaves them null. "paper": the method as the paper
# describes it, with the generator choices this framework shipped before it measured them (Gaussian
# seeds and nn.Linear trunks, gelu, the shared lr, DoRA's literal m0 = ‖W0‖). "ours": the measured
# choices (METHOD.md §2-3). Neither is the paper's own code: none exists.
RECIPES: dict[str, dict[str, str]] = {
    "ours": {"aux_init": "orthogonal", "aux_activation": "tanh", "aux_lr_scale": "fan_in", "magnitude_init": "norm_plus_sigma"},
    "paper": {"aux_init": "random", "aux_activation": "gelu", "aux_lr_scale": "none", "magnitude_init": "norm"},
}

# The variant rule: AdapterConfig fields per label, in the order tables and legends list them. Every ablation
# of DoRAN's two parts is one label: noise off (doran-aux) / fixed / learnable (doran) / gaussian; aux off
# (doran-noise) / block scope (doran) / model scope. Each label sets every switch, so a config's own
# noise_mode or aux_scope cannot relabel a run. `AdapterConfig.variant` is the inverse.
_DORAN_SWITCHES: dict[str, Any] = {"method": "doran", "noise": True, "aux": True, "noise_mode": "learnable",
                                   "aux_scope": "block", "aux_layout": "rank", "recipe": "ours"}
VARIANT_SWITCHES: dict[str, dict[str, Any]] = {
    "lora": {**_DORAN_SWITCHES, "method": "lora", "noise": None, "aux": None},
    "dora": {**_DORAN_SWITCHES, "method": "dora", "noise": None, "aux": None},
    "doran": dict(_DORAN_SWITCHES),
    "doran-noise": {**_DORAN_SWITCHES, "aux": False},
    "doran-aux": {**_DORAN_SWITCHES, "noise": False},
    "doran-fixed": {**_DORAN_SWITCHES, "noise_mode": "fixed"},
    "doran-gaussian": {**_DORAN_SWITCHES, "noise_mode": "gaussian"},
    "doran-model": {**_DORAN_SWITCHES, "aux_scope": "model"},
    "doran-features": {**_DORAN_SWITCHES, "aux_layout": "features"},  # the block layout (issue 39)
    "doran-features-model": {**_DORAN_SWITCHES, "aux_layout": "features", "aux_scope": "model"},  # across layers
    "doran-paper": {**_DORAN_SWITCHES, "recipe": "paper"},
}
VARIANT_LABELS: tuple[str, ...] = tuple(VARIANT_SWITCHES)


def variant_labels() -> tuple[str, ...]:
    """Every variant label a run can have: `VARIANT_LABELS`, then every other registered method by its name
    (its default switches), so that `sweep --methods` accepts every registered method."""
    return VARIANT_LABELS + tuple(name for name in method_names() if name not in VARIANT_SWITCHES)


def variant_switches(label: str) -> dict[str, Any]:
    """The AdapterConfig fields that make a run of variant `label` (a copy; ValueError for unknown labels)."""
    if label in VARIANT_SWITCHES:
        return dict(VARIANT_SWITCHES[label])
    if label not in method_names():
        raise ValueError(f"unknown variant {label!r}; known variants: {', '.join(variant_labels())}")
    # A registered method without a label of its own: its name, its own switches on (none for most).
    own = method_class(label).switches
    return {**_DORAN_SWITCHES, "method": label, **{name: (True if name in own else None) for name in ("noise", "aux")}}


@dataclass
class AdapterConfig:
    """Which projections to adapt and how (LoRA, DoRA or DoRAN and its ablations).

    `target_modules` follows HF PEFT's rule: a list matches module names exactly or as a suffix after
    a dot; a string is a regex that must match the whole module name. Slices of a fused projection
    are addressed as ``"qkv[q,v]"`` (the layout of each fused name is in `fused_modules`).
    ``None`` picks the q and v targets of the DoRA/DoRAN experiments for timm ViT (``qkv[q,v]``), BERT/RoBERTa (``query``, ``value``)
    and LLaMA-style models (``q_proj``, ``v_proj``).
    """

    method: str = "doran"  # a registered method (`registry.method_names()`): lora, dora, doran, pissa, dora-pissa
    r: int = 8
    alpha: float = 16.0
    target_modules: Optional[Union[list[str], str]] = None
    dropout: float = 0.0
    rslora: bool = False
    # DoRAN switches; None means "on" for doran. lora/dora have neither.
    noise: Optional[bool] = None
    aux: Optional[bool] = None
    sigma_init: float = 1e-2
    # "absolute": σ = softplus(ρ), σ0 = sigma_init. "row_norm": σ on the layer's scale (METHOD.md §2):
    # σ = s·softplus_β(ρ) with s the slice's median ‖W0_i‖, σ0 = sigma_init × s, and Adam moves σ by ~lr·s a step.
    sigma_scale: Literal["absolute", "row_norm"] = "absolute"
    noise_mode: Literal["learnable", "fixed", "gaussian"] = "learnable"
    noise_granularity: Literal["projection", "row"] = "projection"
    # Which defaults fill the null fields below (RECIPES): "ours" (measured) or "paper" (earlier choices).
    recipe: Literal["ours", "paper"] = "ours"
    magnitude_init: Optional[Literal["norm_plus_sigma", "norm"]] = None
    detach_norm: bool = True
    aux_scope: Literal["block", "model"] = "block"
    # Where the generators' shared factor sits (METHOD.md §3, issue 39; ours): "rank" (default) shares the trunk on
    # the rank side, which cancels out of the merged update; "features" shares generated feature-side factors U_A,
    # U_B across the group's projections (a block, or every layer with aux_scope: model), each with its own r×r cores.
    aux_layout: Literal["rank", "features"] = "rank"
    aux_hidden: Optional[int] = None
    aux_seed_dim: Optional[int] = None
    aux_activation: Optional[Literal["gelu", "relu", "silu", "tanh", "identity"]] = None
    aux_group_pattern: Optional[str] = None
    # The generators' lr when no explicit one is given (METHOD.md §3): lr/sqrt(aux_hidden + 1) ("fan_in"),
    # so that one Adam step moves generated A/B about as far as LoRA's static ones; "none": lr.
    aux_lr_scale: Optional[Literal["fan_in", "none"]] = None
    # How seeds and trunks start (METHOD.md §3): "orthogonal" gives the trunk pre-activations S W1ᵀ orthogonal rows
    # with entries of rms aux_init_gain (null: sqrt(r / aux_hidden), 1 at the default width), so the generated A/B
    # move along all r directions; "random" (Gaussian seeds, nn.Linear's trunk; the default before issue 17)
    # leaves them on about one.
    aux_init: Optional[Literal["random", "orthogonal"]] = None
    aux_init_gain: Optional[float] = None
    fused_modules: dict[str, list[str]] = field(default_factory=lambda: {"qkv": ["q", "k", "v"]})
    trainable_modules: list[str] = field(default_factory=list)
    factored_norm: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"AdapterConfig.recipe: must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        for name, value in RECIPES[self.recipe].items():  # null: the recipe's value; a set value wins
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    # ------------------------------------------------------------------ derived switches
    @property
    def use_magnitude(self) -> bool:
        """DoRA and DoRAN decompose into magnitude and direction; LoRA does not."""
        return method_class(self.method).rescales

    @property
    def use_noise(self) -> bool:
        return "noise" in method_class(self.method).switches and self.noise is not False

    @property
    def use_aux(self) -> bool:
        return "aux" in method_class(self.method).switches and self.aux is not False

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    @property
    def hidden_dim(self) -> int:
        return self.aux_hidden or self.r

    @property
    def aux_lr_factor(self) -> float:
        """The generators' lr relative to the base lr (used when no explicit aux lr is set)."""
        return (self.hidden_dim + 1) ** -0.5 if self.aux_lr_scale == "fan_in" else 1.0

    @property
    def init_gain(self) -> float:
        """The rms of the trunks' pre-activations at an orthogonal init: at a fixed row norm (sqrt(r)) the
        heads' first Adam steps move A/B about as far as LoRA's at every width (METHOD.md §3)."""
        return self.aux_init_gain if self.aux_init_gain is not None else (self.r / self.hidden_dim) ** 0.5

    @property
    def seed_dim(self) -> int:
        return self.aux_seed_dim or self.r

    @property
    def variant(self) -> str:
        """Short label used to group runs: lora, dora, doran, doran-noise, doran-aux, doran-none.

        Non-default ablations of DoRAN's parts are suffixed, so that runs of different ablations never
        share a label: ``-fixed``/``-gaussian`` (noise_mode), ``-model`` (aux_scope), e.g. doran-noise-fixed.
        """
        if not method_class(self.method).switches:
            return self.method
        label = {(True, True): "", (True, False): "-noise", (False, True): "-aux"}.get(
            (self.use_noise, self.use_aux), "-none")
        label = self.method + label
        if self.use_noise and self.noise_mode != "learnable":
            label += f"-{self.noise_mode}"
        if self.use_aux and self.aux_layout != "rank":
            label += f"-{self.aux_layout}"
        if self.use_aux and self.aux_scope != "block":
            label += f"-{self.aux_scope}"
        if self.recipe != "ours":
            label += f"-{self.recipe}"
        return label

    @classmethod
    def from_variant(cls, label: str, **fields: Any) -> "AdapterConfig":
        """The config of variant `label` (see VARIANT_SWITCHES); `fields` set everything else (r, targets, …)."""
        switches = variant_switches(label)
        clash = sorted(set(fields) & set(switches))
        if clash:
            raise ValueError(f"AdapterConfig.from_variant({label!r}): {clash} are set by the variant label")
        return cls(**switches, **fields)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the offending field."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"AdapterConfig.{name}: {why} (got {getattr(self, name)!r})")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                bad(name, f"must be one of {', '.join(options)}")

        choice("method", method_names())
        choice("noise_mode", NOISE_MODES)
        choice("noise_granularity", NOISE_GRANULARITIES)
        choice("magnitude_init", MAGNITUDE_INITS)
        choice("sigma_scale", SIGMA_SCALES)
        choice("aux_scope", AUX_SCOPES)
        choice("aux_layout", AUX_LAYOUTS)
        choice("aux_activation", AUX_ACTIVATIONS)
        choice("aux_lr_scale", AUX_LR_SCALES)
        choice("aux_init", AUX_INITS)
        gain = self.aux_init_gain
        if gain is not None and (isinstance(gain, bool) or not (gain > 0 and math.isfinite(gain))):
            bad("aux_init_gain", "must be positive and finite, or null")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            bad("r", "rank must be a positive integer")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            bad("alpha", "must be positive and finite")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if not (self.sigma_init > 0 and math.isfinite(self.sigma_init)):
            bad("sigma_init", "must be positive and finite (sigma = softplus(rho) > 0); use noise=false to drop the noise")
        for name in ("aux_hidden", "aux_seed_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                bad(name, "must be a positive integer or null")
        for name in ("noise", "aux"):
            if getattr(self, name) and name not in method_class(self.method).switches:
                owners = " or ".join(repr(method) for method in method_names() if name in method_class(method).switches)
                bad(name, f"only method={owners} has this switch; method={self.method!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple)):
            bad("target_modules", "must be a list of names, a regex string, or null")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                bad("target_modules", "must be a non-empty list of non-empty strings")
            self.target_modules = list(self.target_modules)
        for fused, parts in self.fused_modules.items():
            if len(parts) < 2 or len(set(parts)) != len(parts):
                raise ValueError(f"AdapterConfig.fused_modules[{fused!r}]: needs >= 2 distinct slice names, got {parts}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


# Fields that change tensor shapes or the computation; a saved adapter must agree on them.
STRUCTURAL_FIELDS = (
    "method", "r", "alpha", "rslora", "noise", "aux", "noise_mode", "noise_granularity", "sigma_scale",
    "aux_scope", "aux_layout", "aux_hidden", "aux_seed_dim", "aux_activation", "aux_group_pattern",
)
