"""A fingerprint of trained numbers: 5 AdamW steps of every variant label on tiny BERT and tiny ViT, the whole state
dict hashed (issue 41's "bitwise-equal trained numbers" check for refactors of the method core).

    python benchmarks/trained_fingerprint.py > before.txt     # on the commit before a refactor
    python benchmarks/trained_fingerprint.py > after.txt      # after it; `diff before.txt after.txt` must be empty

The hashes depend on the machine's kernels (BLAS, CPU features) and on the thread count (OMP_NUM_THREADS changes
the order of reductions): compare two commits on one machine with the same OMP_NUM_THREADS, never against a stored
value.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models the tests use

import torch  # noqa: E402
from tiny_models import run, tiny_bert, tiny_vit, token_input, vit_input  # noqa: E402

from doran_lightning.adapters import AdapterConfig, apply_adapters  # noqa: E402
from doran_lightning.adapters.config import VARIANT_LABELS  # noqa: E402
from doran_lightning.adapters.params import adapter_param_groups  # noqa: E402


def fingerprint(make, inputs: torch.Tensor, label: str, steps: int = 5) -> tuple[str, float]:
    """(sha256 prefix of the trained state dict, last loss) after `steps` AdamW steps of variant `label`."""
    torch.manual_seed(0)
    model = make()
    apply_adapters(model, AdapterConfig.from_variant(label, r=4))
    optimizer = torch.optim.AdamW(adapter_param_groups(model, 1e-4, lr=1e-2), lr=1e-2)
    for _ in range(steps):
        loss = run(model, inputs).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16], loss.item()


def main() -> None:
    for make, inputs in ((tiny_bert, token_input()), (tiny_vit, vit_input(dtype=torch.float32))):
        for label in VARIANT_LABELS:
            digest, loss = fingerprint(make, inputs, label)
            print(make.__name__, label, digest, f"{loss:.10g}")


if __name__ == "__main__":
    main()
