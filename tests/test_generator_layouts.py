"""The generator layouts of issue 39 (METHOD.md §3): what each can express, its exact formula and parameter count.

``aux_layout: rank`` (the default) shares the trunk on the rank side, which cancels into B; ``aux_layout: features``
shares generated feature-side factors, so a block's (or, at model scope, every layer's) updates share one
r-dimensional row space and one column space.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import run, tiny_bert, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import (
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    count_parameters,
    load_adapters,
    save_adapters,
)
from doran_lightning.adapters.generators import ACTIVATIONS, AuxGenerator, _generate_stack

RANK = 4


def _trained(options: dict, build=tiny_bert, make_input=token_input, bank: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_adapters(build(), AdapterConfig(method="doran", r=RANK, **options), bank=bank)
    train_steps(model, make_input(), steps=3, lr=0.05)
    return model


def _updates(model: torch.nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """ΔW / s = B·A of every adapted (projection, slice), in float64."""
    return {(name, part): (lora_B.double() @ lora_A.double())
            for name, layer in adapted_modules(model).items()
            for part, (lora_A, lora_B) in layer.lowrank_factors().items()}


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix, rtol=1e-5))  # float32 generation: round-off at ~1e-7


def _blocks(updates: dict[tuple[str, str], torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    blocks: dict[str, list[torch.Tensor]] = {}
    for (name, _), delta in updates.items():
        blocks.setdefault(name.rsplit(".", 1)[0] if not name.endswith("qkv") else name, []).append(delta)
    return blocks


@pytest.mark.parametrize("build,make_input", [(tiny_bert, token_input), (tiny_vit, lambda: vit_input(dtype=torch.float32))])
def test_block_layout_shares_row_and_column_spaces_within_each_block_only(build, make_input) -> None:
    updates = _updates(_trained({"aux_layout": "features"}, build, make_input))
    blocks = _blocks(updates)
    assert len(blocks) == 2 and all(len(deltas) == 2 for deltas in blocks.values())
    for deltas in blocks.values():
        assert all(_rank(delta) == RANK for delta in deltas)
        assert _rank(torch.cat(deltas, dim=0)) == RANK  # one row space (the shared U_A)
        assert _rank(torch.cat(deltas, dim=1)) == RANK  # one column space (the shared U_B)
    every = list(updates.values())
    assert _rank(torch.cat(every, dim=0)) > RANK  # the two blocks' row spaces differ


def test_across_layer_layout_shares_one_row_and_column_space_in_the_whole_model() -> None:
    every = list(_updates(_trained({"aux_layout": "features", "aux_scope": "model"})).values())
    assert len(every) == 4
    assert _rank(torch.cat(every, dim=0)) == RANK and _rank(torch.cat(every, dim=1)) == RANK


def test_rank_layout_constrains_nothing_a_pair_of_loras_could_not_reach() -> None:
    """The default's shared trunk cancels into B (METHOD.md §7): q and v of one block span 2r directions."""
    for deltas in _blocks(_updates(_trained({}))).values():
        assert _rank(torch.cat(deltas, dim=0)) == 2 * RANK and _rank(torch.cat(deltas, dim=1)) == 2 * RANK


@pytest.mark.parametrize("scope", ["block", "model"])
def test_feature_layout_is_the_closed_form_of_its_parts(scope: str) -> None:
    """A_t = C_t (H_A W2_Aᵀ + b2_A), B_t = (H_B W2_Bᵀ + b2_B)ᵀ D_t, with H = act(S W1ᵀ + b1); batched = alone."""
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=RANK, aux_layout="features", aux_scope=scope))
    generators = [module for module in model.modules() if isinstance(module, AuxGenerator)]
    assert len(generators) == (2 if scope == "block" else 1)
    with torch.no_grad():
        for generator in generators:
            for parameter in generator.parameters():
                parameter.normal_(0, 0.3)
        together = _generate_stack(generators)
        for generator in generators:
            activation = ACTIVATIONS[generator.activation_name]
            hidden_A = activation(generator.trunk_A(generator.seed_A[0]))
            hidden_B = activation(generator.trunk_B(generator.seed_B[0]))
            (head_A,), (head_B,) = generator.heads_A.values(), generator.heads_B.values()  # one width each side
            factor_A = hidden_A @ head_A.weight.T + head_A.bias  # U_Aᵀ [r, d_in]
            factor_B = (hidden_B @ head_B.weight.T + head_B.bias).T  # U_B [d_out, r]
            alone = _generate_stack([generator])[generator]
            assert len(together[generator]) == len(generator.members)
            for member, key in enumerate(generator.members):
                lora_A, lora_B = together[generator][key]
                torch.testing.assert_close(lora_A, generator.cores_A[member] @ factor_A)
                torch.testing.assert_close(lora_B, factor_B @ generator.cores_B[member])
                torch.testing.assert_close(lora_A, alone[key][0])
                torch.testing.assert_close(lora_B, alone[key][1])


@pytest.mark.parametrize("scope", ["block", "model"])
def test_banked_and_unbanked_feature_layouts_train_the_same(scope: str) -> None:
    options = {"aux_layout": "features", "aux_scope": scope}
    banked, plain = _trained(options, bank=True), _trained(options, bank=False)
    inputs = token_input()
    torch.testing.assert_close(run(banked, inputs), run(plain, inputs), rtol=1e-5, atol=1e-6)


def test_every_feature_layout_tensor_gets_a_gradient_from_the_first_step_on() -> None:
    """At step 0 B_t = 0 and the cores are I: U_B gets a gradient at once, the cores and U_A from the next step."""
    model = _trained({"aux_layout": "features"})
    model.zero_grad()
    run(model, token_input()).pow(2).mean().backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, parameter in trainable:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def _expected_counts(cfg: AdapterConfig, members: int, groups: int, d_in: int, d_out: int) -> dict[str, int]:
    """Closed form: per group seeds 2·r·h0, trunks 2·(h·h0 + h), one head per side (h·d + d), cores 2·r² per
    member; per projection m [d_out] and one ρ."""
    r, h, h0 = cfg.r, cfg.hidden_dim, cfg.seed_dim
    aux = groups * (2 * r * h0 + 2 * (h * h0 + h) + (h * d_in + d_in) + (h * d_out + d_out)) + 2 * r * r * members
    return {"aux": aux, "adapter": members * (d_out + 1)}


@pytest.mark.parametrize("scope,groups", [("block", 2), ("model", 1)])
def test_parameter_counts_are_the_closed_form(scope: str, groups: int) -> None:
    cfg = AdapterConfig(method="doran", r=RANK, aux_layout="features", aux_scope=scope)
    model = apply_adapters(tiny_bert(), cfg)
    layers = adapted_modules(model)
    first = next(iter(layers.values()))
    counts = count_parameters(model)
    expected = _expected_counts(cfg, len(layers), groups, first.in_features, first.out_features)
    assert {key: counts[key] for key in expected} == expected
    dora = count_parameters(apply_adapters(tiny_bert(), AdapterConfig(method="dora", r=RANK)))
    assert counts["aux"] + counts["adapter"] < dora["adapter"]  # the shared factor costs less than DoRA's A/B


@pytest.mark.parametrize("scope", ["block", "model"])
def test_a_feature_layout_file_refuses_a_model_of_the_other_layout(tmp_path: Path, scope: str) -> None:
    model = _trained({"aux_layout": "features", "aux_scope": scope})
    save_adapters(model, tmp_path)
    other = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=RANK, aux_scope=scope))
    with pytest.raises(ValueError, match="aux_layout: file has 'features', model has 'rank'"):
        load_adapters(other, tmp_path)


def test_an_unknown_layout_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"AdapterConfig.aux_layout: must be one of rank, features"):
        AdapterConfig(method="doran", aux_layout="columns")


def test_variant_labels_name_the_layout() -> None:
    assert AdapterConfig.from_variant("doran-features").aux_layout == "features"
    model_scope = AdapterConfig.from_variant("doran-features-model")
    assert (model_scope.aux_layout, model_scope.aux_scope, model_scope.variant) == ("features", "model",
                                                                                    "doran-features-model")
    assert AdapterConfig(method="doran", noise=False, aux_layout="features").variant == "doran-aux-features"
    assert AdapterConfig(method="doran", aux=False, aux_layout="features").variant == "doran-noise"  # no generators
