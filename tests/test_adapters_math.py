"""Numerical identities of the LoRA/DoRA/DoRAN family (METHOD.md §1-4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tiny_models import run, tiny_bert, tiny_llama, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    merge_adapters,
    unmerge_adapters,
)

VARIANTS = [
    dict(method="lora"),
    dict(method="dora"),
    dict(method="doran"),
    dict(method="doran", noise=False),
    dict(method="doran", aux=False),
    dict(method="doran", noise=False, aux=False),
    dict(method="doran", aux_scope="model"),
    dict(method="doran", aux_layout="features"),
    dict(method="doran", aux_layout="features", aux_scope="model"),
    dict(method="doran", noise_mode="fixed"),
    dict(method="doran", noise_mode="gaussian"),
    dict(method="doran", noise_granularity="row", rslora=True),
    dict(method="doran", detach_norm=False, aux_activation="silu", aux_hidden=6, aux_seed_dim=3),
    dict(method="doran", sigma_scale="row_norm", sigma_init=0.5, noise_mode="gaussian", noise_granularity="row"),
]
BACKBONES = {"vit": (tiny_vit, vit_input), "bert": (tiny_bert, token_input), "llama": (tiny_llama, token_input)}


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_identity_at_init(backbone: str, options: dict) -> None:
    build, make_input = BACKBONES[backbone]
    torch.manual_seed(0)
    model = build().double()
    inputs = make_input()
    expected = run(model, inputs)
    apply_adapters(model, AdapterConfig(r=4, **options))
    assert adapted_modules(model), "nothing was adapted"
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-12, atol=1e-12)


def test_magnitude_init_norm_starts_shrunk_by_the_noise() -> None:
    """DoRA's literal init m0 = ‖W0‖ gives g = ‖W0‖/(‖W0‖+σ) < 1 at step 0."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    model = nn.Sequential(linear)
    expected = linear(x) - linear.bias
    norm = linear.weight.norm(dim=1)
    apply_adapters(model, AdapterConfig(method="doran", aux=False, r=2, sigma_init=0.1, target_modules=["0"],
                                        magnitude_init="norm"))
    shrink = norm / (norm + 0.1)
    torch.testing.assert_close(model(x) - linear.bias, expected * shrink, rtol=1e-6, atol=1e-9)


def _random_factors(layer: AdaptedLinear, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=generator, dtype=torch.float64))
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_factored_row_norm_equals_dense_norm(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40)).to(dtype)
    apply_adapters(model, AdapterConfig(method="dora", r=6, alpha=3.0, target_modules=["0"]))
    layer = model[0]
    _random_factors(layer)
    adapter = layer.adapters["main"]
    factored = layer.row_norm("main", adapter.lora_A, adapter.lora_B, with_grad=False)
    dense = (layer.weight.double() + layer.scaling * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
    torch.testing.assert_close(factored.double(), dense, rtol=tol, atol=tol)
    layer.cfg.factored_norm = False  # the dense reference path gives the same
    torch.testing.assert_close(layer.row_norm("main", adapter.lora_A, adapter.lora_B, with_grad=False).double(),
                               dense, rtol=tol, atol=tol)


def test_factored_norm_is_exactly_zero_safe() -> None:
    """A row with W0 + sBA = 0 gives norm 0 (never NaN from a slightly negative rounding)."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    apply_adapters(model, AdapterConfig(method="dora", r=2, target_modules=["0"]))
    adapter = model[0].adapters["main"]
    norm = model[0].row_norm("main", adapter.lora_A, adapter.lora_B, with_grad=False)
    assert torch.equal(norm, torch.zeros(3))


def _copy_static(source: AdaptedLinear, source_slice: str, target: AdaptedLinear, target_slice: str) -> None:
    with torch.no_grad():
        for name, tensor in source.adapters[source_slice].state_dict().items():
            target.adapters[target_slice].state_dict()[name].copy_(tensor)


@pytest.mark.parametrize("method,extra", [("lora", {}), ("dora", {}), ("doran", {"aux": False, "noise_granularity": "row"})])
def test_fused_slices_equal_separate_projections(method: str, extra: dict) -> None:
    torch.manual_seed(0)
    dim = 8
    fused = nn.Module()
    fused.qkv = nn.Linear(dim, 3 * dim).double()
    separate = nn.Module()
    for index, part in enumerate("qkv"):
        linear = nn.Linear(dim, dim).double()
        with torch.no_grad():
            linear.weight.copy_(fused.qkv.weight[index * dim:(index + 1) * dim])
            linear.bias.copy_(fused.qkv.bias[index * dim:(index + 1) * dim])
        setattr(separate, part, linear)
    apply_adapters(fused, AdapterConfig(method=method, r=3, target_modules=["qkv[q,v]"], **extra))
    apply_adapters(separate, AdapterConfig(method=method, r=3, target_modules=["q", "v"], **extra))
    for part in "qv":
        _random_factors(separate.get_submodule(part), seed=ord(part))
        with torch.no_grad():
            for parameter in separate.get_submodule(part).adapters.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        _copy_static(separate.get_submodule(part), "main", fused.qkv, part)
    x = torch.randn(4, 5, dim, dtype=torch.float64)
    expected = torch.cat([separate.q(x), separate.k(x), separate.v(x)], dim=-1)
    torch.testing.assert_close(fused.qkv(x), expected, rtol=1e-12, atol=1e-12)
    merge_adapters(fused)
    torch.testing.assert_close(fused.qkv(x), expected, rtol=1e-10, atol=1e-10)


def test_sigma_to_zero_with_static_matrices_equals_dora() -> None:
    torch.manual_seed(0)
    dora = tiny_bert().double()
    doran = tiny_bert().double()
    doran.load_state_dict(dora.state_dict())
    apply_adapters(dora, AdapterConfig(method="dora", r=4))
    apply_adapters(doran, AdapterConfig(method="doran", aux=False, r=4))
    inputs = token_input()
    train_steps(dora, inputs)
    with torch.no_grad():
        for name, layer in adapted_modules(doran).items():
            source = adapted_modules(dora)[name].adapters["main"]
            target = layer.adapters["main"]
            for tensor_name in ("lora_A", "lora_B", "magnitude"):
                getattr(target, tensor_name).copy_(getattr(source, tensor_name))
            target.rho.fill_(-80.0)  # softplus(-80) ≈ 1.8e-35
    torch.testing.assert_close(run(doran, inputs), run(dora, inputs), rtol=1e-10, atol=1e-10)


def test_dora_with_magnitude_at_norm_equals_lora() -> None:
    """g = 1 when m = ‖W0 + sBA‖_row: DoRA then moves along LoRA's direction exactly."""
    torch.manual_seed(0)
    lora = tiny_vit().double()
    dora = tiny_vit().double()
    dora.load_state_dict(lora.state_dict())
    apply_adapters(lora, AdapterConfig(method="lora", r=4))
    apply_adapters(dora, AdapterConfig(method="dora", r=4))
    inputs = vit_input()
    train_steps(lora, inputs)
    with torch.no_grad():
        for name, layer in adapted_modules(dora).items():
            for part, adapter in layer.adapters.items():
                source = adapted_modules(lora)[name].adapters[part]
                adapter.lora_A.copy_(source.lora_A)
                adapter.lora_B.copy_(source.lora_B)
                adapter.magnitude.copy_(layer.row_norm(part, adapter.lora_A, adapter.lora_B, with_grad=False))
    torch.testing.assert_close(run(dora, inputs), run(lora, inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", VARIANTS[:10], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_merge_equals_forward_and_unmerge_restores(options: dict) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    apply_adapters(model, AdapterConfig(r=4, **options))
    inputs = vit_input(dtype=torch.float32)
    train_steps(model, inputs)
    expected = run(model, inputs)
    merge_adapters(model)
    merged = run(model, inputs)
    assert torch.linalg.vector_norm(merged - expected) <= 1e-5 * torch.linalg.vector_norm(expected)
    unmerge_adapters(model)
    for name, parameter in model.named_parameters():
        if name in original:
            assert torch.equal(parameter, original[name]) or parameter.requires_grad, name
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)


def test_merge_and_unload_leaves_plain_linears() -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    apply_adapters(model, AdapterConfig(method="doran", r=4))
    inputs = token_input()
    train_steps(model, inputs)
    expected = run(model, inputs)
    merge_adapters(model, unload=True)
    assert not adapted_modules(model)
    assert not any("doran_aux" in name for name, _ in model.named_modules())
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-6)
    apply_adapters(model, AdapterConfig(method="lora", r=2))  # a fresh round of adapters is allowed


def _zero_row_layer(method: str, **options: object) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    with torch.no_grad():
        model[0].weight[0].mul_(1e-7)  # a row of W0 + sBA (B = 0) that is almost zero
    apply_adapters(model, AdapterConfig(method=method, r=2, target_modules=["0"], aux=False if method == "doran" else None,
                                        **options))
    with torch.no_grad():
        model[0].adapters["main"].magnitude.fill_(1.0)  # m trained away from the tiny norm
    return model, torch.randn(8, 16)


def test_noise_bounds_gradients_where_dora_explodes() -> None:
    grads = {}
    for method in ("dora", "doran"):
        model, x = _zero_row_layer(method, sigma_init=0.01)
        model(x).pow(2).sum().backward()
        adapter = model[0].adapters["main"]
        grads[method] = torch.cat([p.grad.flatten() for p in adapter.parameters()])
    assert torch.isfinite(grads["doran"]).all()
    dora_size = torch.linalg.vector_norm(grads["dora"]) if torch.isfinite(grads["dora"]).all() else math.inf
    assert dora_size > 1e4 * torch.linalg.vector_norm(grads["doran"])


def test_sigma_receives_gradient_even_with_detached_norm() -> None:
    model, x = _zero_row_layer("doran")
    model(x).sum().backward()
    rho = model[0].adapters["main"].rho
    assert rho.grad is not None and rho.grad.abs().sum() > 0
