"""Auxiliary networks that generate the low-rank matrices A and B (METHOD.md §3).

One `AuxGenerator` serves a group of projections. With ``aux_scope: block`` a group is one
transformer block (one layer slot); with ``aux_scope: model`` a single generator serves every block
and each block has its own learned seed (a layer embedding). In both cases:

    H_A = act(S_A W1_Aᵀ + b1_A)              S_A: [r, h0] seed of the layer, H_A: [r, h]
    A_t = H_A W2_A,tᵀ + b2_A,t               [r, d_in_t]      one output head per projection type t
    B_t = (act(S_B W1_Bᵀ + b1_B) W2_B,tᵀ + b2_B,t)ᵀ   [d_out_t, r]   W2_B,t, b2_B,t start at zero

The generator does not read the batch, so A and B are produced once per forward pass and reused by
every projection and every token (`matrices()` caches them until the parameters change or the
owning model's next forward starts).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doran_lightning.adapters.config import AdapterConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}

GeneratorKey = tuple[int, str]  # (layer index inside the generator, projection type)


def head_key(projection_type: str) -> str:
    """ModuleDict keys may not contain dots."""
    return projection_type.replace(".", "__")


class AuxGenerator(nn.Module):
    """Generates A and B for every (layer, projection type) it serves, from learnable seeds."""

    def __init__(self, cfg: AdapterConfig, num_layers: int, shapes: dict[str, tuple[int, int]],
                 members: list[GeneratorKey], device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        """`shapes` maps projection type -> (d_in, d_out); `members` lists the (layer, type) pairs served."""
        super().__init__()
        rank, hidden, seed_dim = cfg.r, cfg.hidden_dim, cfg.seed_dim
        self.activation_name = cfg.aux_activation
        self.members = list(members)
        factory = dict(device=device, dtype=dtype)
        self.seed_A = nn.Parameter(torch.randn(num_layers, rank, seed_dim, **factory))
        self.seed_B = nn.Parameter(torch.randn(num_layers, rank, seed_dim, **factory))
        self.trunk_A = nn.Linear(seed_dim, hidden, **factory)
        self.trunk_B = nn.Linear(seed_dim, hidden, **factory)
        self.heads_A = nn.ModuleDict({head_key(t): nn.Linear(hidden, d_in, **factory) for t, (d_in, _) in shapes.items()})
        self.heads_B = nn.ModuleDict({head_key(t): nn.Linear(hidden, d_out, **factory) for t, (_, d_out) in shapes.items()})
        self._cache: Optional[dict[GeneratorKey, tuple[Tensor, Tensor]]] = None
        self._cache_token: Optional[tuple] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """B heads at zero (ΔW = 0 at step 0); A heads scaled so A starts at LoRA's A scale."""
        for head in self.heads_B.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        hidden_A = self._hidden(self.seed_A, self.trunk_A)
        # On the meta device (shape-only models) there is no value to measure.
        mean_square = 1.0 if hidden_A.is_meta else hidden_A.pow(2).mean().clamp_min(1e-6).item()
        for head in self.heads_A.values():
            # Kaiming-uniform(a=√5) A has variance 1/(3·d_in); match it through the trunk's output scale.
            std = 1.0 / math.sqrt(3.0 * head.out_features * head.in_features * mean_square)
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        self.invalidate()

    def _hidden(self, seed: Tensor, trunk: nn.Linear) -> Tensor:
        return ACTIVATIONS[self.activation_name](trunk(seed))

    def invalidate(self) -> None:
        """Forget the cached matrices (the owning model calls this at the start of every forward)."""
        self._cache = None
        self._cache_token = None

    def _token(self) -> tuple:
        # In-place optimiser steps bump tensor versions: a stale cache is never reused.
        return (torch.is_grad_enabled(), self.seed_A.device, self.seed_A.dtype,
                tuple(p._version for p in self.parameters()))

    def matrices(self) -> dict[GeneratorKey, tuple[Tensor, Tensor]]:
        """{(layer, type): (A [r, d_in], B [d_out, r])}, computed once per forward pass."""
        token = self._token()
        if self._cache is not None and self._cache_token == token:
            return self._cache
        hidden_A = self._hidden(self.seed_A, self.trunk_A)  # [L, r, h]
        hidden_B = self._hidden(self.seed_B, self.trunk_B)
        generated: dict[GeneratorKey, tuple[Tensor, Tensor]] = {}
        for projection_type in {t for _, t in self.members}:
            layers = [layer for layer, t in self.members if t == projection_type]
            index = torch.tensor(layers, device=hidden_A.device) if len(layers) < hidden_A.shape[0] else None
            h_A = hidden_A if index is None else hidden_A.index_select(0, index)
            h_B = hidden_B if index is None else hidden_B.index_select(0, index)
            key = head_key(projection_type)
            all_A = self.heads_A[key](h_A)  # [L_t, r, d_in]
            all_B = self.heads_B[key](h_B).transpose(1, 2)  # [L_t, d_out, r]
            for position, layer in enumerate(layers):
                generated[(layer, projection_type)] = (all_A[position], all_B[position])
        self._cache, self._cache_token = generated, token
        return generated
