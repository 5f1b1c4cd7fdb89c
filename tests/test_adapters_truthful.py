"""Parameters that tell the truth (issue 30): the idioms users bring from PEFT and plain PyTorch.

Every trained adapter tensor is listed once by ``named_parameters()`` with ``requires_grad=True`` (a banked one
under its bank's name, `adapters/bank.py`), a tensor listed as frozen never changes, the counts are the backbone's
plus the adapters', and name-based optimizer groups, ``clip_grad_norm_``, ``parameters_to_vector`` and weight
averaging (torch's `AveragedModel`, Lightning's `WeightAveraging`) act on exactly the tensors the state dict holds.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from tiny_models import run, tiny_bert, token_input

from doran_lightning.adapters import AdapterConfig, adapted_modules, adapter_state_dict, apply_adapters, count_parameters
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule

# lora, dora, doran, noise-only, aux-only, aux_scope: model and both feature layouts (every banked variant, and LoRA,
# which banks nothing)
VARIANTS = ("lora", "dora", "doran", "doran-noise", "doran-aux", "doran-model", "doran-features", "doran-features-model")
HEAD = "classifier"
BUFFERS = ("magnitude_init", "sigma_unit")  # adapter tensors that are never trained


def _model(variant: str, bank: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AdapterConfig.from_variant(variant, r=4, trainable_modules=[HEAD])
    return apply_adapters(tiny_bert(), cfg, bank=bank)


def _trained_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the tensors training changes: adapter tensors but the buffers, and the head."""
    return [key for key in adapter_state_dict(model) if key.rsplit(".", 1)[-1] not in BUFFERS]


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        run(model, token_input()).pow(2).mean().backward()
        optimizer.step()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_frozen_tensors_stay_frozen_and_every_trained_tensor_is_listed_once(variant: str) -> None:
    model = _model(variant)
    named = dict(model.named_parameters())
    frozen = {name: p.detach().clone() for name, p in named.items() if not p.requires_grad}
    trainable = [p for p in named.values() if p.requires_grad]
    storages = [p.untyped_storage().data_ptr() for p in trainable]
    assert len(set(storages)) == len(storages)  # no trained tensor shares memory with another one
    before = _snapshot(model)
    _steps(model, torch.optim.AdamW(trainable, lr=0.05))
    for name, value in frozen.items():  # the check PEFT's own tests make
        assert torch.equal(named[name], value), f"{name} is reported frozen but changed"
    after = dict(model.state_dict(keep_vars=True))
    changed = [key for key in _trained_keys(model) if not torch.equal(after[key], before[key])]
    assert any(".adapters." in key or "doran_aux" in key for key in changed)
    for key in changed:  # each changed tensor is (a view of) exactly one trainable parameter
        holders = [p for p in trainable if p.untyped_storage().data_ptr() == after[key].untyped_storage().data_ptr()]
        assert len(holders) == 1, key


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_method_declares_the_tensors_its_projections_train(variant: str) -> None:
    model = _model(variant, bank=False)
    for layer in adapted_modules(model).values():
        declared = {spec.name: spec.role for spec in layer.method.trained_tensors()}
        assert layer.method.cfg.use_aux == (layer.generator is not None)
        for adapter in layer.adapters.values():
            assert adapter.adapter_params() == declared
        with pytest.deprecated_call():  # the shipped name, kept for one release
            roles = layer.method.tensor_roles()
        assert roles == ({"generator": "generator"} if layer.generator is not None else {}) | declared


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_are_the_backbone_plus_the_adapters_also_in_lightnings_summary(variant: str) -> None:
    from lightning.pytorch.utilities.model_summary import ModelSummary

    torch.manual_seed(0)
    backbone = sum(p.numel() for p in tiny_bert().parameters())
    model = _model(variant)
    state = adapter_state_dict(model)
    head = sum(value.numel() for key, value in state.items() if key.startswith(HEAD + "."))
    adapters = sum(state[key].numel() for key in _trained_keys(model)) - head
    assert adapters > 0
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == (backbone + adapters, adapters + head)
    assert count_parameters(model)["total"] == total and count_parameters(model)["trainable"] == trainable

    class Wrapped(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    summary = ModelSummary(Wrapped(), max_depth=1)
    assert (summary.total_parameters, summary.trainable_parameters) == (total, trainable)


@pytest.mark.parametrize("variant", VARIANTS)
def test_name_based_parameter_groups_train_exactly_the_named_tensors(variant: str) -> None:
    model = _model(variant)
    attribute = "lora_A" if variant == "lora" else "magnitude"  # the tensor a user holds still by name
    named = list(model.named_parameters())
    held = [p for name, p in named if name.rsplit(".", 1)[-1] == attribute]
    others = [p for name, p in named if p.requires_grad and name.rsplit(".", 1)[-1] != attribute]
    assert held and all(p.requires_grad for p in held)
    before = _snapshot(model)
    optimizer = torch.optim.AdamW([{"params": held, "lr": 0.0}, {"params": others}], lr=0.05, weight_decay=0.0)
    _steps(model, optimizer)
    after = model.state_dict()
    keys = _trained_keys(model)
    held_keys = [key for key in keys if key.rsplit(".", 1)[-1] == attribute]
    assert held_keys and all(torch.equal(after[key], before[key]) for key in held_keys)
    assert any(not torch.equal(after[key], before[key]) for key in keys if key not in held_keys)


@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_grad_norm_and_parameter_vectors_act_on_the_trained_tensors(variant: str) -> None:
    plain, banked = _model(variant, bank=False), _model(variant, bank=True)  # the unbanked model is the reference
    for model in (plain, banked):
        _steps(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05), steps=1)
        model.zero_grad()
        run(model, token_input()).pow(2).mean().backward()
    norms = [clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e-3) for model in (plain, banked)]
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
    for model in (plain, banked):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    expected = plain.state_dict()
    for key, value in banked.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    trainable = [p for p in banked.parameters() if p.requires_grad]
    vector = parameters_to_vector(trainable)
    assert vector.numel() == parameters_to_vector([p for p in plain.parameters() if p.requires_grad]).numel()
    before = _snapshot(banked)
    vector_to_parameters(vector + 1.0, trainable)
    after = banked.state_dict()
    for key in _trained_keys(banked):
        torch.testing.assert_close(after[key], before[key] + 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_weight_averaging_averages_every_trained_tensor_once(variant: str) -> None:
    model = _model(variant)
    averaged = AveragedModel(model, use_buffers=True)  # a deep copy: its members must stay views of its banks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    snapshots = []
    for _ in range(3):
        _steps(model, optimizer, steps=1)
        averaged.update_parameters(model)
        snapshots.append(_snapshot(model))
    got = averaged.module.state_dict()
    for key in model.state_dict():
        expected = torch.stack([snapshot[key].double() for snapshot in snapshots]).mean(0).to(got[key].dtype)
        torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------- Lightning's WeightAveraging callback
TINY_VIT = dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2)


class Snapshots(pl.Callback):
    """The module's state after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(_snapshot(pl_module))


@pytest.mark.parametrize("variant", ["dora", "doran"])
def test_lightning_weight_averaging_callback_leaves_the_average_in_the_model(variant: str, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import WeightAveraging

    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 1, 2, 3])}
               for _ in range(3)]
    torch.manual_seed(0)
    module = DoranModule(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=TINY_VIT),
                         AdapterConfig.from_variant(variant, r=4, alpha=8), num_classes=4, lr=3e-2)
    snapshots = Snapshots()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[snapshots, WeightAveraging()])
    with pytest.warns(UserWarning, match="configure_model"):
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(snapshots.states) == 3
    final = module.state_dict()
    moved = [key for key in module.trainable_state.keys
             if not torch.equal(snapshots.states[0][key], snapshots.states[-1][key])]
    assert any("adapters" in key for key in moved)
    for key in module.trainable_state.keys:
        expected = torch.stack([state[key].double() for state in snapshots.states]).mean(0).to(final[key].dtype)
        torch.testing.assert_close(final[key], expected, rtol=1e-5, atol=1e-6, msg=key)
