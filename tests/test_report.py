"""The `report` command on event files written here with torch's SummaryWriter (contract tags)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from doran_lightning import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROJECTIONS = ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v", "blocks.1.attn.qkv.q", "blocks.1.attn.qkv.v"]
VARIANT_SWITCHES = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "doran": {"method": "doran", "noise": True, "aux": True},
    "doran-noise": {"method": "doran", "noise": True, "aux": False},
    "doran-aux": {"method": "doran", "noise": False, "aux": True},
}


def write_run(run_dir: Path, hparams: dict | None, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    """A Lightning-like version dir: event file + hparams.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if hparams is not None:
        (run_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return run_dir


def training_scalars(seed: int, steps: int = 40, spike_at: int | None = None, corr_sign: float = -1.0) -> dict:
    """Decaying loss (+ optional spike), grad norms, σ/ΔM/ΔD per projection with a planted ΔM–ΔD sign."""
    rng = np.random.default_rng(seed)
    loss = 2.0 * np.exp(-np.arange(steps) / 20) + 0.05 * rng.random(steps)
    if spike_at is not None:
        loss[spike_at] *= 10
    scalars = {
        "train/loss": list(enumerate(loss.tolist())),
        "train/grad_norm": [(s, 1.0 + 0.1 * s) for s in range(steps)],
        "train/nonfinite_steps": [(s, 0.0) for s in range(steps)],
        "val/loss": [(steps // 2, 1.0), (steps - 1, 0.5)],
        "val/accuracy": [(steps // 2, 0.6 + 0.01 * seed), (steps - 1, 0.7 + 0.01 * seed)],
        "test/accuracy": [(steps - 1, 0.65 + 0.01 * seed)],
    }
    for layer, name in enumerate(PROJECTIONS):
        logged = range(0, steps, 5)
        scalars[f"sigma/{name}"] = [(s, 0.01 + 0.001 * layer + 1e-4 * s) for s in logged]
        delta_d = [(s, 1e-3 * s * (layer + 1) + 1e-5 * rng.random()) for s in logged]
        scalars[f"delta_d/{name}"] = delta_d
        scalars[f"delta_m/{name}"] = [(s, 0.5 + corr_sign * d) for s, d in delta_d]
        scalars[f"radial_gain/{name}"] = [(s, 0.01 * (layer + 1) + 1e-3 * s) for s in logged]
    scalars["sigma/mean"] = [(s, 0.0115 + 1e-4 * s) for s in range(0, steps, 5)]
    scalars["radial_gain/mean"] = [(s, 0.02 + 1e-3 * s + 1e-3 * seed) for s in range(0, steps, 5)]
    return scalars


def hparams_for(variant: str, seed: int, **extra) -> dict:
    return {**VARIANT_SWITCHES[variant], "seed": seed, "lr": 1e-3, "r": 8, **extra}


def run_report(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = report.main([*args, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text()) if code == 0 else {}
    return code, summary


def test_spike_indices_counts_planted_spike_and_ignores_nonfinite():
    values = np.array([1.0, 0.9, 0.95, 0.9, 0.85, 0.9, 5.0, 0.8, float("nan"), 0.8, 0.82])
    assert report.spike_indices(values, factor=3.0, window=50).tolist() == [6]
    assert report.spike_indices(values, factor=10.0, window=50).tolist() == []


def test_variant_labels_from_hparams_and_path(tmp_path: Path):
    for variant, switches in VARIANT_SWITCHES.items():
        assert report.variant_from_hparams(report.flatten({"model": {"adapter": switches}})) == variant
    assert report.variant_from_hparams({"method": "doran"}) == "doran"  # switches default to on
    assert report.variant_from_hparams({"method": "doran", "noise": False, "aux": False}) == "doran-none"
    # The sweep's ablation switches keep their labels (the rule is AdapterConfig.variant's).
    ablations = {"doran-fixed": {"noise_mode": "fixed"}, "doran-gaussian": {"noise_mode": "gaussian"},
                 "doran-model": {"aux_scope": "model"}}
    for variant, switch in ablations.items():
        switches = {"method": "doran", "noise": "true", "aux": "true", "noise_mode": "learnable", "aux_scope": "block", **switch}
        assert report.variant_from_hparams(report.flatten({"model": {"adapter": switches}})) == variant
    assert report.variant_from_hparams({"method": "doran", "aux": "false", "noise_mode": "fixed"}) == "doran-noise-fixed"
    assert report.variant_from_path(tmp_path / "runs" / "doran-model" / "ab12" / "version_0") == "doran-model"
    assert report.variant_from_path(tmp_path / "doran_noise_fixed-f1" / "version_0") == "doran-noise-fixed"
    assert report.variant_from_path(tmp_path / "sweep" / "doran_noise-f0.1" / "version_0") == "doran-noise"
    assert report.variant_from_path(tmp_path / "my_experiment" / "version_3") == "my_experiment"


def test_stability_table_counts_planted_spike_and_nonfinite(tmp_path: Path):
    logs = tmp_path / "logs"
    write_run(logs / "doran" / "version_0", hparams_for("doran", 0), training_scalars(0, spike_at=25))
    broken = training_scalars(1)
    broken["train/loss"][30:] = [(step, float("nan")) for step in range(30, 40)]  # diverged for good
    broken["train/nonfinite_steps"] = [(s, float(s >= 30)) for s in range(40)]
    write_run(logs / "doran" / "version_1", hparams_for("doran", 1), broken)
    code, summary = run_report(tmp_path, str(logs), "--spike-factor", "3")
    assert code == 0
    runs = {run["seed"]: run for run in summary["runs"]}
    assert runs[0]["loss_spikes"] == 1 and runs[0]["spike_steps"] == [25]
    assert runs[0]["nonfinite_steps"] == 0 and runs[1]["nonfinite_steps"] == 10  # NaN losses beyond the counter
    assert not runs[0]["diverged"] and runs[1]["diverged"]
    assert runs[1]["loss_spikes"] == 0
    assert runs[0]["max_grad_norm"] == pytest.approx(1.0 + 0.1 * 39)
    assert runs[0]["best_val"] == pytest.approx(0.7) and runs[1]["final_val"] == pytest.approx(0.71)
    assert runs[0]["test"] == pytest.approx(0.65)
    (group,) = summary["groups"]
    assert group["runs"] == 2 and group["loss_spikes_total"] == 1
    assert group["best_val"][0] == pytest.approx(0.705)
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| doran | 2 | 1 |" in markdown and "python -m doran_lightning report" in markdown
    # the radial gain at the last logged step (35): 0.02 + 0.035 + 0.001·seed, mean ± std over the two seeds
    assert runs[0]["radial_gain"] == pytest.approx(0.055) and runs[1]["radial_gain"] == pytest.approx(0.056)
    assert "| 0.0555 ± 0.0005 |" in markdown


def test_figures_and_planted_correlation_signs(tmp_path: Path):
    logs = tmp_path / "logs"
    for seed in (0, 1):
        write_run(logs / f"doran_s{seed}", hparams_for("doran", seed), training_scalars(seed, corr_sign=-1.0))
        write_run(logs / f"dora_s{seed}", hparams_for("dora", seed), training_scalars(seed, corr_sign=+1.0))
    code, summary = run_report(tmp_path, str(logs / "*"))
    assert code == 0
    assert summary["correlations"]["doran"]["pearson_r"] < -0.99
    assert summary["correlations"]["dora"]["pearson_r"] > 0.99
    assert summary["correlations"]["doran"]["points"] == 2 * len(PROJECTIONS) * 8  # runs × projections × logged steps
    names = {Path(p).name for p in summary["figures"]}
    assert names == {"training_curves.png", "sigma_heatmap.png", "sigma_curves.png", "radial_gain_heatmap.png",
                     "radial_gain_curves.png", "delta_m_vs_delta_d.png"}
    for name in names:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC


def test_fraction_table_uses_mean_over_seeds_and_best_lr(tmp_path: Path):
    logs = tmp_path / "logs"
    for variant in ("lora", "doran"):
        for fraction in (0.1, 1.0):
            for seed in (0, 1, 2):
                scalars = training_scalars(seed)
                bonus = 0.1 if variant == "doran" else 0.0
                scalars["test/accuracy"] = [(39, fraction / 2 + bonus + 0.01 * seed)]
                hp = hparams_for(variant, seed, fraction=fraction)
                write_run(logs / f"{variant}-{fraction}-{seed}", hp, scalars)
    # A worse-lr lora run at fraction 1.0 must not enter the cell: its val metric is lower.
    weak = training_scalars(0)
    weak["val/accuracy"] = [(39, 0.1)]
    weak["test/accuracy"] = [(39, 0.0)]
    write_run(logs / "lora-weak", hparams_for("lora", 0, fraction=1.0, lr=0.5), weak)
    code, summary = run_report(tmp_path, str(logs))
    assert code == 0
    assert set(summary["condition_keys"]) == {"fraction", "lr"}
    cell = summary["fraction_table"]["lora"]["1"]
    assert cell["n"] == 3 and cell["lr"] == 1e-3 and cell["source"] == "test"
    assert cell["mean"] == pytest.approx(0.51) and cell["std"] == pytest.approx(np.std([0.5, 0.51, 0.52]))
    assert summary["fraction_table"]["doran"]["0.1"]["mean"] == pytest.approx(0.16)
    assert (tmp_path / "out" / "metric_vs_fraction.png").read_bytes()[:8] == PNG_MAGIC


def test_lr_sensitivity_table_width_relative_to_each_settings_best_lr(tmp_path: Path):
    """Per setting: best lr, the contiguous lr range within one point of the best, divergences."""
    logs = tmp_path / "logs"
    accuracy = {  # setting -> lr -> mean accuracy (seeds add -0.005, 0, +0.005)
        ("dora", True): {1e-3: 0.80, 3e-3: 0.85, 1e-2: 0.845, 3e-2: 0.70},
        ("dora", False): {1e-3: 0.84, 3e-3: 0.845, 1e-2: 0.842, 3e-2: 0.838},
    }
    for (variant, detach), by_lr in accuracy.items():
        for lr, value in by_lr.items():
            for seed, offset in zip((0, 1, 2), (-0.005, 0.0, 0.005)):
                scalars = training_scalars(seed)
                scalars["test/accuracy"] = [(39, value + offset)]
                if detach and lr == 3e-2 and seed == 2:  # one diverged run: out of the mean, counted
                    scalars["train/loss"] = [(s, float("nan")) for s in range(40)]
                run_dir = write_run(logs / f"{variant}-{detach}-{lr:g}-{seed}", hparams_for(variant, seed, lr=lr, fraction=0.3),
                                    scalars)
                # hparams.yaml does not hold detach_norm: the report reads it from LightningCLI's saved config
                (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"adapter": {"detach_norm": detach}}}))
    code, summary = run_report(tmp_path, str(logs))
    assert code == 0
    assert set(summary["condition_keys"]) == {"lr", "detach_norm"}
    rows = {entry["setting"]: entry for entry in summary["lr_sensitivity"]}
    assert set(rows) == {"dora detach_norm=True", "dora detach_norm=False"}
    detached, attached = rows["dora detach_norm=True"], rows["dora detach_norm=False"]
    assert detached["best_lr"] == 3e-3 and detached["best"] == pytest.approx(0.85)
    assert detached["range"] == [3e-3, 1e-2] and detached["width"] == pytest.approx(1e-2 / 3e-3)
    assert detached["relative_range"] == pytest.approx([1.0, 1e-2 / 3e-3])
    assert detached["diverged"] == 1 and detached["runs"] == 12
    assert detached["points"][-1]["n"] == 2  # the diverged seed is left out of the mean
    assert attached["range"] == [1e-3, 3e-2] and attached["width"] == pytest.approx(30.0) and attached["diverged"] == 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| dora detach_norm=False | 0.3 | 0.003 | 0.8450 ± 0.0041 | 0.001–0.03 (×0.333–×10) | ×30 | 0/12 |" in markdown
    assert (tmp_path / "out" / "metric_vs_lr.png").read_bytes()[:8] == PNG_MAGIC


def test_yaml_with_python_tags_and_nested_keys(tmp_path: Path):
    run_dir = write_run(tmp_path / "logs" / "version_0", None, training_scalars(0))
    (run_dir / "hparams.yaml").write_text(
        "adapter: !!python/object:doran_lightning.adapters.config.AdapterConfig\n"
        "  method: doran\n  noise: true\n  aux: false\n  r: 4\nseed_everything: 7\ndata:\n  fraction: 0.3\n"
    )
    run = report.load_run(run_dir)
    assert run.variant == "doran-noise"
    assert (run.hparam("seed"), run.hparam("fraction"), run.hparam("r")) == (7, 0.3, 4)


def test_bad_inputs_exit_2_with_clear_message(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing*"), "--out", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err
    write_run(tmp_path / "noloss", {"method": "lora"}, {"val/accuracy": [(0, 0.5)]})
    assert report.main([str(tmp_path / "noloss"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train/loss" in err and "val/accuracy" in err and "Traceback" not in err
    write_run(tmp_path / "ok", {"method": "lora"}, {"train/loss": [(0, 1.0), (1, 0.5)]})
    assert report.main([str(tmp_path / "ok"), "--metric", "f1", "--out", str(tmp_path / "o")]) == 2
    assert "--metric f1" in capsys.readouterr().err


def test_run_without_optional_tags_still_reports(tmp_path: Path):
    write_run(tmp_path / "lora" / "version_0", {"method": "lora"}, {"train/loss": [(s, 1.0 / (s + 1)) for s in range(10)]})
    code, summary = run_report(tmp_path, str(tmp_path / "lora"))
    assert code == 0
    assert summary["metric"] is None and summary["runs"][0]["max_grad_norm"] is None
    assert not summary["runs"][0]["diverged"]
    assert any("sigma" in w for w in summary["warnings"])
    assert math.isnan(summary["groups"][0]["best_val"][0])


def test_test_metrics_in_a_sub_dir_belong_to_the_run(tmp_path: Path):
    scalars = training_scalars(0)
    test_metric = {"test/accuracy": scalars.pop("test/accuracy")}
    run_dir = write_run(tmp_path / "logs" / "doran" / "version_0", hparams_for("doran", 0), scalars)
    write_run(run_dir / "test", None, test_metric)  # TensorBoardLogger(sub_dir="test") of a later `test` call
    code, summary = run_report(tmp_path, str(tmp_path / "logs"))
    assert code == 0 and len(summary["runs"]) == 1
    assert summary["runs"][0]["test"] == pytest.approx(0.65)
    assert not any("skipped" in warning for warning in summary["warnings"])


def test_a_killed_run_and_its_resumption_are_one_replicate(tmp_path: Path):
    logs, scalars = tmp_path / "logs", training_scalars(0)
    early = {tag: [(s, v) for s, v in points if s <= 24] for tag, points in scalars.items()}  # killed after step 24
    late = {tag: [(s, v) for s, v in points if s >= 20] for tag, points in scalars.items()}  # resumed from step 20
    killed = write_run(logs / "version_0", hparams_for("doran", 0), early)
    resumed = write_run(logs / "version_1", hparams_for("doran", 0), late)
    (resumed / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": str(killed / "checkpoints" / "last.ckpt")}))
    other_seed = write_run(logs / "version_2", hparams_for("doran", 1), training_scalars(1))
    assert report.find_run_dirs([str(logs)]) == {killed: [killed, resumed], other_seed: [other_seed]}
    code, summary = run_report(tmp_path, str(logs))
    assert code == 0 and len(summary["runs"]) == 2
    assert summary["runs"][0]["max_grad_norm"] == pytest.approx(1.0 + 0.1 * 39)  # steps of both parts


def test_out_is_written_whole_and_replaced_only_with_overwrite(tmp_path: Path, capsys):
    logs, out = tmp_path / "logs", tmp_path / "out"
    write_run(logs / "version_0", hparams_for("lora", 0), training_scalars(0))
    out.mkdir()
    (out / "stale.png").write_bytes(b"an earlier report's figure")
    assert report.main([str(logs), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"report: error: --out={out} is not empty; pass --overwrite to replace it "
                                       "as a whole, or choose another folder\n")
    assert [p.name for p in out.iterdir()] == ["stale.png"]
    assert report.main([str(logs), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.png").exists() and (out / "summary.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "out"]  # no staging folder left over


def test_run_names_and_footer_are_relative_to_the_given_folder(tmp_path: Path, monkeypatch):
    logs = tmp_path / "logs"
    write_run(logs / "doran" / "version_0", hparams_for("doran", 0), training_scalars(0))
    write_run(logs / "lora" / "version_0", hparams_for("lora", 0), training_scalars(1))
    code, summary = run_report(tmp_path, str(logs / "*"))
    assert code == 0
    assert sorted(run["run"] for run in summary["runs"]) == ["doran/version_0", "lora/version_0"]
    assert summary["command"] == "python -m doran_lightning report '…/logs/*' --out '…/out'"
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert str(tmp_path) not in markdown and "| doran/version_0 | doran |" in markdown
    monkeypatch.chdir(tmp_path)  # below the working directory: paths as the user typed them, relative
    assert report.shown_command([str(logs / "doran"), "--out", "out"]) == (
        "python -m doran_lightning report logs/doran --out out")


def test_alarm_precision_classes_existing_runs_by_the_shared_rules(tmp_path: Path):
    """benchmarks/alarm_precision.py --runs: a healthy run with an alarm is a false alarm, a run at chance a failure."""
    from test_benchmarks import load

    precision = load("alarm_precision")
    losses = [(step, 1.5 * 0.97 ** step) for step in range(30)]
    healthy = {"train/loss": losses, "val/accuracy": [(29, 0.9)], "alarm/grad_jump": [(0, 0.0), (12, 1.0)]}
    at_chance = {"train/loss": [(step, 1.39) for step in range(30)], "val/accuracy": [(29, 0.25)],
                 "alarm/collapse": [(0, 0.0), (25, 1.0)]}
    quiet_failure = {"train/loss": [(step, 1.0) for step in range(29)] + [(29, float("nan"))],
                     "val/accuracy": [(29, 0.6)]}
    for name, scalars in (("healthy", healthy), ("chance", at_chance), ("nan", quiet_failure)):
        write_run(tmp_path / name, {"method": "dora", "num_classes": 4}, scalars)
    rows = {Path(row["run"]).name: row for row in precision.measure_runs([str(tmp_path)])}
    assert (rows["healthy"]["outcome"], rows["healthy"]["alarms"]) == ("healthy", {"grad_jump": 1})
    assert (rows["chance"]["outcome"], rows["chance"]["reasons"], rows["chance"]["alarms"]) == (
        "fails", ["loss at the uninformed level", "ended at chance"], {"collapse": 1})
    assert rows["nan"]["outcome"] == "fails" and "non-finite step" in rows["nan"]["reasons"]
    table = precision.runs_markdown(list(rows.values()))
    assert "| healthy | 1 | 1 | grad_jump ×1 |" in table and "| fails | 2 | 1 | collapse ×1 |" in table
    assert "**none**" in table  # the quiet failure is listed as a miss
    assert precision.measure_runs([str(tmp_path)], since=4e9) == []  # every run began before 2096


def test_settings_label_only_the_methods_they_act_in() -> None:
    """LoRA has no norm to detach and DoRA no σ: their curves are not labelled with those settings."""
    from doran_lightning.report.runs import setting_applies

    assert not setting_applies({"method": "lora"}, "detach_norm")
    assert setting_applies({"method": "dora"}, "detach_norm") and not setting_applies({"method": "dora"}, "sigma_init")
    assert setting_applies({"method": "doran"}, "sigma_scale")
    assert not setting_applies({"method": "doran", "noise": False}, "sigma_scale")  # aux-only
    assert setting_applies({"method": "doran", "noise": "false"}, "detach_norm")
    assert setting_applies({}, "detach_norm") and setting_applies({"method": "lora"}, "lr")
