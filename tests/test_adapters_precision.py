"""Mixed precision: the norm, σ and magnitude math stays in float32 under autocast and bf16 storage."""

from __future__ import annotations

import torch

from tiny_models import run, tiny_llama, token_input, train_steps

from doran_lightning.adapters import AdapterConfig, adapted_modules, apply_adapters


def test_bf16_frozen_weights_get_float32_adapters_and_norms() -> None:
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    apply_adapters(model, AdapterConfig(method="doran", r=4))
    layer = next(iter(adapted_modules(model).values()))
    assert layer.weight.dtype == torch.bfloat16
    assert layer.adapters["main"].magnitude.dtype == torch.float32
    assert layer.weight_norm_sq.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.step_values()[2].dtype == torch.float32  # g = m / (‖V‖ + σ) never in half
        logits = run(model, token_input())
    assert torch.isfinite(logits).all()


def test_autocast_output_tracks_float32_output() -> None:
    torch.manual_seed(0)
    model = apply_adapters(tiny_llama(), AdapterConfig(method="doran", r=4))
    inputs = token_input()
    train_steps(model, inputs, steps=2)
    reference = run(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(model, inputs).float()
    assert torch.linalg.vector_norm(mixed - reference) < 0.05 * torch.linalg.vector_norm(reference)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, inputs).float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
