"""The public adapter API: config validation, targeting, gradients, noise modes, aux scopes, files, PEFT export."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny_models import run, tiny_bert, tiny_llama, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import (
    AdapterConfig,
    AuxGenerator,
    adapted_modules,
    adapter_histograms,
    adapter_param_groups,
    adapter_statistics,
    apply_adapters,
    count_parameters,
    export_peft,
    load_adapters,
    resolve_targets,
    save_adapters,
)
from doran_lightning.adapters.bank import gradient, logical_parameters, trained_gradients


# ---------------------------------------------------------------------- config and targets
@pytest.mark.parametrize("field,value", [("r", 0), ("method", "qlora"), ("sigma_init", -0.1), ("dropout", 1.0),
                                         ("noise_mode", "random"), ("aux_scope", "layer"), ("alpha", 0.0),
                                         ("aux_hidden", 0), ("aux_init", "xavier"), ("aux_init_gain", 0.0),
                                         ("aux_init_gain", float("inf"))])
def test_bad_config_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}"):
        AdapterConfig(**{field: value})


def test_ablation_switches_only_exist_for_doran() -> None:
    with pytest.raises(ValueError, match="AdapterConfig.noise"):
        AdapterConfig(method="dora", noise=True)
    assert AdapterConfig(method="doran", noise=False).variant == "doran-aux"
    assert AdapterConfig(method="doran", aux=False).variant == "doran-noise"
    assert AdapterConfig(method="doran").variant == "doran"
    assert AdapterConfig(method="doran", noise_mode="fixed", aux=False).variant == "doran-noise-fixed"
    assert AdapterConfig(method="doran", noise=False, noise_mode="gaussian", aux_scope="model").variant == "doran-aux-model"
    assert AdapterConfig(method="dora", aux_scope="model").variant == "dora"  # switches of absent parts do not label


def test_every_variant_label_builds_the_config_that_carries_it() -> None:
    from doran_lightning.adapters.config import VARIANT_LABELS

    assert VARIANT_LABELS[:5] == ("lora", "dora", "doran", "doran-noise", "doran-aux")
    for label in VARIANT_LABELS:
        assert AdapterConfig.from_variant(label, r=4).variant == label
    assert AdapterConfig.from_variant("doran-noise", r=4).r == 4
    with pytest.raises(ValueError, match="unknown variant 'doran-x'; known variants: lora, dora, doran"):
        AdapterConfig.from_variant("doran-x")
    with pytest.raises(ValueError, match=r"\['method'\] are set by the variant label"):
        AdapterConfig.from_variant("dora", method="lora")


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match="unknown field.*'rank'"):
        AdapterConfig.from_dict({"rank": 8})


def test_default_targets_per_backbone() -> None:
    assert set(resolve_targets(tiny_vit(), AdapterConfig())) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert resolve_targets(tiny_vit(), AdapterConfig())["blocks.0.attn.qkv"] == ["q", "v"]
    bert = set(resolve_targets(tiny_bert(), AdapterConfig()))
    assert bert == {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    llama = set(resolve_targets(tiny_llama(), AdapterConfig()))
    assert llama == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_target_rules_suffix_and_regex() -> None:
    model = tiny_bert()
    assert set(resolve_targets(model, AdapterConfig(target_modules=["self.key"]))) == {
        f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)}
    regex = AdapterConfig(target_modules=r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)")
    assert set(resolve_targets(model, regex)) == {"bert.encoder.layer.1.attention.self.query",
                                                  "bert.encoder.layer.1.attention.self.value"}
    # a suffix must follow a dot: "uery" is not "query"
    with pytest.raises(ValueError, match="'uery' matches no Linear module"):
        resolve_targets(model, AdapterConfig(target_modules=["uery"]))


def test_unknown_target_lists_the_linear_modules() -> None:
    with pytest.raises(ValueError, match=r"'q_proj' matches no Linear module.*query \(x2\).*value \(x2\)"):
        apply_adapters(tiny_bert(), AdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_adapters(tiny_bert(), AdapterConfig(target_modules=["embeddings"]))
    with pytest.raises(ValueError, match=r"unknown slice\(s\) \['x'\]"):
        apply_adapters(tiny_vit(), AdapterConfig(target_modules=["qkv[q,x]"]))
    with pytest.raises(ValueError, match="no layout"):
        apply_adapters(tiny_vit(), AdapterConfig(target_modules=["proj[q]"]))
    with pytest.raises(ValueError, match="cannot infer"):
        apply_adapters(nn.Sequential(nn.Linear(3, 3)), AdapterConfig())
    with pytest.raises(ValueError, match="trainable_modules: 'nohead'"):
        apply_adapters(tiny_vit(), AdapterConfig(trainable_modules=["nohead"]))


def test_applying_twice_is_refused() -> None:
    model = apply_adapters(tiny_vit(), AdapterConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())


# ---------------------------------------------------------------------- gradients
def _trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor's gradient by its own name (a banked one's: its slice of the bank's gradient)."""
    return trained_gradients(model)


@pytest.mark.parametrize("scope", ["block", "model"])
def test_gradients_reach_every_adapter_tensor_and_no_frozen_one(scope: str) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    apply_adapters(model, AdapterConfig(method="doran", r=4, aux_scope=scope, trainable_modules=["head"]))
    inputs = vit_input(dtype=torch.float32)
    train_steps(model, inputs, steps=1)  # B moves off zero, so every tensor sees a gradient
    model.zero_grad()
    model.train()
    run(model, inputs).pow(2).mean().backward()
    grads = _trainable_grads(model)
    names = set(grads)
    assert any(n.endswith("magnitude") for n in names) and any(n.endswith("rho") for n in names)
    assert any("doran_aux" in n and "trunk_A" in n for n in names)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    for name, parameter, trained in logical_parameters(model):
        if not trained:
            assert parameter.grad is None, name
            assert not any(key in name for key in ("adapters", "doran_aux", "head")), name
    for name, parameter in model.named_parameters():  # banked members are views: their banks get the gradients
        assert parameter.requires_grad or parameter.grad is None, name


def test_block_trunk_gets_gradient_from_both_q_and_v() -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    apply_adapters(model, AdapterConfig(method="doran", r=4))
    inputs = token_input()
    train_steps(model, inputs, steps=1)
    outputs: dict[str, torch.Tensor] = {}
    attention = model.bert.encoder.layer[0].attention.self
    for part in ("query", "value"):
        attention.get_submodule(part).register_forward_hook(lambda m, a, out, part=part: outputs.__setitem__(part, out))
    run(model, inputs)
    for part in ("query", "value"):
        model.zero_grad()
        outputs[part].pow(2).sum().backward(retain_graph=True)
        grad = gradient(attention.doran_aux.trunk_A, "weight")  # a banked tensor's: its slice of the bank's
        assert grad is not None and grad.abs().sum() > 0, f"trunk received nothing from {part}"


def test_generators_run_once_per_forward_for_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """One batched generation per forward serves every block and projection; stats reuse it until a step."""
    from doran_lightning.adapters import step
    from doran_lightning.adapters.generators import generate

    calls = []
    monkeypatch.setattr(step, "generate", lambda generators: calls.append(1) or generate(generators))
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4))
    cache = model._doran_step_cache
    assert len(cache.generators) == 2  # one per block, generated together
    inputs = token_input()
    run(model, inputs)
    assert len(calls) == 1
    run(model, inputs)
    assert len(calls) == 2  # the next forward regenerates
    with torch.no_grad():
        adapter_statistics(model)
    assert len(calls) == 3  # no-grad use outside a forward: made anew once, for all projections
    adapter_statistics(model)
    assert len(calls) == 3
    with torch.no_grad():
        for tensor in cache.generators[0].state_dict(keep_vars=True).values():  # banked: views of the banks
            tensor.add_(0.01)
    adapter_statistics(model)
    assert len(calls) == 4  # a changed parameter is never served stale


def test_batched_generation_equals_each_generator_alone() -> None:
    """The stacked pass computes exactly what each block's generator computes on its own."""
    from doran_lightning.adapters.generators import ACTIVATIONS, _generate_stack

    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4))
    cache = model._doran_step_cache
    with torch.no_grad():
        for generator in cache.generators:
            for name, parameter in generator.named_parameters():
                parameter.normal_(0, 0.3)
        together = _generate_stack(cache.generators)
        for generator in cache.generators:
            alone = _generate_stack([generator])[generator]
            hidden_B = ACTIVATIONS[generator.activation_name](generator.trunk_B(generator.seed_B[0]))
            for (layer, kind), (lora_A, lora_B) in together[generator].items():
                torch.testing.assert_close(lora_A, alone[(layer, kind)][0])
                expected_B = (hidden_B @ generator.heads_B[kind].weight.T + generator.heads_B[kind].bias).T
                torch.testing.assert_close(lora_B, expected_B)


def test_gradient_accumulation_regenerates_the_matrices() -> None:
    """Two backward passes before a step must not reuse a freed graph."""
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4))
    model.train()
    for _ in range(2):
        run(model, token_input()).sum().backward()


# ---------------------------------------------------------------------- noise modes and scopes
def test_fixed_noise_is_a_constant_buffer() -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", noise_mode="fixed", sigma_init=0.05))
    adapter = next(iter(adapted_modules(model).values())).adapters["main"]
    assert "rho" not in dict(adapter.named_parameters()) and "rho" in adapter.state_dict()
    assert not any(name.endswith("rho") for name, _ in model.named_parameters())  # banked: in a buffer bank
    train_steps(model, token_input())
    stats = adapter_statistics(model)
    assert all(math.isclose(s["sigma"].item(), 0.05, rel_tol=1e-6) for s in stats.values())


def test_learnable_noise_moves_sigma() -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", sigma_init=0.05))
    train_steps(model, token_input(), steps=3, lr=0.1)
    sigmas = [s["sigma"].item() for s in adapter_statistics(model).values()]
    assert all(s > 0 for s in sigmas) and any(abs(s - 0.05) > 1e-3 for s in sigmas)


def test_gaussian_noise_is_random_in_training_and_its_mean_in_eval() -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    inputs = token_input()
    reference = run(model, inputs)
    apply_adapters(model, AdapterConfig(method="doran", noise_mode="gaussian", sigma_init=0.5))
    model.train()
    first, second = run(model, inputs), run(model, inputs)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(run(model, inputs), reference, rtol=1e-5, atol=1e-6)  # E|ε|σ used at init
    layer = next(iter(adapted_modules(model).values()))
    sigma = layer.sigma("main")
    assert math.isclose(sigma.item(), 0.5 * math.sqrt(2 / math.pi), rel_tol=1e-6)


def test_row_granularity_has_one_sigma_per_output_row() -> None:
    model = apply_adapters(tiny_vit(), AdapterConfig(method="doran", noise_granularity="row"))
    layer = adapted_modules(model)["blocks.0.attn.qkv"]
    assert layer.adapters["q"].rho.shape == (32,)


def test_model_scope_shares_one_generator_with_per_layer_seeds() -> None:
    model = apply_adapters(tiny_llama(), AdapterConfig(method="doran", aux_scope="model", r=4))
    generators = [m for m in model.modules() if isinstance(m, AuxGenerator)]
    assert len(generators) == 1 and generators[0] is model.doran_aux
    assert model.doran_aux.seed_A.shape[0] == 2  # two decoder layers
    assert set(model.doran_aux.heads_A) == {"q_proj", "v_proj"}
    block = count_parameters(apply_adapters(tiny_llama(), AdapterConfig(method="doran", r=4)))
    assert count_parameters(model)["aux"] < block["aux"]


def test_custom_group_pattern_groups_across_blocks() -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", aux_group_pattern=r"(query|value)$"))
    assert set(model.doran_aux) == {"query", "value"}  # one generator per projection type
    assert len(model.doran_aux["query"].heads_A) == 2  # each projection keeps its own head
    train_steps(model, token_input(), steps=1)


# ---------------------------------------------------------------------- statistics and counts
def test_statistics_match_dense_definitions() -> None:
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit().double(), AdapterConfig(method="doran", r=4, aux=False))
    train_steps(model, vit_input(), steps=3, lr=0.1)
    stats = adapter_statistics(model)
    layer = adapted_modules(model)["blocks.1.attn.qkv"]
    start, stop = layer.slices["v"]
    adapter = layer.adapters["v"]
    w0 = layer.weight[start:stop]
    update = layer.scaling * adapter.lora_B @ adapter.lora_A
    v = w0 + update
    sigma = torch.nn.functional.softplus(adapter.rho)
    expected = {
        "sigma": sigma.mean(),
        "delta_m": (adapter.magnitude - adapter.magnitude_init).abs().mean(),
        "delta_d": (1 - torch.nn.functional.cosine_similarity(v, w0, dim=1)).mean(),
        "denominator_min": (v.norm(dim=1) + sigma).min(),
        "update_ratio": update.norm() / w0.norm(),
    }
    got = stats["blocks.1.attn.qkv.v"]
    for key, value in expected.items():
        assert math.isclose(got[key].item(), value.item(), rel_tol=1e-5, abs_tol=1e-9), key
    assert got["grad_norm"].item() > 0
    hist = adapter_histograms(model)["blocks.1.attn.qkv.v"]
    torch.testing.assert_close(hist["denominator"].double(), v.norm(dim=1) + sigma, rtol=1e-6, atol=1e-9)


def test_parameter_counts_side_by_side() -> None:
    counts = {}
    for method in ("lora", "dora", "doran"):
        model = apply_adapters(tiny_bert(), AdapterConfig(method=method, r=4, trainable_modules=["classifier"]))
        counts[method] = count_parameters(model)
    d, r, projections = 32, 4, 4
    assert counts["lora"]["adapter"] == projections * r * (d + d)
    assert counts["dora"]["adapter"] == counts["lora"]["adapter"] + projections * d
    assert counts["doran"]["adapter"] == projections * (d + 1) and counts["doran"]["aux"] > 0
    assert counts["lora"]["other_trainable"] == d * 3 + 3  # the classifier head
    assert all(c["total"] > c["trainable"] for c in counts.values())


def test_param_groups_exempt_magnitude_and_sigma_from_decay() -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4, trainable_modules=["classifier"]))
    groups = {g["name"]: g for g in adapter_param_groups(model, weight_decay=0.1, aux_lr=3e-3, sigma_lr=0.05,
                                                         aux_weight_decay=0.0)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["no_decay"]["weight_decay"] == 0.0 and "lr" not in groups["no_decay"]
    assert all(names[id(p)].endswith("magnitude") for p in groups["no_decay"]["params"])
    assert groups["sigma"]["weight_decay"] == 0.0 and groups["sigma"]["lr"] == 0.05
    assert all(names[id(p)].endswith("rho") for p in groups["sigma"]["params"]) and groups["sigma"]["params"]
    assert groups["aux"]["lr"] == 3e-3 and groups["aux"]["weight_decay"] == 0.0
    assert all("doran_aux" in names[id(p)] for p in groups["aux"]["params"])
    assert groups["decay"]["weight_decay"] == 0.1 and "lr" not in groups["decay"]
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == count_parameters(model)["trainable"]
    with pytest.warns(UserWarning, match=r"needs the optimizer's lr .* pass lr="):
        defaults = {g["name"]: g for g in adapter_param_groups(model, weight_decay=0.1)}
    assert defaults["aux"]["weight_decay"] == 0.1 and "lr" not in defaults["aux"] and "lr" not in defaults["sigma"]
    scaled = {g["name"]: g for g in adapter_param_groups(model, weight_decay=0.1, lr=1e-2)}
    assert scaled["aux"]["lr"] == pytest.approx(1e-2 / 5**0.5) and "lr" not in scaled["sigma"]  # h = r = 4
    unscaled = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4, aux_lr_scale="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the optimizer's lr is the configured rule
        assert "lr" not in {g["name"]: g for g in adapter_param_groups(unscaled, weight_decay=0.1)}["aux"]


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("options", [dict(method="lora"), dict(method="doran"), dict(method="doran", aux_scope="model"),
                                     dict(method="doran", aux_layout="features"),
                                     dict(method="doran", aux_layout="features", aux_scope="model")])
def test_save_load_round_trip(tmp_path: Path, options: dict) -> None:
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit(), AdapterConfig(r=4, trainable_modules=["head"], **options))
    inputs = vit_input(dtype=torch.float32)
    train_steps(model, inputs)
    expected = run(model, inputs)
    save_adapters(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    backbone_size = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad)
    assert size < backbone_size / 2
    torch.manual_seed(0)
    fresh = tiny_vit()
    load_adapters(fresh, tmp_path)  # applies the saved config, then loads
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=0, atol=0)


def test_load_into_wrong_model_names_the_mismatch(tmp_path: Path) -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4))
    save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match=r"r: file has 4, model has 8"):
        load_adapters(apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=8)), tmp_path)
    with pytest.raises(ValueError, match=r"method: file has 'doran', model has 'dora'"):
        load_adapters(apply_adapters(tiny_bert(), AdapterConfig(method="dora", r=4)), tmp_path)
    with pytest.raises(ValueError, match="not in file: .*key"):
        load_adapters(apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4,
                                                                target_modules=["query", "key", "value"])), tmp_path)
    wider = tiny_bert()
    wider.bert.encoder.layer[0].attention.self.query = nn.Linear(32, 48)
    with pytest.raises(ValueError, match="attention.self.query: file has"):
        load_adapters(wider, tmp_path)


def test_corrupt_or_missing_adapter_files_give_clear_errors(tmp_path: Path) -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="lora", r=4))
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapters(model, tmp_path / "nowhere")
    save_adapters(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapters(apply_adapters(tiny_bert(), AdapterConfig(method="lora", r=4)), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapters(tiny_bert(), tmp_path)


@pytest.mark.parametrize("options", [dict(method="lora"), dict(method="dora"), dict(method="doran"),
                                     dict(method="doran", noise_mode="gaussian", rslora=True),
                                     dict(method="doran", aux_layout="features"),
                                     dict(method="doran", aux_layout="features", aux_scope="model")])
def test_export_peft_reproduces_outputs_in_peft(tmp_path: Path, options: dict) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base_state = tiny_bert().state_dict()
    model = tiny_bert()
    model.load_state_dict(base_state)
    apply_adapters(model, AdapterConfig(r=4, trainable_modules=["classifier"], **options))
    inputs = token_input()
    train_steps(model, inputs, steps=3, lr=0.05)
    expected = run(model, inputs)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == (options["method"] != "lora")
    base = tiny_bert()
    base.load_state_dict(base_state)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, inputs), expected, rtol=1e-4, atol=1e-5)


def test_export_peft_refuses_fused_slices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fused projection"):
        export_peft(apply_adapters(tiny_vit(), AdapterConfig(method="dora")), tmp_path)


def test_statistics_are_the_same_while_merged() -> None:
    """Merging swaps the weight in place; statistics and histograms still describe W0 + sBA."""
    torch.manual_seed(0)
    model = apply_adapters(tiny_vit(), AdapterConfig(method="doran", r=4))
    train_steps(model, vit_input(dtype=torch.float32))
    before, hist_before = adapter_statistics(model), adapter_histograms(model)
    from doran_lightning.adapters import merge_adapters

    merge_adapters(model)
    after, hist_after = adapter_statistics(model), adapter_histograms(model)
    for projection, stats in before.items():
        for key in ("sigma", "delta_m", "delta_d", "denominator_min", "update_ratio"):
            torch.testing.assert_close(after[projection][key], stats[key], msg=f"{projection} {key}")
        torch.testing.assert_close(hist_after[projection]["denominator"], hist_before[projection]["denominator"])
