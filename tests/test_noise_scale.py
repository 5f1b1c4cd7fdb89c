"""Where σ acts (issue 17, METHOD.md §2): the row Jacobians in float64, σ on the layer's scale, the radial gain.

Notation per adapted row i: V_i = W0_i + s·B_i·A, n_i = ‖V_i‖, u_i = V_i/n_i, W'_i = m_i/(n_i+σ_i)·V_i.
The Jacobians ∂W'_i/∂V_i are read off the layer's own forward and backward through B: ∂W'_i/∂B_i =
J_i·(s·Aᵀ), and with r ≥ d_in the columns of Aᵀ span the row space, so J_i is determined.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tiny_models import run, tiny_bert, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapted_modules,
    adapter_state_dict,
    adapter_statistics,
    apply_adapters,
    export_peft,
    load_adapters,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from doran_lightning.adapters.methods.doran import RELATIVE_SHARPNESS, initial_rho

D_IN, RANK = 4, 6  # r ≥ d_in: J_i is fully determined by ∂W'_i/∂B_i
FUSED = {"q": (0, 5), "v": (10, 15)}  # two slices of a [15, 4] weight; rows 5-9 (k) are not adapted


def _layer(slices: dict[str, tuple[int, int]] | None = None, **options) -> AdaptedLinear:
    """A float64 AdaptedLinear with random A, B, m and σ (noise-only: static A/B)."""
    torch.manual_seed(0)
    out_features = 15 if slices else 5
    base = nn.Linear(D_IN, out_features, bias=False).double()
    cfg = AdapterConfig(**{"method": "doran", "aux": False, "r": RANK, "alpha": 3.0, **options})
    layer = AdaptedLinear(base, cfg, slices or {"main": (0, out_features)})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=generator, dtype=torch.float64))
            adapter.lora_B.copy_(0.3 * torch.randn(adapter.lora_B.shape, generator=generator, dtype=torch.float64))
            if hasattr(adapter, "magnitude"):
                scale = 1 + 0.2 * torch.rand(adapter.magnitude.shape, generator=generator, dtype=torch.float64)
                adapter.magnitude.mul_(scale)
            if hasattr(adapter, "rho") and isinstance(adapter.rho, nn.Parameter):
                adapter.rho.add_(0.5 * torch.rand(adapter.rho.shape, generator=generator, dtype=torch.float64))
    return layer.eval()


def _effective_weight(layer: AdaptedLinear) -> Tensor:
    """W' = g ⊙ (W0 + sBA) through the layer's forward (x = I, no bias: y = W'ᵀ)."""
    return layer(torch.eye(layer.in_features, dtype=torch.float64)).T


def _jacobian_wrt_B(layer: AdaptedLinear, name: str) -> Tensor:
    """∂W'[o, k]/∂B[j, c] of one slice by autograd: [d_out, d_in, rows, r]."""
    lora_B = layer.adapters[name].lora_B
    weight = _effective_weight(layer)
    jacobian = torch.zeros(*weight.shape, *lora_B.shape, dtype=torch.float64)
    for o in range(weight.shape[0]):
        for k in range(weight.shape[1]):
            (jacobian[o, k],) = torch.autograd.grad(weight[o, k], lora_B, retain_graph=True)
    return jacobian


def _row_quantities(layer: AdaptedLinear, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense V (rows of the slice), n, σ per row and m."""
    start, stop = layer.slices[name]
    adapter = layer.adapters[name]
    v = layer.weight[start:stop].detach() + layer.scaling * (adapter.lora_B @ adapter.lora_A).detach()
    norm = v.norm(dim=1)
    sigma = layer.sigma(name)
    sigma = torch.zeros_like(norm) if sigma is None else torch.broadcast_to(sigma.detach(), norm.shape)
    return v, norm, sigma, adapter.magnitude.detach()


def closed_form_jacobian(v: Tensor, norm: Tensor, sigma: Tensor, magnitude: Tensor, detach_norm: bool) -> Tensor:
    """[rows, d_in, d_in]: m/(n+σ)·[I − n/(n+σ)·u uᵀ] (norm in the gradient path) or m/(n+σ)·I (detached)."""
    identity = torch.eye(v.shape[1], dtype=v.dtype).expand(v.shape[0], -1, -1)
    gain = (magnitude / (norm + sigma))[:, None, None]
    if detach_norm:
        return gain * identity
    u = v / norm[:, None]
    return gain * (identity - (norm / (norm + sigma))[:, None, None] * u[:, :, None] * u[:, None, :])


def _assert_rows_match(layer: AdaptedLinear, detach_norm: bool) -> None:
    """Every adapted row: autograd ∂W'_i/∂B_i = J_i·sAᵀ; other rows' B never reaches W'_i."""
    for name, (start, stop) in layer.slices.items():
        jacobian = _jacobian_wrt_B(layer, name)
        v, norm, sigma, magnitude = _row_quantities(layer, name)
        closed = closed_form_jacobian(v, norm, sigma, magnitude, detach_norm)
        lora_A = layer.adapters[name].lora_A.detach()
        for i in range(stop - start):
            torch.testing.assert_close(jacobian[start + i, :, i, :], closed[i] @ (layer.scaling * lora_A.T),
                                       rtol=1e-12, atol=1e-12)
            others = torch.ones(stop - start, dtype=torch.bool)
            others[i] = False
            assert torch.count_nonzero(jacobian[start + i][:, others]) == 0
        outside = torch.ones(layer.out_features, dtype=torch.bool)
        outside[start:stop] = False
        assert torch.count_nonzero(jacobian[outside]) == 0  # unadapted rows and other slices: untouched


LAYOUTS = {"plain": None, "fused_qkv": FUSED}


# ---------------------------------------------------------------------- item 1: the identities
@pytest.mark.parametrize("factored_norm", [True, False])
@pytest.mark.parametrize("granularity", ["projection", "row"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("sigma_scale", ["absolute", "row_norm"])
def test_non_detached_jacobian_is_the_closed_form(layout: str, granularity: str, factored_norm: bool,
                                                  sigma_scale: str) -> None:
    layer = _layer(LAYOUTS[layout], detach_norm=False, noise_granularity=granularity, factored_norm=factored_norm,
                   sigma_scale=sigma_scale, sigma_init=0.3)
    _assert_rows_match(layer, detach_norm=False)


@pytest.mark.parametrize("granularity", ["projection", "row"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_detached_jacobian_is_the_row_scale_times_identity(layout: str, granularity: str) -> None:
    layer = _layer(LAYOUTS[layout], detach_norm=True, noise_granularity=granularity)
    _assert_rows_match(layer, detach_norm=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sigma_to_zero_gives_non_detached_dora(layout: str) -> None:
    """DoRAN's Jacobian at σ → 0 equals DoRA's m/n·[I − u uᵀ] (same A, B, m), by autograd on both."""
    doran = _layer(LAYOUTS[layout], detach_norm=False)
    dora = _layer(LAYOUTS[layout], method="dora", aux=None, detach_norm=False)
    with torch.no_grad():
        for name, adapter in doran.adapters.items():
            adapter.rho.fill_(-80.0)  # σ = softplus(-80) ≈ 1.8e-35
            for tensor in ("lora_A", "lora_B", "magnitude"):
                getattr(dora.adapters[name], tensor).copy_(getattr(adapter, tensor))
    for name in doran.slices:
        torch.testing.assert_close(_jacobian_wrt_B(doran, name), _jacobian_wrt_B(dora, name), rtol=1e-12, atol=1e-14)
        v, norm, _, magnitude = _row_quantities(dora, name)
        projection = closed_form_jacobian(v, norm, torch.zeros_like(norm), magnitude, detach_norm=False)
        u = v / norm[:, None]
        torch.testing.assert_close(projection @ u[:, :, None], torch.zeros_like(u[:, :, None]), rtol=0, atol=1e-12)
    _assert_rows_match(dora, detach_norm=False)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sigma_to_infinity_with_matched_magnitude_gives_loras_step(layout: str) -> None:
    """σ → ∞ with m = c·(n+σ): J → c·I, so for the same ∂L/∂W' the gradient of B is c × LoRA's (same direction)."""
    c, big = 0.7, 1e9
    doran = _layer(LAYOUTS[layout], detach_norm=False)
    lora = _layer(LAYOUTS[layout], method="lora", aux=None)
    with torch.no_grad():
        for name, adapter in doran.adapters.items():
            adapter.rho.fill_(big)  # softplus(ρ) = ρ for large ρ
            v, norm, sigma, _ = _row_quantities(doran, name)
            adapter.magnitude.copy_(c * (norm + sigma))
            lora.adapters[name].lora_A.copy_(adapter.lora_A)
            lora.adapters[name].lora_B.copy_(adapter.lora_B)
    target = torch.randn(doran.out_features, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name, (start, stop) in doran.slices.items():
        v, norm, sigma, magnitude = _row_quantities(doran, name)
        identity = torch.eye(D_IN, dtype=torch.float64).expand(stop - start, -1, -1)
        torch.testing.assert_close(closed_form_jacobian(v, norm, sigma, magnitude, False), c * identity,
                                   rtol=0, atol=1e-8)
    for layer in (doran, lora):  # the same upstream gradient ∂L/∂W' = target for both
        (_effective_weight(layer) * target).sum().backward()
    for name in doran.slices:
        torch.testing.assert_close(doran.adapters[name].lora_B.grad, c * lora.adapters[name].lora_B.grad,
                                   rtol=1e-7, atol=1e-12)


def test_detached_step_is_sigma_independent_up_to_the_row_scale() -> None:
    """With the norm detached, ∂L/∂B_i·(n_i+σ_i)/m_i is the same for every σ (same m, same ∂L/∂W')."""
    target = torch.randn(5, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rescaled, raw = [], []
    for rho in (-6.0, 0.0, 3.0):  # σ ≈ 0.0025, 0.69, 3.05
        layer = _layer(detach_norm=True, noise_granularity="row")
        adapter = layer.adapters["main"]
        with torch.no_grad():
            adapter.rho.fill_(rho)
        _, norm, sigma, magnitude = _row_quantities(layer, "main")
        (_effective_weight(layer) * target).sum().backward()
        raw.append(adapter.lora_B.grad)
        rescaled.append(adapter.lora_B.grad * ((norm + sigma) / magnitude)[:, None])
    assert not torch.allclose(raw[0], raw[-1], rtol=0.1)  # σ does change the raw step: by the row scale only
    for other in rescaled[1:]:
        torch.testing.assert_close(other, rescaled[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- item 2: σ on the layer's scale
@pytest.mark.parametrize("mode", ["learnable", "fixed", "gaussian"])
@pytest.mark.parametrize("granularity", ["projection", "row"])
def test_relative_sigma_init_is_a_fraction_of_each_slices_median_row_norm(mode: str, granularity: str) -> None:
    layer = _layer(FUSED, sigma_scale="row_norm", sigma_init=0.1, noise_mode=mode, noise_granularity=granularity)
    for name, (start, stop) in FUSED.items():
        median = layer.weight[start:stop].detach().norm(dim=1).median()
        adapter = layer.adapters[name]
        rows = stop - start
        expected_mean = 0.1 * median * (math.sqrt(2 / math.pi) if mode == "gaussian" else 1.0)
        sigma = layer.sigma(name)
        # ρ0 does not depend on the weight: the scale lives in the buffer, σ0 = sigma_init × median.
        torch.testing.assert_close(adapter.sigma_unit, median.reshape(1), rtol=1e-15, atol=0)
        assert sigma.numel() == (1 if granularity == "projection" else rows)
        if granularity == "projection":  # the test's _layer randomises learnable ρ; fixed ρ is the init
            base = torch.nn.functional.softplus(adapter.rho, beta=RELATIVE_SHARPNESS)
            torch.testing.assert_close(sigma, median * base * (math.sqrt(2 / math.pi) if mode == "gaussian" else 1.0))
        if mode == "fixed":
            torch.testing.assert_close(sigma, torch.full_like(sigma, expected_mean.item()), rtol=1e-12, atol=0)
        assert "sigma_unit" in dict(adapter.named_buffers()) and "sigma_unit" not in dict(adapter.named_parameters())


def test_absolute_sigma_init_is_unchanged() -> None:
    torch.manual_seed(0)
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4, sigma_init=0.05))
    for layer in adapted_modules(model).values():
        adapter = layer.adapters["main"]
        assert not hasattr(adapter, "sigma_unit")
        torch.testing.assert_close(torch.nn.functional.softplus(adapter.rho), torch.full((1,), 0.05))
    assert not any(key.endswith("sigma_unit") for key in adapter_state_dict(model))


@pytest.mark.parametrize("relative", [0.01, 0.1, 1.0])
def test_one_adam_step_moves_relative_sigma_on_the_layers_scale(relative: float) -> None:
    """Adam's first step moves ρ by lr; σ then moves by lr·u·(1 − e^(−β·σ0/u)) — ≥ 0.63·lr·u from σ0/u = 1 %.

    The absolute parametrization at σ0 = 0.01 moves σ by lr·σ0 (log-space), whatever the row norms are.
    """
    lr = 1e-4
    moves = {}
    for scale, sigma_init in (("absolute", 0.01), ("row_norm", relative)):
        layer = _layer(sigma_scale=scale, sigma_init=sigma_init)
        adapter = layer.adapters["main"]
        with torch.no_grad():
            adapter.rho.fill_(initial_rho(layer.cfg))
        before = layer.sigma("main").detach().clone()
        optimizer = torch.optim.Adam([adapter.rho], lr=lr)
        _effective_weight(layer).pow(2).sum().backward()
        optimizer.step()
        moves[scale] = (layer.sigma("main").detach() - before).abs().item()
    unit = layer.weight.detach().norm(dim=1).median().item()
    assert before.item() == pytest.approx(relative * unit, rel=1e-12)
    assert moves["row_norm"] == pytest.approx(lr * unit * -math.expm1(-RELATIVE_SHARPNESS * relative), rel=5e-3)
    assert moves["row_norm"] >= 0.63 * lr * unit
    assert moves["absolute"] == pytest.approx(lr * 0.01, rel=2e-2)


RELATIVE = [dict(method="doran", sigma_scale="row_norm", sigma_init=0.3),
            dict(method="doran", aux=False, sigma_scale="row_norm", sigma_init=1.0, noise_mode="gaussian",
                 noise_granularity="row", detach_norm=False),
            dict(method="doran", sigma_scale="row_norm", sigma_init=0.1, noise_mode="fixed")]


@pytest.mark.parametrize("options", RELATIVE, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_relative_sigma_saves_loads_and_merges(tmp_path: Path, options: dict) -> None:
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit(), AdapterConfig(r=4, **options))
    inputs = vit_input(dtype=torch.float32)
    train_steps(model, inputs)
    expected = run(model, inputs)
    save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = tiny_vit()
    load_adapters(fresh, tmp_path)
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=0, atol=0)
    merge_adapters(fresh)
    merged = run(fresh, inputs)
    assert torch.linalg.vector_norm(merged - expected) <= 1e-5 * torch.linalg.vector_norm(expected)
    unmerge_adapters(fresh)
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=0, atol=0)


def test_relative_sigma_noise_only_exports_to_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base_state = tiny_bert().state_dict()
    model = tiny_bert()
    model.load_state_dict(base_state)
    apply_adapters(model, AdapterConfig(method="doran", aux=False, r=4, sigma_scale="row_norm", sigma_init=0.5,
                                        trainable_modules=["classifier"]))
    inputs = token_input()
    train_steps(model, inputs, steps=3, lr=0.05)
    expected = run(model, inputs)
    export_peft(model, tmp_path)
    base = tiny_bert()
    base.load_state_dict(base_state)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, inputs), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- item 3: the radial gain
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("options", [dict(method="doran", aux=False, noise_granularity="row"),
                                     dict(method="doran", sigma_scale="row_norm", sigma_init=0.5),
                                     dict(method="dora", aux=None)])
def test_radial_gain_statistic(options: dict, detach_norm: bool) -> None:
    """mean over rows of σ/(‖V‖+σ) with the norm in the gradient path; 1 detached; DoRA non-detached: 0."""
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit().double(), AdapterConfig(r=4, detach_norm=detach_norm, **options))
    if not detach_norm and options.get("sigma_scale") == "row_norm":  # at init: σ0 = u/2, V = W0
        row_norm = adapted_modules(model)["blocks.0.attn.qkv"].weight[64:96].norm(dim=1)
        half = row_norm.median() / 2
        assert adapter_statistics(model)["blocks.0.attn.qkv.v"]["radial_gain"].item() == pytest.approx(
            (half / (row_norm + half)).mean().item(), rel=1e-10)
    train_steps(model, vit_input(), steps=2, lr=0.05)
    stats = adapter_statistics(model)
    layer = adapted_modules(model)["blocks.0.attn.qkv"]
    start, stop = layer.slices["v"]
    adapter = layer.adapters["v"]
    lora_A, lora_B = layer.lowrank_factors()["v"]
    norm = (layer.weight[start:stop] + layer.scaling * lora_B @ lora_A).norm(dim=1)
    sigma = layer.sigma("v")
    sigma = torch.zeros_like(norm) if sigma is None else sigma
    expected = 1.0 if detach_norm else (sigma / (norm + sigma)).mean().item()
    got = stats["blocks.0.attn.qkv.v"]["radial_gain"].item()
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-15)
    if not detach_norm and options["method"] == "dora":
        assert got == 0.0


def test_reset_magnitudes_after_new_weights_rescales_relative_sigma() -> None:
    """Weights loaded or materialised after `apply_adapters` (meta/FSDP): u, σ0 and m0 follow the new W0."""
    from doran_lightning.adapters import reset_magnitudes

    torch.manual_seed(0)
    model = apply_adapters(tiny_vit().double(), AdapterConfig(method="doran", r=4, sigma_scale="row_norm", sigma_init=0.5))
    layer = adapted_modules(model)["blocks.0.attn.qkv"]
    with torch.no_grad():
        layer.weight.mul_(3.0)
    reset_magnitudes(model)
    start, stop = layer.slices["q"]
    median = layer.weight[start:stop].norm(dim=1).median()
    torch.testing.assert_close(layer.adapters["q"].sigma_unit, median.reshape(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(layer.sigma("q"), 0.5 * median.reshape(1), rtol=1e-12, atol=0)
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-12, atol=1e-12)
