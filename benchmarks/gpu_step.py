"""Train-step cost on one GPU: ours vs HF PEFT, eager and compiled, fp32 and bf16 (the issue-10 targets).

One *section* per process, so a slow compile cannot cost the other sections their numbers
(`gpu_step.sh` runs them all with time limits, then `--summarize` prints the target table):

    python benchmarks/gpu_step.py --section eager-fp32 --out results/eager-fp32.json
    python benchmarks/gpu_step.py --section eager-bf16 | compiled-bf16 | llama-pair
    python benchmarks/gpu_step.py --summarize results/*.json
    python benchmarks/gpu_step.py --section llama-pair --pair-width 768 --pair-tokens 1024 --pair-rank 8   # CPU pair

Setting (as in the issue): BERT-base shape, random init, dropout 0, adapters on query+value, r = 8,
alpha = 16, batch 32 × 128 tokens, AdamW over the trainable tensors (classifier head included).
Every round runs each variant once, in forward order on even rounds and reversed on odd ones; a step
(forward, backward, optimizer step) is timed with CUDA events; ratios are taken per round against the
reference measured in the same round, then summarised by their median. Kernels per step are counted
with the profiler (CUDA kernel events of one step). `--quick` shrinks everything to run on a CPU in
seconds (structure only, for the tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doran_lightning.adapters import AdapterConfig, apply_adapters  # noqa: E402

OURS = {"lora": dict(method="lora"), "dora": dict(method="dora"), "doran": dict(method="doran"),
        "doran-noise": dict(method="doran", aux=False), "doran-aux": dict(method="doran", noise=False)}
SECTIONS = {
    "eager-fp32": (["lora", "dora", "doran", "doran-noise", "doran-aux", "peft-lora", "peft-dora"], "fp32", False),
    "eager-bf16": (["lora", "dora", "doran", "doran-noise", "doran-aux", "peft-lora", "peft-dora"], "bf16", False),
    "compiled-bf16": (["lora", "dora", "doran", "peft-dora"], "bf16", True),
}
# (target, section, numerator, denominator, bound)
TARGETS = [
    ("our DoRA / our LoRA, bf16 eager", "eager-bf16", "dora", "lora", 1.15),
    ("DoRAN / our LoRA, bf16 eager", "eager-bf16", "doran", "lora", 1.25),
    ("DoRAN / PEFT DoRA, bf16 eager", "eager-bf16", "doran", "peft-dora", 0.85),
    ("compiled DoRAN / our compiled LoRA", "compiled-bf16", "doran", "lora", 1.10),
    ("compiled DoRAN / compiled PEFT DoRA", "compiled-bf16", "doran", "peft-dora", 1.00),
    ("LLaMA-sized pair: DoRAN / PEFT DoRA", "llama-pair", "doran", "peft-dora", 0.60),
    ("LLaMA-sized pair: peak memory DoRAN / PEFT DoRA", "llama-pair", "doran:memory", "peft-dora:memory", 1.00),
]


def adapt(variant: str, model: nn.Module, rank: int, targets: list[str], head: list[str]) -> nn.Module:
    if variant.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                            use_dora=variant == "peft-dora", modules_to_save=head or None)
        return get_peft_model(model, config)
    return apply_adapters(model, AdapterConfig(r=rank, alpha=2 * rank, target_modules=targets,
                                               trainable_modules=head, **OURS[variant]))


def bert_task(quick: bool, device: str) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if quick else {}
    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2, **size)
    batch, length = (4, 16) if quick else (32, 128)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(device)
    labels = torch.randint(0, 2, (batch,), generator=generator).to(device)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(config).to(device)

    def loss(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(input_ids=ids).logits.float(), labels)

    return build, loss


class Pair(nn.Module):
    """A LLaMA-7B-sized q/v pair: two bias-free 4096×4096 projections of the same tokens."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(width, width, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).float().pow(2).mean() + self.v_proj(x).float().pow(2).mean()


def make_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], bf16: bool, device: str) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            value = loss(model)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def kernels_per_step(step: Callable[[], None], device: str) -> int:
    if device != "cuda":
        return 0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type.name == "CUDA")


def time_rounds(steps: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, list[float]]:
    """Milliseconds per step per variant, one list entry per round (interleaved, order alternating)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                steps[name]()
                times[name].append(1000 * (time.perf_counter() - began))
    return times


def summarize_times(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    return {name: {"median_ms": statistics.median(values),
                   f"ratio_vs_{reference}": statistics.median(v / r for v, r in zip(values, times[reference]))}
            for name, values in times.items()}


def peak_memory(step: Callable[[], None], device: str) -> float:
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_section(section: str, args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if section == "llama-pair":
        return run_pair(args, device)
    variants, precision, compiled = SECTIONS[section]
    build, loss = bert_task(args.quick, device)
    steps, kernels, memory, compile_seconds = {}, {}, {}, {}
    for variant in variants:
        model = adapt(variant, build(), args.rank, ["query", "value"], ["classifier"]).train()
        began = time.perf_counter()
        if compiled:
            model.compile()
        step = make_step(model, loss, precision == "bf16", device)
        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        compile_seconds[variant] = time.perf_counter() - began
        steps[variant] = step
        kernels[variant] = kernels_per_step(step, device)
        memory[variant] = peak_memory(step, device)
        print(f"[{section}] {variant}: ready after {compile_seconds[variant]:.1f} s, {kernels[variant]} kernels/step",
              flush=True)
    times = time_rounds(steps, args.rounds, device)
    result = summarize_times(times, "lora")
    for variant in variants:
        result[variant].update(kernels_per_step=kernels[variant], peak_mib=memory[variant],
                               warmup_seconds=compile_seconds[variant])
        if "peft-dora" in times:
            result[variant]["ratio_vs_peft-dora"] = statistics.median(
                v / r for v, r in zip(times[variant], times["peft-dora"]))
    return {"section": section, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "rounds": args.rounds, "results": result}


def run_pair(args: argparse.Namespace, device: str) -> dict:
    width, tokens, rank = (64, 128, 4) if args.quick else (args.pair_width, args.pair_tokens, args.pair_rank)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    steps, memory = {}, {}
    for variant in ("lora", "dora", "doran", "peft-dora"):
        torch.manual_seed(0)
        model = adapt(variant, Pair(width, dtype).to(device), rank, ["q_proj", "v_proj"], []).train()
        step = make_step(model, lambda m: m(x), False, device)
        for _ in range(args.warmup):
            step()
        steps[variant], memory[variant] = step, peak_memory(step, device)
    result = summarize_times(time_rounds(steps, args.rounds, device), "peft-dora")
    for variant in steps:
        result[variant]["peak_mib"] = memory[variant]
    return {"section": "llama-pair", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "rounds": args.rounds, "results": result}


def summarize(paths: list[str]) -> str:
    sections = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        sections[data["section"]] = data
    lines = []
    for name, data in sections.items():
        lines += [f"\n### {name} ({data['device']}, torch {data['torch']}, {data['rounds']} rounds)", "",
                  "| variant | median ms | vs LoRA | vs PEFT DoRA | kernels/step | peak MiB |", "|---|---|---|---|---|---|"]
        for variant, row in data["results"].items():
            lines.append(f"| {variant} | {row['median_ms']:.2f} | {row.get('ratio_vs_lora', float('nan')):.2f} | "
                         f"{row.get('ratio_vs_peft-dora', float('nan')):.2f} | {row.get('kernels_per_step', '')} | "
                         f"{row.get('peak_mib', 0):.0f} |")
    lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
    for label, section, numerator, denominator, bound in TARGETS:
        if section not in sections:
            lines.append(f"| {label} | not measured | ≤ {bound} | — |")
            continue
        results = sections[section]["results"]
        if numerator.endswith(":memory"):
            value = results[numerator.split(":")[0]]["peak_mib"] / max(results[denominator.split(":")[0]]["peak_mib"], 1e-9)
        else:
            value = results[numerator][f"ratio_vs_{denominator}"] if f"ratio_vs_{denominator}" in results[numerator] \
                else results[numerator]["median_ms"] / results[denominator]["median_ms"]
        lines.append(f"| {label} | {value:.2f} | ≤ {bound} | {'yes' if value <= bound else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=[*SECTIONS, "llama-pair"])
    parser.add_argument("--summarize", nargs="+", metavar="JSON")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (structure only)")
    parser.add_argument("--pair-width", type=int, default=4096, help="llama-pair: width of q_proj/v_proj")
    parser.add_argument("--pair-tokens", type=int, default=8192, help="llama-pair: tokens per step")
    parser.add_argument("--pair-rank", type=int, default=32, help="llama-pair: rank")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not args.section:
        parser.error("give --section or --summarize")
    result = run_section(args.section, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
