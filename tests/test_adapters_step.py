"""The per-step cache (issue 18): batched values equal each projection's own, nothing W0-sized is kept for
backward, a compiled step pass hands the forward its groups' stacks, and modules declare their adapter tensors
(the adapter-params protocol)."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny_models import run, tiny_bert, tiny_vit, token_input, train_steps, vit_input

from doran_lightning.adapters import AdapterConfig, adapted_modules, apply_adapters, count_parameters
from doran_lightning.adapters import engine
from doran_lightning.adapters.engine import compute_step
from doran_lightning.adapters.params import GROUP_OF_ROLE, adapter_roles
from doran_lightning.adapters.step import plan_groups

CASES = [(tiny_bert, token_input, dict(method="dora")), (tiny_bert, token_input, dict(method="doran")),
         (tiny_vit, vit_input, dict(method="doran", aux=False, noise_granularity="row")),
         (tiny_vit, vit_input, dict(method="lora")),
         (tiny_vit, vit_input, dict(method="doran", sigma_scale="row_norm"))]


@pytest.mark.parametrize("stacked", [False, True], ids=["products-each", "stacked-W0"])
@pytest.mark.parametrize("build,make_input,options", CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_batched_step_values_equal_each_projection_alone(build, make_input, options, stacked, monkeypatch) -> None:
    """Both ways of reading W0 for a group (one stacked product: GPUs; one product each: CPUs) give each
    projection's own values."""
    monkeypatch.setattr(engine, "stacks_frozen_weights", lambda device: stacked)
    torch.manual_seed(0)
    model = apply_adapters(build().double(), AdapterConfig(r=4, **options))
    train_steps(model, make_input(), steps=2, lr=0.05)  # every tensor away from its init
    model.eval()
    cache = model._doran_step_cache
    with torch.no_grad():
        cache.generate()
        assert max(len(group) for group in cache.groups) > 1  # equal-shape projections really are batched
        for layer in adapted_modules(model).values():
            batched = cache.served(layer._slot)
            alone = [value if value is None else value[0] for value in compute_step([layer], training=False)]
            for got, expected in zip(batched, alone):
                if expected is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lora_on_whole_projections_needs_no_step_pass() -> None:
    model = apply_adapters(tiny_bert(), AdapterConfig(method="lora", r=4))
    assert not model._doran_step_cache.groups and not model._doran_generation_hooks


def test_no_stacked_copy_of_the_frozen_weights_is_kept_for_backward() -> None:
    """With the default detached norm, the batched norm's W0 stack is a temporary: nothing W0-sized is saved."""
    model = apply_adapters(tiny_bert(), AdapterConfig(method="doran", r=4)).train()
    layers = list(adapted_modules(model).values())
    stacked = sum(layer.weight.numel() for layer in plan_groups(layers)[0])
    assert stacked > max(layer.weight.numel() for layer in layers)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        run(model, token_input()).sum().backward()
    assert max(saved) < stacked


def _recording_backend(outputs: list[int]):
    """A torch.compile backend that runs each graph as traced and records how many outputs it has."""
    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        outputs.append(len(next(node for node in graph_module.graph.nodes if node.op == "output").args[0]))
        return graph_module.forward
    return backend


def test_compiled_step_pass_outputs_its_groups_stacks_not_a_view_per_projection() -> None:
    """`module.compile()` traces the step hook as a graph of its own: each tensor it leaves on the cache is an
    output with a runtime wrapper every step. It leaves the groups' stacks (A, B, g); each projection indexes
    its row inside the forward's graph. Before: one output per projection and kind, plus every generated A/B."""
    torch.manual_seed(0)
    model = apply_adapters(tiny_bert().double(), AdapterConfig(method="doran", r=4)).train()
    groups = model._doran_step_cache.groups
    eager = copy.deepcopy(model)
    outputs: list[int] = []
    model.compile(backend=_recording_backend(outputs))
    run(model, token_input()).pow(2).sum().backward()
    run(eager, token_input()).pow(2).sum().backward()
    assert len(adapted_modules(model)) == 4 and len(groups) == 1
    assert outputs[0] == 3 * len(groups)  # the hook's graph: A, B and g stacked (20 outputs before)
    for (name, compiled), (_, reference) in zip(model.named_parameters(), eager.named_parameters()):
        if reference.requires_grad:
            torch.testing.assert_close(compiled.grad, reference.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_compiled_step_with_activation_checkpointing_equals_eager() -> None:
    """The step pass stays outside every checkpointed block under compile too (made in the hook, not lazily by
    the first projection: inside a checkpointed block that side effect breaks the graph and the recompute)."""
    torch.manual_seed(0)
    base = tiny_bert().double()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_adapters(base, AdapterConfig(method="doran", r=4)).train()
    eager = copy.deepcopy(model)
    model.compile(backend=_recording_backend([]))
    for candidate in (model, eager):
        for _ in range(2):  # the second step reads the first step's cache state
            run(candidate, token_input()).pow(2).sum().backward()
    for (name, compiled), (_, reference) in zip(model.named_parameters(), eager.named_parameters()):
        if reference.requires_grad:
            torch.testing.assert_close(compiled.grad, reference.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_merged_model_runs_no_step_pass(monkeypatch) -> None:
    """Merged projections read only their merged weights: the forward makes no generated A/B and no norms
    (it used to stack every W0 and run the generators for nothing: +10 % on BERT-base's eval forward)."""
    from doran_lightning.adapters import merge_adapters, step

    torch.manual_seed(0)
    model = apply_adapters(tiny_bert().double(), AdapterConfig(method="doran", r=4)).eval()
    train_steps(model.train(), token_input(), steps=2, lr=0.05)
    model.eval()
    with torch.no_grad():
        unmerged = run(model, token_input())
        merge_adapters(model)

        def refuse(*args, **kwargs):
            raise AssertionError("a merged model's forward made step values")

        monkeypatch.setattr(step, "compute_step", refuse)
        monkeypatch.setattr(step, "generate", refuse)
        torch.testing.assert_close(run(model, token_input()), unmerged, rtol=1e-10, atol=1e-10)


def _checkpoint_hf(model) -> None:  # HF checkpoints a block's `forward`: its hooks run outside the checkpoint
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpoint_timm(model) -> None:  # timm's checkpoint_seq calls the blocks: their hooks run inside it
    model.set_grad_checkpointing(True)


@pytest.mark.parametrize("build,make_input,checkpointing", [
    (tiny_bert, token_input, None), (tiny_bert, token_input, _checkpoint_hf), (tiny_vit, vit_input, _checkpoint_timm)],
    ids=["bert", "bert-checkpointed", "vit-checkpointed"])
def test_block_passes_batch_each_blocks_projections_when_the_step_pass_cannot(build, make_input, checkpointing,
                                                                             monkeypatch) -> None:
    """FSDP2's case, simulated: no W0 is whole when the step's pass runs, so each block makes its projections'
    values in one pass inside the block. Outputs and gradients equal the unsharded model's, also when the block
    is recomputed by activation checkpointing, and nothing the blocks made is served after the step."""
    from doran_lightning.adapters import inject, step
    from doran_lightning.sharding import repeated_blocks

    torch.manual_seed(0)
    base = build().double()
    if checkpointing is not None:
        checkpointing(base)
    reference = apply_adapters(base, AdapterConfig(method="doran", r=4)).train()
    model = copy.deepcopy(reference)
    blocks = repeated_blocks(model)
    inject.add_block_passes(model, blocks)
    cache = model._doran_step_cache
    passes: list[int] = []
    batched = step.compute_step
    monkeypatch.setattr(step, "compute_step", lambda layers, training: passes.append(len(layers)) or batched(layers, training))
    in_block = {"depth": 0}
    for block in blocks:  # W0 is "whole" only inside a block, as under FSDP2
        block.register_forward_pre_hook(lambda *a: in_block.update(depth=in_block["depth"] + 1), prepend=True)
        block.register_forward_hook(lambda *a: in_block.update(depth=in_block["depth"] - 1))
    monkeypatch.setattr(step, "_whole", lambda layer: in_block["depth"] > 0)
    for candidate in (model, reference):
        run(candidate, make_input()).pow(2).sum().backward()
    per_block = len(adapted_modules(model)) // len(blocks)
    assert passes[:len(blocks)] == [per_block] * len(blocks)  # one pass per block, over all its projections
    with torch.no_grad():  # an optimizer step: what the blocks made is stale and must not be served
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.0)
    assert all(cache.current(slot) is None for slot in range(len(cache.layers)))
    for (name, got), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        if expected.requires_grad:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_modules_declare_their_adapter_tensors() -> None:
    model = apply_adapters(tiny_vit(), AdapterConfig(method="doran", r=4, trainable_modules=["head"]))
    roles = adapter_roles(model)
    names = {parameter: name for name, parameter in model.named_parameters()}
    by_role = {role: sorted(names[p].rsplit(".", 1)[-1] for p, r in roles.items() if r == role) for role in GROUP_OF_ROLE}
    assert set(by_role["magnitude"]) == {"magnitude"} and set(by_role["sigma"]) == {"rho"}
    assert not by_role["lora"]  # generated A/B: the generators' parameters carry them
    assert {"seed_A", "seed_B", "weight", "bias"} == set(by_role["generator"])
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert trainable - set(roles) == set(model.head.parameters())  # only trainable_modules are undeclared
    assert count_parameters(model)["other_trainable"] == sum(p.numel() for p in model.head.parameters())


def test_reset_magnitudes_is_deprecated_and_still_works() -> None:
    from doran_lightning.adapters import reset_magnitudes

    model = apply_adapters(tiny_bert(), AdapterConfig(method="dora", r=4))
    layer = next(iter(adapted_modules(model).values()))
    with torch.no_grad():
        layer.adapters["main"].magnitude.zero_()
    with pytest.warns(DeprecationWarning, match="layer.reset_magnitude"):
        reset_magnitudes(model)
    torch.testing.assert_close(layer.adapters["main"].magnitude, layer.weight.detach().norm(dim=1))
