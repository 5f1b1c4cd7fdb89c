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
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from doran_lightning.adapters import (
    AdapterConfig,
    adapter_histograms,
    adapter_statistics,
    apply_adapters,
    merge_adapters,
)

OUR_VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "doran": {"method": "doran"},
    "doran-noise": {"method": "doran", "aux": False},
    "doran-aux": {"method": "doran", "noise": False},
}
PEFT_VARIANTS = {"peft-lora": False, "peft-dora": True}  # variant -> use_dora
VARIANTS = ("full", *OUR_VARIANTS, *PEFT_VARIANTS)
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
    model = copy.deepcopy(base)
    if variant == "full":
        return model.requires_grad_(True)
    if variant in OUR_VARIANTS:
        cfg = AdapterConfig(r=rank, alpha=2.0 * rank, target_modules=spec.our_targets,
                            trainable_modules=[spec.head], **OUR_VARIANTS[variant])
        return apply_adapters(model, cfg)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=spec.peft_targets,
                     use_dora=PEFT_VARIANTS[variant], modules_to_save=[spec.head])
    return get_peft_model(model, cfg)


# ---------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if settings.autocast != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device, dtype=torch.bfloat16)


def interleaved(tasks: dict[str, Callable[[], Any]], settings: Settings) -> dict[str, list[float]]:
    """Seconds per call of every task, run in rounds (forward order, then reversed) after warm-up."""
    for _ in range(settings.warmup):
        for task in tasks.values():
            task()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for round_index in range(settings.steps):
        for name in names if round_index % 2 == 0 else names[::-1]:
            synchronize(settings.device)
            start = time.perf_counter()
            tasks[name]()
            synchronize(settings.device)
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "q25": ordered[0], "q75": ordered[0]}
    q25, median, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": median, "q25": q25, "q75": q75}


def summarize(times: dict[str, list[float]], references: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median/IQR seconds per task and paired per-round ratios against each reference task present."""
    summary: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        entry: dict[str, Any] = {"seconds": quartiles(values), "n": len(values)}
        for reference in references:
            if reference in times:
                ratios = [value / ref for value, ref in zip(values, times[reference])]
                entry[f"ratio_vs_{reference}"] = quartiles(ratios)
        summary[name] = entry
    return summary


# ---------------------------------------------------------------------- memory
def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _unique_bytes(tensors: Iterator[Tensor], exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    seen: dict[int, int] = {}
    for tensor in tensors:
        key = _storage_key(tensor)
        if key not in exclude and key != 0:
            seen[key] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    for state in optimizer.state.values():
        yield from (value for value in state.values() if isinstance(value, Tensor) and value.dim() > 0)


def memory_proxy(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor]) -> dict[str, int]:
    """One train step's bytes: persistent (params, buffers, grads, optimizer state) + live saved activations.

    Call after at least one step so that the optimizer state exists.
    """
    saved: list[weakref.ref] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    parameters = list(model.parameters()) + list(model.buffers())
    persistent_keys = {_storage_key(t) for t in parameters}
    alive = (ref() for ref in saved)
    activations = _unique_bytes((t for t in alive if t is not None), exclude=persistent_keys)
    loss.backward()
    weights = _unique_bytes(iter(parameters))
    grads = _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = _unique_bytes(_optimizer_tensors(optimizer))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"weights": weights, "grads": grads, "optimizer_state": state, "activations": activations,
            "total": weights + grads + state + activations}


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
    proxy = memory_proxy(prepared.model, prepared.optimizer, prepared.loss)
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


def layer_task(layer: nn.Module, tokens: int, settings: Settings) -> Callable[[], None]:
    """Forward + backward of one projection on [tokens, d_in] input that requires grad."""
    in_features = layer.in_features
    out_features = layer.out_features
    generator = getattr(layer, "generator", None)
    bank = getattr(layer, "_bank", None)
    x = torch.randn(tokens, in_features, device=settings.device, requires_grad=True)
    grad_out = torch.randn(tokens, out_features, device=settings.device)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    if generator is not None:
        trainable += [p for p in generator.parameters() if p.requires_grad]

    def run() -> None:
        if generator is not None:
            bank.generate()  # a new step regenerates A/B (the model's forward hook does this)
        with autocast(settings):
            out = layer(x)
        out.backward(grad_out.to(out.dtype))
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
        synchronize(settings.device)
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
    train_step = summarize(interleaved(tasks, settings), ("lora", "peft-dora"))

    layer_tasks = {v: layer_task(find_layer(p.model, spec.layer_path), settings.layer_tokens, settings)
                   for v, p in prepared.items() if v != "full"}
    reference = find_layer(bare, spec.layer_path)
    layer_tasks["frozen-linear"] = layer_task(copy.deepcopy(reference).requires_grad_(False), settings.layer_tokens,
                                              settings)
    layer_tasks["full"] = layer_task(copy.deepcopy(reference).requires_grad_(True), settings.layer_tokens, settings)
    per_layer = summarize(interleaved(layer_tasks, settings), ("lora", "peft-dora"))

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
    return {"eval": summarize(times, ("bare",)), "merge_max_abs_diff": difference}


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
    """The issue's targets, each as {target, value, limit, met} (ratios are paired medians)."""
    step, layer, memory = cell["train_step"], cell["per_layer"], cell["memory"]
    checks = [
        ("per-layer DoRAN / our LoRA", layer["doran"]["ratio_vs_lora"]["median"], 1.2),
        ("per-layer our DoRA / our LoRA", layer["dora"]["ratio_vs_lora"]["median"], 1.15),
        ("per-layer DoRAN / PEFT DoRA", layer["doran"]["ratio_vs_peft-dora"]["median"], 0.75),
        ("per-layer our DoRA / PEFT DoRA", layer["dora"]["ratio_vs_peft-dora"]["median"], 0.75),
        ("train step DoRAN / our LoRA", step["doran"]["ratio_vs_lora"]["median"], 1.05),
        ("train step DoRAN / PEFT DoRA", step["doran"]["ratio_vs_peft-dora"]["median"], 1.0),
        ("peak memory DoRAN / PEFT DoRA", memory["doran"]["peak"] / memory["peft-dora"]["peak"], 1.0),
        ("eval merged / bare backbone", cell["eval"]["doran-merged"]["ratio_vs_bare"]["median"], 1.02),
        ("stats overhead fraction of a step", cell["stats_overhead"]["overhead_fraction"], 0.03),
    ]
    return [{"target": name, "value": value, "limit": limit, "met": value <= limit} for name, value, limit in checks]


def _ratio(entry: dict[str, Any], key: str) -> str:
    ratio = entry.get(key)
    if ratio is None:
        return "–"
    return f"{ratio['median']:.2f} ({ratio['q25']:.2f}–{ratio['q75']:.2f})"


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
                             f"{seconds['q75'] * 1e3:.0f}) | {_ratio(step, 'ratio_vs_lora')} | "
                             f"{_ratio(step, 'ratio_vs_peft-dora')} | {layer_ms} | {_ratio(layer, 'ratio_vs_lora')} | "
                             f"{_ratio(layer, 'ratio_vs_peft-dora')} | {mem} | {mem_lora} | {mem_peft} |")
            for reference in ("frozen-linear",):
                layer = cell["per_layer"][reference]
                lines.append(f"| ({reference}) | – | – | – | {layer['seconds']['median'] * 1e3:.2f} | "
                             f"{_ratio(layer, 'ratio_vs_lora')} | {_ratio(layer, 'ratio_vs_peft-dora')} | – | – | – |")
            evals = ", ".join(f"{name} {entry['seconds']['median'] * 1e3:.0f} ms (×bare {_ratio(entry, 'ratio_vs_bare')})"
                              for name, entry in cell["eval"].items())
            stats = cell["stats_overhead"]
            lines += ["", f"Eval forward: {evals}.",
                      f"Statistics: {stats['scalars_seconds'] * 1e3:.1f} ms per call, histograms "
                      f"{stats['histograms_seconds'] * 1e3:.1f} ms; every {stats['every_n_steps']} steps that is "
                      f"{stats['overhead_fraction'] * 100:.2f} % of a DoRAN step.", "",
                      "| target | value | limit | met |", "|---|---|---|---|"]
            lines += [f"| {c['target']} | {c['value']:.3f} | {c['limit']} | {'yes' if c['met'] else 'NO'} |"
                      for c in cell["targets"]]
            lines.append("")
    return "\n".join(lines)


def machine_description(settings: Settings) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    description: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if settings.device == "cuda" else None,
    }
    for package in ("timm", "transformers", "peft"):
        with contextlib.suppress(ImportError):
            description[package] = __import__(package).__version__
    with contextlib.suppress(OSError):
        description["load_average_start"] = os.getloadavg()
    return description


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
    results: dict[str, Any] = {"machine": machine_description(settings),
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
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
