"""Find target projections in any nn.Module, wrap them, freeze the rest, merge and unmerge."""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter, defaultdict
from typing import Optional

import torch
from torch import nn

from doran_lightning.adapters.bank import BANK_NAME, banking_enabled
from doran_lightning.adapters.generators import AuxGenerator, GeneratorKey, plan_stacks
from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.layer import MAIN_SLICE, AdaptedLinear
from doran_lightning.adapters.step import StepCache, bank_adapters
from doran_lightning.adapters.torch_private import attributes_of, children_of

GENERATOR_ATTRIBUTE = "doran_aux"
CONFIG_ATTRIBUTE = "doran_adapter_config"
_HOOK_ATTRIBUTE = "_doran_generation_hooks"
STEP_CACHE_ATTRIBUTE = "_doran_step_cache"  # the `step.StepCache` of an adapted root
_SLICE_SYNTAX = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<parts>[^\[\]]+)\]$")

# The paper's targets (q and v) for the backbones this project ships configs for.
DEFAULT_TARGETS = (
    ("attn.qkv", ["qkv[q,v]"]),  # timm ViT (fused)
    ("attention.self.query", ["query", "value"]),  # BERT / RoBERTa / MiniLM
    ("self_attn.q_proj", ["q_proj", "v_proj"]),  # LLaMA / Mistral / OPT
)


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted projection of the model, by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}


def adapter_root(model: nn.Module) -> nn.Module:
    """The module `apply_adapters` was called on (the model itself or one of its submodules)."""
    for module in model.modules():
        if hasattr(module, CONFIG_ATTRIBUTE):
            return module
    raise ValueError("this model has no adapters; call apply_adapters(model, AdapterConfig(...)) first")


def adapter_config(model: nn.Module) -> AdapterConfig:
    return getattr(adapter_root(model), CONFIG_ATTRIBUTE)


def generators(model: nn.Module) -> dict[str, AuxGenerator]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AuxGenerator)}


# ---------------------------------------------------------------------- target resolution
def _linear_summary(model: nn.Module) -> str:
    suffixes = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear))
    examples = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
    listed = ", ".join(f"{suffix} (x{count})" if count > 1 else suffix for suffix, count in sorted(suffixes.items()))
    return f"Linear modules by name suffix: {listed or 'none'}; e.g. {', '.join(examples)}"


def _default_targets(model: nn.Module) -> list[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for marker, targets in DEFAULT_TARGETS:
        if any(name.endswith(marker) for name in names):
            return targets
    raise ValueError(
        f"AdapterConfig.target_modules: cannot infer the q/v projections of {type(model).__name__}; "
        f"set target_modules explicitly. {_linear_summary(model)}"
    )


def name_matches(name: str, pattern: str) -> bool:
    """PEFT's target rule: `name` is `pattern` or ends with ``.pattern``."""
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, cfg: AdapterConfig) -> dict[str, Optional[list[str]]]:
    """{module path: slice names (None = the whole projection)} for every Linear the config selects."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = cfg.target_modules if cfg.target_modules is not None else _default_targets(model)
    selected: dict[str, Optional[list[str]]] = {}
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(f"AdapterConfig.target_modules: invalid regex {targets!r}: {error}") from None
        selected = {name: None for name in linears if pattern.fullmatch(name)}
        if not selected:
            raise ValueError(f"AdapterConfig.target_modules: regex {targets!r} matches no Linear module. "
                             f"{_linear_summary(model)}")
    else:
        for entry in targets:
            match = _SLICE_SYNTAX.match(entry)
            base_name = match["name"] if match else entry
            parts = [p.strip() for p in match["parts"].split(",")] if match else None
            found = [name for name in linears if name_matches(name, base_name)]
            if not found:
                other = [name for name, m in model.named_modules() if name_matches(name, base_name)]
                kind = f" (it is a {type(model.get_submodule(other[0])).__name__}, not an nn.Linear)" if other else ""
                raise ValueError(f"AdapterConfig.target_modules: {entry!r} matches no Linear module{kind}. "
                                 f"{_linear_summary(model)}")
            for name in found:
                selected[name] = _check_slices(cfg, name, entry, parts, linears[name])
    for name in selected:
        if any(name_matches(name, keep) for keep in cfg.trainable_modules):
            raise ValueError(f"AdapterConfig: {name!r} is both a target and in trainable_modules")
    return selected


def _check_slices(cfg: AdapterConfig, name: str, entry: str, parts: Optional[list[str]],
                  linear: nn.Linear) -> Optional[list[str]]:
    if parts is None:
        return None
    leaf = name.rsplit(".", 1)[-1]
    layout = cfg.fused_modules.get(leaf)
    if layout is None:
        raise ValueError(f"AdapterConfig.target_modules: {entry!r} addresses slices of {leaf!r}, but "
                         f"fused_modules has no layout for it (known: {sorted(cfg.fused_modules)})")
    unknown = [p for p in parts if p not in layout]
    if unknown or not parts:
        raise ValueError(f"AdapterConfig.target_modules: {entry!r}: unknown slice(s) {unknown}; "
                         f"{leaf!r} is laid out as [{'|'.join(layout)}]")
    if linear.out_features % len(layout):
        raise ValueError(f"{name}: out_features={linear.out_features} does not split into {len(layout)} equal "
                         f"slices [{'|'.join(layout)}]")
    return parts


def _slice_bounds(cfg: AdapterConfig, name: str, linear: nn.Linear,
                  parts: Optional[list[str]]) -> dict[str, tuple[int, int]]:
    if parts is None:
        return {MAIN_SLICE: (0, linear.out_features)}
    layout = cfg.fused_modules[name.rsplit(".", 1)[-1]]
    size = linear.out_features // len(layout)
    return {part: (layout.index(part) * size, (layout.index(part) + 1) * size) for part in parts}


# ---------------------------------------------------------------------- generators
def _group_key(cfg: AdapterConfig, module_name: str) -> str:
    if cfg.aux_group_pattern:
        match = re.search(cfg.aux_group_pattern, module_name)
        if match is None:
            raise ValueError(f"AdapterConfig.aux_group_pattern {cfg.aux_group_pattern!r} does not match "
                             f"the adapted module {module_name!r}")
        return match.group(1) if match.groups() else match.group(0)
    return module_name.rpartition(".")[0]


def _attach_generators(model: nn.Module, cfg: AdapterConfig, layers: dict[str, AdaptedLinear]) -> None:
    """Build the generators and register each where it belongs.

    Block scope: in the block it serves (``<parent>.doran_aux``), or, with a custom
    `aux_group_pattern`, in ``model.doran_aux[<group>]``. Model scope: one ``model.doran_aux``.
    """
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)  # group -> [(module name, slice)]
    for name, layer in layers.items():
        for slice_name in layer.slices:
            groups[_group_key(cfg, name)].append((name, slice_name))
    first = next(iter(layers.values()))
    device, dtype = first.weight.device, first.math_dtype
    by_layer = list(groups.values()) if cfg.aux_scope == "model" else None
    plans = [list(groups.items())] if by_layer is not None else [[item] for item in groups.items()]
    custom_groups = nn.ModuleDict()
    for plan in plans:
        shapes: dict[str, tuple[int, int]] = {}
        assignment: dict[tuple[str, str], GeneratorKey] = {}
        for layer_index, (group, members) in enumerate(plan):
            for name, slice_name in members:
                kind = _projection_type(name, slice_name, group)
                shape = _slice_shape(layers[name], slice_name)
                if shapes.setdefault(kind, shape) != shape:
                    raise ValueError(f"aux_scope='model' shares one head per projection type, but {kind!r} has "
                                     f"shapes {shapes[kind]} and {shape} (at {name}); use aux_scope='block'")
                assignment[(name, slice_name)] = (layer_index, kind)
        generator = AuxGenerator(cfg, len(plan), shapes, list(assignment.values()), device=device, dtype=dtype)
        group = plan[0][0]
        if cfg.aux_scope == "model" or not group:
            model.add_module(GENERATOR_ATTRIBUTE, generator)
        elif cfg.aux_group_pattern:
            custom_groups[group.replace(".", "__")] = generator
        else:
            model.get_submodule(group).add_module(GENERATOR_ATTRIBUTE, generator)
        by_module: dict[str, dict[str, GeneratorKey]] = defaultdict(dict)
        for (name, slice_name), key in assignment.items():
            by_module[name][slice_name] = key
        for name, keys in by_module.items():
            layers[name].attach_generator(generator, keys)
    if len(custom_groups):
        model.add_module(GENERATOR_ATTRIBUTE, custom_groups)


def _projection_type(module_name: str, slice_name: str, group: str) -> str:
    """The head a projection uses: its path below the group (``query``, ``qkv.q``).

    A custom `aux_group_pattern` group is not a module prefix: its members keep their full paths.
    """
    leaf = module_name[len(group) + 1:] if group and module_name.startswith(group + ".") else module_name
    return leaf if slice_name == MAIN_SLICE else f"{leaf}.{slice_name}"


def _slice_shape(layer: AdaptedLinear, slice_name: str) -> tuple[int, int]:
    start, stop = layer.slices[slice_name]
    return layer.in_features, stop - start


# Adapters beyond this many times the frozen model's parameters (and this floor, for toy models) are refused.
OVERSIZE_FACTOR, OVERSIZE_FLOOR = 16, 1 << 24


def refuse_oversized(model: nn.Module, cfg: AdapterConfig, targets: dict[str, Optional[list[str]]]) -> None:
    """Refuse sizes (r, aux_hidden, aux_seed_dim) whose adapters would outgrow the frozen model, before anything is
    allocated: a value read from a file or typed by mistake (aux_hidden=1e8) would otherwise fill the memory."""
    frozen = sum(parameter.numel() for parameter in model.parameters())
    widths = [model.get_submodule(name).in_features + model.get_submodule(name).out_features for name in targets]
    estimate = cfg.r * sum(widths)
    if cfg.use_aux:
        groups = len({_group_key(cfg, name) for name in targets}) if cfg.aux_scope != "model" else 1
        estimate = cfg.hidden_dim * sum(widths) + groups * 2 * cfg.seed_dim * (cfg.r * len(targets) + cfg.hidden_dim)
    if estimate > max(OVERSIZE_FACTOR * frozen, OVERSIZE_FLOOR):
        sizes = f"r={cfg.r}" + (f", aux_hidden={cfg.hidden_dim}, aux_seed_dim={cfg.seed_dim}" if cfg.use_aux else "")
        raise ValueError(f"model.adapter: {sizes} would build about {estimate:,} adapter parameters, more than {OVERSIZE_FACTOR} times the "
                         f"{frozen:,} of the frozen model they adapt; lower these sizes")


# ---------------------------------------------------------------------- public API
def apply_adapters(model: nn.Module, cfg: AdapterConfig, *, bank: Optional[bool] = None) -> nn.Module:
    """Wrap the targets of `cfg` in place, freeze everything but adapters (+ trainable_modules); return model.

    `bank` (default: on, unless inside ``bank.banking(False)``) stacks equal-role adapter tensors into a few
    trainable tensors (`bank.py`); state-dict keys and values are the same either way.
    """
    if adapted_modules(model) or hasattr(model, CONFIG_ATTRIBUTE):
        raise ValueError("this model already has adapters; build a fresh model (or unload merged adapters) first")
    targets = resolve_targets(model, cfg)
    refuse_oversized(model, cfg, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers: dict[str, AdaptedLinear] = {}
    for name, parts in targets.items():
        linear = model.get_submodule(name)
        layer = AdaptedLinear(linear, cfg, _slice_bounds(cfg, name, linear, parts))
        _replace_module(model, name, layer)
        layers[name] = layer
    if cfg.use_aux:
        _attach_generators(model, cfg, layers)
    _unfreeze_trainable_modules(model, cfg)
    object.__setattr__(model, CONFIG_ATTRIBUTE, cfg)
    object.__setattr__(model, _HOOK_ATTRIBUTE, _register_step_hooks(model))
    if banking_enabled() if bank is None else bank:
        cache = getattr(model, STEP_CACHE_ATTRIBUTE)
        bank_adapters(model, cache.groups, plan_stacks(cache.generators))
    return model


def is_banked(model: nn.Module) -> bool:
    """Whether `apply_adapters` stacked this model's adapter tensors into banks (`bank.py`)."""
    return any(BANK_NAME in children_of(module) for module in model.modules())


def _register_step_hooks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """One `StepCache` pass (generated A/B, then every projection's A/B and g) when the adapted model's forward starts.

    The generators live in their blocks (state-dict keys), but the cache on the model runs them all at
    once. The values are made outside every block, so activation checkpointing (non-reentrant, the
    default of timm and of our HF set-up) recomputes a block from the same tensors as the original pass.
    Reentrant checkpointing cannot backpropagate into tensors shared by several checkpointed blocks and
    fails loudly ("backward through the graph a second time").
    """
    found = [m for m in model.modules() if isinstance(m, AuxGenerator)]
    cache = StepCache(list(adapted_modules(model).values()), found, root=model)
    object.__setattr__(model, STEP_CACHE_ATTRIBUTE, cache)
    if not cache.generators and not cache.groups:
        return []  # LoRA on whole projections: nothing to make per step
    return [model.register_forward_pre_hook(functools.partial(_start_forward, cache)),
            model.register_forward_hook(functools.partial(_end_forward, cache), always_call=True)]


def add_block_passes(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Batch each block's projections inside the block (`StepCache.add_block_passes`; FSDP2 calls this after
    sharding); the hooks are removed with the model's own when its adapters are unloaded."""
    cache = getattr(model, STEP_CACHE_ATTRIBUTE, None)
    if cache is not None:
        getattr(model, _HOOK_ATTRIBUTE).extend(cache.add_block_passes(blocks))


def _start_forward(cache: StepCache, module: nn.Module, args: object) -> None:
    cache.in_forward = False
    cache.generate()
    cache.in_forward = True


def _end_forward(cache: StepCache, module: nn.Module, args: object, output: object) -> None:
    cache.in_forward = False


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _unfreeze_trainable_modules(model: nn.Module, cfg: AdapterConfig) -> None:
    for keep in cfg.trainable_modules:
        found = [module for name, module in model.named_modules() if name and name_matches(name, keep)]
        if not found:
            children = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"AdapterConfig.trainable_modules: {keep!r} matches no module "
                             f"(top-level modules: {children})")
        for module in found:
            module.requires_grad_(True)


@torch.no_grad()
def merge_adapters(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold the adapters into the frozen weights: W = g ⊙ (W0 + s·B·A).

    With ``unload=True`` every adapted projection becomes a plain nn.Linear and the generators are
    removed (irreversible); otherwise `unmerge_adapters` restores W0 bit-exactly.
    """
    layers = adapted_modules(model)
    if not layers:
        raise ValueError("merge_adapters: this model has no adapted projections")
    for layer in layers.values():
        layer.merge()
    if unload:
        for name, layer in layers.items():
            _replace_module(model, name, layer.to_linear())
        for name in [n for n, m in model.named_modules() if hasattr(m, GENERATOR_ATTRIBUTE)]:
            delattr(model.get_submodule(name) if name else model, GENERATOR_ATTRIBUTE)
        root = adapter_root(model)
        children_of(root).pop(BANK_NAME, None)  # the banks of the adapter tensors just folded away
        for handle in getattr(root, _HOOK_ATTRIBUTE):
            handle.remove()
        for attribute in (CONFIG_ATTRIBUTE, _HOOK_ATTRIBUTE, STEP_CACHE_ATTRIBUTE):
            if attribute in attributes_of(root):
                object.__delattr__(root, attribute)
    return model


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Restore the original frozen weights of every merged projection."""
    layers = adapted_modules(model)
    if not layers:
        raise ValueError("unmerge_adapters: this model has no adapted projections (unloaded merges cannot be undone)")
    for layer in layers.values():
        layer.unmerge()
    return model


def reset_magnitudes(model: nn.Module) -> None:
    """Deprecated: call ``layer.reset_magnitude()`` for each of ``adapted_modules(model).values()``."""
    warnings.warn("doran_lightning.adapters.reset_magnitudes is deprecated and will be removed; call "
                  "layer.reset_magnitude() for each layer of adapted_modules(model)", DeprecationWarning, stacklevel=2)
    for layer in adapted_modules(model).values():
        layer.reset_magnitude()
