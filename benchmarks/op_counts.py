"""Count the ATen operations (≈ GPU kernel launches) of one training step, per method.

On a GPU the adapters' extra work is tiny per operation, so a step's overhead follows the number of
operations dispatched rather than their FLOPs (see docs/PERFORMANCE.md). Views (slices, transposes,
expands, …), detaches and dtype look-ups launch nothing and are not counted. Runs on CPU in seconds:
    python benchmarks/op_counts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (doran_lightning, benchmarks)

from benchmarks import harness  # noqa: E402

VARIANTS = harness.OURS
# Views (slices, transposes, expands, …) launch nothing; neither do these bookkeeping ops.
_FREE = {"aten.detach.default", "aten.alias.default", "aten.promote_types.default", "aten.lift_fresh.default"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops that would launch work."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view and str(func) not in _FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_ops(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(forward ops, backward ops) of one training forward + backward, on the GPU's code paths (what it counts
    stands for a GPU step's dispatches)."""
    model.train()
    with harness.gpu_paths(), OpCounter() as counter:
        loss = model(images).float().pow(2).mean()
        forward = counter.count
        loss.backward()
    return forward, counter.count - forward


def main() -> None:
    images = torch.randn(2, 3, 32, 32)
    build = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,  # noqa: E731
                                      depth=12, embed_dim=64, num_heads=2, num_classes=5)
    print("ViT with 12 blocks, q and v slices of every fused qkv adapted (24 projections), r = 8")
    print("| variant | forward ops | backward ops | extra ops vs LoRA per step |")
    print("|---|---|---|---|")
    counts = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        counts[name] = step_ops(harness.adapt(name, build(), 8, ["qkv[q,v]"], ["head"]), images)
        extra = sum(counts[name]) - sum(counts["lora"])
        print(f"| {name} | {counts[name][0]} | {counts[name][1]} | {extra:+d} |")
    measured = {f"ops:{name}/lora": sum(counts[name]) / sum(counts["lora"]) for name in VARIANTS}
    print("\n" + harness.target_table(harness.check_targets(measured, ["ops"])))


if __name__ == "__main__":
    main()
