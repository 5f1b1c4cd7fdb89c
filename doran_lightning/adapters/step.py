"""Once per step, everything the adapted projections need that does not depend on the tokens (METHOD.md §3, §4).

`StepCache` runs when the adapted model's forward starts (a forward pre-hook): the generators make
every generated A/B in one batched pass, then `engine.compute_step` makes A_cat, B_full and g for each
group of projections of equal shape in one batched pass. The projections read their values from the
cache during that forward — and during the recomputation of checkpointed blocks in the backward,
which therefore sees the very tensors of the original pass. The cache is made outside every block,
so non-reentrant activation checkpointing recomputes a block from the same tensors.

The adapter tensors each batched pass reads are banked (`bank.py`): the pass reads one stacked tensor per
kind, and each pass first checks, cheaply, that nothing replaced the banked members (re-tying them if so).

Where a frozen weight is not whole when the forward starts (FSDP2 shards it until its block runs),
its group is left out and each block makes its own projections' values in one batched pass when it runs
(`StepCache.add_block_passes`). Outside a
forward (statistics, merge, export, a call of one submodule), values are served from the cache only
while no adapter tensor has changed since they were made (eager mode; under compile every forward
starts with a new pass); otherwise a projection computes its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import repeat
from typing import Optional

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed: nothing is ever sharded
    DTensor = ()  # type: ignore[assignment,misc]

from doran_lightning.adapters.bank import BANK_NAME, ParameterBank, add_served
from doran_lightning.adapters.generators import CORES, AuxGenerator, Generated, GeneratorKey, generate
from doran_lightning.adapters.engine import StepValues
from doran_lightning.adapters.layer import AdaptedLinear
from doran_lightning.adapters.tensors import GENERATOR, STACKED
from doran_lightning.adapters.torch_private import children_of, in_backward, parameters_of

# Projections of equal shape are computed together in chunks of at most this many bytes of stacked W0, so that
# the temporary stack (freed before the blocks run) stays small beside the activations.
CHUNK_BYTES = 256 * 2**20


def compute_step(layers: list[AdaptedLinear], training: bool) -> StepValues:
    """One group's stacked (A_cat, B_full, g): asked of the projections' method (`methods.AdapterMethod.step`)."""
    return layers[0].method.step(layers, training)


def _signature(layer: AdaptedLinear) -> tuple:
    """Layers with equal signatures are computed by one `compute_step` call."""
    return (tuple(layer.slices.values()), layer.in_features, layer.out_features, layer.weight.dtype,
            layer.weight.device, layer.source.generated, type(layer.method))


def plan_groups(layers: list[AdaptedLinear]) -> list[list[AdaptedLinear]]:
    """Groups of layers computed together; every layer's own group when the norm takes gradients (no stacked W0
    may be kept for backward). LoRA on whole projections needs no per-step values: no group."""
    groups: dict[tuple, list[AdaptedLinear]] = {}
    for index, layer in enumerate(layers):
        if layer.rescale is None and not layer.is_fused:
            continue
        batched = layer.rescale is None or layer.rescale.detach_norm
        key = _signature(layer) if batched else ("alone", index)
        groups.setdefault(key, []).append(layer)
    chunks = []
    for group in groups.values():
        size = max(1, CHUNK_BYTES // (group[0].weight.numel() * group[0].weight.element_size()))
        chunks += [group[start:start + size] for start in range(0, len(group), size)]
    return chunks


def _whole(layer: AdaptedLinear) -> bool:
    """Whether W0 is whole now (not an FSDP2 shard)."""
    return not isinstance(layer.weight, DTensor)


def _keep(values: list[Optional[StepValues]], layers: Sequence[AdaptedLinear], stacked: StepValues) -> None:
    """Each layer's (A, B, g) into its slot of `values`, from a group's stacks (one unbind per kind: cheaper in eager
    mode than an index per projection)."""
    lora_A, lora_B, scale = stacked
    scales = repeat(None) if scale is None else scale.unbind(0)
    for layer, a, b, g in zip(layers, lora_A.unbind(0), lora_B.unbind(0), scales):
        values[layer._slot] = (a, b, g)


def _parameter_slots(modules: list[nn.Module]) -> list[tuple[dict, str]]:
    """(the registry of parameters, name) of every parameter of `modules` and their submodules (`parameters_of`)."""
    return [(parameters_of(module), name) for root in modules for module in root.modules()
            for name, parameter in parameters_of(module).items() if parameter is not None]


class StepCache:
    """The per-step values of one adapted model: generated A/B and every projection's (A_cat, B_full, g)."""

    def __init__(self, layers: list[AdaptedLinear], generators: list[AuxGenerator],
                 root: Optional[nn.Module] = None) -> None:
        self.root = root  # the adapted model, which holds the parameter bank (bank.py) when there is one
        self.generators = list(generators)
        self.layers = list(layers)
        self.groups = plan_groups(self.layers)
        for slot, layer in enumerate(self.layers):
            layer.attach_cache(self, slot)
        self.values: list[Optional[StepValues]] = [None] * len(self.layers)
        # Compiled: per projection, its group's stacked values and its index there (indexed when it runs).
        self.stacks: list[Optional[tuple[StepValues, int]]] = [None] * len(self.layers)
        self._generated: Optional[Generated] = None
        self._made_with: Optional[tuple] = None
        self._generated_with: Optional[tuple] = None
        self.in_forward = False
        self._making = False  # inside `generate`: the projections read the matrices being made
        self._block_made: set[int] = set()  # slots whose values this step's block passes made (`add_block_passes`)
        # Where the watched parameters are registered (the modules do not change; the tensors there may).
        self._generator_slots = _parameter_slots(self.generators)
        self._layer_slots = _parameter_slots([layer.adapters for layer in self.layers])

    def _state(self, with_layers: bool) -> tuple:
        """Grad mode and tensor versions: of the generators, and with `with_layers` of every projection's adapters.

        The generated matrices depend on the generators only: under FSDP2 the projections' parameters are
        swapped for unsharded ones inside their blocks, which must not make the matrices look stale there.
        A banked member is no parameter: its bank is watched (the optimizer steps it, a load writes into its slices).
        """
        slots = self._generator_slots + self._layer_slots if with_layers else self._generator_slots
        versions = [parameters[name]._version for parameters, name in slots if name in parameters]
        bank = self.bank
        if bank is not None:
            versions += [tensor._version for tensor in bank.tensors()]
        return (torch.is_grad_enabled(), *versions)

    @property
    def bank(self) -> Optional[ParameterBank]:
        """The model's parameter bank, if it has one."""
        return None if self.root is None else children_of(self.root).get(BANK_NAME)  # type: ignore[return-value]

    def _generate_matrices(self) -> None:
        bank = self.bank
        if bank is not None and not torch.compiler.is_compiling():
            bank.tie()  # a module.to(), an assign=True load, ... may have replaced the members under the banks
        self._generated = generate(self.generators) if self.generators else {}
        if not torch.compiler.is_compiling():
            self._generated_with = self._state(with_layers=False)

    def generate(self) -> None:
        """Make this step's values (the forward pre-hook calls this; benchmarks of one layer may too)."""
        if all(layer.merged for layer in self.layers):
            self.clear()  # a merged model reads only its merged weights: no generators, no stacked W0, no norms
            return
        self._generate_matrices()
        compiling = torch.compiler.is_compiling()
        values: list[Optional[StepValues]] = [None] * len(self.layers)
        stacks: list[Optional[tuple[StepValues, int]]] = [None] * len(self.layers)
        served_all = True
        self._making = True
        try:
            for group in self.groups:
                if not all(_whole(layer) for layer in group):
                    served_all = False
                    continue
                stacked = compute_step(group, group[0].training)
                if compiling:
                    # Every tensor still held here when the traced hook ends becomes an output of its graph,
                    # with a runtime wrapper per aliased view: keep the group's stacks, which each projection
                    # indexes inside the forward's own graph.
                    for index, layer in enumerate(group):
                        stacks[layer._slot] = (stacked, index)
                    continue
                _keep(values, group, stacked)
        finally:
            self._making = False
        self.values, self.stacks = values, stacks
        self._block_made = set()
        if not compiling:
            self._made_with = self._state(with_layers=True)
        elif served_all:
            self._generated = None  # not read again in this forward; kept, its views would be outputs too

    def current(self, slot: int) -> Optional[StepValues]:
        """Projection `slot`'s values of this step when the cache holds them (the step's pass while fresh, or its
        block's pass during this step's forward and backward); None: the projection computes its own."""
        if self.fresh() or (slot in self._block_made and (self.in_forward or in_backward())):
            return self.served(slot)
        return None

    def add_block_passes(self, blocks: Sequence[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
        """Batch the projections of each block inside the block, where the step's pass cannot (FSDP2).

        Under FSDP2 a block's W0 is whole only while the block runs (its unshard hook runs first: FSDP2
        prepends it), so the step's pass leaves those groups out and a pre-hook on each block makes its
        projections' values in one `compute_step` per group. They are served during this step's forward and
        backward: a block recomputed by activation checkpointing reads what its forward read when the hook runs
        outside the checkpoint (HF checkpoints `forward`), and makes them again when it runs inside (timm's
        `checkpoint_seq`). Under compile each projection computes its own (a side effect inside a
        checkpointed block breaks the graph).
        """
        handles = []
        for block in blocks:
            members = {id(module) for module in block.modules()}
            slots = frozenset(layer._slot for layer in self.layers if id(layer) in members)
            if slots:
                handles.append(block.register_forward_pre_hook(functools.partial(self._start_block, slots)))
        return handles

    def _start_block(self, slots: frozenset[int], module: nn.Module, args: object) -> None:
        if torch.compiler.is_compiling():
            return
        recomputing = in_backward()
        for group in self.groups:
            members = [layer for layer in group if layer._slot in slots
                       and (recomputing or self.values[layer._slot] is None)]
            if not members or not all(_whole(layer) for layer in members):
                continue
            _keep(self.values, members, compute_step(members, members[0].training))
            self._block_made.update(layer._slot for layer in members)

    def served(self, slot: int) -> Optional[StepValues]:
        """Projection `slot`'s (A_cat, B_full, g) from this step's pass; None when its group was not computed."""
        values = self.values[slot]
        if values is not None:
            return values
        stacked = self.stacks[slot]
        if stacked is None:
            return None
        (lora_A, lora_B, scale), index = stacked
        return lora_A[index], lora_B[index], None if scale is None else scale[index]

    def _current(self, made_with: Optional[tuple], with_layers: bool) -> bool:
        return self.in_forward or self._making or torch.compiler.is_compiling() or (
            made_with is not None and made_with == self._state(with_layers))

    def fresh(self) -> bool:
        """Whether the cached per-projection values are this step's (see the module docstring)."""
        return self._current(self._made_with, with_layers=True)

    def matrices(self, generator: AuxGenerator) -> dict[GeneratorKey, tuple[Tensor, Tensor]]:
        """The current A/B of one generator's members."""
        if self._generated is None or not self._current(self._generated_with, with_layers=False):
            self._generate_matrices()
        assert self._generated is not None
        return self._generated[generator]

    def __getstate__(self) -> dict:
        # Cached tensors are autograd non-leaves: a copied or pickled model recomputes instead.
        return {**self.__dict__, "_generated": None, "_made_with": None, "_generated_with": None,
                "in_forward": False, "_making": False, "_block_made": set(), "values": [None] * len(self.layers),
                "stacks": [None] * len(self.layers)}

    def clear(self) -> None:
        """Drop the cached tensors (and the autograd graph they hold)."""
        self._generated, self._made_with, self._generated_with = None, None, None
        self.values = [None] * len(self.layers)
        self.stacks = [None] * len(self.layers)
        self._block_made = set()


# The attributes (`bank.py`) of a rescaled projection group's adapters that may be banked, with their roles (a
# buffer's family has none): the declarations that stack (`tensors.STACKED`). Groups that rescale no rows (LoRA) bank
# nothing: LoRA's forward reads its own A and B directly. (A shipped name; the declarations are the source.)
GROUP_TENSORS = tuple((spec.name, spec.role) for spec in STACKED)


def bank_adapters(root: nn.Module, groups: Sequence[Sequence[AdaptedLinear]],
                  stacks: Sequence[Sequence[AuxGenerator]]) -> Optional[ParameterBank]:
    """Bank the families of the step plan (projection `groups`, generator `stacks`); register the bank on `root`."""
    bank = ParameterBank()
    for layers in groups:
        adapters = [adapter for layer in layers for adapter in layer.adapters.values()]
        declared = type(layers[0].method).tensors  # what the group's method declares; what this config made of it:
        present = [spec for spec in STACKED if spec in declared and hasattr(adapters[0], spec.name)]
        if len(adapters) > 1 and layers[0].rescale is not None:
            add_served(bank, "adapters", layers, {spec.name: (spec.name, spec.role, [(a, spec.name) for a in adapters],
                                                              "stack") for spec in present})
    for stack in stacks:
        if len(stack) < 2 or stack[0].num_layers != 1:  # a model-scope generator holds its layers in one tensor
            continue
        parts: dict[str, tuple] = {}
        for side in ("A", "B"):
            parts[f"seed_{side}"] = (f"seed_{side}", GENERATOR, [(g, f"seed_{side}") for g in stack], "cat")
            for kind in ("weight", "bias"):
                trunks = [(getattr(g, f"trunk_{side}"), kind) for g in stack]
                heads = [(head, kind) for g in stack for head in getattr(g, f"heads_{side}").values()]
                parts[f"trunk_{side}.{kind}"] = (kind, GENERATOR, trunks, "stack")
                parts[f"heads_{side}.{kind}"] = (kind, GENERATOR, heads, "cat")
        if stack[0].features:
            parts.update({name: (name, GENERATOR, [(g, name) for g in stack], "cat") for name in CORES})
        add_served(bank, "doran_aux", stack, parts)
    if not len(bank.families):
        return None
    root.add_module(BANK_NAME, bank)
    return bank
