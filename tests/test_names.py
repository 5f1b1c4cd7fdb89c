"""Statistic names are the same under every wrapper a strategy adds (FSDP, torch.compile, checkpointing, DDP)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from conftest import TINY_VIT_OVERRIDES
from timm.models.vision_transformer import Block
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from doran_lightning.adapters import AdapterConfig, adapter_histograms, adapter_statistics, apply_adapters
from doran_lightning.adapters.names import canonical_name
from doran_lightning.callbacks import flatten_statistics


def tags(model: torch.nn.Module) -> set[str]:
    histograms = {f"hist/{kind}/{name}" for name, values in adapter_histograms(model).items() for kind in values}
    return set(flatten_statistics(adapter_statistics(model))) | histograms


@pytest.fixture
def process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_canonical_name_drops_wrapper_components():
    assert canonical_name("blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn._orig_mod.qkv") == \
        "blocks.0.attn.qkv"
    assert canonical_name("module.encoder.layer.0") == "module.encoder.layer.0"  # a real child called "module"


def test_statistic_tags_are_the_same_under_every_wrapper(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    plain = apply_adapters(timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_VIT_OVERRIDES),
                           AdapterConfig(method="doran", r=2, alpha=4))
    expected = tags(plain)
    assert "sigma/blocks.0.attn.qkv.q" in expected and "hist/denominator/blocks.1.attn.qkv.v" in expected

    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, check_fn=lambda module: isinstance(module, Block))
    compiled_blocks = copy.deepcopy(plain)
    compiled_blocks.blocks[0] = torch.compile(compiled_blocks.blocks[0])
    wrapped = {
        "fsdp": FullyShardedDataParallel(copy.deepcopy(plain), auto_wrap_policy=ModuleWrapPolicy({Block}),
                                         device_id=torch.device("cpu"), use_orig_params=True),
        "torch.compile": torch.compile(copy.deepcopy(plain)),
        "compiled block": compiled_blocks,
        "activation checkpointing": checkpointed,
        "ddp": torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain)),
    }
    names = {kind: [name for name, _ in model.named_modules()] for kind, model in wrapped.items()}
    for kind, marker in (("fsdp", "_fsdp_wrapped_module"), ("torch.compile", "_orig_mod"),
                         ("activation checkpointing", "_checkpoint_wrapped_module"), ("ddp", "module.")):
        assert any(marker in name for name in names[kind]), f"{kind} did not wrap anything"  # the test means something
    for kind, model in wrapped.items():
        assert tags(model) == expected, kind
