"""Trainable-parameter counts of LoRA, DoRA and DoRAN's generator layouts at the same rank (docs/ADAPTERS.md table).

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


# (column, AdapterConfig fields): the baselines and DoRAN's generator layouts (METHOD.md §3).
METHODS = {"lora": {"method": "lora"}, "dora": {"method": "dora"}, "doran": {"method": "doran"},
           "doran-features": {"method": "doran", "aux_layout": "features"},
           "doran-features-model": {"method": "doran", "aux_layout": "features", "aux_scope": "model"}}


def main() -> None:
    doran_columns = [name for name in METHODS if name.startswith("doran")]
    print("| backbone (targets) | r | LoRA | DoRA | " + " | ".join(f"{name} (adapter + aux), vs DoRA" for name in doran_columns)
          + " |")
    print("|---|---|---|---|" + "---|" * len(doran_columns))
    for label, (build, rank, alpha, head) in BACKBONES.items():
        counts = {}
        for name, fields in METHODS.items():
            with torch.device("meta"):
                model = build()
            apply_adapters(model, AdapterConfig(r=rank, alpha=alpha, trainable_modules=head, **fields))
            counts[name] = count_parameters(model)
        dora = counts["dora"]["adapter"]
        cells = []
        for name in doran_columns:
            adapter, aux = counts[name]["adapter"], counts[name]["aux"]
            cells.append(f"{adapter + aux:,} ({adapter:,} + {aux:,}), {100 * (adapter + aux - dora) / dora:+.1f} %")
        print(f"| {label} | {rank} | {counts['lora']['adapter']:,} | {dora:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
