"""Speed and memory of LoRA / DoRA / DoRAN (ours) against full fine-tuning and HF PEFT, side by side.

For each backbone (a ViT-B/16-shaped timm ViT, a BERT-base-shaped encoder; random weights) and rank:

* train step (forward + backward + AdamW step) of every variant, interleaved A B C … C B A … so that
  drift in a shared machine's load hits every variant alike; medians and inter-quartile ranges, and
  ratios taken *per round* (paired neighbours) then summarised by their median;
* peak memory of one train step: CUDA ``max_memory_allocated`` above the pre-model baseline; on CPU a
  proxy = bytes of parameters + buffers + gradients + optimizer state + the activations autograd holds
  at the forward/backward boundary (tensors saved via ``saved_tensors_hooks`` still alive then,
  de-duplicated by storage, excluding parameter storages);
* one adapted layer's forward + backward at a realistic batch × tokens (input requires grad, as
  inside a network), plus a bare frozen Linear and a fully trainable Linear as references;
* eval forward of bare backbone vs DoRAN unmerged / merged / merged-and-unloaded;
* statistics-logging overhead: ``adapter_statistics`` every ``--stats-every`` steps and
  ``adapter_histograms`` every 10× that (the training callback's defaults), relative to a step;
* optionally ``torch.compile`` (mode default) of the DoRAN model and bf16 autocast.

Our adapters target ViT ``qkv[q,v]`` (two fused row slices) and BERT ``query``/``value``; PEFT cannot
address slices of a fused Linear, so PEFT adapts the whole ViT ``qkv`` (3/2 of our adapted rows).

    python benchmarks/speed_memory.py --out benchmarks/results_cpu.json     # full CPU run (<10 min, 2 cores)
    python benchmarks/speed_memory.py --quick --out /tmp/quick.json         # tiny shapes, structure only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (doran_lightning, benchmarks)

from benchmarks import harness  # noqa: E402
from doran_lightning.adapters import adapter_histograms, adapter_statistics, merge_adapters  # noqa: E402

VARIANTS = (harness.FULL, *harness.OURS, *harness.PEFT)
COMPILED = "doran-compiled"
MODELS = ("vit", "bert")
HISTOGRAM_CADENCE_FACTOR = 10  # AdapterStatisticsLogger: histograms every 10x the scalar cadence
Batch = dict[str, Tensor]


# ---------------------------------------------------------------------- settings and backbones
@dataclass
class Settings:
    """Shapes and repeat counts of one benchmark run (defaults per device; --quick shrinks everything)."""

    device: str = "cpu"
    quick: bool = False
    models: Sequence[str] = MODELS
    ranks: Sequence[int] = (8, 32)
    steps: int = 12  # timed rounds per measurement (each round runs every variant once)
    warmup: int = 2
    batch: int = 2
    image_size: int = 112
    seq_len: int = 64
    layer_tokens: int = 1024  # batch × tokens of the per-layer measurement
    stats_every: int = 50
    compile: bool = False
    autocast: Optional[str] = None  # None | "bf16"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_device(cls, device: str, quick: bool) -> "Settings":
        if quick:
            return cls(device=device, quick=True, ranks=(4,), steps=2, warmup=1, batch=2, image_size=32,
                       seq_len=16, layer_tokens=64)
        if device == "cuda":
            return cls(device=device, steps=30, warmup=5, batch=32, image_size=224, seq_len=128,
                       layer_tokens=64 * 197)
        return cls(device=device, steps=10)


@dataclass
class Backbone:
    """How to build one backbone, feed it and target it (ours and PEFT's names)."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[Settings, torch.Generator], tuple[Batch, Tensor]]
    our_targets: list[str]
    peft_targets: list[str]
    head: str
    layer_path: str  # the adapted projection timed on its own (path suffix)


def _vit(settings: Settings) -> nn.Module:
    import timm

    shape = dict(embed_dim=64, depth=2, num_heads=2) if settings.quick else {}
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10,
                             img_size=settings.image_size, **shape)


def _bert(settings: Settings) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    shape = (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
             if settings.quick else {})
    # Dropout off, as in the adapters (lora_dropout 0): train-mode attention dropout pushes CPU SDPA onto its
    # slow math path, which made every BERT step ~5x slower without changing what is compared.
    return BertForSequenceClassification(BertConfig(num_labels=2, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, **shape))


def _vit_batch(settings: Settings, generator: torch.Generator) -> tuple[Batch, Tensor]:
    pixels = torch.randn(settings.batch, 3, settings.image_size, settings.image_size, generator=generator)
    return {"pixel_values": pixels}, torch.randint(0, 10, (settings.batch,), generator=generator)


def _bert_batch(settings: Settings, generator: torch.Generator) -> tuple[Batch, Tensor]:
    vocab = 1000 if settings.quick else 30522
    ids = torch.randint(0, vocab, (settings.batch, settings.seq_len), generator=generator)
    return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            torch.randint(0, 2, (settings.batch,), generator=generator))


def backbone(name: str, settings: Settings) -> Backbone:
    if name == "vit":
        return Backbone("vit", lambda: _vit(settings), _vit_batch, ["qkv[q,v]"], ["qkv"], "head", "blocks.0.attn.qkv")
    if name == "bert":
        return Backbone("bert", lambda: _bert(settings), _bert_batch, ["query", "value"], ["query", "value"],
                        "classifier", "encoder.layer.0.attention.self.query")
    raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (the generator bank drops its non-leaf A/B of the last forward when copied)."""
    return copy.deepcopy(model)


def logits(model: nn.Module, batch: Batch) -> Tensor:
    """Main output of a timm model (positional pixels) or a HF / PEFT-wrapped one (keyword inputs)."""
    out = model(batch["pixel_values"]) if "pixel_values" in batch else model(**batch)
    return out.logits if hasattr(out, "logits") else out


def build_variant(variant: str, base: nn.Module, spec: Backbone, rank: int) -> nn.Module:
    """A fresh copy of `base` prepared for `variant` (head trainable in every variant)."""
    return harness.adapted_copy(variant, base, rank, spec.our_targets, [spec.head], spec.peft_targets)


# ---------------------------------------------------------------------- timing
def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if settings.autocast != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device, dtype=torch.bfloat16)


def interleaved(tasks: dict[str, Callable[[], Any]], settings: Settings) -> dict[str, list[float]]:
    """Seconds per call of every task, in interleaved rounds (harness.interleaved) with this run's counts."""
    return harness.interleaved(tasks, settings.steps, settings.warmup, settings.device)


# ---------------------------------------------------------------------- one (backbone, rank) cell
@dataclass
class Prepared:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], Tensor]
    step: Callable[[], None]


def prepare(model: nn.Module, batch: Batch, labels: Tensor, settings: Settings) -> Prepared:
    model.to(settings.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def loss() -> Tensor:
        with autocast(settings):
            return F.cross_entropy(logits(model, batch).float(), labels)

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Prepared(model, optimizer, loss, step)


def measure_memory(prepared: Prepared, settings: Settings, baseline: int) -> dict[str, int]:
    prepared.step()  # optimizer state now exists
    proxy = harness.memory_proxy(prepared.model, prepared.optimizer, prepared.loss)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        prepared.step()
        proxy["cuda_peak"] = torch.cuda.max_memory_allocated() - baseline
    proxy["peak"] = proxy.get("cuda_peak", proxy["total"])
    return proxy


def find_layer(model: nn.Module, path: str) -> nn.Module:
    for name, module in model.named_modules():
        if name == path or name.endswith("." + path):
            return module
    raise KeyError(f"no module named {path!r} in {type(model).__name__}")


def shared_projections(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The adapted projections of `model` shaped like `layer`: those whose norms and g (and A/B) our DoRA and DoRAN
    make in the step's one batched pass (`StepCache`)."""
    from doran_lightning.adapters.layer import AdaptedLinear

    return [m for m in model.modules() if isinstance(m, AdaptedLinear)
            and (m.in_features, m.out_features) == (layer.in_features, layer.out_features)]


def layer_task(layers: list[nn.Module], owner: nn.Module, tokens: int, settings: Settings,
               step_cache: Any = None) -> Callable[[], None]:
    """Forward + backward of `layers` (projections of one shape) on one [tokens, d_in] input that requires grad,
    after `step_cache.generate()` when given; `owner` holds every tensor they train. With several layers sharing a
    step's batched pass, the time divided by their number is one projection's share of a real step (timing the
    pass for one layer alone would charge it the whole model's)."""
    first = layers[0]
    x = torch.randn(tokens, first.in_features, device=settings.device, requires_grad=True)
    grad_out = torch.randn(tokens, first.out_features, device=settings.device)
    trainable = [p for p in owner.parameters() if p.requires_grad]

    def run() -> None:
        if step_cache is not None:
            step_cache.generate()  # a new step's batched pass (the model's forward hook does this)
        with autocast(settings):
            outs = [layer(x) for layer in layers]
        torch.autograd.backward(outs, [grad_out.to(out.dtype) for out in outs])
        x.grad = None
        for parameter in trainable:
            parameter.grad = None

    return run


def check_identity(models: dict[str, nn.Module], bare: nn.Module, batch: Batch) -> dict[str, float]:
    """Max |output − bare backbone output| at initialisation (ΔW = 0): every variant computes the same model."""
    with torch.no_grad():
        bare.eval()
        reference = logits(bare, batch)
        result = {}
        for name, model in models.items():
            model.eval()
            result[name] = (logits(model, batch) - reference).abs().max().item()
            model.train()
    return result


def bench_cell(spec: Backbone, rank: int, base: nn.Module, settings: Settings) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(rank)
    batch, labels = spec.make_batch(settings, generator)
    batch = {key: value.to(settings.device) for key, value in batch.items()}
    labels = labels.to(settings.device)
    prepared: dict[str, Prepared] = {}
    memory: dict[str, dict[str, int]] = {}
    for variant in VARIANTS:
        harness.synchronize(settings.device)
        baseline = torch.cuda.memory_allocated() if settings.device == "cuda" else 0
        torch.manual_seed(0)
        prepared[variant] = prepare(build_variant(variant, base, spec, rank), batch, labels, settings)
        memory[variant] = measure_memory(prepared[variant], settings, baseline)
    bare = copy.deepcopy(base).to(settings.device)
    # Built fresh (optimizer steps above moved B, so the trained copies no longer equal the backbone).
    fresh = {v: build_variant(v, base, spec, rank).to(settings.device) for v in VARIANTS if v != "full"}
    identity = check_identity(fresh, bare, batch)
    del fresh

    tasks = {variant: p.step for variant, p in prepared.items()}
    if settings.compile:
        compiled = clone(prepared["doran"].model)
        compiled.forward = torch.compile(compiled.forward)  # type: ignore[method-assign]
        tasks[COMPILED] = prepare(compiled, batch, labels, settings).step
    train_step = harness.summarize(interleaved(tasks, settings), ("lora", "peft-dora"))

    layer_tasks, shares = {}, {}
    for v, p in prepared.items():
        if v == "full":
            continue
        layer = find_layer(p.model, spec.layer_path)
        # Our DoRA/DoRAN make norms, g (and DoRAN's A/B) once per step for all projections (`StepCache`).
        if getattr(layer, "_cache", None) is not None and (layer.generator is not None or layer.rescale is not None):
            shared = shared_projections(p.model, layer)
            layer_tasks[v] = layer_task(shared, p.model, settings.layer_tokens, settings, step_cache=layer._cache)
            shares[v] = len(shared)
        else:
            layer_tasks[v] = layer_task([layer], layer, settings.layer_tokens, settings)
    for name, trained in (("frozen-linear", False), ("full", True)):
        reference = copy.deepcopy(find_layer(bare, spec.layer_path)).requires_grad_(trained)
        layer_tasks[name] = layer_task([reference], reference, settings.layer_tokens, settings)
    layer_times = interleaved(layer_tasks, settings)
    for v, count in shares.items():  # one projection's share of the step's shared pass (see layer_task)
        layer_times[v] = [seconds / count for seconds in layer_times[v]]
    per_layer = harness.summarize(layer_times, ("lora", "peft-dora"))

    result = {"train_step": train_step, "memory": memory, "per_layer": per_layer, "init_max_abs_diff": identity,
              **bench_eval(prepared["doran"].model, bare, batch, settings),
              "stats_overhead": bench_stats(prepared["doran"], train_step["doran"]["seconds"]["median"], settings)}
    for variant in list(prepared):
        del prepared[variant]
    return result


def bench_eval(model: nn.Module, bare: nn.Module, batch: Batch, settings: Settings) -> dict[str, Any]:
    """Eval forward: bare backbone vs DoRAN unmerged, merged (reversible) and merged + unloaded."""
    unmerged = clone(model).eval()
    merged = merge_adapters(clone(model).eval())
    unloaded = merge_adapters(clone(model).eval(), unload=True)
    candidates = {"bare": bare.eval(), "doran-unmerged": unmerged, "doran-merged": merged, "doran-unloaded": unloaded}

    def forward(candidate: nn.Module) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad(), autocast(settings):
                return logits(candidate, batch)
        return run

    outputs = {name: forward(candidate)() for name, candidate in candidates.items()}
    difference = {name: (out - outputs["doran-unmerged"]).abs().max().item()
                  for name, out in outputs.items() if name.startswith("doran-")}
    times = interleaved({name: forward(candidate) for name, candidate in candidates.items()}, settings)
    return {"eval": harness.summarize(times, ("bare",)), "merge_max_abs_diff": difference}


def bench_stats(prepared: Prepared, step_seconds: float, settings: Settings) -> dict[str, float]:
    """Cost of the training callback's statistics at its default cadence, as a fraction of a step."""
    prepared.loss().backward()  # gradients present, as when the callback runs after a step

    def scalars() -> None:
        stats = adapter_statistics(prepared.model)
        torch.stack([value for per in stats.values() for value in per.values()]).tolist()  # what logging costs

    def histograms() -> None:
        for per in adapter_histograms(prepared.model).values():
            [value.tolist() for value in per.values()]

    times = interleaved({"scalars": scalars, "histograms": histograms}, settings)
    prepared.optimizer.zero_grad(set_to_none=True)
    scalar_s = statistics.median(times["scalars"])
    histogram_s = statistics.median(times["histograms"])
    per_step = scalar_s / settings.stats_every + histogram_s / (settings.stats_every * HISTOGRAM_CADENCE_FACTOR)
    return {"scalars_seconds": scalar_s, "histograms_seconds": histogram_s, "every_n_steps": settings.stats_every,
            "overhead_fraction": per_step / step_seconds}


# ---------------------------------------------------------------------- targets and report
def target_checks(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (harness.TARGETS) this cell measures, each with its paired median ratio."""
    step, layer, memory = cell["train_step"], cell["per_layer"], cell["memory"]
    measured = {f"{measure}:{name}/{reference}": entries[name][f"ratio_vs_{reference}"]["median"]
                for measure, entries in (("step", step), ("layer", layer))
                for name, reference in (("dora", "lora"), ("doran", "lora"), ("dora", "peft-dora"),
                                        ("doran", "peft-dora"))}
    measured["memory:doran/peft-dora"] = memory["doran"]["peak"] / memory["peft-dora"]["peak"]
    measured["eval:doran-merged/bare"] = cell["eval"]["doran-merged"]["ratio_vs_bare"]["median"]
    measured["stats:statistics/step"] = cell["stats_overhead"]["overhead_fraction"]
    return harness.check_targets(measured, ("step", "layer", "memory", "eval", "stats"))


def markdown(results: dict[str, Any]) -> str:
    """Tables of one run: per (model, rank) train step, per-layer, memory, eval, stats, targets."""
    lines: list[str] = []
    for model_name, by_rank in results["results"].items():
        for rank, cell in by_rank.items():
            lines += [f"### {model_name}, r = {rank}", "",
                      "| variant | step ms (IQR) | step ×LoRA | step ×PEFT-DoRA | layer ms | layer ×LoRA | "
                      "layer ×PEFT-DoRA | memory MiB | mem ×LoRA | mem ×PEFT-DoRA |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            memory = cell["memory"]
            for variant, step in cell["train_step"].items():
                seconds = step["seconds"]
                layer = cell["per_layer"].get(variant, {})
                layer_ms = f"{layer['seconds']['median'] * 1e3:.2f}" if layer else "–"
                peak = memory.get(variant, {}).get("peak")
                mem = f"{peak / 2**20:.0f}" if peak else "–"
                mem_lora = f"{peak / memory['lora']['peak']:.3f}" if peak else "–"
                mem_peft = f"{peak / memory['peft-dora']['peak']:.3f}" if peak else "–"
                lines.append(f"| {variant} | {seconds['median'] * 1e3:.0f} ({seconds['q25'] * 1e3:.0f}–"
                             f"{seconds['q75'] * 1e3:.0f}) | {harness.ratio_text(step, 'lora')} | "
                             f"{harness.ratio_text(step, 'peft-dora')} | {layer_ms} | {harness.ratio_text(layer, 'lora')} | "
                             f"{harness.ratio_text(layer, 'peft-dora')} | {mem} | {mem_lora} | {mem_peft} |")
            for reference in ("frozen-linear",):
                layer = cell["per_layer"][reference]
                lines.append(f"| ({reference}) | – | – | – | {layer['seconds']['median'] * 1e3:.2f} | "
                             f"{harness.ratio_text(layer, 'lora')} | {harness.ratio_text(layer, 'peft-dora')} | – | – | – |")
            evals = ", ".join(f"{name} {entry['seconds']['median'] * 1e3:.0f} ms (×bare {harness.ratio_text(entry, 'bare')})"
                              for name, entry in cell["eval"].items())
            stats = cell["stats_overhead"]
            lines += ["", f"Eval forward: {evals}.",
                      f"Statistics: {stats['scalars_seconds'] * 1e3:.1f} ms per call, histograms "
                      f"{stats['histograms_seconds'] * 1e3:.1f} ms; every {stats['every_n_steps']} steps that is "
                      f"{stats['overhead_fraction'] * 100:.2f} % of a DoRAN step.", "",
                      harness.target_table(cell["targets"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]]) -> tuple[Settings, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (checks structure only)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, help="adapter ranks (default 8 32; quick: 4)")
    parser.add_argument("--steps", type=int, help="timed rounds per measurement (default cpu 10, cuda 30)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--batch", type=int, help="train/eval batch size (default cpu 2, cuda 32)")
    parser.add_argument("--image-size", type=int, help="ViT input side (default cpu 112, cuda 224)")
    parser.add_argument("--seq-len", type=int, help="BERT tokens per sample (default cpu 64, cuda 128)")
    parser.add_argument("--layer-tokens", type=int, help="batch×tokens of the per-layer measurement")
    parser.add_argument("--stats-every", type=int, help="statistics cadence in steps (default 50)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile (mode default) DoRAN row")
    parser.add_argument("--autocast", choices=("bf16",), help="run every step under bf16 autocast")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    settings = Settings.for_device(args.device, args.quick)
    settings.models = args.models
    overrides = {"ranks": args.ranks, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                 "image_size": args.image_size, "seq_len": args.seq_len, "layer_tokens": args.layer_tokens,
                 "stats_every": args.stats_every}
    for name, value in overrides.items():
        if value is not None:
            if (min(value) if isinstance(value, list) else value) < (0 if name == "warmup" else 1):
                parser.error(f"--{name.replace('_', '-')}: must be positive, got {value}")
            setattr(settings, name, tuple(value) if isinstance(value, list) else value)
    settings.compile, settings.autocast = args.compile, args.autocast
    if args.threads:
        torch.set_num_threads(args.threads)
    return settings, args.out


def run(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": harness.machine_description(settings.device),
                               "settings": {k: v for k, v in vars(settings).items() if k != "extra"},
                               "results": {}}
    started = time.perf_counter()
    for model_name in settings.models:
        spec = backbone(model_name, settings)
        torch.manual_seed(0)
        base = spec.build().eval()
        results["results"][model_name] = {}
        for rank in settings.ranks:
            cell = bench_cell(spec, rank, base, settings)
            cell["targets"] = target_checks(cell)
            results["results"][model_name][str(rank)] = cell
            partial = {"results": {model_name: {str(rank): cell}}}
            print(f"[{time.perf_counter() - started:.0f}s] {model_name} r={rank} done\n{markdown(partial)}",
                  file=sys.stderr, flush=True)
    results["wall_seconds"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        results["machine"]["load_average_end"] = os.getloadavg()
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    settings, out = parse_args(argv)
    results = run(settings)
    print(markdown(results))
    harness.save_results(results, out)
    return results


if __name__ == "__main__":
    main()
