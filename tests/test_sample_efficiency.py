"""The sample-efficiency sweep: planning, hashing, caching/resume, lr choice and aggregation.

The CLI is replaced by a fake launcher that writes real TensorBoard event files where the real
`fit`/`test` would, so result extraction goes through the same `report` loader.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "benchmarks" / "sample_efficiency.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sample_efficiency"] = sweep  # dataclasses look their module up there
_spec.loader.exec_module(sweep)

BEST_LR = 3e-3


def parse_overrides(cli_args: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cli_args if arg.startswith("--") and "=" in arg)


class FakeCLI:
    """Writes what `fit`/`test` would log; accuracy peaks at BEST_LR and grows with the fraction."""

    def __init__(self, fail_variant: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.fail_variant = fail_variant

    def __call__(self, cli_args: list[str], run_dir: Path) -> int:
        options = parse_overrides(cli_args)
        self.calls.append((cli_args[0], options))
        logger = json.loads(options["trainer.logger"])["init_args"]
        log_dir = Path(logger["save_dir"], logger["name"], logger["version"], logger["sub_dir"] or "")
        log_dir.mkdir(parents=True, exist_ok=True)
        lr, fraction, seed = float(options["model.lr"]), float(options["data.fraction"]), int(options["seed_everything"])
        if logger["name"] == self.fail_variant:
            return 1
        accuracy = 0.5 * fraction + 0.1 * seed / 10 - abs(math.log10(lr / BEST_LR)) / 10
        writer = SummaryWriter(str(log_dir))
        if cli_args[0] == "fit":
            for step in range(10):
                writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("val/accuracy", accuracy, 9)
            (log_dir / "checkpoints").mkdir()
            (log_dir / "checkpoints" / "last.ckpt").write_bytes(b"fake")
            (log_dir / "hparams.yaml").write_text(f"variant: {logger['name']}\nfraction: {fraction}\nseed: {seed}\nlr: {lr}\n")
        else:
            assert options["ckpt_path"].endswith("last.ckpt")
            writer.add_scalar("test/accuracy", accuracy + 0.01, 9)
        writer.close()
        return 0


def sweep_args(tmp_path: Path, *extra: str) -> object:
    config = tmp_path / "tiny.yaml"
    if not config.exists():
        config.write_text("trainer: {max_epochs: 1}\n")
    argv = ["--config", str(config), "--out", str(tmp_path / "out"), "--no-report", *extra]
    return sweep.resolve_defaults(sweep.build_parser().parse_args(argv))


def test_default_plan_covers_every_variant_fraction_seed():
    specs = sweep.plan_runs(list(sweep.DEFAULT_METHODS), [0.1, 0.3, 0.5, 1.0], [0, 1, 2], dict.fromkeys(sweep.DEFAULT_METHODS, 1e-3),
                            config="c.yaml", config_sha256="x", max_epochs=3)
    assert len(specs) == 5 * 4 * 3 and len({s.key for s in specs}) == len(specs)
    search = sweep.plan_search(["lora", "doran"], [1e-3, 3e-3], 1.0, [0], config="c.yaml", config_sha256="x", max_epochs=3)
    assert [(s.variant, s.lr) for s in search] == [("lora", 1e-3), ("lora", 3e-3), ("doran", 1e-3), ("doran", 3e-3)]


def test_hash_is_stable_and_sensitive_to_what_changes_the_run():
    base = sweep.RunSpec("doran", 0.1, 0, 1e-3, "c.yaml", "abc", 3)
    assert base.key == sweep.RunSpec("doran", 0.1, 0, 1e-3, "c.yaml", "abc", 3).key
    changed = [sweep.RunSpec("doran", 0.1, 0, 3e-3, "c.yaml", "abc", 3), sweep.RunSpec("doran", 0.1, 0, 1e-3, "c.yaml", "abd", 3),
               sweep.RunSpec("doran", 0.1, 0, 1e-3, "c.yaml", "abc", 3, ("--trainer.limit_train_batches=3",))]
    assert base.key not in {spec.key for spec in changed}
    moved = sweep.RunSpec("doran", 0.1, 0, 1e-3, "/elsewhere/c.yaml", "abc", 3)  # same content, another checkout
    assert moved.key == base.key and moved.legacy_key != base.legacy_key


def test_cache_finds_runs_stored_under_the_legacy_key(tmp_path: Path):
    spec = sweep.RunSpec("dora", 1.0, 0, 1e-3, "c.yaml", "abc", 3)
    cache = sweep.ResultCache(tmp_path)
    assert cache.run_dir(spec) == tmp_path / "dora" / spec.key and cache.load(spec) is None
    legacy = tmp_path / "dora" / spec.legacy_key
    legacy.mkdir(parents=True)
    (legacy / "result.json").write_text(json.dumps({"status": "ok", "test": 0.5}))
    assert cache.run_dir(spec) == legacy and cache.load(spec) == {"status": "ok", "test": 0.5}


def test_cli_args_set_the_variant_switches(tmp_path: Path):
    options = parse_overrides(sweep.RunSpec("doran-aux", 0.3, 2, 1e-3, "c.yaml", "x", 4).cli_args("fit", tmp_path))
    assert (options["model.adapter.method"], options["model.adapter.noise"], options["model.adapter.aux"]) == ("doran", "false", "true")
    gaussian = parse_overrides(sweep.RunSpec("doran-gaussian", 1.0, 0, 1e-3, "c.yaml", "x", 4).cli_args("fit", tmp_path))
    assert (gaussian["model.adapter.noise_mode"], gaussian["model.adapter.aux_scope"]) == ("gaussian", "block")
    assert (options["data.fraction"], options["seed_everything"], options["trainer.max_epochs"]) == ("0.3", "2", "4")
    lora = parse_overrides(sweep.RunSpec("lora", 1.0, 0, 1e-3, "c.yaml", "x", 4).cli_args("test", tmp_path, sub_dir="test"))
    assert lora["model.adapter.noise"] == "null" and json.loads(lora["trainer.logger"])["init_args"]["sub_dir"] == "test"


def test_sweep_searches_lr_aggregates_and_resumes_from_cache(tmp_path: Path):
    args = sweep_args(tmp_path, "--methods", "lora", "doran", "--fractions", "0.5", "1.0", "--seeds", "0", "1",
                      "--lrs", "1e-3", "3e-3", "--epochs", "2")
    fake = FakeCLI()
    summary = sweep.run_sweep(args, launch=fake, log=lambda _: None)
    assert summary["lr_by_variant"] == {"lora": BEST_LR, "doran": BEST_LR}
    # 2 variants × (2 lrs at fraction 1.0, seed 0) search + 2 × 2 fractions × 2 seeds final - 2 reused = 10 runs.
    assert sum(1 for subcommand, _ in fake.calls if subcommand == "fit") == 10
    assert all(options["trainer.max_epochs"] == "2" for _, options in fake.calls)
    row = next(r for r in summary["table"] if r["variant"] == "doran" and r["fraction"] == 0.5)
    assert row["source"] == "test" and row["n"] == 2 and row["lr"] == BEST_LR
    assert row["mean"] == pytest.approx(0.25 + 0.005 + 0.01, abs=1e-6) and row["std"] == pytest.approx(0.005, abs=1e-6)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| doran | 0.003 |" in table and "0.2650 ± 0.0050 (n=2)" in table

    rerun = FakeCLI()
    sweep.run_sweep(args, launch=rerun, log=lambda _: None)
    assert rerun.calls == []  # everything cached

    victim = next((tmp_path / "out" / "runs" / "lora").glob("*/result.json"))
    victim.unlink()  # an interrupted run: its directory exists but it has no result
    resumed = FakeCLI()
    sweep.run_sweep(args, launch=resumed, log=lambda _: None)
    assert [subcommand for subcommand, _ in resumed.calls] == ["fit", "test"]


def test_failed_runs_are_reported_not_cached(tmp_path: Path):
    args = sweep_args(tmp_path, "--methods", "lora", "dora", "--fractions", "1.0", "--seeds", "0", "--lrs", "1e-3")
    summary = sweep.run_sweep(args, launch=FakeCLI(fail_variant="dora"), log=lambda _: None)
    dora = next(r for r in summary["table"] if r["variant"] == "dora")
    assert dora["failed"] == 1 and dora["n"] == 0 and "failed (1)" in (tmp_path / "out" / "results.md").read_text()
    retry = FakeCLI()
    sweep.run_sweep(args, launch=retry, log=lambda _: None)
    assert [options["model.adapter.method"] for _, options in retry.calls] == ["dora", "dora"]


def test_select_lrs_prefers_best_mean_and_ranks_diverged_last():
    def result(variant: str, lr: float, best_val: float, diverged: bool = False) -> dict:
        return {"spec": {"variant": variant, "lr": lr}, "status": "ok", "best_val": best_val, "diverged": diverged}

    results = [result("dora", 1e-3, 0.6), result("dora", 1e-2, 0.9, diverged=True), result("dora", 3e-3, 0.7),
               result("dora", 3e-3, 0.65), {"spec": {"variant": "lora", "lr": 1e-2}, "status": "failed"}, result("lora", 1e-3, 0.1)]
    assert sweep.select_lrs(results) == {"dora": 3e-3, "lora": 1e-3}


def test_bad_config_and_options_exit_2(tmp_path: Path, capsys):
    assert sweep.main(["--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert sweep.main(["--config", str(config), "--fractions", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_dry_run_prints_commands_without_running(tmp_path: Path):
    lines: list[str] = []
    args = sweep_args(tmp_path, "--quick", "--dry-run", "--methods", "doran-noise")
    assert sweep.run_sweep(args, launch=FakeCLI(), log=lines.append) == {}
    assert len(lines) == 2 and all(line.startswith("[to run] python -m doran_lightning fit") for line in lines)
    assert "--trainer.limit_train_batches=3" in lines[0] and not (tmp_path / "out" / "runs").exists()


def test_report_covers_only_this_sweeps_runs(tmp_path: Path):
    orphan = tmp_path / "out" / "runs" / "lora" / "0123456789abcdef" / "lora" / "old"
    orphan.mkdir(parents=True)  # a cached run of another setting must not enter this sweep's figures
    writer = SummaryWriter(str(orphan))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    args = sweep_args(tmp_path, "--methods", "doran", "--fractions", "0.5", "1.0", "--seeds", "0", "--lrs", "1e-3")
    args.no_report = False
    sweep.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert sorted(run["fraction"] for run in summary["runs"]) == [0.5, 1.0]
    assert summary["fraction_table"]["doran"]["0.5"]["source"] == "test"
    # Resuming the sweep (all runs cached now) rewrites its own report instead of refusing the folder.
    (tmp_path / "out" / "report" / "summary.json").write_text("{}")
    sweep.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    assert json.loads((tmp_path / "out" / "report" / "summary.json").read_text())["runs"]


@pytest.mark.slow
def test_quick_sweep_end_to_end_with_the_real_cli(tmp_path: Path):
    """One real `fit` + `test` through `python -m doran_lightning` (about 20 s on 2 cores)."""
    pytest.importorskip("sklearn")
    if not (ROOT / "configs" / "vit_tiny_digits.yaml").is_file():
        pytest.skip("configs/vit_tiny_digits.yaml is not in this checkout")
    out = tmp_path / "out"
    code = sweep.main(["--config", "vit_tiny_digits.yaml", "--quick", "--methods", "doran", "--fractions", "0.3", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["status"] == "ok", run.get("error")
    assert run["metric"] == "accuracy" and 0.0 <= run["test"] <= 1.0 and run["steps"] >= 1
    report_summary = json.loads((out / "report" / "summary.json").read_text())
    assert {Path(p).name for p in report_summary["figures"]} >= {"training_curves.png", "sigma_heatmap.png"}
    assert report_summary["runs"][0]["fraction"] == 0.3 and report_summary["runs"][0]["variant"] == "doran"


def test_parallel_jobs_give_the_same_table(tmp_path: Path):
    options = ("--methods", "lora", "dora", "--fractions", "0.5", "1.0", "--seeds", "0", "1", "--epochs", "2")
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    serial = sweep.run_sweep(sweep_args(tmp_path / "serial", *options), launch=FakeCLI(), log=lambda _: None)
    parallel_cli = FakeCLI()
    parallel = sweep.run_sweep(sweep_args(tmp_path / "parallel", *options, "--jobs", "4"), launch=parallel_cli,
                               log=lambda _: None)
    # fit + test of 2 variants × 3 default lrs (search) + 2 × 2 fractions × 2 seeds - 2 reused: none lost or doubled
    assert len(parallel_cli.calls) == 2 * (6 + 8 - 2)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "command"} for row in rows]  # noqa: E731
    assert strip(parallel["table"]) == strip(serial["table"])


@pytest.mark.parametrize("variant", list(sweep.VARIANT_SWITCHES))
def test_every_variant_label_is_the_label_the_model_logs(variant: str):
    """The sweep's label must be AdapterConfig.variant of the runs it launches (the report groups by it)."""
    from doran_lightning.adapters import AdapterConfig

    values = {"null": None, "true": True, "false": False}
    fields = {k: values.get(v, v) for k, v in sweep.VARIANT_SWITCHES[variant].items()}
    assert AdapterConfig(**fields).variant == variant


@pytest.mark.parametrize("targets, expected", [
    (["qkv[q,v]"], ["qkv[q,k,v]"]),
    (["query", "value"], ["query", "key", "value"]),
    (["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
])
def test_targets_qkv_adds_the_key_projection(tmp_path: Path, targets: list[str], expected: list[str]):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"adapter": {"target_modules": targets}}}))
    assert sweep.with_key_targets(config) == expected
    config.write_text(json.dumps({"model": {"adapter": {"target_modules": ["fc1"]}}}))
    with pytest.raises(sweep.SweepError, match="no query projection"):
        sweep.with_key_targets(config)


def test_targets_switch_reaches_every_run_and_its_cache_key(tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {adapter: {target_modules: [query, value]}}\n")
    fake = FakeCLI()
    args = sweep_args(tmp_path, "--methods", "lora", "doran-model", "doran-features-model", "--fractions", "1.0",
                      "--seeds", "0", "--lrs", "1e-3", "--targets", "qkv")
    summary = sweep.run_sweep(args, launch=fake, log=lambda _: None)
    assert {options["model.adapter.target_modules"] for _, options in fake.calls} == {'["query", "key", "value"]'}
    assert [row["variant"] for row in summary["table"]] == ["lora", "doran-model", "doran-features-model"]
    layouts = {(options["model.adapter.aux_layout"], options["model.adapter.aux_scope"]) for _, options in fake.calls}
    assert layouts == {("rank", "block"), ("rank", "model"), ("features", "model")}  # the across-layer layout runs
    rerun = FakeCLI()
    sweep.run_sweep(args, launch=rerun, log=lambda _: None)
    assert rerun.calls == []  # the same command again finds every run cached
    plain = sweep.run_sweep(sweep_args(tmp_path, "--methods", "lora", "--fractions", "1.0", "--seeds", "0", "--lrs", "1e-3"),
                            launch=FakeCLI(), log=lambda _: None)
    assert plain["runs"][0]["key"] != summary["runs"][0]["key"]  # q,v and q,k,v runs never share a cache entry
