"""CPU proxy of the GPU train step's dispatch cost (issue 18): BERT-base's operation graph at a tiny width.

On a GPU an eager DoRAN step is bound by how many operations Python dispatches, not by FLOPs. This
keeps BERT-base's graph — 12 layers, query + value adapted, r = 8, AdamW with ``foreach=True`` (the CUDA
default), dropout 0 — but at width 64 and a batch of 1 × 8 tokens, so compute is negligible and a step's
time is its dispatch cost. Every method runs round by round (`benchmarks/harness.py`), and the ratios are
medians of per-round ratios; it reproduced the H200's eager and compiled ratios within a few percent.

Two modes: ``eager`` and ``compiled`` (``torch.compile``, CPU inductor, each model compiled whole, the
optimizer eager). It prints the issue's ratio table with its targets, each method's step and optimizer
time, and the split of DoRAN's extra cost in LoRA steps — magnitude (DoRA − LoRA), noise (noise-only −
DoRA), generators (aux-only − DoRA) — so a change shows where it paid.

    python benchmarks/dispatch_proxy.py --out /tmp/proxy.json     # full run, ≤ 2 min on 2 CPU cores
    python benchmarks/dispatch_proxy.py --quick                   # 2 layers, few rounds: structure only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (doran_lightning, benchmarks)

from benchmarks import harness  # noqa: E402

EAGER = (*harness.OURS, *harness.PEFT)
COMPILED = ("lora", "doran")  # compiling is the slow part (about a minute per model): the target's two by default
MODES = ("eager", "compiled")
# (row label, numerator, denominator) of the table; targets come from harness.TARGETS.
RATIOS = (
    ("DoRAN / our LoRA", "doran", "lora"),
    ("our DoRA / our LoRA", "dora", "lora"),
    ("DoRAN / PEFT DoRA", "doran", "peft-dora"),
    ("noise-only / our LoRA", "doran-noise", "lora"),
    ("aux-only / our LoRA", "doran-aux", "lora"),
    ("PEFT DoRA / PEFT LoRA", "peft-dora", "peft-lora"),
)
TARGET_MEASURE = {"eager": "step", "compiled": "compiled"}


@dataclass
class Settings:
    """Shape and repeat counts (--quick shrinks them to check the structure in seconds)."""

    layers: int = 12
    width: int = 64
    heads: int = 4
    batch: int = 1
    tokens: int = 8
    rank: int = 8
    rounds: int = 600  # at most; each mode also stops after its time budget
    warmup: int = 5
    budget_s: float = 30.0  # timed seconds per mode
    modes: Sequence[str] = MODES
    threads: int = 1
    quick: bool = False
    compiled_methods: Sequence[str] = field(default_factory=lambda: list(COMPILED))


def build_base(settings: Settings) -> nn.Module:
    """BERT-base's graph at a tiny width, random weights, dropout off (as the adapters' dropout 0)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=settings.width, num_hidden_layers=settings.layers,
                        num_attention_heads=settings.heads, intermediate_size=4 * settings.width,
                        max_position_embeddings=max(64, settings.tokens), num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        # set, not inferred: the first forward with labels would set it and recompile every model
                        problem_type="single_label_classification")
    return BertForSequenceClassification(config).train()


class Step:
    """One train step (forward, backward, AdamW foreach step) that records its optimizer part's seconds."""

    def __init__(self, model: nn.Module, ids: Tensor, labels: Tensor) -> None:
        self.model, self.ids, self.labels = model, ids, labels
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                           foreach=True)
        self.optimizer_seconds: list[float] = []

    def __call__(self) -> None:
        self.model(input_ids=self.ids, labels=self.labels).loss.backward()
        began = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_seconds.append(time.perf_counter() - began)


def run_mode(mode: str, base: nn.Module, settings: Settings) -> dict[str, Any]:
    """Time every method of `mode` interleaved; per method: step quartiles, paired ratios, optimizer share."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (settings.batch, settings.tokens), generator=generator)
    labels = torch.randint(0, 2, (settings.batch,), generator=generator)
    methods = EAGER if mode == "eager" else tuple(settings.compiled_methods)
    steps: dict[str, Step] = {}
    prepare_seconds: dict[str, float] = {}
    graphs: dict[str, int] = {}
    with harness.several_compiled_models():
        for method in methods:
            began, compiled_before = time.perf_counter(), _graphs_compiled()
            model = harness.adapted_copy(method, base, settings.rank, ["query", "value"], ["classifier"]).train()
            if mode == "compiled":
                model.compile()
            steps[method] = Step(model, ids, labels)
            for _ in range(2):  # compiles (compiled mode) and creates the optimizer state
                steps[method]()
            prepare_seconds[method] = time.perf_counter() - began
            graphs[method] = _graphs_compiled() - compiled_before
            print(f"[{mode}] {method}: ready after {prepare_seconds[method]:.1f} s, {graphs[method]} graph(s)",
                  file=sys.stderr, flush=True)
        compiled_before = _graphs_compiled()
        times = harness.interleaved(steps, settings.rounds, settings.warmup, budget_s=settings.budget_s)
        recompiled = _graphs_compiled() - compiled_before
    summary = harness.summarize(times, ("lora", "peft-lora", "peft-dora"))
    rounds = len(times[methods[0]])
    for method, entry in summary.items():
        optimizer = statistics.median(steps[method].optimizer_seconds[-rounds:])
        entry.update(optimizer_seconds=optimizer, optimizer_share=optimizer / entry["seconds"]["median"],
                     prepare_seconds=prepare_seconds[method], graphs=graphs[method])
    return {"methods": summary, "rounds": rounds, "split": split(summary), "graphs_compiled_while_timing": recompiled}


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (recompilations included)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _vs_lora(summary: dict[str, Any], method: str) -> Optional[float]:
    return summary[method]["ratio_vs_lora"]["median"] if method in summary else None


def split(summary: dict[str, Any]) -> dict[str, Optional[float]]:
    """DoRAN's extra cost in LoRA steps: magnitude (DoRA − LoRA), noise (noise-only − DoRA), generators (aux-only − DoRA)."""
    dora, noise, aux, doran = (_vs_lora(summary, m) for m in ("dora", "doran-noise", "doran-aux", "doran"))
    return {"magnitude": None if dora is None else dora - 1.0,
            "noise": None if None in (noise, dora) else noise - dora,
            "generators": None if None in (aux, dora) else aux - dora,
            "doran_total": None if doran is None else doran - 1.0}


def measured_ratios(results: dict[str, Any]) -> dict[str, float]:
    """Target keys (harness.Target.key) → paired median ratios of this run."""
    measured = {}
    for mode, data in results["modes"].items():
        for _, numerator, denominator in RATIOS:
            entry = data["methods"].get(numerator, {}).get(f"ratio_vs_{denominator}")
            if entry is not None:
                measured[f"{TARGET_MEASURE[mode]}:{numerator}/{denominator}"] = entry["median"]
    return measured


def markdown(results: dict[str, Any]) -> str:
    """The issue's ratio table with targets, the per-method times, the split and the target check."""
    modes = results["modes"]
    bounds = {target.key: target.bound for target in harness.TARGETS}
    lines = ["| ratio | " + " | ".join(f"{mode} (IQR)" for mode in modes) + " | targets |",
             "|---|" + "---|" * len(modes) + "---|"]
    for label, numerator, denominator in RATIOS:
        cells = [harness.ratio_text(modes[mode]["methods"].get(numerator, {}), denominator) for mode in modes]
        limits = [f"{mode} ≤ {bounds[key]}" for mode in MODES
                  if (key := f"{TARGET_MEASURE[mode]}:{numerator}/{denominator}") in bounds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(limits) or '—'} |")
    for mode, data in modes.items():
        lines += ["", f"{mode}: {data['rounds']} rounds, {data['graphs_compiled_while_timing']} graphs compiled while "
                  "timing (0 = no recompilation)", "",
                  "| method | step ms (IQR) | × our LoRA | optimizer ms | optimizer share |", "|---|---|---|---|---|"]
        for method, entry in data["methods"].items():
            seconds = entry["seconds"]
            lines.append(f"| {method} | {seconds['median'] * 1e3:.2f} ({seconds['q25'] * 1e3:.2f}–"
                         f"{seconds['q75'] * 1e3:.2f}) | {harness.ratio_text(entry, 'lora')} | "
                         f"{entry['optimizer_seconds'] * 1e3:.2f} | {entry['optimizer_share']:.2f} |")
    lines += ["", "Split of DoRAN's extra cost, in LoRA steps:", "",
              "| part | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for part in ("magnitude", "noise", "generators", "doran_total"):
        values = [modes[mode]["split"][part] for mode in modes]
        lines.append(f"| {part.replace('_', ' ')} | "
                     + " | ".join("–" if v is None else f"{v:+.2f}" for v in values) + " |")
    lines += ["", harness.target_table(results["targets"])]
    return "\n".join(lines)


def run(settings: Settings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    base = build_base(settings)
    results: dict[str, Any] = {"settings": asdict(settings), "machine": harness.machine_description(), "modes": {}}
    with harness.gpu_paths():  # the proxy stands for a GPU step
        for mode in settings.modes:
            results["modes"][mode] = run_mode(mode, base, settings)
    results["targets"] = harness.check_targets(measured_ratios(results),
                                               [TARGET_MEASURE[mode] for mode in settings.modes])
    results["wall_seconds"] = time.perf_counter() - started
    return results


def parse_args(argv: Optional[Sequence[str]]) -> tuple[Settings, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, eager only, few rounds: structure only")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: eager compiled (quick: eager)")
    parser.add_argument("--rounds", type=int, help="at most this many timed rounds per mode (default 600)")
    parser.add_argument("--budget", type=float, help="timed seconds per mode (default 30)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 5)")
    parser.add_argument("--compiled-methods", nargs="+", choices=EAGER,
                        help="methods of the compiled mode (default: lora doran; add dora doran-noise doran-aux "
                             "for the compiled split, about a minute of compiling each)")
    parser.add_argument("--layers", type=int, help="encoder layers (default 12, as BERT-base)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1: dispatch is single-threaded)")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    settings = (Settings(layers=2, rounds=3, warmup=1, budget_s=5.0, modes=("eager",), quick=True)
                if args.quick else Settings())
    for name in ("rounds", "warmup", "layers", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "warmup" else 1):
                parser.error(f"--{name}: must be positive, got {value}")
            setattr(settings, name, value)
    if args.budget is not None:
        settings.budget_s = args.budget
    if args.modes:
        settings.modes = tuple(args.modes)
    if args.compiled_methods:
        settings.compiled_methods = list(dict.fromkeys(["lora", *args.compiled_methods]))
    return settings, args.out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    settings, out = parse_args(argv)
    results = run(settings)
    print(markdown(results))
    print(f"\n{results['wall_seconds']:.0f} s on {results['machine']['cpu']} ({settings.threads} torch thread(s))")
    harness.save_results(results, out)
    return results


if __name__ == "__main__":
    main()
