"""Tiny backbones built from configs (no downloads) shared by the adapter tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import timm
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_vit(num_classes: int = 5) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=num_classes).eval()


def tiny_bert(num_labels: int = 3) -> nn.Module:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def vit_input(batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)


def token_input(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(2))


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's main output tensor, whatever the library."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def train_steps(model: nn.Module, inputs: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps on a dummy objective so that B, m and σ move away from their init."""
    from doran_lightning.adapters import adapter_param_groups

    optimizer = torch.optim.AdamW(adapter_param_groups(model, weight_decay=0.0, lr=lr), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        run(model, inputs).pow(2).mean().backward()
        optimizer.step()
    model.eval()
