"""The synthetic world of the teacher–student benchmark (`teacher_student.py`, METHOD.md §7).

One world per seed: two frozen random attention blocks in sequence (q, k, v, o without bias; the first maps all T
tokens, h = x + attn_1(x), the second reads out token 0), a teacher update ΔW_{ℓ,t} of rank r on q and v of
both blocks, inputs x ~ N(0, 1) and targets = teacher readout + Gaussian noise. Teachers (ours):

- ``control``: A_{ℓ,t}, B_{ℓ,t} Gaussian and independent for each (block ℓ, projection t): nothing is shared.
- ``block``: in each block, ΔW_{ℓ,t} = U_B,ℓ K_{ℓ,t} U_A,ℓᵀ with U_A,ℓ, U_B,ℓ [d, r] shared by q and v, and
  its own r×r core K_{ℓ,t}: the block layout's structure (``aux_layout: features``, ``aux_scope: block``).
- ``layers``: ΔW_{ℓ,t} = U_B K_{ℓ,t} U_Aᵀ with one U_A, U_B for both blocks: the across-layer layout's
  structure (``aux_layout: features``, ``aux_scope: model``).

Every ΔW is rescaled to ‖ΔW‖_F = `update_scale` · ‖W0‖_F (a scalar, absorbed in the core): every teacher has the
same rank and norm. Students are the project's adapters (`Population`: one adapted two-block network per seed, each
its own `apply_adapters` root, so that an across-layer generator serves one seed's blocks only). The training
forward (`readout`) is `AdaptedLinear.forward`'s formula g ⊙ (x W0ᵀ + s·(x Aᵀ) Bᵀ), batched over the seeds, with
each step's (A, B, g) read from the real adapted layers (`step_values`); `loop_forward` runs the modules and the
tests hold the two equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from doran_lightning.adapters import AdapterConfig, adapted_modules, apply_adapters

TEACHERS = ("control", "block", "layers")
PROJECTIONS = ("q", "v")
# The students: name -> variant label (`AdapterConfig.from_variant`). doran-block / doran-layers are the feature
# layouts of issue 39; each is the positive control of the teacher written in its own structure.
STUDENTS = {"lora": "lora", "dora": "dora", "doran": "doran", "doran-block": "doran-features",
            "doran-layers": "doran-features-model"}
POSITIVE_CONTROLS = {"doran-block": "block", "doran-layers": "layers"}
DTYPE = torch.float64  # the stopping test reads gradients near 1e-9: float32's rounding would decide it


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of one world (every seed's world has these)."""

    d_model: int = 16
    tokens: int = 4
    layers: int = 2
    rank: int = 4
    update_scale: float = 0.2  # ‖ΔW‖_F / ‖W0‖_F of every teacher update
    noise_std: float = 0.05  # std of the target noise
    held_out: int = 1024


Key = tuple[int, str]  # (block, projection)


@dataclass
class World:
    """One seed's frozen blocks, teacher update and data (nested: a run on n samples uses the first n)."""

    frozen: list[dict[str, Tensor]]  # per block: q, k, v, o [d, d]
    update: dict[Key, Tensor]  # ΔW [d, d] per (block, projection)
    inputs: Tensor  # [n_max, T, d]
    targets: Tensor  # [n_max, d] (teacher readout + noise)
    test_inputs: Tensor  # [held_out, T, d]
    test_clean: Tensor  # [held_out, d] teacher readout without noise
    test_frozen: Tensor  # [held_out, d] frozen network's readout


def keys(spec: WorldSpec) -> list[Key]:
    return [(layer, t) for layer in range(spec.layers) for t in PROJECTIONS]


def mix(scores: Tensor) -> Tensor:
    """Attention weights from scores [..., T]: (1 + score) / T, softmax linearised at uniform attention. Through a
    softmax the query update was weakly identified (only score differences act, and they saturate) and L-BFGS
    crept on for thousands of evaluations; plain linear weights (score / T) make the readout bilinear in q and v,
    so DoRA's magnitudes could trade a factor c on q for 1/c on v unseen (an exactly flat direction of the merged
    updates); sigmoid weights damp the query's effect until its update is barely identified. The constant term
    fixes v's scale on its own."""
    return (1.0 + scores) / scores.shape[-1]


def network_readout(x: Tensor, weights: list[dict[str, Tensor]]) -> Tensor:
    """The readout [..., d] of the two-block network with plain weights, for inputs x [..., T, d]."""
    scale = 1.0 / math.sqrt(x.shape[-1])
    for block in weights[:-1]:
        scores = (x @ block["q"].T) @ (x @ block["k"].T).transpose(-1, -2) * scale
        x = x + mix(scores) @ (x @ block["v"].T) @ block["o"].T
    last = weights[-1]
    scores = ((x[..., :1, :] @ last["q"].T) @ (x @ last["k"].T).transpose(-1, -2)) * scale
    return (mix(scores) @ (x @ last["v"].T))[..., 0, :] @ last["o"].T


def _orthogonal(d: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    return q


def teacher_updates(kind: str, spec: WorldSpec, frozen: list[dict[str, Tensor]], gen: torch.Generator) -> dict[Key, Tensor]:
    """{(block, projection): ΔW} of one teacher (module docstring), rescaled to the common norm."""
    d, r = spec.d_model, spec.rank
    if kind not in TEACHERS:
        raise ValueError(f"teacher {kind!r} is unknown; choose one of {', '.join(TEACHERS)}")

    def gaussian(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=DTYPE)

    shared = (gaussian(d, r), gaussian(d, r))  # the across-layer factors (U_A, U_B)
    updates = {}
    for layer in range(spec.layers):
        if kind == "block":
            shared = (gaussian(d, r), gaussian(d, r))
        for t in PROJECTIONS:
            if kind == "control":
                delta = gaussian(d, r) @ gaussian(r, d)
            else:
                factor_A, factor_B = shared
                delta = factor_B @ gaussian(r, r) @ factor_A.T
            weight = frozen[layer][t]
            updates[(layer, t)] = delta * (spec.update_scale * weight.norm() / delta.norm())
    return updates


def make_world(kind: str, seed: int, n_max: int, spec: WorldSpec) -> World:
    """The world of one seed; the frozen blocks, inputs and noise depend on the seed only, not on the teacher, so the
    teachers are compared on the same networks and data."""
    def stream(part: int) -> torch.Generator:  # one stream per part: sample i is the same whatever n_max is
        return torch.Generator().manual_seed(1_000_003 * seed + 17 + 7 * part)

    d, tokens = spec.d_model, spec.tokens
    gen = stream(0)
    frozen = []
    for _ in range(spec.layers):
        block = {name: torch.randn(d, d, generator=gen, dtype=DTYPE) / math.sqrt(d) for name in ("q", "k", "v")}
        block["o"] = _orthogonal(d, gen)
        frozen.append(block)
    inputs = torch.randn(n_max, tokens, d, generator=stream(1), dtype=DTYPE)
    noise = torch.randn(n_max, d, generator=stream(2), dtype=DTYPE) * spec.noise_std
    test_inputs = torch.randn(spec.held_out, tokens, d, generator=stream(3), dtype=DTYPE)
    update = teacher_updates(kind, spec, frozen, torch.Generator().manual_seed(7_919 * seed + TEACHERS.index(kind) + 1))
    teacher = [{**block, **{t: block[t] + update[(layer, t)] for t in PROJECTIONS}} for layer, block in enumerate(frozen)]
    return World(frozen=frozen, update=update, inputs=inputs, targets=network_readout(inputs, teacher) + noise,
                 test_inputs=test_inputs, test_clean=network_readout(test_inputs, teacher),
                 test_frozen=network_readout(test_inputs, frozen))


def subspace_overlap(first: Tensor, second: Tensor, rank: int, side: str = "row") -> float:
    """Mean squared cosine of the principal angles between the top-`rank` row (or column) spaces of two matrices:
    1 when they share the subspace, about rank/d for unrelated random subspaces."""
    u1, _, v1 = torch.linalg.svd(first)
    u2, _, v2 = torch.linalg.svd(second)
    basis1, basis2 = (v1[:rank].T, v2[:rank].T) if side == "row" else (u1[:, :rank], u2[:, :rank])
    return float(torch.linalg.svdvals(basis1.T @ basis2).pow(2).mean())


class Block(nn.Module):
    """A frozen attention block whose q and v the adapters wrap (k and o stay plain)."""

    def __init__(self, frozen: dict[str, Tensor]) -> None:
        super().__init__()
        d = frozen["q"].shape[0]
        for name in ("q", "k", "v", "o"):
            linear = nn.Linear(d, d, bias=False, dtype=DTYPE)
            linear.weight.data.copy_(frozen[name])
            setattr(self, name, linear)


class Network(nn.Module):
    """One seed's blocks through the (adapted) modules themselves: the reference `Population.forward` is tested
    against."""

    def __init__(self, frozen: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(block) for block in frozen)

    def forward(self, x: Tensor) -> Tensor:
        scale = 1.0 / math.sqrt(x.shape[-1])
        for block in self.blocks[:-1]:
            scores = block.q(x) @ block.k(x).transpose(-1, -2) * scale
            x = x + block.o(mix(scores) @ block.v(x))
        last = self.blocks[-1]
        scores = (last.q(x[..., :1, :]) @ last.k(x).transpose(-1, -2)) * scale
        return last.o((mix(scores) @ last.v(x))[..., 0, :])


def readout(x: Tensor, weights: list[dict[str, Tensor]], factors: dict[Key, tuple[Tensor, Tensor, Tensor]],
            scaling: float, first_q: Tensor, first_k: Tensor, first_v: Tensor) -> Tensor:
    """Readouts [K, n, d] of K networks (weights [K, d, d], factors A [K, r, d], B [K, d, r], g [K, d]) for inputs
    x [K, n, T, d], each adapted projection as g ⊙ (h W0ᵀ + s·(h Aᵀ) Bᵀ); the first block's frozen products
    (first_q/k/v = x W0ᵀ) are precomputed. The last block's values are mixed before they are projected (Σ p_t W h_t
    = W Σ p_t h_t), so only its query token and keys are projected per token."""
    K, n, T, d = x.shape
    scale = 1.0 / math.sqrt(d)

    def adapted(h: Tensor, base: Tensor, key: Key) -> Tensor:  # h, base: [K, m, d]
        lora_A, lora_B, g = factors[key]
        low = torch.bmm(torch.bmm(h, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))
        return (base + scaling * low) * g.unsqueeze(1)

    flat = x.reshape(K, n * T, d)
    queries = adapted(flat, first_q, (0, "q")).view(K, n, T, d)
    values = adapted(flat, first_v, (0, "v")).view(K, n, T, d)
    attention = mix(queries @ first_k.view(K, n, T, d).transpose(-1, -2) * scale)
    mixed = (attention @ values).reshape(K, n * T, d)
    h = x + torch.bmm(mixed, weights[0]["o"].transpose(1, 2)).view(K, n, T, d)
    last = weights[1]
    first = h[:, :, 0, :]
    query = adapted(first, torch.bmm(first, last["q"].transpose(1, 2)), (1, "q"))  # [K, n, d]
    keys_ = torch.bmm(h.reshape(K, n * T, d), last["k"].transpose(1, 2)).view(K, n, T, d)
    weights_t = mix((keys_ * query.unsqueeze(2)).sum(-1) * scale)  # [K, n, T]
    pooled = (weights_t.unsqueeze(-1) * h).sum(2)  # [K, n, d]
    value = adapted(pooled, torch.bmm(pooled, last["v"].transpose(1, 2)), (1, "v"))
    return torch.bmm(value, last["o"].transpose(1, 2))


class Population(nn.Module):
    """K independent adapted networks (one per seed, each its own `apply_adapters` root) fitted as one batched
    problem. `forward` reads every adapted layer's step values (`AdaptedLinear.step_values`: generated A/B, norms,
    σ and m come from the library) and evaluates `readout`; `loop_forward` runs the modules network by network."""

    def __init__(self, worlds: list[World], spec: WorldSpec, student: str) -> None:
        super().__init__()
        if student not in STUDENTS:
            raise ValueError(f"student {student!r} is unknown; choose one of {', '.join(STUDENTS)}")
        if spec.layers != 2:
            raise ValueError(f"WorldSpec.layers: the batched readout is written for 2 blocks (got {spec.layers})")
        self.spec = spec
        self.networks = nn.ModuleList(Network(world.frozen) for world in worlds)
        # detach_norm off: the fit looks for the minimum of the training loss, so its gradient must be the loss's.
        extra = {} if student == "lora" else {"detach_norm": False}
        self.config = AdapterConfig.from_variant(STUDENTS[student], r=spec.rank, alpha=2.0 * spec.rank,
                                                 target_modules=list(PROJECTIONS), **extra)
        self.layers = []
        for network in self.networks:
            apply_adapters(network, self.config, bank=False)  # one root per seed: its generators serve it alone
            found = adapted_modules(network)
            self.layers.append({(layer, t): found[f"blocks.{layer}.{t}"] for layer, t in keys(spec)})
        self.weights = [{name: torch.stack([getattr(net.blocks[layer], name).weight for net in self.networks]).detach()
                         for name in ("q", "k", "v", "o")} for layer in range(spec.layers)]

    @torch.no_grad()
    def prepare(self, x: Tensor) -> dict[str, Tensor]:
        """The first block's frozen products of inputs x [K, n, T, d], reused by every step."""
        K, n, T, d = x.shape
        flat = x.reshape(K, n * T, d)
        products = {f"first_{name}": torch.bmm(flat, self.weights[0][name].transpose(1, 2)) for name in ("q", "k", "v")}
        return {"x": x, **products}

    def factors(self) -> dict[Key, tuple[Tensor, Tensor, Tensor]]:
        """{(block, projection): (A [K, r, d], B [K, d, r], g [K, d])}, g ones for LoRA (x·1 is exact)."""
        out = {}
        for key in keys(self.spec):
            values = [layers[key].step_values() for layers in self.layers]
            lora_A, lora_B = torch.stack([a for a, _, _ in values]), torch.stack([b for _, b, _ in values])
            g = (lora_A.new_ones(lora_A.shape[0], lora_B.shape[1]) if values[0][2] is None
                 else torch.stack([g for _, _, g in values]))
            out[key] = (lora_A, lora_B, g)
        return out

    def forward(self, data: dict[str, Tensor]) -> Tensor:
        return readout(data["x"], self.weights, self.factors(), self.config.scaling,
                       data["first_q"], data["first_k"], data["first_v"])

    def seed_parameters(self) -> list[list[nn.Parameter]]:
        """The trainable tensors of each seed's network (adapters and, for DoRAN, generators)."""
        return [[p for p in network.parameters() if p.requires_grad] for network in self.networks]

    def loop_forward(self, x: Tensor) -> Tensor:
        """The same readouts from the real modules, one network at a time."""
        return torch.stack([network(x[i]) for i, network in enumerate(self.networks)])

    @torch.no_grad()
    def merged_updates(self) -> dict[Key, Tensor]:
        """{(block, projection): [K, d, d]} the effective ΔW = merged weight − W0 of every network."""
        return {key: torch.stack([layers[key].merged_weight() - layers[key].weight for layers in self.layers])
                for key in keys(self.spec)}
