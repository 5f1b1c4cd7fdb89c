"""Issue 42, classes D–F (`benchmarks/hostile_round4_caches.py`): a test per case, in process.

D: the sweep's cache key holds the inherited ``PL_*`` variables; arguments that would train another variant than
``--methods`` names are refused; ``--status`` finds run folders from anywhere; the sweep's JSON is written
atomically and a damaged one is one line; ``evidence.py`` fails loudly; ``--out`` never replaces a user's file.
E: an environment setting a run did not use is one note naming the value that won.
F: labels as they look, EXIF orientation, linked predict folders, text-file ids, device files, the frozen-weight
fingerprint of adapter files, PiSSA's rank bound.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from doran_lightning import sweep
from doran_lightning.sweep import cli, plan, runs
from doran_lightning.sweep.plan import SweepError
from test_sweep import FakeCLI, make_args

ROOT = Path(__file__).resolve().parents[1]
NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def one_run(tmp_path: Path, *extra: str) -> object:
    return make_args(tmp_path, "--methods", "lora", "--seeds", "0", "--fractions", "1", "--lrs", "1e-3", *extra)


def lines_of(run, args) -> list[str]:
    lines: list[str] = []
    run(args, lines)
    return lines


# ------------------------------------------------------------------------------------------------ D: caches
def test_the_cache_key_holds_the_inherited_pl_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in [name for name in os.environ if name.startswith("PL_")]:
        monkeypatch.delenv(name)
    plain = plan.config_fields(ROOT / "configs" / "vit_tiny_digits.yaml", 1, [])
    spec = sweep.RunSpec("lora", 1.0, 0, 1e-3, "c.yaml", **{k: v for k, v in plain.items() if k != "config"})
    assert spec.env == () and "env" not in spec.key  # no variables: the key of older caches
    keys = {spec.key}
    for env in ({"PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "3"}, {"PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "2"},
                {"PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "2", "PL_TEST__TRAINER__LIMIT_TEST_BATCHES": "2"}):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            patch.setenv("PL_GLOBAL_SEED", "7")  # Lightning's own seeding, not a setting
            fields = plan.config_fields(ROOT / "configs" / "vit_tiny_digits.yaml", 1, [])
            assert dict(fields["env"]) == env
            keys.add(sweep.RunSpec("lora", 1.0, 0, 1e-3, "c.yaml", **{k: v for k, v in fields.items() if k != "config"}).key)
    assert len(keys) == 4
    changed = plan.config_fields(ROOT / "configs" / "vit_tiny_digits.yaml", 1, ["--trainer.limit_train_batches=2"])
    assert sweep.RunSpec("lora", 1.0, 0, 1e-3, "c", **{k: v for k, v in changed.items() if k != "config"}).key != spec.key
    assert plan.spec_from_dict(json.loads(json.dumps(sweep.RunSpec("lora", 1.0, 0, 1e-3, "c", "x", 1, env=(("PL_A", "1"),)).__dict__))).key \
        == sweep.RunSpec("lora", 1.0, 0, 1e-3, "c", "x", 1, env=(("PL_A", "1"),)).key


def test_a_sweep_without_the_variables_does_not_claim_the_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES", "3")
    cli.run_sweep(one_run(tmp_path), launch=FakeCLI(), log=lambda _: None)
    again = lines_of(lambda args, out: cli.run_sweep(args, log=out.append), one_run(tmp_path, "--dry-run"))
    assert any(line.startswith("[cached]") for line in again)
    assert "every run inherits PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES=3" in "\n".join(again)
    monkeypatch.delenv("PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES")
    without = lines_of(lambda args, out: cli.run_sweep(args, log=out.append), one_run(tmp_path, "--dry-run"))
    assert any(line.startswith("[to run]") for line in without) and not any("[cached]" in line for line in without)


@pytest.mark.parametrize("extra, names", [
    (["--model.adapter.method=pissa"], "model.adapter.method"),
    (["--model.adapter.method", "pissa"], "model.adapter.method"),
    (["--model.adapter.noise=true"], "model.adapter.noise"),
    (["--model.init_args.adapter.aux_scope=model"], "model.adapter.aux_scope"),
    (["--model.adapter={\"method\": \"pissa\"}"], "--model.adapter=…"),
])
def test_an_argument_that_trains_another_variant_is_refused(tmp_path: Path, extra: list[str], names: str):
    with pytest.raises(SweepError, match=names.replace(".", r"\.").replace("…", ".")):
        one_run(tmp_path, "--", *extra)


def test_a_config_after_the_dashes_that_sets_the_method_is_refused(tmp_path: Path):
    pissa = tmp_path / "pissa.yaml"
    pissa.write_text("model:\n  adapter:\n    method: pissa\n")
    with pytest.raises(SweepError, match="sets model.adapter.method"):
        one_run(tmp_path, "--", "--config", str(pissa))
    one_run(tmp_path, "--", "--model.adapter.r=4")  # any other adapter setting is fine


def test_status_finds_the_runs_from_another_folder_and_after_a_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    args = one_run(Path("."))  # a relative --out, as a user types it
    args.out = Path("out")
    cli.run_sweep(args, launch=FakeCLI(), log=lambda _: None)
    assert not Path(json.loads(Path("out/sweep.json").read_text())["runs"][0]["run_dir"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "1 runs: 1 finished" in sweep.status_table(tmp_path / "out")
    shutil.move(tmp_path / "out", elsewhere / "moved")
    monkeypatch.chdir(tmp_path)
    assert "1 runs: 1 finished" in sweep.status_table(elsewhere / "moved")
    monkeypatch.chdir(elsewhere / "moved")
    assert "1 runs: 1 finished" in sweep.status_table(Path("."))


@pytest.fixture
def finished_sweep(tmp_path: Path) -> Path:
    cli.run_sweep(one_run(tmp_path), launch=FakeCLI(), log=lambda _: None)
    return tmp_path / "out"


@pytest.mark.parametrize("damage, named", [
    ("cut result", "result.json"), ("empty result", "result.json"), ("list result", "result.json"),
    ("cut plan", "sweep.json"), ("cut failed", "failed.json"), ("cut running", "running.json"),
])
def test_a_damaged_json_file_is_one_line(finished_sweep: Path, damage: str, named: str, capsys: pytest.CaptureFixture):
    result = next(finished_sweep.glob("runs/*/*/result.json"))
    if damage == "cut plan":
        (finished_sweep / "sweep.json").write_text('{"command": "x", "ru')
    elif damage.endswith("result"):
        result.write_text({"cut": result.read_text()[:40], "empty": "", "list": "[]"}[damage.split()[0]])
    else:
        result.unlink()
        result.with_name(named).write_text('{"status": "fail')
    assert cli.main(["--status", str(finished_sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


def test_a_sweep_over_a_cut_short_result_is_one_line(finished_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    result = next(finished_sweep.glob("runs/*/*/result.json"))
    result.write_text(result.read_text()[:30])
    config = tmp_path / "tiny.yaml"
    code = cli.main(["--config", str(config), "--out", str(finished_sweep), "--no-report", "--epochs", "1", "--methods",
                     "lora", "--seeds", "0", "--fractions", "1", "--lrs", "1e-3", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(result) in err


def test_every_json_the_sweep_writes_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    written: list[str] = []
    atomic = runs.atomic_write
    monkeypatch.setattr(runs, "atomic_write", lambda path, write: (written.append(Path(path).name), atomic(path, write)))
    cli.run_sweep(one_run(tmp_path), launch=FakeCLI(), log=lambda _: None)
    assert {"spec.json", "running.json", "result.json", "sweep.json", "results.json"} <= set(written)


def _evidence():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import evidence
    finally:
        sys.path.pop(0)
    return evidence


def test_evidence_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    evidence = _evidence()
    assert evidence.main(["--table", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err
    calls: list[list[str]] = []
    monkeypatch.setattr(evidence.subprocess, "call", lambda command, **_: calls.append(command) or 2)
    assert evidence.main(["--cells", "sst2_f1", "--out", str(tmp_path / "ev")]) == 1
    assert len(calls) == 1  # exit 2 (bad input) stops the cell: every later stage would repeat it
    assert "1 stage(s) failed" in capsys.readouterr().err


@pytest.mark.parametrize("own", ["report/NOTES.md", "results.md", "results_runs.csv", "results.json"])
def test_out_never_replaces_a_users_file(tmp_path: Path, own: str):
    target = tmp_path / "out" / own
    target.parent.mkdir(parents=True)
    target.write_text("mine\n")
    with pytest.raises(SweepError, match=own.split("/")[-1]):
        one_run(tmp_path)
    one_run(tmp_path, "--overwrite")  # said, so allowed
    assert target.read_text() == "mine\n"


def test_a_sweep_may_replace_its_own_files_but_not_an_edited_one(finished_sweep: Path, tmp_path: Path):
    assert json.loads((finished_sweep / "sweep.json").read_text())["outputs"].keys() >= {"results.md", "results.json"}
    cli.run_sweep(one_run(tmp_path), launch=FakeCLI(), log=lambda _: None)  # again: its own files
    (finished_sweep / "results.md").write_text("my edits\n")
    with pytest.raises(SweepError, match="results.md"):
        one_run(tmp_path)


# ------------------------------------------------------------------------------------------------ E: settings
def test_an_environment_setting_not_used_is_one_note():
    from doran_lightning.env_settings import environment_notes

    config = {"trainer": {"max_epochs": 1, "limit_val_batches": 1}, "model": {"lr": 0.02},
              "data": {"class_path": "x.Digits", "init_args": {"fraction": 1.0}}}
    env = {"PL_FIT__TRAINER__MAX_EPOCHS": "2", "PL_FIT__DATA__INIT_ARGS__FRACTION": "0.1", "PL_FIT__DATA__FRACTION": "0.1",
           "PL_FIT__TRAINER__MAX_EPOCH": "1", "PL_FIT__TRAINER__LIMIT_VAL_BATCHES": "1", "PL_FIT__MODEL__LR": "0.02",
           "PL_TEST__MODEL__LR": "9", "HOME": "/x"}
    notes = environment_notes("fit", config, env)
    assert len(notes) == 4
    text = "\n".join(notes)
    assert "PL_FIT__TRAINER__MAX_EPOCHS=2 is not what this run uses: trainer.max_epochs=1 won" in text
    assert "PL_FIT__DATA__INIT_ARGS__FRACTION=0.1 is not what this run uses: data.fraction=1.0 won" in text
    assert "PL_FIT__DATA__FRACTION=0.1 is not what this run uses: data.fraction=1.0 won" in text
    assert "PL_FIT__TRAINER__MAX_EPOCH=1 is ignored: `fit` has no setting trainer.max_epoch" in text


def test_the_cli_prints_the_notes(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    from doran_lightning.cli import DoranCLI

    monkeypatch.setenv("PL_FIT__TRAINER__MAX_EPOCHS", "5")
    holder = type("Parsed", (), {"config": {"subcommand": "fit", "fit": {"trainer": {"max_epochs": 1}}}})()
    DoranCLI.before_instantiate_classes(holder)
    assert "doran_lightning: note: PL_FIT__TRAINER__MAX_EPOCHS=5 is not what this run uses: trainer.max_epochs=1" \
        in capsys.readouterr().err


def test_the_sweep_names_what_shadows_an_inherited_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PL_FIT__TRAINER__MAX_EPOCHS", "5")
    monkeypatch.setenv("PL_FIT__MODEL__ADAPTER__METHOD", "pissa")
    monkeypatch.setenv("PL_FIT__DATA__INIT_ARGS__FRACTION", "0.5")
    text = "\n".join(lines_of(lambda args, out: cli.run_sweep(args, log=out.append), one_run(tmp_path, "--dry-run")))
    assert "PL_FIT__TRAINER__MAX_EPOCHS=5 is shadowed in every run: trainer.max_epochs is set by --epochs " \
           "(trainer.max_epochs=1)" in text
    assert "PL_FIT__MODEL__ADAPTER__METHOD=pissa is shadowed in every run: model.adapter.method is set by --methods " \
           "(lora: method=lora)" in text
    assert "PL_FIT__DATA__INIT_ARGS__FRACTION=0.5 is shadowed in every run: data.fraction is set by --fractions (1)" in text


# ------------------------------------------------------------------------------------------------ F: inputs
def test_labels_are_read_as_they_look(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from doran_lightning.data.language import TextClassificationDataModule

    def names(labels: list[str]) -> list[str]:
        data = tmp_path / "labels.csv"
        data.write_text("text,label\n" + "".join(f"t{i},{label}\n" for i, label in enumerate(labels)), encoding="utf-8")
        module = TextClassificationDataModule.__new__(TextClassificationDataModule)
        module.files, module.text_columns, module.label_column = {"train": str(data)}, ["text"], "label"
        return module._labels_of_train_file()[0]

    with caplog.at_level("INFO", logger="doran_lightning"):
        assert names([NFC, NFD, "tea", "tea"]) == [NFC, "tea"]
        assert "look identical are one class" in caplog.text and "'cafe\\u0301'" in caplog.text
        for invisible in ("tea\u200b", "\ufefftea", "te\u00ada", "\u200dtea "):
            assert names(["tea", invisible, "milk"]) == ["milk", "tea"]
        caplog.clear()
        assert names(["Tea", "tea", "milk"]) == ["Tea", "milk", "tea"]  # case kept, with a note
        assert "differ only by letter case" in caplog.text


def test_class_folders_that_look_identical_are_one_class(tmp_path: Path):
    from PIL import Image

    from doran_lightning.data.vision import ImageFolderDataModule

    for split in ("train", "val"):
        for name in (NFC, NFD, "tea"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "0.png")
    module = ImageFolderDataModule(str(tmp_path), image_size=4)
    assert module.classes == [NFC, "tea"] and module.num_classes == 2
    labels = sorted(label for _, label in module.load_split("train").samples)
    assert labels == [0, 0, 1]


def exif_image(path: Path, orientation: int) -> Path:
    from PIL import Image

    image = Image.new("RGB", (20, 10))
    image.paste((255, 255, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("name, orientation", [("a.jpg", 6), ("a.png", 8), ("plain.png", 1)])
def test_exif_orientation_is_applied_in_training_and_predict(tmp_path: Path, name: str, orientation: int):
    from torchvision import transforms

    from doran_lightning.data.vision import LabelledImages, UnlabelledImages

    path = exif_image(tmp_path / name, orientation)
    expected = (10, 20) if orientation == 1 else (20, 10)
    for dataset in (LabelledImages([(path, 0)], transforms.ToTensor()), UnlabelledImages(tmp_path, transforms.ToTensor())):
        assert tuple(dataset[0]["pixel_values"].shape[1:]) == expected


def test_predict_follows_linked_folders_once(tmp_path: Path):
    from PIL import Image

    from doran_lightning.data.vision import UnlabelledImages

    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder, name in ((root / "real", "a.png"), (outside, "b.png")):
        folder.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(folder / name)
    (root / "link").symlink_to(outside)
    (root / "loop").symlink_to(root)
    found = UnlabelledImages(root, lambda image: image).ids
    assert sorted(Path(path).name for path in found) == ["a.png", "b.png"]


def test_predict_ids_of_a_text_file_are_its_lines(tmp_path: Path):
    from doran_lightning.data.language import TextClassificationDataModule

    file = tmp_path / "inputs.txt"
    file.write_text("first\n\nthird\n\n\nsixth\n")
    module = TextClassificationDataModule.__new__(TextClassificationDataModule)
    module.predict_file, module.tokenizer, module.max_length, module.text_columns = str(file), None, 8, ["text"]
    dataset = module.load_predict()
    assert dataset.ids == [0, 2, 5] and [text for (text,) in dataset.texts] == ["first", "third", "sixth"]


def test_a_predict_file_that_is_a_device_is_not_called_missing(tmp_path: Path):
    from doran_lightning.data.common import require_file

    (tmp_path / "null.csv").symlink_to("/dev/null")
    for path in (tmp_path / "null.csv", Path("/dev/null")):
        with pytest.raises(ValueError, match="not a regular file") as raised:
            require_file(path, "predict", "check --data.predict_file")
        assert "not found" not in str(raised.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        require_file(tmp_path / "absent.csv", "predict", "check --data.predict_file")


def test_adapter_files_know_their_frozen_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tiny_models import tiny_vit

    from doran_lightning.adapters import AdapterConfig, apply_adapters, load_adapters, save_adapters

    torch.manual_seed(0)
    base = tiny_vit()
    model = apply_adapters(tiny_vit(), AdapterConfig(method="dora", r=2))
    model.load_state_dict(base.state_dict(), strict=False)
    save_adapters(model, tmp_path)

    def copy_of(base_model: torch.nn.Module) -> torch.nn.Module:
        fresh = tiny_vit()
        fresh.load_state_dict(base_model.state_dict())
        return fresh

    load_adapters(copy_of(base), tmp_path)  # the weights it was trained on
    other = copy_of(base)
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.mul_(1.01)  # same shapes, other frozen weights
    with pytest.raises(ValueError, match="trained on other frozen weights"):
        load_adapters(other, tmp_path)
    path = tmp_path / "adapter_model.safetensors"  # a file of an older release: no fingerprint
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "frozen_fingerprint"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)
    with caplog.at_level("INFO", logger="doran_lightning"):
        load_adapters(other, tmp_path)
    assert "holds no fingerprint of the frozen weights" in caplog.text


def test_pissa_rank_above_a_slice_is_one_line():
    from tiny_models import tiny_vit

    from doran_lightning.adapters import AdapterConfig, apply_adapters

    with pytest.raises(ValueError, match=r"AdapterConfig.r: .* at most rank 32 \(got r=64\)"):
        apply_adapters(tiny_vit(), AdapterConfig(method="pissa", r=64))
    apply_adapters(tiny_vit(), AdapterConfig(method="pissa", r=32))  # the bound itself is fine


def test_a_read_only_run_is_evaluated_into_a_new_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture):
    import lightning.pytorch as pl

    from doran_lightning import run_folders

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    trainer = pl.Trainer(default_root_dir=tmp_path / "root", enable_progress_bar=False, enable_model_summary=False)
    assert run_folders.RunFolders().claim(trainer, "test", run / "checkpoints" / "last.ckpt") == run / "test"
    # a read-only copy or mount (root writes through mode bits, so the probe is what says no)
    monkeypatch.setattr(run_folders, "writable", lambda folder: Path(folder) != run)
    trainer = pl.Trainer(default_root_dir=tmp_path / "root", enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level("INFO", logger="doran_lightning"):
        assert run_folders.RunFolders().claim(trainer, "test", run / "checkpoints" / "last.ckpt") is None
    assert Path(trainer.logger.log_dir).is_relative_to(tmp_path / "root") and not (run / "test_1").exists()
    assert f"run folder {run} is read-only" in caplog.text


def test_a_sweep_folder_of_an_older_release_keeps_its_files_until_recorded(finished_sweep: Path, tmp_path: Path):
    from doran_lightning.sweep.progress import write_plan

    plan_file = finished_sweep / "sweep.json"
    legacy = {key: value for key, value in json.loads(plan_file.read_text()).items() if key != "outputs"}
    plan_file.write_text(json.dumps(legacy))
    (finished_sweep / "results.md").write_text("an older sweep's table\n")
    write_plan(finished_sweep, "another grid", {})  # a sweep interrupted after writing its plan
    assert "outputs" not in json.loads(plan_file.read_text())
    one_run(tmp_path)  # its files still count as the sweep's
