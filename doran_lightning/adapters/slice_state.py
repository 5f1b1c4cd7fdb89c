"""The trained state of one adapted row range (`SliceAdapter`).

The base every part (`variants`, `methods.doran.Noise`) creates its declared tensors (`tensors.py`) on; optimizer
groups, counts and adapter files ask modules for their roles (`adapter_params`) instead of matching names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from doran_lightning.adapters.tensors import GENERATOR, LORA, MAGNITUDE, SIGMA, TensorSpec
from doran_lightning.adapters.torch_private import parameters_of

__all__ = ["GENERATOR", "LORA", "MAGNITUDE", "SIGMA", "SliceAdapter", "math_dtype", "stack"]  # roles: `tensors`


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 tensors, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def stack(tensors: list[Tensor]) -> Tensor:
    """[n, ...] from n equal-shaped tensors; a view (no kernel) for one."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class SliceAdapter(nn.Module):
    """The trained state of one adapted row range; its parts create the tensors (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.roles: dict[str, str] = {}

    def add(self, name: str, tensor: Tensor, role: str, trainable: bool = True) -> None:
        """Register `tensor` as a parameter (or, when not `trainable`, a buffer) playing `role`."""
        if trainable:
            self.register_parameter(name, nn.Parameter(tensor))
            self.roles[name] = role
        else:
            self.register_buffer(name, tensor)

    def declare(self, spec: TensorSpec, tensor: Tensor, trainable: bool = True) -> None:
        """Register the declared tensor `spec` (`tensors.py`): a parameter playing its role, or a buffer."""
        self.add(spec.name, tensor, spec.role or "", trainable)

    def adapter_params(self) -> dict[str, str]:
        """{parameter name: role} of the tensors this module trains and holds (the adapter-params protocol); a banked
        tensor is trained as its bank (`bank.py`), which declares the role."""
        return {name: role for name, role in self.roles.items() if name in parameters_of(self)}
