"""Auxiliary networks that generate the low-rank matrices A and B (METHOD.md §3).

One `AuxGenerator` holds the parameters of a group of projections. With ``aux_scope: block`` a group
is one transformer block (one layer slot); with ``aux_scope: model`` a single generator serves every
block and each block has its own learned seed (a layer embedding). In both cases:

    H_A = act(S_A W1_Aᵀ + b1_A)              S_A: [r, h0] seed of the layer, H_A: [r, h]
    A_t = H_A W2_A,tᵀ + b2_A,t               [r, d_in_t]      one output head per projection type t
    B_t = (act(S_B W1_Bᵀ + b1_B) W2_B,tᵀ + b2_B,t)ᵀ   [d_out_t, r]   W2_B,t, b2_B,t start at zero

That is ``aux_layout: rank`` (the default): the shared trunk sits on the rank side and cancels into B in
B_t A_t (METHOD.md §7), so the block's sharing constrains no merged update. ``aux_layout: features`` (ours,
issue 39) puts the shared factor on the feature side, where it does constrain the update:

    U_Aᵀ = H_A W2_A,kᵀ + b2_A,k              [r, d_in]   one head per input width k, shared by the group's projections
    U_B  = (H_B W2_B,kᵀ + b2_B,k)ᵀ           [d_out, r]  one head per output width, starts at zero
    A_t = C_t U_Aᵀ,  B_t = U_B D_t           C_t, D_t: [r, r] cores of each (layer, projection), start at I

so ΔW_t = s·U_B D_t C_t U_Aᵀ: every projection of the group lies in one generated r-dimensional row space and
one column space. With ``aux_scope: block`` the group is a block (the block layout); with ``aux_scope: model``
it is the whole model (the across-layer layout): one U_A / U_B for every layer, cores per layer.

By default (``aux_init: orthogonal``) S W1ᵀ starts with orthogonal rows, so that an Adam step of the heads
moves A and B along all r directions, as LoRA's steps do, instead of along H's top singular direction.

The generators do not read the batch, so A and B are produced once per forward pass of the whole
model and reused by every projection and token. `generate` does that in one batched pass (called by
`step.StepCache` when the adapted model's forward starts):
block generators of the same shape are stacked (seeds, trunks and heads concatenated), so the cost is
a few batched matrix products per step whatever the depth, not a Python loop over blocks. The
parameters keep their names in their generators (state-dict keys unchanged); with banking (`bank.py`)
each is a view of one stacked tensor per stack and parameter name, which the batched pass reads whole.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doran_lightning.adapters.bank import live, serving
from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.slice_state import GENERATOR

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}

GeneratorKey = tuple[int, str]  # (layer index inside the generator, projection type)
CORES = ("cores_A", "cores_B")  # the feature layout's per-member r×r cores, one tensor [members, r, r] each


def head_key(projection_type: str) -> str:
    """ModuleDict keys may not contain dots."""
    return projection_type.replace(".", "__")


def width_key(side: str, width: int) -> str:
    """The feature layout's head of one width: projections of equal d_in (A) / d_out (B) share it."""
    return f"{'in' if side == 'A' else 'out'}{width}"


class AuxGenerator(nn.Module):
    """The parameters that generate A and B for every (layer, projection type) it serves, from learnable seeds."""

    def __init__(self, cfg: AdapterConfig, num_layers: int, shapes: dict[str, tuple[int, int]],
                 members: list[GeneratorKey], device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        """`shapes` maps projection type -> (d_in, d_out); `members` lists the (layer, type) pairs served."""
        super().__init__()
        rank, hidden, seed_dim = cfg.r, cfg.hidden_dim, cfg.seed_dim
        self.activation_name = cfg.aux_activation
        self.init_name, self.init_gain = cfg.aux_init, cfg.init_gain
        self.layout = cfg.aux_layout
        self._num_layers = num_layers
        self.members = list(members)
        self.shapes = dict(shapes)
        factory = dict(device=device, dtype=dtype)
        seed_rows = 1 if self.features else num_layers  # the feature layout shares one factor across its layers
        self.seed_A = nn.Parameter(torch.randn(seed_rows, rank, seed_dim, **factory))
        self.seed_B = nn.Parameter(torch.randn(seed_rows, rank, seed_dim, **factory))
        self.trunk_A = nn.Linear(seed_dim, hidden, **factory)
        self.trunk_B = nn.Linear(seed_dim, hidden, **factory)
        self.heads_A = nn.ModuleDict({key: nn.Linear(hidden, width, **factory) for key, width in self.head_widths("A").items()})
        self.heads_B = nn.ModuleDict({key: nn.Linear(hidden, width, **factory) for key, width in self.head_widths("B").items()})
        if self.features:
            self.cores_A = nn.Parameter(torch.empty(len(self.members), rank, rank, **factory))
            self.cores_B = nn.Parameter(torch.empty(len(self.members), rank, rank, **factory))
            # Which members read which head: fixed by the shapes, so made once here, not in every step's pass.
            self.heads_members = {side: self.members_by_head(side) for side in "AB"}
        self.reset_parameters()

    @property
    def features(self) -> bool:
        """Whether the shared factor sits on the feature side (``aux_layout: features``)."""
        return self.layout == "features"

    def head_widths(self, side: str) -> dict[str, int]:
        """{head key: output width} of side "A" (d_in) or "B" (d_out): one head per projection type (rank layout),
        one per width (feature layout), in the order the batched pass concatenates them."""
        position = 0 if side == "A" else 1
        if not self.features:
            return {head_key(t): shape[position] for t, shape in self.shapes.items()}
        return {width_key(side, shape[position]): shape[position] for shape in self.shapes.values()}

    def members_by_head(self, side: str) -> dict[str, list[int]]:
        """The feature layout's {head key: positions in `members` of the projections that read it} on `side`."""
        position = 0 if side == "A" else 1
        grouped: dict[str, list[int]] = {key: [] for key in self.head_widths(side)}
        for member, (_, projection_type) in enumerate(self.members):
            grouped[width_key(side, self.shapes[projection_type][position])].append(member)
        return grouped

    def adapter_params(self) -> dict[str, str]:
        """{parameter name: role}: every parameter of a generator is an adapter tensor (the adapter-params protocol)."""
        return {name: GENERATOR for name, _ in self.named_parameters()}

    @property
    def num_layers(self) -> int:
        """The layers this generator serves (1 in block scope)."""
        return self._num_layers

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Orthogonal seeds and trunks (``aux_init: orthogonal``), B heads at zero (ΔW = 0 at step 0), A heads
        scaled so A starts at LoRA's A scale."""
        if self.init_name == "orthogonal":
            self._orthogonal_trunks()
        for head in self.heads_B.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if self.features and not self.cores_A.is_meta:
            for cores in (self.cores_A, self.cores_B):  # A_t = U_Aᵀ and B_t = U_B = 0 at step 0
                cores.copy_(torch.eye(cores.shape[-1], dtype=cores.dtype, device=cores.device).expand_as(cores))
        hidden_A = ACTIVATIONS[self.activation_name](self.trunk_A(self.seed_A))
        # On the meta device (shape-only models) there is no value to measure.
        mean_square = 1.0 if hidden_A.is_meta else hidden_A.pow(2).mean().clamp_min(1e-6).item()
        for head in self.heads_A.values():
            # Kaiming-uniform(a=√5) A has variance 1/(3·d_in); match it through the trunk's output scale.
            std = 1.0 / math.sqrt(3.0 * head.out_features * head.in_features * mean_square)
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)

    @torch.no_grad()
    def _orthogonal_trunks(self) -> None:
        """Seeds with orthogonal rows of norm √h0 and orthogonal trunks without bias, so H = act(S W1ᵀ) starts
        with orthogonal rows whose entries have rms `init_gain` (the activation's near-linear range)."""
        hidden, seed_dim = self.trunk_A.out_features, self.trunk_A.in_features
        if self.seed_A.is_meta:
            return
        for seeds, trunk in ((self.seed_A, self.trunk_A), (self.seed_B, self.trunk_B)):
            for layer_seed in seeds:
                nn.init.orthogonal_(layer_seed, gain=math.sqrt(seed_dim))
            nn.init.orthogonal_(trunk.weight, gain=self.init_gain * math.sqrt(hidden / seed_dim))
            nn.init.zeros_(trunk.bias)

    def signature(self) -> tuple:
        """Generators with equal signatures can be stacked into one batched computation."""
        return (self.num_layers, tuple(self.shapes.values()), self.activation_name, tuple(self.seed_A.shape),
                self.trunk_A.out_features, self.seed_A.device, self.seed_A.dtype, self.layout, len(self.members))

    def matrices(self) -> dict[GeneratorKey, tuple[Tensor, Tensor]]:
        """{(layer, type): (A [r, d_in], B [d_out, r])}, computed now (outside a model forward)."""
        return generate([self])[self]


Generated = dict[AuxGenerator, dict[GeneratorKey, tuple[Tensor, Tensor]]]


def _stacked(tensors: list[Tensor]) -> Tensor:
    """One tensor [rows, ...] from per-row tensors (no copy for a single row)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


class _Transposed(torch.autograd.Function):
    """``weight.mT`` whose gradient comes back in the weight's own layout in one copy for all stacked rows.

    Autograd would hand every stacked parameter a transposed (non-contiguous) slice of the gradient,
    and each parameter's gradient accumulation would then copy it on its own: one kernel instead of one per block.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return weight.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.mT.contiguous()


class _StackReader:
    """The batched reads of one stack of generators (equal signatures): hidden states and head outputs.

    Rows are (generator, layer) pairs: block-scope generators hold one layer each and their trunks and
    heads are stacked along the rows; a model-scope generator of the rank layout holds every layer's seed and
    shares its trunk and heads, which then broadcast over the rows.
    """

    def __init__(self, stack: list[AuxGenerator]) -> None:
        self.stack = stack
        self.first = stack[0]
        self.activation = ACTIVATIONS[self.first.activation_name]
        self.shared = len(stack) == 1 and self.first.seed_A.shape[0] > 1
        self.banked = serving(stack)  # the stack's banks (bank.py): its stacked tensors without a cat

    def gathered(self, label: str, members: list[tuple[nn.Module, str]], lead: bool = False) -> Tensor:
        if label in self.banked:
            return self.banked[label].stacked()
        return _stacked([live(owner, name).unsqueeze(0) if lead else live(owner, name) for owner, name in members])

    def hidden(self, side: str) -> Tensor:  # [rows, r, h]
        seed_name, trunk_name = f"seed_{side}", f"trunk_{side}"
        seeds = self.gathered(seed_name, [(g, seed_name) for g in self.stack])
        if self.shared:
            trunk = getattr(self.first, trunk_name)
            return self.activation(torch.nn.functional.linear(seeds, live(trunk, "weight"), live(trunk, "bias")))
        trunks = [getattr(g, trunk_name) for g in self.stack]
        weight = self.gathered(f"{trunk_name}.weight", [(t, "weight") for t in trunks], lead=True)  # [rows, h, h0]
        bias = self.gathered(f"{trunk_name}.bias", [(t, "bias") for t in trunks], lead=True)
        return self.activation(torch.baddbmm(bias.unsqueeze(1), seeds, _Transposed.apply(weight)))

    def heads(self, side: str) -> Tensor:  # [rows, r, Σ widths]: every head's output, concatenated
        heads_name, hidden_states = f"heads_{side}", self.hidden(side)
        per_row = [list(getattr(g, heads_name).values()) for g in (self.stack[:1] if self.shared else self.stack)]
        weight = self.gathered(f"{heads_name}.weight", [(head, "weight") for row in per_row for head in row])
        bias = self.gathered(f"{heads_name}.bias", [(head, "bias") for row in per_row for head in row])
        if self.shared:
            return torch.nn.functional.linear(hidden_states, weight, bias)
        rows = len(self.stack)
        stacked = _Transposed.apply(weight.view(rows, -1, weight.shape[-1]))
        return torch.baddbmm(bias.view(rows, 1, -1), hidden_states, stacked)

    def per_head(self, side: str) -> dict[str, Tensor]:
        """{head key: [rows, r, width]} (split, not indexing: its backward is one cat for all heads)."""
        widths = self.first.head_widths(side)
        return dict(zip(widths, self.heads(side).split(list(widths.values()), dim=2)))


def _generate_stack(stack: list[AuxGenerator]) -> Generated:
    """A/B of every generator in `stack` (equal signatures) in one batched pass.

    Heads of all projection types are concatenated along their output features, so A of every (row, type) is
    one column block of one product.
    """
    if stack[0].features:
        return _generate_feature_stack(stack)
    reader = _StackReader(stack)
    # unbind (not indexing): its backward is one stack for all members together.
    per_type_A = [part.unbind(0) for part in reader.per_head("A").values()]
    per_type_B = [part.transpose(1, 2).unbind(0) for part in reader.per_head("B").values()]
    result: Generated = {}
    for index, generator in enumerate(stack):
        own_types = list(generator.shapes)  # same shapes as the first generator's, possibly other names
        out: dict[GeneratorKey, tuple[Tensor, Tensor]] = {}
        for layer, projection_type in generator.members:
            row = layer if reader.shared else index
            position = own_types.index(projection_type)
            out[(layer, projection_type)] = (per_type_A[position][row], per_type_B[position][row])
        result[generator] = out
    return result


def _generate_feature_stack(stack: list[AuxGenerator]) -> Generated:
    """The feature layout: A_t = C_t U_Aᵀ and B_t = U_B D_t for every member of every generator of the stack.

    One product per width and side: the cores of all members of all stacked generators [rows, members, r, r]
    multiply their row's shared factor [rows, 1, r, width].
    """
    reader, first = _StackReader(stack), stack[0]
    rows, members, rank = len(stack), len(first.members), first.seed_A.shape[1]
    made: dict[str, list[Tensor]] = {}
    for side, cores_name in zip("AB", CORES):
        cores = reader.gathered(cores_name, [(g, cores_name) for g in stack]).view(rows, members, rank, rank)
        if side == "B":
            cores = cores.transpose(-1, -2)  # B_tᵀ = D_tᵀ U_Bᵀ: the head gives U_Bᵀ [r, d_out]
        outputs: list[Optional[Tensor]] = [None] * members
        for key, factor in reader.per_head(side).items():
            positions = first.heads_members[side][key]
            chosen = cores if len(positions) == members else cores[:, positions]
            product = chosen @ factor.unsqueeze(1)  # [rows, members of this width, r, width]
            if side == "B":
                product = product.transpose(-1, -2)
            for position, value in zip(positions, product.unbind(1)):
                outputs[position] = value
        made[side] = outputs  # type: ignore[assignment]
    result: Generated = {}
    for index, generator in enumerate(stack):
        result[generator] = {key: (made["A"][m][index], made["B"][m][index]) for m, key in enumerate(generator.members)}
    return result


def plan_stacks(generators: list[AuxGenerator]) -> list[list[AuxGenerator]]:
    """The generators computed together: block generators of equal signatures, in order; a model-scope one alone."""
    stacks: dict[tuple, list[AuxGenerator]] = {}
    for generator in generators:
        key = generator.signature() if generator.num_layers == 1 else ("model", id(generator))
        stacks.setdefault(key, []).append(generator)
    return list(stacks.values())


def generate(generators: list[AuxGenerator]) -> Generated:
    """A/B of every generator, one batched pass per stack of `plan_stacks`."""
    result: Generated = {}
    for stack in plan_stacks(generators):
        result.update(_generate_stack(stack))
    return result
