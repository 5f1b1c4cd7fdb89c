"""Aux generators under activation checkpointing (non-reentrant): the same gradients as without it."""

from __future__ import annotations

import pytest
import torch

from tiny_models import run, tiny_bert, tiny_vit, token_input, vit_input

from doran_lightning.adapters import AdapterConfig, apply_adapters


def _gradients(build, make_input, enable, options: dict, checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = apply_adapters(build(), AdapterConfig(method="doran", r=4, alpha=8, **options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "heads_B" in name:
                parameter.normal_(0, 0.1)  # B != 0, so A's head gets a gradient too
    if checkpointing:
        enable(model)
    model.train()
    run(model, make_input()).float().pow(2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _hf_checkpointing(model: torch.nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _timm_checkpointing(model: torch.nn.Module) -> None:
    model.set_grad_checkpointing(True)


@pytest.mark.parametrize("scope", ["block", "model"])
@pytest.mark.parametrize("backbone", ["bert", "vit"])
def test_checkpointed_blocks_regenerate_like_the_original_pass(backbone: str, scope: str) -> None:
    if backbone == "bert":
        setup = (tiny_bert, token_input, _hf_checkpointing)
    else:
        setup = (tiny_vit, lambda: vit_input(dtype=torch.float32), _timm_checkpointing)
    plain = _gradients(*setup, {"aux_scope": scope}, checkpointing=False)
    checkpointed = _gradients(*setup, {"aux_scope": scope}, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and any("doran_aux" in name for name in plain)
    for name, grad in plain.items():
        assert grad is not None and checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
