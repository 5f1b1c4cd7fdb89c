"""The speed/memory benchmark's quick mode: structure and correctness of its output, never its timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from doran_lightning.adapters import AdapterConfig, apply_adapters

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "speed_memory.py"


def load(name: str):
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("speed_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_memory"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_results(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    printed = bench.main(["--quick", "--models", "vit", "bert", "--steps", "1", "--warmup", "0", "--out", str(out)])
    return printed, json.loads(out.read_text())


def test_quick_run_writes_every_measurement_for_every_variant(bench, quick_results) -> None:
    printed, written = quick_results
    assert written["settings"]["quick"] is True
    assert set(written["results"]) == {"vit", "bert"}
    for model_name, by_rank in written["results"].items():
        cell = by_rank["4"]
        assert set(cell["train_step"]) == set(bench.VARIANTS)
        assert set(cell["memory"]) == set(bench.VARIANTS)
        assert set(cell["per_layer"]) == set(bench.VARIANTS) | {"frozen-linear"}
        assert set(cell["eval"]) == {"bare", "doran-unmerged", "doran-merged", "doran-unloaded"}
        for entry in cell["train_step"].values():
            assert entry["n"] == 1 and entry["seconds"]["median"] > 0
        # Ratios against a variant itself are exactly one (paired per round).
        assert cell["train_step"]["lora"]["ratio_vs_lora"]["median"] == 1.0
        assert cell["per_layer"]["peft-dora"]["ratio_vs_peft-dora"]["median"] == 1.0
        assert cell["stats_overhead"]["overhead_fraction"] >= 0
        targets = {check["key"]: check for check in cell["targets"]}
        assert {"step:doran/lora", "eval:doran-merged/bare", "memory:doran/peft-dora"} <= set(targets)
        assert targets["step:doran/lora"]["value"] == cell["train_step"]["doran"]["ratio_vs_lora"]["median"]
    assert written["machine"]["torch"] and written["machine"]["torch_threads"] >= 1
    assert json.loads(json.dumps(printed)) == written


def test_every_variant_computes_the_backbone_at_init_and_merge_preserves_outputs(quick_results) -> None:
    _, written = quick_results
    for by_rank in written["results"].values():
        cell = by_rank["4"]
        assert set(cell["init_max_abs_diff"]) == {"lora", "dora", "doran", "doran-noise", "doran-aux",
                                                  "peft-lora", "peft-dora"}
        assert max(cell["init_max_abs_diff"].values()) < 1e-5
        assert max(cell["merge_max_abs_diff"].values()) < 1e-4


def test_memory_accounts_for_what_each_method_keeps(quick_results) -> None:
    _, written = quick_results
    for by_rank in written["results"].values():
        memory = by_rank["4"]["memory"]
        # Full fine-tuning keeps a gradient and two AdamW moments for every weight.
        assert memory["full"]["grads"] > 10 * memory["lora"]["grads"]
        assert memory["full"]["optimizer_state"] == 2 * memory["full"]["grads"]
        # DoRA adds a magnitude vector; DoRAN adds σ and the generators on top.
        assert memory["dora"]["grads"] > memory["lora"]["grads"]
        assert memory["doran"]["grads"] > memory["dora"]["grads"]
        for entry in memory.values():
            assert entry["activations"] > 0
            assert entry["peak"] == entry["weights"] + entry["grads"] + entry["optimizer_state"] + entry["activations"]


def test_markdown_table_has_a_row_per_variant(bench, quick_results) -> None:
    _, written = quick_results
    table = bench.markdown(written)
    for variant in bench.VARIANTS:
        assert f"| {variant} |" in table
    assert "### vit, r = 4" in table and "### bert, r = 4" in table


def test_bad_arguments_are_rejected_with_the_flag_name(bench, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "resnet"])


def test_op_counts_grow_with_each_doran_part():
    """benchmarks/op_counts.py: DoRA adds ops to LoRA, the noise and the generators add more on top."""
    op_counts = load("op_counts")
    images = torch.randn(1, 3, 16, 16)
    totals = {}
    for name in op_counts.VARIANTS:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                                  embed_dim=32, num_heads=2, num_classes=3)
        apply_adapters(model, AdapterConfig.from_variant(name, r=4, trainable_modules=["head"]))
        totals[name] = sum(op_counts.step_ops(model, images))
    assert totals["lora"] < totals["dora"] < totals["doran-noise"] < totals["doran"]
    assert totals["dora"] < totals["doran-aux"] < totals["doran"]


def test_gpu_step_benchmark_quick_mode_writes_sections_and_target_table(tmp_path) -> None:
    """gpu_step.py on CPU with tiny shapes: every variant timed, ratios paired, the target table filled."""
    gpu_step = load("gpu_step")
    out = tmp_path / "eager-fp32.json"
    assert gpu_step.main(["--section", "eager-fp32", "--quick", "--rounds", "2", "--warmup", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(gpu_step.SECTIONS["eager-fp32"][0])
    assert results["lora"]["ratio_vs_lora"] == 1.0 and results["peft-dora"]["ratio_vs_peft-dora"] == 1.0
    assert all(row["median_ms"] > 0 for row in results.values())
    table = gpu_step.summarize([str(out)])
    assert "| train step: DoRAN / PEFT DoRA | not measured |" in table
    assert "| doran |" in table


def test_harness_interleaves_rounds_pairs_ratios_and_has_one_bound_per_ratio() -> None:
    from benchmarks import harness

    calls = []
    times = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    # One warm-up round, then forward, reversed, forward order.
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(values) for values in times.values()] == [3, 3]
    fixed = {"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}
    assert harness.paired_ratios(fixed, "a", "b") == [2.0, 4.0, 3.0]
    assert harness.summarize(fixed, ["b", "missing"])["a"]["ratio_vs_b"] == {"median": 3.0, "q25": 2.5, "q75": 3.5}
    keys = [target.key for target in harness.TARGETS]
    assert len(keys) == len(set(keys)), "one bound per (measure, ratio)"
    rows = harness.check_targets({"step:doran/lora": 1.3}, ["step"])
    assert [row["key"] for row in rows] == ["step:dora/lora", "step:doran/lora", "step:doran/peft-dora"]
    assert [row["met"] for row in rows] == [None, False, None]
    assert "| train step: DoRAN / our LoRA | 1.300 | ≤ 1.25 | NO |" in harness.target_table(rows)


def test_dispatch_proxy_quick_mode_reports_ratios_split_and_targets(tmp_path) -> None:
    """dispatch_proxy.py --quick: every method timed in paired rounds, the split and targets from those medians."""
    proxy = load("dispatch_proxy")
    out = tmp_path / "proxy.json"
    printed = proxy.main(["--quick", "--rounds", "2", "--warmup", "0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert json.loads(json.dumps(printed)) == written
    assert set(written["modes"]) == {"eager"} and written["settings"]["layers"] == 2
    eager = written["modes"]["eager"]
    methods = eager["methods"]
    assert list(methods) == list(proxy.EAGER) and eager["rounds"] == 2
    assert all(entry["n"] == 2 and 0 < entry["optimizer_share"] < 1 and entry["graphs"] == 0 for entry in methods.values())
    assert eager["graphs_compiled_while_timing"] == 0
    assert methods["lora"]["ratio_vs_lora"]["median"] == 1.0
    assert methods["peft-dora"]["ratio_vs_peft-dora"]["median"] == 1.0
    ratio = {name: entry["ratio_vs_lora"]["median"] for name, entry in methods.items()}
    assert eager["split"]["magnitude"] == pytest.approx(ratio["dora"] - 1)
    assert eager["split"]["noise"] == pytest.approx(ratio["doran-noise"] - ratio["dora"])
    assert eager["split"]["generators"] == pytest.approx(ratio["doran-aux"] - ratio["dora"])
    targets = {row["key"]: row["value"] for row in written["targets"]}
    assert targets == {"step:dora/lora": ratio["dora"], "step:doran/lora": ratio["doran"],
                       "step:doran/peft-dora": methods["doran"]["ratio_vs_peft-dora"]["median"]}
    table = proxy.markdown(written)
    assert "| DoRAN / our LoRA |" in table and "| magnitude |" in table and "| train step: DoRAN / our LoRA |" in table
