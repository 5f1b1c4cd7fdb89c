"""Parameter banks (issue 18, item 3): the optimizer sees a few stacked tensors, everything else sees the members.

Banking changes no value, key or gradient: a model trained banked equals one trained unbanked, its state dict
and counts are the unbanked model's, the ties between members and banks survive module.to, state-dict
loads (in place and assign=True) and meta-device materialisation, and a checkpoint written before banking
resumes under banking with the same next steps.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tiny_models import run, tiny_bert, tiny_vit, token_input, vit_input

from doran_lightning.adapters import (
    AdapterConfig,
    adapted_modules,
    adapter_param_groups,
    adapter_statistics,
    apply_adapters,
    count_parameters,
    generator_grad_norms,
)
from doran_lightning.adapters.bank import (
    BANK_NAME,
    banking,
    find_bank,
    gradient,
    logical_parameters,
    trained_gradients,
    unbank,
)
from doran_lightning.adapters.io import adapter_state_dict
from doran_lightning.alarms import AlarmConfig
from doran_lightning.models import BackboneConfig
from doran_lightning.module import DoranModule

CONFIGS = {
    "doran-bert": (tiny_bert, token_input, dict(method="doran", trainable_modules=["classifier"])),
    "doran-vit-fused-row-norm": (tiny_vit, vit_input, dict(method="doran", sigma_scale="row_norm",
                                                           noise_granularity="row", trainable_modules=["head"])),
    "dora-vit": (tiny_vit, vit_input, dict(method="dora")),
    "doran-fixed-noise": (tiny_bert, token_input, dict(method="doran", noise_mode="fixed")),
}


def _model(name: str, bank: bool, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    build, _, options = CONFIGS[name]
    torch.manual_seed(0)
    return apply_adapters(build().to(dtype), AdapterConfig(r=4, **options), bank=bank)


def _members_view_their_banks(model: torch.nn.Module) -> bool:
    """Whether every banked member (a plain attribute of its owner) is a view of its bank's slice."""
    bank = find_bank(model)
    return bank is not None and all(family.tied() for family in bank.families.values())


def _train(model: torch.nn.Module, inputs: torch.Tensor, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(adapter_param_groups(model, weight_decay=0.1, lr=0.02, sigma_lr=0.05), lr=0.02,
                                  foreach=True)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = run(model, inputs).double().pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", CONFIGS)
def test_banking_changes_no_key_value_count_or_training_step(name: str) -> None:
    plain, banked = _model(name, bank=False), _model(name, bank=True)
    assert find_bank(plain) is None and find_bank(banked) is not None
    trained = [p for p in banked.parameters() if p.requires_grad]
    assert len(trained) < sum(trained for _, _, trained in logical_parameters(banked))  # fewer tensors to step
    for view in (lambda m: m.state_dict(), adapter_state_dict):
        before, after = view(plain), view(banked)
        assert list(before) == list(after) and not any(BANK_NAME in key for key in after)
        for key in before:
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert count_parameters(banked) == count_parameters(plain)
    groups = {g["name"]: sum(p.numel() for p in g["params"]) for g in adapter_param_groups(plain, 0.1, lr=1e-3)}
    assert {g["name"]: sum(p.numel() for p in g["params"]) for g in adapter_param_groups(banked, 0.1, lr=1e-3)} == groups
    inputs = CONFIGS[name][1]()
    assert _train(banked, inputs) == pytest.approx(_train(plain, inputs), rel=1e-6, abs=1e-12)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(banked.state_dict()[key], value, rtol=1e-6, atol=1e-12)
    # After the optimizer stepped the banks, nothing cached by the last forward may be served (grad mode on).
    for layer, plain_layer in zip(adapted_modules(banked).values(), adapted_modules(plain).values()):
        for got, expected in zip(layer.step_values(), plain_layer.step_values()):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    # Statistics (outside a forward) and
    # the per-projection / per-generator gradient norms read through the banks.
    expected, got = adapter_statistics(plain), adapter_statistics(banked)
    assert got.keys() == expected.keys()
    for projection, values in expected.items():
        assert values.keys() == got[projection].keys() and "grad_norm" in values
        for statistic, value in values.items():
            torch.testing.assert_close(got[projection][statistic], value, rtol=1e-6, atol=1e-12)
    expected_norms = generator_grad_norms(plain)
    assert generator_grad_norms(banked).keys() == expected_norms.keys()
    for generator, norm in expected_norms.items():
        torch.testing.assert_close(generator_grad_norms(banked)[generator], norm, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["doran-bert", "doran-vit-fused-row-norm", "dora-vit"])
def test_every_bank_and_every_member_gets_its_gradient(name: str) -> None:
    plain, banked = _model(name, bank=False), _model(name, bank=True)
    inputs = CONFIGS[name][1]()
    for model in (plain, banked):
        _train(model, inputs, steps=1)  # B off zero: every tensor sees a gradient
        model.zero_grad()
        run(model, inputs).double().pow(2).mean().backward()
    for family in find_bank(banked).families.values():
        if family.trainable:
            assert family.tensor().grad is not None and family.tensor().grad.abs().sum() > 0, family.label
    expected = trained_gradients(plain)
    got = trained_gradients(banked)
    assert got.keys() == expected.keys() and all(grad is not None for grad in got.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-12)
    layer = next(iter(adapted_modules(banked).values()))
    adapter = next(iter(layer.adapters.values()))
    assert adapter.magnitude.grad is None and gradient(adapter, "magnitude") is not None  # the bank's row


@pytest.mark.parametrize("build", [tiny_bert, tiny_vit])
def test_lora_banks_nothing_its_forward_reads_a_and_b_directly(build) -> None:
    model = apply_adapters(build(), AdapterConfig(method="lora", r=4))
    assert find_bank(model) is None and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_ties_survive_module_to_and_double() -> None:
    plain, banked = _model("doran-bert", bank=False, dtype=torch.float32), _model("doran-bert", bank=True,
                                                                                 dtype=torch.float32)
    plain.double()
    banked.to(torch.float64)
    assert _members_view_their_banks(banked)  # module.to gave the banks new storage and re-pointed their members
    assert banked.bert.encoder.layer[0].attention.self.query.adapters.main.magnitude.dtype == torch.float64
    inputs = token_input()
    assert _train(banked, inputs) == pytest.approx(_train(plain, inputs), rel=1e-6, abs=1e-12)
    assert _members_view_their_banks(banked)
    assert all(t.dtype == torch.float64 for t in find_bank(banked).tensors())
    for key, value in plain.state_dict().items():  # the members moved with the banks the optimizer stepped
        torch.testing.assert_close(banked.state_dict()[key], value, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("assign", [False, True])
def test_loading_a_state_dict_updates_the_banks(assign: bool) -> None:
    source = _model("doran-bert", bank=True)
    _train(source, token_input(), steps=2)
    target = _model("doran-bert", bank=True)
    target.load_state_dict(copy.deepcopy(source.state_dict()), assign=assign)
    source.eval(), target.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(target, token_input()), run(source, token_input()), rtol=0, atol=0)
    assert _members_view_their_banks(target)
    assert _train(target, token_input(), steps=2) == pytest.approx(_train(source, token_input(), steps=2), rel=1e-9)


def test_strict_load_does_not_miss_the_banks_and_deep_copies_keep_their_own() -> None:
    model = _model("doran-bert", bank=True)
    missing, unexpected = model.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    twin = copy.deepcopy(model)
    _train(twin, token_input(), steps=1)
    assert _members_view_their_banks(twin)
    assert not torch.equal(twin.state_dict()["bert.encoder.layer.0.attention.self.doran_aux.seed_A"],
                           model.state_dict()["bert.encoder.layer.0.attention.self.doran_aux.seed_A"])


def test_meta_device_materialisation_and_reset_magnitude_retie() -> None:
    reference = _model("doran-bert", bank=True, dtype=torch.float32)
    with torch.device("meta"):
        shell = apply_adapters(tiny_bert(), AdapterConfig(r=4, **CONFIGS["doran-bert"][2]))
    shell.to_empty(device="cpu")
    shell.load_state_dict(reference.state_dict())
    for name in ("position_ids", "token_type_ids"):  # BERT's own non-persistent buffers
        getattr(shell.bert.embeddings, name).copy_(getattr(reference.bert.embeddings, name))
    for layer in adapted_modules(shell).values():
        layer.reset_magnitude()  # m from the loaded W0, written into the members
    reference.eval(), shell.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(shell, token_input()), run(reference, token_input()))
    assert _members_view_their_banks(shell)


def test_unbank_gives_every_member_its_own_trainable_tensor() -> None:
    plain, banked = _model("doran-bert", bank=False), _model("doran-bert", bank=True)
    unbank(banked)
    assert find_bank(banked) is None and not hasattr(banked, BANK_NAME)
    assert [n for n, p in banked.named_parameters() if p.requires_grad] == [
        n for n, p in plain.named_parameters() if p.requires_grad]
    assert _train(banked, token_input()) == pytest.approx(_train(plain, token_input()), rel=1e-9)


# ---------------------------------------------------------------------- resuming a checkpoint written before banking
TINY_VIT = dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _our_configs() -> contextlib.AbstractContextManager:
    """weights_only loading of a checkpoint whose hyperparameters hold our config dataclasses (a module built in
    Python; the CLI stores plain values)."""
    return torch.serialization.safe_globals([AdapterConfig, AlarmConfig, BackboneConfig])


def _fit(bank: bool, root: Path, max_steps: int, ckpt_path: Path | None = None) -> tuple[DoranModule, list[float]]:
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 1, 2, 3])}
               for _ in range(6)]
    with banking(bank):
        module = DoranModule(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=TINY_VIT),
                             AdapterConfig(method="doran", r=4, alpha=8), num_classes=4, lr=3e-2)
    losses = Losses()
    trainer = pl.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[losses])
    with _our_configs():
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path,
                    weights_only=True)
    if ckpt_path is None:
        trainer.save_checkpoint(root / "old.ckpt")
    return module, losses.losses


def test_a_checkpoint_written_before_banking_resumes_banked_with_the_same_steps(tmp_path: Path) -> None:
    old, _ = _fit(bank=False, root=tmp_path, max_steps=3)
    assert find_bank(old.backbone) is None
    with _our_configs():
        checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=True)
    assert len(checkpoint["optimizer_states"][0]["state"]) == sum(
        trained for _, _, trained in logical_parameters(old.backbone))  # one optimizer entry per member
    unbanked, unbanked_losses = _fit(bank=False, root=tmp_path / "a", max_steps=6, ckpt_path=tmp_path / "old.ckpt")
    banked, banked_losses = _fit(bank=True, root=tmp_path / "b", max_steps=6, ckpt_path=tmp_path / "old.ckpt")
    assert find_bank(banked.backbone) is not None and len(banked_losses) == len(unbanked_losses) == 3
    assert banked_losses == pytest.approx(unbanked_losses, rel=1e-5)
    # The moments were carried over: a fresh optimizer state would take other steps than the resumed ones.
    after_banked, after_unbanked = banked.state_dict(), unbanked.state_dict()
    for key in banked.trainable_state.keys:
        torch.testing.assert_close(after_banked[key], after_unbanked[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_fsdp_strategies_train_unbanked_and_ddp_banked(strategy: str) -> None:
    """FSDP shards parameters per block, so no bank may stack them across blocks; DDP trains the banks."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from doran_lightning.module import deferred_build

    with deferred_build():
        module = DoranModule(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=TINY_VIT),
                             AdapterConfig(method="doran", r=4, alpha=8), num_classes=4)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy() if strategy == "fsdp" else DDPStrategy(), world_size=1)
    module.configure_model()
    banked = find_bank(module.backbone) is not None
    assert banked == (strategy == "ddp")
    names = {name for name, p in module.backbone.named_parameters() if p.requires_grad}
    assert any(name.endswith("adapters.q.magnitude") for name in names) != banked
    trained = {f"backbone.{name}" for name, _, trained in logical_parameters(module.backbone) if trained}
    assert trained <= module.trainable_state.keys and not any(BANK_NAME in key for key in module.trainable_state.keys)
