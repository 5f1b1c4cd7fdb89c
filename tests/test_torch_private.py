"""`adapters/torch_private.py` is the one file of the adapters that reads or writes PyTorch's private state; each of
its functions is checked here against the installed torch, so a torch upgrade that changes what they rely on
fails here, by name, before it corrupts a bank or a step cache."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import doran_lightning.adapters
from doran_lightning.adapters.torch_private import (
    attributes_of,
    buffers_of,
    children_of,
    in_backward,
    parameters_of,
    persistent_buffer_names,
    remove_state_dict_hooks,
)

PRIVATE = re.compile(r"\._parameters\b|\._buffers\b|_forward_pre_hooks|\._state_dict_hooks|\._load_state_dict_pre_hooks|"
                     r"\._non_persistent_buffers_set|\._modules\b|torch\._C\b")


def test_no_other_adapters_file_spells_a_private_torch_name() -> None:
    root = Path(doran_lightning.adapters.__file__).parent
    found = [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py")) if path.name != "torch_private.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not found, found


def test_the_registries_are_live() -> None:
    module = nn.Linear(3, 2)
    module.register_buffer("kept", torch.ones(2))
    module.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert list(parameters_of(module)) == ["weight", "bias"] and list(buffers_of(module)) == ["kept", "scratch"]
    assert persistent_buffer_names(module) == ["kept"]
    bias = parameters_of(module).pop("bias")  # unregistered: no longer a parameter nor in the state dict
    assert [name for name, _ in module.named_parameters()] == ["weight"] and "bias" not in module.state_dict()
    parameters_of(module)["bias"] = bias
    assert [name for name, _ in module.named_parameters()] == ["weight", "bias"]
    buffers_of(module)["kept"] = torch.full((2,), 3.0)  # a buffer's tensor replaced in place of its registration
    assert torch.equal(module.state_dict()["kept"], torch.full((2,), 3.0))
    parent = nn.Sequential()
    parent.add_module("child", module)
    assert children_of(parent)["child"] is module
    children_of(parent).pop("child")
    assert list(parent.named_modules()) == [("", parent)]


def test_state_dict_hooks_registered_without_handles_can_be_removed() -> None:
    calls = []

    def save(module, destination, prefix, local_metadata):
        calls.append("save")

    def load(module, state_dict, prefix, *args):
        calls.append("load")

    module = nn.Linear(2, 2)
    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)
    module.load_state_dict(module.state_dict())
    assert calls == ["save", "load"]
    remove_state_dict_hooks(module, save, load)
    module.load_state_dict(module.state_dict())
    assert calls == ["save", "load"]  # neither ran again


def test_in_backward_is_true_only_while_autograd_runs_a_backward() -> None:
    seen = []
    leaf = torch.ones(2, requires_grad=True)
    out = leaf * 2
    out.register_hook(lambda grad: seen.append(in_backward()))
    assert not in_backward()
    out.sum().backward()
    assert seen == [True] and not in_backward()


def test_attributes_of_bypasses_module_registration() -> None:
    module = nn.Linear(2, 2)
    weight = parameters_of(module).pop("weight")
    attributes_of(module)["weight"] = weight.detach() * 2  # a plain tensor attribute: not registered, still readable
    assert torch.equal(module.weight, weight.detach() * 2)
    assert [name for name, _ in module.named_parameters()] == ["bias"] and list(buffers_of(module)) == []
