"""FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`.

`DoranModule.configure_model` calls `shard_backbone` when the strategy has set a device mesh:

* every repeated block (each child of an ``nn.Sequential``/``nn.ModuleList`` holding adapted projections:
  timm ``blocks.N``, HF ``encoder.layer.N``) and then the backbone itself get `fully_shard`, so the frozen
  weights are sharded per parameter and, having ``requires_grad=False``, never get a gradient;
* the DoRAN generators are left out of the sharding (``ignored_params``): the `StepCache` runs them
  all in the backbone's forward pre-hook, outside the blocks' forwards, where parameters of a block would
  still be sharded. They stay whole on every rank, like DDP parameters: `all_reduce_ignored_gradients`
  averages their gradients after each backward (FSDP2 does not touch them);
* trainable tensors are broadcast from rank 0 before sharding, so every rank starts from the same adapters;
* the step's batched pass cannot read a block's sharded W0, so each block batches its own projections in a
  pre-hook that runs after FSDP2 has unsharded the block (`inject.add_block_passes`).

The adapters' cached row norms (``weight_norm_sq``) were computed from the whole W0 before sharding.
`gathered_parameters` gathers whole weights and gradients for the statistics (every rank takes part).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from doran_lightning.adapters.generators import AuxGenerator
from doran_lightning.adapters.inject import add_block_passes, is_banked
from doran_lightning.adapters.layer import AdaptedLinear

IGNORED_ATTRIBUTE = "_doran_unsharded_params"


def check_strategy(strategy: Any) -> None:
    """Raise for ModelParallelStrategy settings DoranModule does not support (tensor parallel, sharded files)."""
    mesh = strategy.device_mesh
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tensor_parallel > 1:
        raise ValueError(
            f"ModelParallelStrategy: DoranModule shards data-parallel only (FSDP2), but tensor_parallel_size="
            f"{tensor_parallel}; set --trainer.strategy.data_parallel_size=<number of devices> and "
            "--trainer.strategy.tensor_parallel_size=1")
    if getattr(strategy, "_save_distributed_checkpoint", False):
        raise ValueError(
            "ModelParallelStrategy: set --trainer.strategy.save_distributed_checkpoint=false; DoranModule writes "
            "one full checkpoint file of the trainable tensors, which `test`/`export` read on one device")


def is_fsdp_v1(strategy: Any, world_size: int) -> bool:
    """Whether parameters and gradients are sharded by FSDP v1 (Lightning's `FSDPStrategy` on several ranks).

    The one test of it: the gradient norm combines shards, the statistics gather whole weights and
    DoRAN's generators are refused (`check_fsdp_v1`) exactly when this holds.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy) and world_size > 1


def check_fsdp_v1(strategy: Any, world_size: int, cfg: Any) -> None:
    """Refuse FSDP (v1) across ranks with generated A/B: it would shard the generators inside the blocks.

    All generators run together when the backbone's forward starts (one batched pass), before FSDP v1
    gathers a block's flat parameter, so their weights would be shards there. FSDP2 keeps them whole.
    """
    if is_fsdp_v1(strategy, world_size) and cfg.use_aux:
        raise ValueError(
            "FSDPStrategy (FSDP v1) on several devices cannot shard DoRAN's A/B generators (they run for all "
            "blocks at once, outside the wrapped blocks); use --trainer.strategy=ModelParallelStrategy (FSDP2, "
            "docs/SCALING.md), or static A/B with --model.adapter.aux=false")


def is_fsdp(strategy: Any) -> bool:
    """Whether the strategy shards parameters per block (FSDP v1 or FSDP2), where adapter tensors are not banked."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost children of Sequential/ModuleList containers that hold adapted projections."""
    blocks: list[nn.Module] = []
    taken: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken) or not isinstance(module, (nn.Sequential,
                                                                                              nn.ModuleList)):
            continue
        children = [child for child in module.children()
                    if any(isinstance(m, AdaptedLinear) for m in child.modules())]
        if children:
            blocks.extend(children)
            taken.add(name)
    return blocks


def shard_backbone(model: nn.Module, mesh: Any) -> list[nn.Parameter]:
    """Broadcast the trainable tensors from rank 0, `fully_shard` each block and the root; return the
    generator parameters, which stay whole (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    if is_banked(model):  # a block's parameters are sharded with the block: no bank may stack them across blocks
        raise ValueError("shard_backbone: the adapters were applied with parameter banks; build the model with "
                         "apply_adapters(model, cfg, bank=False) before sharding it")
    mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    group = mesh.get_group()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                dist.broadcast(parameter.data, src=dist.get_global_rank(group, 0), group=group)
    ignored = {p for m in model.modules() if isinstance(m, AuxGenerator) for p in m.parameters()}
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    add_block_passes(model, blocks)  # after fully_shard: its unshard pre-hooks run first (FSDP2 prepends them)
    unsharded = [p for p in model.parameters() if p in ignored]  # the same order on every rank
    object.__setattr__(model, IGNORED_ATTRIBUTE, (unsharded, group))
    return unsharded


def all_reduce_ignored_gradients(model: nn.Module) -> None:
    """Average the gradients of the unsharded (generator) parameters over the data-parallel group.

    Called after every backward: averaging is linear, so with gradient accumulation the sum of
    per-micro-batch averages is the average of the sums.
    """
    parameters, group = getattr(model, IGNORED_ATTRIBUTE, ((), None))
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_backbone` sharded this model."""
    return hasattr(model, IGNORED_ATTRIBUTE)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, keep: bool) -> Iterator[None]:
    """Every rank gathers each sharded parameter and its gradient (collectives, same order everywhere);
    where `keep`, the module holds the whole tensors until the context exits (rank zero computes)."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if not isinstance(parameter, DTensor):
                    continue
                whole = nn.Parameter(parameter.full_tensor(), requires_grad=parameter.requires_grad)
                if parameter.grad is not None:
                    whole.grad = parameter.grad.full_tensor()
                if keep:
                    module._parameters[name] = whole
                    swapped.append((module, name, parameter))
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def local_gradient_square_sum(grads: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """This rank's share of Σ‖g‖²: its shard of each sharded gradient, 1/world_size of each whole one."""
    from torch.distributed.tensor import DTensor

    squares = [grad.to_local().detach().float().pow(2).sum() if isinstance(grad, DTensor)
               else grad.detach().float().pow(2).sum() / world_size for grad in grads]
    return torch.stack(squares).sum()
