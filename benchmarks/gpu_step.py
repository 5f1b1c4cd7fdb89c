"""Train-step cost on one GPU: ours vs HF PEFT, eager, compiled and CUDA graphs, fp32 and bf16.

One *section* per process, so a slow compile cannot cost the other sections their numbers
(`gpu_step.sh` runs them all with time limits, then `--summarize` prints the target table of
`benchmarks/harness.py::TARGETS`):

    python benchmarks/gpu_step.py --section eager-fp32 --out results/eager-fp32.json
    python benchmarks/gpu_step.py --section eager-bf16 | compiled-bf16 | cudagraphs-bf16 | llama-pair
    python benchmarks/gpu_step.py --summarize results/*.json
    python benchmarks/gpu_step.py --section llama-pair --pair-width 768 --pair-tokens 1024 --pair-rank 8   # CPU pair

Setting (as in the issue): BERT-base shape, random init, dropout 0, adapters on query+value, r = 8,
alpha = 16, batch 32 × 128 tokens, AdamW over the trainable tensors (classifier head included).
Timing, pairing and variants are `benchmarks/harness.py`'s: every round runs each variant once, in forward
order on even rounds and reversed on odd ones; a step (forward, backward, optimizer step) is timed with
CUDA events; ratios are taken per round against the reference measured in the same round, then summarised
by their median. Compiled sections compile each model whole with `torch.compile`'s mode as `model.compile_mode`
names it: ``default`` (compiled-bf16) or ``reduce-overhead`` (cudagraphs-bf16: CUDA graphs, fixed shapes).
Kernels per step are counted with the profiler (CUDA kernel events of one step). `--quick` shrinks
everything to run on a CPU in seconds (structure only, for the tests; CUDA graphs then fall back to the
default mode, which a CPU has no graphs for).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (doran_lightning, benchmarks)

from benchmarks import harness  # noqa: E402

ALL = (*harness.OURS, *harness.PEFT)
# section -> (variants, precision, torch.compile mode or None for eager; the values of `model.compile_mode`)
SECTIONS: dict[str, tuple[tuple[str, ...], str, Optional[str]]] = {
    "eager-fp32": (ALL, "fp32", None),
    "eager-bf16": (ALL, "bf16", None),
    "compiled-bf16": (("lora", "dora", "doran", "peft-dora"), "bf16", "default"),
    "cudagraphs-bf16": (("lora", "dora", "doran", "peft-dora"), "bf16", "reduce-overhead"),
}
PAIR = "llama-pair"
PAIR_VARIANTS = ("lora", "dora", "doran", "peft-dora")
# section -> the measure of harness.TARGETS its ratios are checked against (sections not listed: no target)
MEASURES = {"eager-bf16": "step", "compiled-bf16": "compiled", PAIR: "pair"}


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


def make_step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], bf16: bool, device: str,
              cudagraphs: bool = False) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        if cudagraphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
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
    """Milliseconds per step per variant, one list entry per round (harness.interleaved)."""
    return {name: [1000 * value for value in values]
            for name, values in harness.interleaved(steps, rounds, device=device).items()}


def summarize_times(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per variant: median ms and the medians of its per-round ratios to `reference` (and to PEFT DoRA)."""
    summary = harness.summarize(times, (reference, "peft-dora"))
    return {name: {"median_ms": entry["seconds"]["median"],
                   **{key: value["median"] for key, value in entry.items() if key.startswith("ratio_vs_")}}
            for name, entry in summary.items()}


def peak_memory(step: Callable[[], None], device: str) -> float:
    """MiB allocated above the current allocation at the peak of one step (0 off CUDA)."""
    return harness.cuda_peak_bytes(step) / 2**20 if device == "cuda" else 0.0


def run_section(section: str, args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if section == PAIR:
        return run_pair(args, device)
    variants, precision, mode = SECTIONS[section]
    if mode == "reduce-overhead" and device != "cuda":
        mode = "default"  # CUDA graphs need CUDA; the CPU run checks the section's structure
    build, loss = bert_task(args.quick, device)
    with harness.several_compiled_models():
        return _time_section(section, variants, precision, mode, build, loss, args, device)


def _time_section(section: str, variants: tuple[str, ...], precision: str, mode: Optional[str],
                  build: Callable[[], nn.Module], loss: Callable[[nn.Module], torch.Tensor],
                  args: argparse.Namespace, device: str) -> dict:
    """Build, warm up (compile) and time every variant of one BERT section."""
    steps, kernels, memory, compile_seconds = {}, {}, {}, {}
    for variant in variants:
        model = harness.adapt(variant, build(), args.rank, ["query", "value"], ["classifier"]).train()
        began = time.perf_counter()
        if mode is not None:
            model.compile(mode=mode)
        step = make_step(model, loss, precision == "bf16", device, cudagraphs=mode == "reduce-overhead")
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
    result = summarize_times(time_rounds(steps, args.rounds, device), "lora")
    for variant in variants:
        result[variant].update(kernels_per_step=kernels[variant], peak_mib=memory[variant],
                               warmup_seconds=compile_seconds[variant])
    return {"section": section, "compile_mode": mode,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "rounds": args.rounds, "results": result}


def run_pair(args: argparse.Namespace, device: str) -> dict:
    width, tokens, rank = (64, 128, 4) if args.quick else (args.pair_width, args.pair_tokens, args.pair_rank)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, width, device=device, dtype=dtype)
    steps, memory = {}, {}
    for variant in PAIR_VARIANTS:
        torch.manual_seed(0)
        model = harness.adapt(variant, Pair(width, dtype).to(device), rank, ["q_proj", "v_proj"]).train()
        step = make_step(model, lambda m: m(x), False, device)
        for _ in range(args.warmup):
            step()
        steps[variant], memory[variant] = step, peak_memory(step, device)
    result = summarize_times(time_rounds(steps, args.rounds, device), "peft-dora")
    for variant in steps:
        result[variant]["peak_mib"] = memory[variant]
    return {"section": PAIR, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
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
    measured = {}
    for name, measure in MEASURES.items():
        results = sections.get(name, {}).get("results", {})
        for target in harness.targets_for([measure]):
            ratio = results.get(target.numerator, {}).get(f"ratio_vs_{target.denominator}")
            if ratio is not None:
                measured[target.key] = ratio
        if name == PAIR and results:
            measured["pair-memory:doran/peft-dora"] = results["doran"]["peak_mib"] / max(results["peft-dora"]["peak_mib"], 1e-9)
    rows = harness.check_targets(measured, [*MEASURES.values(), "pair-memory"])
    return "\n".join([*lines, "", harness.target_table(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=[*SECTIONS, PAIR])
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
