"""Parameter banks: one stacked tensor per family of equal-role adapter tensors (issue 18, item 3).

A DoRAN step read some 200 small tensors — per block the generator's seeds, trunks and heads, per
projection m and ρ — each one more AccumulateGrad in the backward, one more entry in every foreach
optimizer kernel, and one more input of a ``cat``/``stack`` in the forward. Banking is the rule:

* A *family* is what one batched computation of `step.StepCache` reads together, in its order: one
  attribute of every adapter of a group of rescaled projections of equal shape (``magnitude``, ``rho``,
  ``sigma_unit``, static ``lora_A``/``lora_B``; `step.plan_groups`; LoRA banks nothing: its forward reads
  A and B directly), or one parameter of every block generator of a stack of equal
  signatures (seeds, trunk and head weights and biases; `generators.plan_stacks`; `step.bank_adapters` plans both). Every family of two or
  more tensors gets ONE flat bank tensor holding its members back to back in that order: a parameter
  when the members are trained, else a non-persistent buffer.
* Each member keeps its place and name (state-dict keys, adapter files, checkpoints unchanged) and
  becomes a view of its slice of the bank: a parameter with ``requires_grad=False``, or a buffer.
  Reading a member, loading into it in place (``load_state_dict``, ``copy_``), merge, export and the
  statistics work as before; the bank itself is never in a state dict nor missing from one.
* The batched computations read the bank shaped as their stack (`Family.stacked`, no kernel) when
  their owners are exactly the family's (`serving`); any other differentiable read goes through
  `live` (the member's slice of the bank), so gradients always reach the bank. `gradient` is a
  member's gradient (its slice of the bank's).
* A member's storage can be replaced under the bank: ``module.to(dtype/device)``,
  ``load_state_dict(assign=True)``, ``to_empty`` after a meta-device build, a deep copy. Each of these
  replaces every member, so `ParameterBank.tie` compares the first and last member of each family with
  the bank (at the start of every eager step) and re-ties a family that no longer matches: the bank
  takes the members' values, which are the truth, and the members become its views again.
* Not where the backbone is sharded (FSDP2, FSDP v1): a block's parameters are sharded per block there,
  so `unbank` gives the members their own storage back first.

Optimizer states of checkpoints written before banking (one entry per member) are stacked into the
banks' by `stack_optimizer_state`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn


BANK_NAME = "doran_bank"  # the bank module's name on the adapted root
_MEMBERSHIP = "_doran_banked"  # on an owner module: {attribute: (family, index)}
_SERVED = "_doran_bank_group"  # on the first module of a planned group/stack: its `Served`
_ENABLED = contextvars.ContextVar("doran_banking", default=True)



@contextlib.contextmanager
def banking(enabled: bool) -> Iterator[None]:
    """Within this context `apply_adapters` banks (the default) or not (per-member tensors, as before banking)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def banking_enabled() -> bool:
    return _ENABLED.get()


def _local(owner: nn.Module, name: str) -> Tensor:
    """The member tensor now registered on `owner` (a parameter or a buffer)."""
    parameters = owner._parameters
    return parameters[name] if name in parameters else owner._buffers[name]  # type: ignore[return-value]


def _point(owner: nn.Module, name: str, value: Tensor) -> None:
    """Make the member `owner.name` hold `value` (a view of the bank), keeping the parameter object."""
    if name in owner._parameters:
        owner._parameters[name].data = value  # type: ignore[union-attr]
    else:
        owner._buffers[name] = value


class Family(nn.Module):
    """One bank tensor (named like its members' attribute) and the members that are views of its slices."""

    def __init__(self, label: str, name: str, role: Optional[str], members: Sequence[tuple[nn.Module, str]],
                 stacked_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.label = label  # e.g. "adapters.magnitude of 24", for its repr and messages
        self.name = name
        tensors = [_local(owner, name) for owner, name in members]
        self.trainable = isinstance(tensors[0], nn.Parameter) and tensors[0].requires_grad
        self.role = role if self.trainable else None
        self.members: list[tuple[nn.Module, str, int, torch.Size]] = []
        offset = 0
        for (owner, attribute), tensor in zip(members, tensors):
            self.members.append((owner, attribute, offset, tensor.shape))
            offset += tensor.numel()
        self.stacked_shape = stacked_shape
        flat = torch.cat([tensor.detach().reshape(-1) for tensor in tensors])
        if self.trainable:
            self.register_parameter(name, nn.Parameter(flat))
        else:
            self.register_buffer(name, flat, persistent=False)
        for index, (owner, attribute, _, _) in enumerate(self.members):
            owner.__dict__.setdefault(_MEMBERSHIP, {})[attribute] = (self, index)
            if self.trainable:
                _local(owner, attribute).requires_grad_(False)
        self._point_members(flat)

    # ------------------------------------------------------------------ values
    def tensor(self) -> Tensor:
        """The bank: a flat parameter (trained members) or buffer."""
        return getattr(self, self.name)

    def stacked(self) -> Tensor:
        """The bank shaped as the batched computation's stack of its members (a view: no kernel)."""
        return self.tensor().view(self.stacked_shape)

    def row(self, index: int) -> Tensor:
        """Member `index`'s slice of the bank, differentiable (the gradient lands in the bank)."""
        if not torch.compiler.is_compiling():
            self.tie()
        _, _, offset, shape = self.members[index]
        return self.tensor()[offset:offset + shape.numel()].view(shape)

    def gradient(self, index: int) -> Optional[Tensor]:
        """Member `index`'s gradient: its slice of the bank's (None before a backward)."""
        grad = self.tensor().grad
        if grad is None:
            return None
        _, _, offset, shape = self.members[index]
        return grad[offset:offset + shape.numel()].view(shape)

    # ------------------------------------------------------------------ ties
    def tied(self) -> bool:
        """Whether the first and the last member still view their slices of the bank."""
        bank = self.tensor()
        first_owner, first_name, _, _ = self.members[0]
        last_owner, last_name, offset, _ = self.members[-1]
        base = bank.data_ptr()
        return (_local(first_owner, first_name).data_ptr() == base
                and _local(last_owner, last_name).data_ptr() == base + offset * bank.element_size())

    @torch.no_grad()
    def tie(self) -> None:
        """Re-tie if broken: the bank takes the members' current values, the members become its views."""
        if self.tied():
            return
        values = torch.cat([_local(owner, name).detach().reshape(-1) for owner, name, _, _ in self.members])
        bank = self.tensor()
        if isinstance(bank, nn.Parameter):
            if bank.grad is not None and (bank.grad.dtype, bank.grad.device) != (values.dtype, values.device):
                bank.grad = None
            bank.data = values
        else:
            self._buffers[self.name] = values
        self._point_members(values)

    def _point_members(self, flat: Tensor) -> None:
        for owner, name, offset, shape in self.members:
            _point(owner, name, flat[offset:offset + shape.numel()].view(shape))

    @torch.no_grad()
    def release(self) -> None:
        """Give every member its own storage back (trainable again) and forget the bank."""
        self.tie()
        for owner, name, _, _ in self.members:
            member = _local(owner, name)
            _point(owner, name, member.detach().clone())
            if self.trainable:
                _local(owner, name).requires_grad_(True)
            owner.__dict__.get(_MEMBERSHIP, {}).pop(name, None)

    def adapter_params(self) -> dict[str, str]:
        """{bank name: role} of a trained bank (the adapter-params protocol: optimizer groups, counts)."""
        return {self.name: self.role} if self.role is not None else {}

    # Banks are never saved nor loaded: their members carry the values under their own keys.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return None

    def extra_repr(self) -> str:
        return f"{self.label}: {tuple(self.tensor().shape)}{'' if self.trainable else ', buffer'}"


class Served:
    """The families a planned group (of projections) or stack (of generators) reads, for exactly its owners."""

    def __init__(self, owners: Sequence[nn.Module], families: dict[str, Family]) -> None:
        self.owners = tuple(owners)
        self.families = families

    def serves(self, owners: Sequence[nn.Module]) -> bool:
        return len(owners) == len(self.owners) and all(a is b for a, b in zip(owners, self.owners))


def serving(owners: Sequence[nn.Module]) -> dict[str, Family]:
    """{name: family} banked for exactly `owners` in this order (the batched fast path), else {}."""
    served: Optional[Served] = owners[0].__dict__.get(_SERVED)
    return served.families if served is not None and served.serves(owners) else {}


def live(owner: nn.Module, name: str) -> Tensor:
    """`owner.name` for a differentiable computation: a banked member's slice of its bank, else the tensor itself."""
    record = owner.__dict__.get(_MEMBERSHIP)
    if record is not None and name in record:
        family, index = record[name]
        return family.row(index)
    return getattr(owner, name)


def gradient(owner: nn.Module, name: str) -> Optional[Tensor]:
    """The gradient of `owner.name`: a banked member's slice of its bank's gradient, else `.grad`."""
    record = owner.__dict__.get(_MEMBERSHIP)
    if record is not None and name in record:
        family, index = record[name]
        return family.gradient(index)
    return getattr(owner, name).grad


class ParameterBank(nn.Module):
    """Every family of one adapted model (registered on it as ``doran_bank``); see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        # Keyed like "doran_aux_trunk_A_weight_0": a bank's name says whose tensors it holds.
        self.families = nn.ModuleDict()

    def add(self, label: str, name: str, role: Optional[str], members: Sequence[tuple[nn.Module, str]],
            stacked_shape: tuple[int, ...]) -> Family:
        family = Family(f"{label} of {len(members)}", name, role, members, stacked_shape)
        prefix = label.replace(".", "_")
        self.families[f"{prefix}_{sum(key.startswith(prefix + '_') for key in self.families)}"] = family
        return family

    def tie(self) -> None:
        """Re-tie every family whose members no longer view it (two pointer comparisons per family)."""
        for family in self.families.values():
            family.tie()  # type: ignore[operator]

    def tensors(self) -> list[Tensor]:
        return [family.tensor() for family in self.families.values()]  # type: ignore[operator]


def _stack_shape(members: Sequence[tuple[nn.Module, str]], how: str) -> tuple[int, ...]:
    """The shape of ``torch.stack`` (how="stack") or ``torch.cat`` (how="cat") of the members."""
    first = _local(*members[0])
    if how == "stack":
        return (len(members), *first.shape)
    return (sum(_local(*member).shape[0] for member in members), *first.shape[1:])


def add_served(bank: ParameterBank, prefix: str, owners: Sequence[nn.Module], parts: dict[str, tuple]) -> None:
    """Bank each part {label: (attribute, role, members, how)} and record the families for `owners`."""
    families = {}
    for label, (name, role, members, how) in parts.items():
        families[label] = bank.add(f"{prefix}.{label}", name, role, members, _stack_shape(members, how))
    owners[0].__dict__[_SERVED] = Served(owners, families)


def tie_banks(root: nn.Module) -> None:
    """Re-tie the banks of an adapted root if anything replaced their members (see `ParameterBank.tie`)."""
    bank = root._modules.get(BANK_NAME)
    if bank is not None:
        bank.tie()  # type: ignore[operator]


def find_bank(model: nn.Module) -> Optional[ParameterBank]:
    """The model's `ParameterBank` (on its adapted root), or None."""
    for module in model.modules():
        if isinstance(module, ParameterBank):
            return module
    return None


def unbank(model: nn.Module) -> None:
    """Give every banked member its own trainable storage back and remove the bank (before sharding)."""
    bank = find_bank(model)
    if bank is None:
        return
    for family in bank.families.values():
        family.release()  # type: ignore[operator]
    for module in model.modules():
        module.__dict__.pop(_SERVED, None)
        if module._modules.get(BANK_NAME) is bank:
            del module._modules[BANK_NAME]


# ---------------------------------------------------------------------- the unbanked view
def _owned(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter, bool]]:
    """(full name, owner, attribute, parameter, trained) of every parameter but the banks, once each, in
    `named_parameters` order; a banked member counts as trained when its bank is."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Family):
            continue
        record = module.__dict__.get(_MEMBERSHIP, {})
        for name, parameter in module._parameters.items():
            if parameter is None or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            trained = record[name][0].trainable if name in record else parameter.requires_grad
            yield (f"{module_name}.{name}" if module_name else name), module, name, parameter, trained


def logical_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, trained) of every parameter as if nothing were banked: banks skipped, members trained."""
    for full, _, _, parameter, trained in _owned(model):
        yield full, parameter, trained


def trained_gradients(model: nn.Module) -> dict[str, Optional[Tensor]]:
    """{name: gradient, None before a backward} of every trained tensor, named as if nothing were banked."""
    return {full: gradient(module, name) for full, module, name, _, trained in _owned(model) if trained}


def named_gradients(model: nn.Module) -> dict[str, Tensor]:
    """{name: gradient} of every parameter with one, as if nothing were banked (a member: its slice of the bank's)."""
    grads = {full: gradient(module, name) for full, module, name, _, _ in _owned(model)}
    return {name: grad for name, grad in grads.items() if grad is not None}


# ---------------------------------------------------------------------- optimizer states
def stack_optimizer_state(state: dict[str, Any], unbanked: Sequence[Sequence[Tensor]],
                          banked: Sequence[Sequence[Tensor]], model: nn.Module) -> dict[str, Any]:
    """An optimizer state dict written before banking (one entry per member), laid out for the banks.

    `unbanked` and `banked` list the parameters of each optimizer group in the two layouts (the first
    is what the state's groups index); each bank's per-parameter state is its members' stacked in
    bank order: tensors shaped like a member are concatenated flat, anything else (Adam's ``step``)
    is taken from the first member.
    """
    bank = find_bank(model)
    members: dict[int, list[Tensor]] = {}
    for family in (bank.families.values() if bank is not None else []):
        members[id(family.tensor())] = [_local(owner, name) for owner, name, _, _ in family.members]
    old_index = {}
    for group_ids, params in zip((group["params"] for group in state["param_groups"]), unbanked):
        old_index.update({id(parameter): index for index, parameter in zip(group_ids, params)})
    old_states, new_states, new_groups, counter = state["state"], {}, [], 0
    for group, params in zip(state["param_groups"], banked):
        ids = []
        for parameter in params:
            sources = members.get(id(parameter))
            if sources is None:
                entry = old_states.get(old_index[id(parameter)])
            else:
                entry = _stacked_entry([old_states.get(old_index[id(member)]) for member in sources], sources)
            if entry is not None:
                new_states[counter] = entry
            ids.append(counter)
            counter += 1
        new_groups.append({**group, "params": ids})
    return {**state, "state": new_states, "param_groups": new_groups}


def _stacked_entry(entries: list[Optional[dict[str, Any]]], members: list[Tensor]) -> Optional[dict[str, Any]]:
    if any(entry is None for entry in entries):
        return None  # a member never stepped: the bank starts fresh, as that member would have
    stacked = {}
    for key, value in entries[0].items():  # type: ignore[union-attr]
        values = [entry[key] for entry in entries]  # type: ignore[index]
        if all(isinstance(item, Tensor) and item.shape == member.shape for item, member in zip(values, members)):
            stacked[key] = torch.cat([item.reshape(-1) for item in values])
        else:
            stacked[key] = value  # the same for every member (Adam's step count)
    return stacked
