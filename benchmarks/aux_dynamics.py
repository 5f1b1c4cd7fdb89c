"""How far and how broadly the first Adam steps move generated vs static low-rank factors (METHOD.md §3).

LoRA's A and B are free tensors: Adam moves every entry by about lr per step. DoRAN's are the output
of a generator; this measures whether, at the same lr, they move as far (per-element RMS of the change
of A and of B over the first `steps` optimiser steps) and along as many directions (the effective rank of
each slice's change, (Σ s²)² / Σ s⁴ over its singular values s: 1 when one direction carries the whole step,
r when all r do equally), on a 2-layer BERT with random weights and labels, for static factors
(``method=lora``) and generated ones (``method=doran``, noise off to isolate A/B).

    python benchmarks/aux_dynamics.py                       # default generator
    python benchmarks/aux_dynamics.py aux_hidden=32 aux_lr_scale=none   # any AdapterConfig overrides
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from doran_lightning.adapters import AdapterConfig, adapted_modules, adapter_param_groups, apply_adapters


def tiny_bert(seed: int = 0, hidden: int = 64) -> nn.Module:
    """A 2-layer BERT with random weights (no dropout, so the steps are deterministic)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Current (A, B) of every adapted slice, detached copies."""
    return {f"{name}.{slice_name}": (a.detach().clone(), b.detach().clone())
            for name, layer in adapted_modules(model).items()
            for slice_name, (a, b) in layer.lowrank_factors().items()}


def effective_rank(change: torch.Tensor) -> float:
    """(Σ s²)² / Σ s⁴ over the singular values of `change`: how many directions share it evenly."""
    singular = torch.linalg.svdvals(change.double())
    return float(singular.pow(2).sum() ** 2 / singular.pow(4).sum().clamp_min(1e-300))


def factor_movement(cfg: AdapterConfig, lr: float = 1e-3, steps: int = 2, seed: int = 0) -> dict[str, float]:
    """Per-element RMS change of A and of B over the first `steps` AdamW steps (all slices pooled), and the
    mean effective rank of each slice's change (keys ``A_rank``, ``B_rank``)."""
    model = apply_adapters(tiny_bert(seed), cfg)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randint(0, 100, (16, 12), generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    optimizer = torch.optim.AdamW(adapter_param_groups(model, weight_decay=0.0, lr=lr), lr=lr)
    before = snapshot(model)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs).logits, labels).backward()
        optimizer.step()
    after = snapshot(model)
    moved = {}
    for index, factor in enumerate(("A", "B")):
        changes = [after[key][index] - before[key][index] for key in before]
        moved[factor] = float(torch.cat([change.flatten() for change in changes]).pow(2).mean().sqrt())
        moved[f"{factor}_rank"] = sum(effective_rank(change) for change in changes) / len(changes)
    return moved


def movement_ratio(lr: float = 1e-3, steps: int = 2, seed: int = 0, **overrides: Any) -> dict[str, float]:
    """Generated / static RMS change (``A``, ``B``) and effective rank of the change (``A_rank``, ``B_rank``)
    at the same lr (DoRAN aux-only vs LoRA, same targets)."""
    common = dict(r=8, alpha=16, target_modules=["query", "value"], trainable_modules=["classifier"])
    static = factor_movement(AdapterConfig(method="lora", **common), lr, steps, seed)
    generated = factor_movement(AdapterConfig(method="doran", noise=False, **common, **overrides), lr, steps, seed)
    return {key: generated[key] / static[key] for key in static}


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return None if value == "null" else value


if __name__ == "__main__":
    overrides = {key: _parse(value) for key, value in (arg.split("=", 1) for arg in sys.argv[1:])}
    for lr in (1e-3, 3e-3):
        for steps in (2, 20):
            ratios = [movement_ratio(lr=lr, steps=steps, seed=seed, **overrides) for seed in range(3)]
            print(f"lr={lr:g} {overrides or 'defaults'}, steps 0-{steps}, seeds 0-2, generated/static: RMS change "
                  + ", ".join(f"A {r['A']:.2f} B {r['B']:.2f}" for r in ratios) + "; effective rank of the change "
                  + ", ".join(f"A {r['A_rank']:.2f} B {r['B_rank']:.2f}" for r in ratios))
