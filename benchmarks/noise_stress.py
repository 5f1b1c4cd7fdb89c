"""Where DoRAN's noise σ should matter: a setting whose DoRA denominators ‖W0 + sBA‖_row get small.

DoRA's scale g = m / ‖V‖_row is unbounded when a row norm approaches zero; DoRAN's m / (‖V‖ + σ) is
bounded by m/σ. In ordinary fine-tuning the rows of W0 have norms of order 0.1-1 and a rank-r update
cannot cancel them (for r = 1, ‖V_i‖ ≥ the distance of W0_i from the line of A), so the denominators
stay far from zero. This script *builds* the other case: the adapted rows of W0 are shrunk by
``--shrink`` (as in a heavily pruned or low-norm layer), so ‖V_i‖ ≈ s·|B_i|·‖A‖, which passes near
zero whenever Adam (which moves B_i by about lr per step whatever the gradient's size) flips B_i's sign.

In-process (no Lightning, a few seconds per run): a 2-block ViT (random init) on sklearn digits,
constant lr, AdamW (or ``--optimizer sgd``, momentum 0.9) through `adapter_param_groups`, the same steps
and data for every variant.
Records per run: loss every step, σ and min(‖V‖+σ) per projection every `--every` steps, divergence
(`stability.loss_diverged`: final loss non-finite or `DIVERGE_FACTOR` times the initial), loss spikes,
test accuracy. Writes ``<out>/results.json``, ``results.md`` and ``sigma_trajectories.png``.

    python benchmarks/noise_stress.py --out benchmarks/results/noise_stress          # the docs/RESULTS.md setting
    python benchmarks/noise_stress.py --shrink 1 --out …                             # ordinary W0
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from doran_lightning import stability
from doran_lightning.adapters import AdapterConfig, adapter_param_groups, adapter_statistics, apply_adapters
from doran_lightning.adapters.config import VARIANT_LABELS
from doran_lightning.adapters.inject import resolve_targets
from doran_lightning.data.vision import DigitsDataModule
from doran_lightning.models import BackboneConfig, build_backbone

BACKBONE = BackboneConfig(source="timm", name="vit_tiny_patch16_224", pretrained=False,
                          overrides={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})


@torch.no_grad()
def shrink_targets(model: torch.nn.Module, cfg: AdapterConfig, factor: float) -> None:
    """Scale the rows of W0 that `cfg` adapts (whole projections or fused slices) by `factor`."""
    for name, parts in resolve_targets(model, cfg).items():
        weight = model.get_submodule(name).weight
        if parts is None:
            weight.mul_(factor)
            continue
        layout = cfg.fused_modules[name.rsplit(".", 1)[-1]]
        size = weight.shape[0] // len(layout)
        for part in parts:
            start = layout.index(part) * size
            weight[start:start + size].mul_(factor)


def train_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run: loss per step, σ / min denominator per projection every `args.every` steps, test accuracy."""
    model, heads = build_backbone(BACKBONE, "image_classification", 10)
    cfg = AdapterConfig.from_variant(variant, r=args.r, alpha=args.alpha, magnitude_init=args.magnitude_init,
                                     trainable_modules=heads, target_modules=["qkv[q,v]"])
    shrink_targets(model, cfg, args.shrink)
    torch.manual_seed(seed)
    model = apply_adapters(model, cfg)
    data = DigitsDataModule(image_size=16, fraction=args.fraction, seed=seed, batch_size=32)
    data.setup("fit")
    data.setup("test")
    groups = adapter_param_groups(model, weight_decay=0.0, lr=args.lr, sigma_lr=args.sigma_lr)
    # Adam normalises every step to about lr, whatever the gradient's size; SGD lets DoRA's 1/‖V‖ through.
    optimizer = (torch.optim.AdamW(groups, lr=args.lr) if args.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=args.lr, momentum=0.9))
    losses: list[float] = []
    trace: dict[str, dict[str, list[float]]] = {}
    steps: list[int] = []
    model.train()
    while len(losses) < args.steps:
        for batch in data.train_dataloader():
            if len(losses) == args.steps:
                break
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break
            loss.backward()
            if len(losses) % args.every == 1 or args.every == 1:
                steps.append(len(losses) - 1)
                for projection, stats in adapter_statistics(model).items():
                    for stat in ("sigma", "denominator_min"):
                        if stat in stats:
                            trace.setdefault(stat, {}).setdefault(projection, []).append(float(stats[stat]))
            optimizer.step()
        if losses and not math.isfinite(losses[-1]):
            break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((model(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    values = np.array(losses)
    diverged = len(losses) < args.steps or stability.loss_diverged(values)
    return {"variant": variant, "seed": seed, "diverged": bool(diverged), "steps_done": len(losses),
            "spikes": len(stability.spike_indices(values)),
            "test_accuracy": correct / total, "final_loss": float(values[-stability.DIVERGE_WINDOW:].mean()), "loss": losses, "trace_steps": steps, "trace": trace}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: divergences, spikes, min denominator over runs, σ range, accuracy mean ± std."""
    rows = []
    for variant in dict.fromkeys(run["variant"] for run in runs):
        members = [run for run in runs if run["variant"] == variant]
        denominators = [v for run in members for series in run["trace"].get("denominator_min", {}).values() for v in series]
        sigmas = [series[-1] for run in members for series in run["trace"].get("sigma", {}).values()]
        mean, std, _ = stability.mean_std(run["test_accuracy"] for run in members)
        rows.append({"variant": variant, "runs": len(members), "diverged": sum(r["diverged"] for r in members),
                     "spikes": sum(r["spikes"] for r in members),
                     "denominator_min": min(denominators) if denominators else None,
                     "sigma_final": (min(sigmas), max(sigmas)) if sigmas else None,
                     "accuracy": (mean, std)})
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"Made by: `{command}`", "",
             "| variant | diverged | loss spikes | min ‖V‖+σ (all runs) | final σ (min–max over layers, seeds) | test accuracy |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        denominator = "–" if row["denominator_min"] is None else f"{row['denominator_min']:.2e}"
        sigma = "–" if row["sigma_final"] is None else f"{row['sigma_final'][0]:.3g}–{row['sigma_final'][1]:.3g}"
        mean, std = row["accuracy"]
        lines.append(f"| {row['variant']} | {row['diverged']}/{row['runs']} | {row['spikes']} | {denominator} | {sigma} | "
                     f"{mean:.3f} ± {std:.3f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], out: Path, command: str) -> Path:
    """σ per projection (seed 0 of every noisy variant) and the min denominator of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for run in runs:
        first.setdefault(run["variant"], run)
    noisy = [run for run in first.values() if "sigma" in run["trace"]]
    fig, axes = plt.subplots(1, len(noisy) + 1, figsize=(4.5 * (len(noisy) + 1), 3.6), squeeze=False)
    for ax, run in zip(axes[0], noisy):
        for projection, series in run["trace"]["sigma"].items():
            ax.plot(run["trace_steps"], series, label=projection.replace("blocks.", "b").replace(".attn.qkv", ""))
        ax.set(title=f"{run['variant']} (seed {run['seed']}): σ per projection", xlabel="step", ylabel="σ", yscale="log")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for run in first.values():
        series = run["trace"].get("denominator_min")
        if series:
            ax.plot(run["trace_steps"], np.min(np.array(list(series.values())), axis=0), label=run["variant"])
    ax.set(title="min over projections of min_row(‖V‖+σ)", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    fig.text(0.01, 0.01, command, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out / "sigma_trajectories.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANT_LABELS, default=["dora", "doran-noise", "doran"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sigma-lr", type=float, help="σ's own lr (default: the module default, see METHOD.md §6)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--shrink", type=float, default=1e-3, help="factor on the adapted rows of W0 (1: unchanged)")
    parser.add_argument("--magnitude-init", choices=("norm", "norm_plus_sigma"), default="norm")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=5, help="statistics cadence in steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_stress"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "benchmarks/noise_stress.py", *argv])
    torch.set_num_threads(1)
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            run = train_one(variant, seed, args)
            print(f"{variant} seed={seed}: diverged={run['diverged']} accuracy={run['test_accuracy']:.3f} "
                  f"final loss={run['final_loss']:.3f}", flush=True)
            runs.append(run)
    rows = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "table": rows, "runs": runs}, default=float))
    table = markdown(rows, command)
    (args.out / "results.md").write_text(table)
    plot(runs, args.out, command)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
