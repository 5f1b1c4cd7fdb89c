"""PiSSA (issue 30, `adapters/methods/pissa.py`): LoRA and DoRA started on W0's top-r singular directions.

Identity at step 0, A/B and the residual equal to HF PEFT's ``init_lora_weights="pissa"``, exact merge and
unmerge, and an export that PEFT loads onto the original backbone with equal logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_models import run, tiny_bert, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import (
    AdapterConfig,
    adapted_modules,
    apply_adapters,
    export_peft,
    load_adapters,
    merge_adapters,
    method_names,
    save_adapters,
    unmerge_adapters,
)

METHODS = ("pissa", "dora-pissa")


def _pair(method: str, dtype: torch.dtype = torch.float64, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the backbone, the same backbone with PiSSA adapters), in `dtype`."""
    torch.manual_seed(0)
    base = tiny_bert().to(dtype)
    model = tiny_bert().to(dtype)
    model.load_state_dict(base.state_dict())
    cfg = AdapterConfig(method=method, r=4, trainable_modules=["classifier"], **options)
    return base, apply_adapters(model, cfg)


def test_pissa_is_a_registered_method_with_the_right_parts() -> None:
    assert {"pissa", "dora-pissa"} <= set(method_names())
    assert not AdapterConfig(method="pissa").use_magnitude and AdapterConfig(method="dora-pissa").use_magnitude
    assert AdapterConfig(method="dora-pissa").variant == "dora-pissa"
    with pytest.raises(ValueError, match="only method='doran' has this switch"):
        AdapterConfig(method="pissa", aux=True)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_the_residual_plus_update_is_w0(method: str) -> None:
    base, model = _pair(method)
    for name, layer in adapted_modules(model).items():
        original = base.get_submodule(name).weight
        lora_A, lora_B = layer.lowrank_factors()["main"]
        assert lora_A.abs().sum() > 0 and lora_B.abs().sum() > 0  # not LoRA's zero B
        assert not torch.allclose(layer.weight, original)  # W0 was replaced by the residual
        torch.testing.assert_close(layer.weight + layer.scaling * lora_B @ lora_A, original, rtol=0, atol=1e-12)
        # The residual carries none of the top-r directions: its r-th singular values are W0's (r+1)-th on.
        torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[:2], torch.linalg.svdvals(original)[4:6])
    with torch.no_grad():
        torch.testing.assert_close(run(model, token_input()), run(base, token_input()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_the_initialisation_is_peft_pissa(method: str) -> None:
    peft = pytest.importorskip("peft")
    base, model = _pair(method, dtype=torch.float32)  # PEFT's PiSSA refuses float64
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="pissa",
                             use_dora=method == "dora-pissa")
    theirs = peft.get_peft_model(base, config)
    for name, layer in adapted_modules(model).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        lora_A, lora_B = layer.lowrank_factors()["main"]
        torch.testing.assert_close(lora_A, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lora_B, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        if method == "dora-pissa":
            torch.testing.assert_close(layer.adapters["main"].magnitude,
                                       peft_layer.lora_magnitude_vector["default"].weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unmerge_are_exact_after_training(method: str) -> None:
    _, model = _pair(method)
    train_steps(model, token_input(), steps=3, lr=0.05)
    residual = {name: layer.weight.detach().clone() for name, layer in adapted_modules(model).items()}
    with torch.no_grad():
        expected = run(model, token_input())
        merge_adapters(model)
        torch.testing.assert_close(run(model, token_input()), expected, rtol=1e-10, atol=1e-10)
        unmerge_adapters(model)
        assert all(torch.equal(layer.weight, residual[name]) for name, layer in adapted_modules(model).items())
        torch.testing.assert_close(run(model, token_input()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rslora", [False, True])
def test_export_peft_loads_onto_the_original_backbone_with_equal_logits(method: str, rslora: bool,
                                                                       tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, model = _pair(method, rslora=rslora)
    train_steps(model, token_input(), steps=3, lr=0.05)
    model.eval()
    with torch.no_grad():
        expected = run(model, token_input())
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_dora"] == (method == "dora-pissa") and config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, token_input()), expected, rtol=1e-9, atol=1e-9)


def test_adapter_files_rebuild_the_residual_from_w0(tmp_path: Path) -> None:
    base, model = _pair("dora-pissa")
    train_steps(model, token_input(), steps=2, lr=0.05)
    model.eval()
    save_adapters(model, tmp_path)
    fresh = tiny_bert().double()
    fresh.load_state_dict(base.state_dict())
    load_adapters(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, token_input()), run(model, token_input()), rtol=1e-10, atol=1e-10)


def test_fused_slices_decompose_each_slice() -> None:
    torch.manual_seed(0)
    base = tiny_vit().double()
    model = tiny_vit().double()
    model.load_state_dict(base.state_dict())
    apply_adapters(model, AdapterConfig(method="dora-pissa", r=4))
    with torch.no_grad():
        torch.testing.assert_close(run(model, vit_input()), run(base, vit_input()), rtol=1e-10, atol=1e-10)
    name, layer = next(iter(adapted_modules(model).items()))
    original = base.get_submodule(name).weight
    assert sorted(layer.slices) == ["q", "v"]
    assert torch.equal(layer.weight[32:64], original[32:64])  # k is not adapted: its rows are W0's
    for start, stop in layer.slices.values():
        assert not torch.allclose(layer.weight[start:stop], original[start:stop])
