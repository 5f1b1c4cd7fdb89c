"""Trainable-parameter counts of LoRA, DoRA and DoRAN at the same rank (docs/ADAPTERS.md table).

Models are built on the meta device (shapes only), so even LLaMA-7B costs no memory or download:
    python benchmarks/parameter_counts.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, RobertaConfig, RobertaForSequenceClassification

from doran_lightning.adapters import AdapterConfig, apply_adapters, count_parameters

BACKBONES = {
    "ViT-B/16, timm (q, v of `qkv`)": (lambda: timm.create_model("vit_base_patch16_224", pretrained=False,
                                                                  num_classes=100), 8, 16, ["head"]),
    "RoBERTa-base (query, value)": (lambda: RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)), 8, 16, ["classifier"]),
    "LLaMA-7B (q_proj, v_proj)": (lambda: AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        vocab_size=32000)), 32, 64, []),
}


def main() -> None:
    print("| backbone (targets) | r | LoRA | DoRA | DoRAN (adapter + aux) | DoRAN vs DoRA |")
    print("|---|---|---|---|---|---|")
    for label, (build, rank, alpha, head) in BACKBONES.items():
        counts = {}
        for method in ("lora", "dora", "doran"):
            with torch.device("meta"):
                model = build()
            apply_adapters(model, AdapterConfig(method=method, r=rank, alpha=alpha, trainable_modules=head))
            counts[method] = count_parameters(model)
        doran = counts["doran"]
        total = doran["adapter"] + doran["aux"]
        dora = counts["dora"]["adapter"]
        print(f"| {label} | {rank} | {counts['lora']['adapter']:,} | {dora:,} | "
              f"{total:,} ({doran['adapter']:,} + {doran['aux']:,}) | {100 * (total - dora) / dora:+.1f} % |")


if __name__ == "__main__":
    main()
