"""The one benchmark harness: variants, the interleaved timer, paired ratios, memory, the target table.

Every script in `benchmarks/` builds its variants, times them and checks its targets through this
module, so that a rule (which AdapterConfig a label means, how a ratio is paired, what bound a ratio
must meet) lives in one place.

* **Variants.** Ours are `AdapterConfig.from_variant` labels (``lora``, ``dora``, ``doran``, ``doran-noise``,
  ``doran-aux``, …); HF PEFT's are ``peft-lora`` and ``peft-dora``; ``full`` is full fine-tuning.
  alpha = 2r and dropout 0 everywhere.
* **Timing.** All variants of one measurement run in rounds — forward order on even rounds, reversed on
  odd ones — after untimed warm-up rounds, so load changes on a shared machine hit each alike; CUDA
  steps are timed with CUDA events, CPU ones with `perf_counter`; the garbage collector is off while
  timing (as `timeit` does).
* **Ratios** are taken per round (a variant against the reference measured next to it), then summarised
  by their median and inter-quartile range.
* **Targets** are one table, `TARGETS`, keyed by measure and ratio; a script reports those it measured.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks build models from configs, never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from doran_lightning.adapters import AdapterConfig, apply_adapters  # noqa: E402
from doran_lightning.adapters.config import VARIANT_LABELS  # noqa: E402

# ---------------------------------------------------------------------- variants
OURS = VARIANT_LABELS[:5]  # lora, dora, doran, doran-noise (σ only), doran-aux (generated A/B only)
PEFT = ("peft-lora", "peft-dora")
FULL = "full"


def adapt(label: str, model: nn.Module, rank: int, targets: Sequence[str], head: Sequence[str] = (),
          peft_targets: Optional[Sequence[str]] = None) -> nn.Module:
    """`model` prepared for variant `label` in place (PEFT wraps it): ours, ``peft-*`` or ``full``.

    `head` modules are trainable in every variant; `peft_targets` defaults to `targets` (PEFT cannot
    address slices of a fused Linear such as ``qkv[q,v]``, so callers pass the whole ``qkv`` there).
    """
    if label == FULL:
        return model.requires_grad_(True)
    if label in PEFT:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=label == "peft-dora",
                            target_modules=list(peft_targets or targets), modules_to_save=list(head) or None)
        return get_peft_model(model, config)
    config = AdapterConfig.from_variant(label, r=rank, alpha=2.0 * rank, target_modules=list(targets),
                                        trainable_modules=list(head))
    return apply_adapters(model, config)


def adapted_copy(label: str, base: nn.Module, rank: int, targets: Sequence[str], head: Sequence[str] = (),
                 peft_targets: Optional[Sequence[str]] = None) -> nn.Module:
    """A fresh deep copy of `base` prepared for `label` (the base stays untouched)."""
    return adapt(label, copy.deepcopy(base), rank, targets, head, peft_targets)


@contextlib.contextmanager
def gpu_paths() -> Iterator[None]:
    """Run the code paths a GPU step takes, on the CPU: the dispatch proxies stand for a GPU step.

    A projection group's detached norm reads W0 through one stacked product on a GPU and through one product
    per projection on a CPU (`engine.stacks_frozen_weights`); the proxies count and time the GPU's dispatches.
    """
    from doran_lightning.adapters import engine

    own = engine.stacks_frozen_weights
    engine.stacks_frozen_weights = lambda device: True
    try:
        yield
    finally:
        engine.stacks_frozen_weights = own


def several_compiled_models() -> contextlib.AbstractContextManager:
    """Room for several compiled models of one class in a process.

    Models of one class share their forward's code, so each model's graph is one more cache entry of the
    same frames: past dynamo's default limit of 8 entries a frame, later models would silently run eager.
    """
    return torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024)


# ---------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(task: Callable[[], Any], device: str) -> float:
    """Seconds one call of `task` takes (CUDA events on a GPU, so host overhead between steps is not counted)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        task()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    began = time.perf_counter()
    task()
    return time.perf_counter() - began


def interleaved(tasks: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 0, device: str = "cpu",
                budget_s: Optional[float] = None) -> dict[str, list[float]]:
    """Seconds per call of every task, one entry per round (order alternating), after `warmup` untimed rounds.

    With `budget_s`, stops early once that many seconds of timed rounds have passed (at least 2 rounds).
    """
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    began = time.perf_counter()
    try:
        for index in range(rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                times[name].append(_timed(tasks[name], device))
            if budget_s is not None and index >= 1 and time.perf_counter() - began > budget_s:
                break
    finally:
        if enabled:
            gc.enable()
    return times


def quartiles(values: Sequence[float]) -> dict[str, float]:
    """Median and inter-quartile range (inclusive method; one value is its own quartiles)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "q25": ordered[0], "q75": ordered[0]}
    q25, median, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": median, "q25": q25, "q75": q75}


def paired_ratios(times: Mapping[str, Sequence[float]], name: str, reference: str) -> list[float]:
    """`name`'s time over `reference`'s, round by round."""
    return [value / ref for value, ref in zip(times[name], times[reference])]


def summarize(times: Mapping[str, Sequence[float]], references: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per task: quartiles of its seconds, n, and quartiles of its paired ratios against each reference present."""
    references = [reference for reference in references if reference in times]
    summary: dict[str, dict[str, Any]] = {}
    for name, values in times.items():
        entry: dict[str, Any] = {"seconds": quartiles(values), "n": len(values)}
        for reference in references:
            entry[f"ratio_vs_{reference}"] = quartiles(paired_ratios(times, name, reference))
        summary[name] = entry
    return summary


def ratio_text(entry: Mapping[str, Any], reference: str) -> str:
    """'median (q25–q75)' of a summarised ratio, or '–' when not measured."""
    ratio = entry.get(f"ratio_vs_{reference}")
    if ratio is None:
        return "–"
    return f"{ratio['median']:.2f} ({ratio['q25']:.2f}–{ratio['q75']:.2f})"


# ---------------------------------------------------------------------- memory
def cuda_peak_bytes(step: Callable[[], Any]) -> int:
    """Bytes allocated above the current allocation at the peak of one call of `step` (CUDA)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _unique_bytes(tensors: Iterator[Tensor], exclude: frozenset[int] = frozenset()) -> int:
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
    """One train step's bytes on any device: params/buffers, grads, optimizer state + live saved activations.

    Activations are the tensors autograd saved (``saved_tensors_hooks``) that are still alive when the
    forward returns, de-duplicated by storage, parameter storages excluded. Call after one step, so that
    the optimizer state exists.
    """
    saved: list[weakref.ref] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    parameters = list(model.parameters()) + list(model.buffers())
    persistent = frozenset(_storage_key(t) for t in parameters)
    alive = (ref() for ref in saved)
    activations = _unique_bytes((t for t in alive if t is not None), exclude=persistent)
    loss.backward()
    weights = _unique_bytes(iter(parameters))
    grads = _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = _unique_bytes(_optimizer_tensors(optimizer))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"weights": weights, "grads": grads, "optimizer_state": state, "activations": activations,
            "total": weights + grads + state + activations}


# ---------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """One bound: `measure` of `numerator` over `denominator` (a paired median ratio) must be ≤ `bound`."""

    measure: str
    numerator: str
    denominator: str
    bound: float
    label: str

    @property
    def key(self) -> str:
        return f"{self.measure}:{self.numerator}/{self.denominator}"


# The one target table (issues 10 and 18). Measures: "step" = eager train step (forward + backward + AdamW
# step; the CPU dispatch proxy, speed_memory's CPU step and gpu_step's bf16 step all measure it), "compiled"
# = the same under torch.compile, "layer" = one adapted projection's forward + backward, "memory" = peak
# memory of a step, "eval" = eval forward, "stats" = statistics logging as a fraction of a step, "pair" /
# "pair-memory" = gpu_step's LLaMA-sized q/v pair, "ops" = ATen operations per step (op_counts.py).
TARGETS: tuple[Target, ...] = (
    Target("step", "dora", "lora", 1.15, "train step: our DoRA / our LoRA"),
    Target("step", "doran", "lora", 1.25, "train step: DoRAN / our LoRA"),
    Target("step", "doran", "peft-dora", 0.85, "train step: DoRAN / PEFT DoRA"),
    Target("compiled", "doran", "lora", 1.10, "compiled step: DoRAN / our compiled LoRA"),
    Target("compiled", "doran", "peft-dora", 1.00, "compiled step: DoRAN / compiled PEFT DoRA"),
    Target("layer", "doran", "lora", 1.20, "per layer: DoRAN / our LoRA"),
    Target("layer", "dora", "lora", 1.15, "per layer: our DoRA / our LoRA"),
    Target("layer", "doran", "peft-dora", 0.75, "per layer: DoRAN / PEFT DoRA"),
    Target("layer", "dora", "peft-dora", 0.75, "per layer: our DoRA / PEFT DoRA"),
    Target("memory", "doran", "peft-dora", 1.00, "peak memory: DoRAN / PEFT DoRA"),
    Target("eval", "doran-merged", "bare", 1.02, "eval forward: DoRAN merged / bare backbone"),
    Target("stats", "statistics", "step", 0.03, "statistics logging / DoRAN step"),
    Target("pair", "doran", "peft-dora", 0.60, "LLaMA-sized q/v pair: DoRAN / PEFT DoRA"),
    Target("pair-memory", "doran", "peft-dora", 1.00, "LLaMA-sized q/v pair: peak memory DoRAN / PEFT DoRA"),
    Target("ops", "dora", "lora", 1.25, "ATen ops per step: our DoRA / our LoRA"),
    Target("ops", "doran", "lora", 1.40, "ATen ops per step: DoRAN / our LoRA"),
)


def targets_for(measures: Iterable[str]) -> list[Target]:
    """The targets of the given measures, in table order."""
    wanted = set(measures)
    return [target for target in TARGETS if target.measure in wanted]


def check_targets(measured: Mapping[str, float], measures: Iterable[str]) -> list[dict[str, Any]]:
    """One row per target of `measures`: {target, key, value (None when not measured), bound, met}."""
    rows = []
    for target in targets_for(measures):
        value = measured.get(target.key)
        rows.append({"target": target.label, "key": target.key, "value": value, "bound": target.bound,
                     "met": None if value is None else value <= target.bound})
    return rows


def target_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of `check_targets` rows."""
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for row in rows:
        if row["value"] is None:
            lines.append(f"| {row['target']} | not measured | ≤ {row['bound']} | — |")
        else:
            lines.append(f"| {row['target']} | {row['value']:.3f} | ≤ {row['bound']} | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- machine
def machine_description(device: str = "cpu") -> dict[str, Any]:
    """CPU model, threads, library versions, GPU name and load average: what a result came from."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    description: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    for package in ("timm", "transformers", "peft"):
        with contextlib.suppress(ImportError):
            description[package] = __import__(package).__version__
    with contextlib.suppress(OSError):
        description["load_average"] = os.getloadavg()
    return description


def save_results(results: Mapping[str, Any], out: Optional[Path]) -> None:
    """Write a script's results as JSON to `out` (its folder made), when an --out was given."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
