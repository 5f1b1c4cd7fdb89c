"""The one place the adapters touch PyTorch's private state (issue 41): each access named, and why.

Parameter banks (`bank.py`) make a member tensor stop being a registered parameter or buffer while it stays
readable (an entry of the module's instance dictionary, `attributes_of`), and in its state-dict place, as a view of
its bank. `nn.Module` has no public way to unregister a
tensor, to list what is registered on a module itself (not its children), to drop a state-dict hook whose handle
was not kept, or to remove a child module; the step cache (`step.py`) watches the registered tensors' versions and
must know whether autograd's backward is running (a checkpointed block being recomputed). Those reads and writes
are these functions, and nothing else in the package spells a private torch name (tests/test_torch_private.py
checks every one against the installed torch, so an upgrade that changes them fails there first).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Optional

import torch
from torch import Tensor, nn


def attributes_of(module: nn.Module) -> dict[str, Any]:
    """`module`'s instance dictionary, read and written past ``nn.Module.__setattr__`` / ``__getattr__``: a banked
    member is a plain tensor attribute there (a view of its bank), which ``setattr`` would register as a buffer or
    refuse over a former parameter's name, and the banks' bookkeeping must not become submodules or state."""
    return module.__dict__


def parameters_of(module: nn.Module) -> MutableMapping[str, Optional[nn.Parameter]]:
    """The live registry of `module`'s own parameters (``_parameters``): popping a name unregisters it."""
    return module._parameters


def buffers_of(module: nn.Module) -> MutableMapping[str, Optional[Tensor]]:
    """The live registry of `module`'s own buffers (``_buffers``); writing a name replaces the buffer's tensor."""
    return module._buffers


def persistent_buffer_names(module: nn.Module) -> list[str]:
    """`module`'s own buffers that its state dict holds, in registration order."""
    return [name for name in module._buffers if name not in module._non_persistent_buffers_set]


def children_of(module: nn.Module) -> MutableMapping[str, Optional[nn.Module]]:
    """The live registry of `module`'s direct children (``_modules``): popping a name removes the child."""
    return module._modules


def remove_state_dict_hooks(module: nn.Module, save: Callable[..., Any], load: Callable[..., Any]) -> None:
    """Drop `module`'s state-dict post-hook `save` and load pre-hook `load` (registered without keeping handles)."""
    for hooks, function in ((module._state_dict_hooks, save), (module._load_state_dict_pre_hooks, load)):
        for key in [key for key, hook in hooks.items() if getattr(hook, "hook", hook) is function]:
            del hooks[key]  # load pre-hooks are wrapped (`_WrappedHook.hook`)


def in_backward() -> bool:
    """Whether autograd's backward is running now (no public API tells: the current graph task's id is -1 outside)."""
    return torch._C._current_graph_task_id() != -1
