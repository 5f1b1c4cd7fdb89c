"""Parameter banks: one stacked tensor per family of equal-role adapter tensors (issue 18 item 3, issue 30).

A DoRAN step read some 200 small tensors — per block the generator's seeds, trunks and heads, per
projection m and ρ — each one more AccumulateGrad in the backward, one more entry in every foreach
optimizer kernel, and one more input of a ``cat``/``stack`` in the forward. Banking is the rule:

* A *family* is what one batched computation of `step.StepCache` reads together, in its order: one
  attribute of every adapter of a group of rescaled projections of equal shape (``magnitude``, ``rho``,
  ``sigma_unit``, static ``lora_A``/``lora_B``; LoRA banks nothing: its forward reads A and B directly),
  or one parameter of every block generator of a stack of equal signatures (seeds, trunk and head
  weights and biases; `step.bank_adapters` plans both). Every family of two or more tensors gets ONE
  flat bank tensor holding its members back to back in that order: a parameter when the members are
  trained, else a non-persistent buffer.
* The bank is the truth and the only registered tensor (issue 30): ``named_parameters()`` lists each
  trained tensor once, under the bank's name (``doran_bank.families.<family>.<attribute>``, e.g.
  ``…adapters_magnitude_0.magnitude``), so counts, ``clip_grad_norm_``, ``parameters_to_vector``, weight
  averaging and name-based optimizer groups see exactly what is trained. Each member stays readable where
  it was (``adapter.magnitude``) as a plain view of its slice of the bank (not a parameter, not a buffer),
  and keeps its state-dict key: state-dict hooks on its owner write and read it in its old place, so
  state dicts, adapter files and checkpoints are unchanged; the bank itself is never in a state dict.
* The batched computations read the bank shaped as their stack (`Family.stacked`, no kernel) when
  their owners are exactly the family's (`serving`); any other differentiable read goes through
  `live` (the member's slice of the bank), so gradients always reach the bank. `gradient` is a
  member's gradient (its slice of the bank's).
* What replaces the bank's storage re-points the members: ``module.to(dtype/device)``, ``to_empty``
  (`Family._apply`); a deep copy keeps them aliased (`Family.__deepcopy__`); `Family.tie` re-points
  them if anything else did (two pointer comparisons, at the start of every eager step).
* Not where the backbone is sharded (FSDP2, FSDP v1): a block's parameters are sharded per block there,
  so such models are built without banks (`apply_adapters(..., bank=False)`), and `unbank` gives the
  members of a banked model their own trainable storage back.

Optimizer states of checkpoints written before banking (one entry per member) are stacked into the
banks' by `stack_optimizer_state`.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from doran_lightning.adapters.torch_private import (
    attributes_of,
    buffers_of,
    children_of,
    parameters_of,
    persistent_buffer_names,
    remove_state_dict_hooks,
)

BANK_NAME = "doran_bank"  # the bank module's name on the adapted root
_MEMBERSHIP = "_doran_banked"  # on an owner module: {attribute: (family, index)}
_ORDER = "_doran_state_order"  # on an owner module: its parameter and buffer names as registered (state-dict order)
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


def _registered(owner: nn.Module, name: str) -> Tensor:
    """The tensor registered as `owner.name` before banking (a parameter or a buffer)."""
    parameters = parameters_of(owner)
    return parameters[name] if name in parameters else buffers_of(owner)[name]  # type: ignore[return-value]


# ---------------------------------------------------------------------- owners: members in their state-dict place
def _save_members(owner: nn.Module, destination: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of an owner: its members under their own keys, in their registration order."""
    record = attributes_of(owner).get(_MEMBERSHIP)
    if not record:
        return
    for family, _ in record.values():
        family.tie()
    tail_keys = []
    for key in reversed(destination):  # this owner's subtree was written last: its keys end the dict
        if not key.startswith(prefix):
            break
        tail_keys.append(key)
    tail = {key: destination.pop(key) for key in reversed(tail_keys)}
    for name in attributes_of(owner)[_ORDER]:
        if name in record:
            destination[prefix + name] = attributes_of(owner)[name]
        elif prefix + name in tail:
            destination[prefix + name] = tail.pop(prefix + name)
    destination.update(tail)  # the owner's submodules' keys


def _load_members(owner: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load-state-dict pre-hook of an owner: copy its members' entries into their slices of the banks."""
    for name, (family, index) in attributes_of(owner).get(_MEMBERSHIP, {}).items():
        key = prefix + name
        if key not in state_dict:
            missing_keys.append(key)
            continue
        value = state_dict.pop(key)
        if family.tensor().is_meta and local_metadata.get("assign_to_params_buffers", False):
            family.materialize(value.device)
        family.tie()
        target = attributes_of(owner)[name]
        if not isinstance(value, Tensor) or value.shape != target.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                              f"the shape in current model is {tuple(target.shape)}.")
            continue
        with torch.no_grad():
            target.copy_(value)


def _adopt(owner: nn.Module, name: str, family: "Family", index: int) -> None:
    """Make `owner.name` a member of `family`: no longer registered, written and read by the owner's hooks."""
    state = attributes_of(owner)
    if _MEMBERSHIP not in state:
        state[_ORDER] = [*parameters_of(owner), *persistent_buffer_names(owner)]
        state[_MEMBERSHIP] = {}
        owner.register_state_dict_post_hook(_save_members)
        owner.register_load_state_dict_pre_hook(_load_members)
    state[_MEMBERSHIP][name] = (family, index)
    parameters_of(owner).pop(name, None)
    buffers_of(owner).pop(name, None)


def _release(owner: nn.Module, name: str, value: Tensor, trainable: bool) -> None:
    """Register `value` as `owner.name` again (a parameter when `trainable`, else a buffer); drop the hooks last."""
    state = attributes_of(owner)
    state[_MEMBERSHIP].pop(name)
    del state[name]
    if trainable:
        owner.register_parameter(name, nn.Parameter(value))
    else:
        owner.register_buffer(name, value)
    if state[_MEMBERSHIP]:
        return
    order = state.pop(_ORDER)
    del state[_MEMBERSHIP]
    remove_state_dict_hooks(owner, _save_members, _load_members)
    # Registration order as before banking (state-dict keys in their old order).
    for registry in (parameters_of(owner), buffers_of(owner)):
        for key in [key for key in order if key in registry]:
            registry[key] = registry.pop(key)


class Family(nn.Module):
    """One bank tensor (named like its members' attribute) and the members that are views of its slices."""

    def __init__(self, label: str, name: str, role: Optional[str], members: Sequence[tuple[nn.Module, str]],
                 stacked_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.label = label  # e.g. "adapters.magnitude of 24", for its repr and messages
        self.name = name
        tensors = [_registered(owner, attribute) for owner, attribute in members]
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
            _adopt(owner, attribute, self, index)
        self._point_members()

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
        return (attributes_of(first_owner)[first_name].data_ptr() == base
                and attributes_of(last_owner)[last_name].data_ptr() == base + offset * bank.element_size())

    def tie(self) -> None:
        """Re-point the members at the bank (the truth) if something replaced its storage."""
        if not self.tied():
            self._point_members()

    def _point_members(self) -> None:
        flat = self.tensor().detach()
        for owner, name, offset, shape in self.members:
            attributes_of(owner)[name] = flat[offset:offset + shape.numel()].view(shape)

    @torch.no_grad()
    def materialize(self, device: torch.device) -> None:
        """Give a meta-device bank real (uninitialised) storage on `device` (a load with ``assign=True``)."""
        bank = self.tensor()
        values = torch.empty_like(bank, device=device)
        if isinstance(bank, nn.Parameter):
            bank.data = values
        else:
            buffers_of(self)[self.name] = values
        self._point_members()

    def _apply(self, fn: Any, recurse: bool = True) -> "Family":
        result = super()._apply(fn, recurse)
        self._point_members()  # .to(), .double(), to_empty(): the bank has new storage, the members follow
        return result

    def __deepcopy__(self, memo: dict) -> "Family":
        """A copy whose bank shares storage with its copied members (a parameter's own deep copy clones it)."""
        bank = self.tensor()
        if id(bank) not in memo and bank.device.type not in ("meta",):
            storage = copy.deepcopy(bank.untyped_storage(), memo)  # the same storage the members' copies view
            twin = torch.empty(0, dtype=bank.dtype, device=bank.device).set_(
                storage, bank.storage_offset(), bank.size(), bank.stride())
            memo[id(bank)] = nn.Parameter(twin, bank.requires_grad) if isinstance(bank, nn.Parameter) else twin
        twin_family = type(self).__new__(type(self))
        memo[id(self)] = twin_family
        twin_family.__setstate__(copy.deepcopy(self.__dict__, memo))
        return twin_family

    @torch.no_grad()
    def release(self) -> None:
        """Give every member its own storage back (trainable again) and forget the bank."""
        self.tie()
        for owner, name, _, _ in self.members:
            _release(owner, name, attributes_of(owner)[name].clone(), self.trainable)

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
    served: Optional[Served] = attributes_of(owners[0]).get(_SERVED)
    return served.families if served is not None and served.serves(owners) else {}


def live(owner: nn.Module, name: str) -> Tensor:
    """`owner.name` for a differentiable computation: a banked member's slice of its bank, else the tensor itself."""
    record = attributes_of(owner).get(_MEMBERSHIP)
    if record is not None and name in record:
        family, index = record[name]
        return family.row(index)
    return getattr(owner, name)


def gradient(owner: nn.Module, name: str) -> Optional[Tensor]:
    """The gradient of `owner.name`: a banked member's slice of its bank's gradient, else `.grad`."""
    record = attributes_of(owner).get(_MEMBERSHIP)
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
    first = _registered(*members[0])
    if how == "stack":
        return (len(members), *first.shape)
    return (sum(_registered(*member).shape[0] for member in members), *first.shape[1:])


def add_served(bank: ParameterBank, prefix: str, owners: Sequence[nn.Module], parts: dict[str, tuple]) -> None:
    """Bank each part {label: (attribute, role, members, how)} and record the families for `owners`."""
    families = {}
    for label, (name, role, members, how) in parts.items():
        families[label] = bank.add(f"{prefix}.{label}", name, role, members, _stack_shape(members, how))
    attributes_of(owners[0])[_SERVED] = Served(owners, families)


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
        attributes_of(module).pop(_SERVED, None)
        if children_of(module).get(BANK_NAME) is bank:
            del children_of(module)[BANK_NAME]


# ---------------------------------------------------------------------- the unbanked view
def parameter_names(owner: nn.Module) -> list[str]:
    """The names of `owner`'s own parameters as if nothing were banked (trained members included), in order."""
    record = attributes_of(owner).get(_MEMBERSHIP)
    if not record:
        return list(parameters_of(owner))
    return [name for name in attributes_of(owner)[_ORDER]
            if name in parameters_of(owner) or (name in record and record[name][0].trainable)]


def _owned(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor, bool]]:
    """(full name, owner, attribute, tensor, trained) of every parameter but the banks, once each, in the order
    `named_parameters` had before banking; a banked member (a view of its bank) is trained when its bank is."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Family):
            continue
        record = attributes_of(module).get(_MEMBERSHIP, {})
        for name in parameter_names(module):
            tensor = attributes_of(module)[name] if name in record else parameters_of(module)[name]
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            trained = record[name][0].trainable if name in record else tensor.requires_grad
            yield (f"{module_name}.{name}" if module_name else name), module, name, tensor, trained


def logical_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """(name, tensor, trained) of every parameter as if nothing were banked: banks skipped, members trained."""
    for full, _, _, parameter, trained in _owned(model):
        yield full, parameter, trained


def unbanked_params(model: nn.Module, groups: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    """The tensors of each of `groups` (lists of parameters) as a model without banks lists them: each bank
    replaced by its members, in the order ``named_parameters`` had before banking."""
    bank = find_bank(model)
    families = {} if bank is None else {id(family.tensor()): family for family in bank.families.values()}
    wanted = []
    for params in groups:
        ids = set()
        for parameter in params:
            family = families.get(id(parameter))
            ids.update([id(attributes_of(owner)[name]) for owner, name, _, _ in family.members] if family else [id(parameter)])
        wanted.append(ids)
    order = [tensor for _, tensor, trained in logical_parameters(model) if trained]
    return [[tensor for tensor in order if id(tensor) in ids] for ids in wanted]


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
        members[id(family.tensor())] = [attributes_of(owner)[name] for owner, name, _, _ in family.members]
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
