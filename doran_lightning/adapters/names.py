"""Canonical projection names: the same tag under every wrapper a training strategy adds.

FSDP (v1) inserts ``_fsdp_wrapped_module``, ``torch.compile`` ``_orig_mod`` and activation
checkpointing ``_checkpoint_wrapped_module`` as path components (`canonical_name` drops them);
DDP and a compiled root add a leading ``module`` / ``_orig_mod`` (`unwrap_root` looks through them).
So an FSDP run's ``sigma/blocks.0.attn.qkv.q`` is the tag of a DDP or plain run. FSDP2
(``fully_shard``) changes no names.
"""

from __future__ import annotations

from torch import nn

WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module"})


def canonical_name(module_name: str) -> str:
    """``blocks.0._fsdp_wrapped_module.attn.qkv`` -> ``blocks.0.attn.qkv``."""
    return ".".join(part for part in module_name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrap_root(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
