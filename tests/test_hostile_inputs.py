"""Issue 31's cases, one test each: inputs known from the whole config, labels and lengths that cannot mislead,
one-line errors where tracebacks were, adapter configs checked against their tensors, links out of a dataset.
(The data modules are built directly; the CLI cases run `cli.main` in this process.)"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from doran_lightning.cli import main
from doran_lightning.data.common import DataError
from doran_lightning.data.language import TextClassificationDataModule
from doran_lightning.data.tokenizers import minilm_path
from doran_lightning.outputs import OutputOverlapError, config_inputs, refuse_overlap

from conftest import TINY_VIT_OVERRIDES, only_run_dir, tiny_fit_args

MINILM = minilm_path()


def csv_file(path: Path, rows: list[tuple[str, object]], header: str = "text,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def text_module(train: Path, val: Path | None = None, **kwargs) -> TextClassificationDataModule:
    return TextClassificationDataModule(train_file=str(train), val_file=str(val or train), tokenizer=MINILM,
                                        batch_size=2, **kwargs)


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def image(path: Path, colour: tuple[int, int, int] = (1, 2, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


# ------------------------------------------------------------------------------------------ outputs vs inputs
def test_config_inputs_are_every_existing_path_of_the_config(tmp_path):
    data = csv_file(tmp_path / "d" / "train.csv", [("a", "x")])
    config = {"data": {"init_args": {"train_file": str(data), "root": str(tmp_path / "d"), "metric": "accuracy",
                                     "val_file": str(tmp_path / "missing.csv")}},
              "trainer": {"default_root_dir": str(tmp_path), "logger": {"init_args": {"save_dir": str(tmp_path)}}},
              "model": {"backbone": {"checkpoint_path": None, "name": "vit_tiny_patch16_224"}}}
    inputs = config_inputs(config)
    assert sorted(inputs) == [tmp_path / "d", data]  # outputs and missing paths are not inputs
    refuse_overlap(tmp_path / "runs", inputs, adds_only=True)  # beside the data: fine
    refuse_overlap(tmp_path, inputs, adds_only=True)  # a run folder may contain the data
    refuse_overlap(tmp_path / "d" / "runs", inputs, adds_only=True)  # or sit in a dataset's folder
    with pytest.raises(OutputOverlapError, match="is the input"):
        refuse_overlap(tmp_path / "d", inputs, adds_only=True)
    with pytest.raises(OutputOverlapError, match="lies inside the input"):  # but not where entries are classes
        refuse_overlap(tmp_path / "d" / "train" / "runs", inputs, adds_only=True, listed=[tmp_path / "d" / "train"])
    with pytest.raises(OutputOverlapError, match="contains the input"):
        refuse_overlap(tmp_path, inputs)  # export/report replace their --out: never over data


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT run of 2 steps that logs every 50 steps, and an image folder."""
    root = tmp_path_factory.mktemp("trained")
    assert main(tiny_fit_args(root / "runs", "--trainer.log_every_n_steps=50")) == 0
    run = only_run_dir(root / "runs")
    for split in ("train", "val"):
        for name, colour in (("a", (1, 2, 3)), ("b", (200, 100, 50))):
            image(root / "images" / split / name / "0.png", colour)
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "images": root / "images"}


def test_a_run_shorter_than_log_every_n_steps_still_logs_its_loss(trained):
    from doran_lightning.report import load_run

    run = load_run(trained["run"], [trained["run"]])
    assert list(run.scalars["train/loss"].steps) == [1]  # its last step, written at the end of training


def test_export_never_deletes_the_data_files_of_its_config(trained, capsys):
    images, before = trained["images"], sorted(trained["images"].rglob("*"))
    code, text = run(["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
                      f"--ckpt_path={trained['ckpt']}", "--data=doran_lightning.data.vision.ImageFolderDataModule",
                      f"--data.root={images}", "--data.image_size=16", f"--out={images}", "--overwrite=true"], capsys)
    assert code == 2 and f"--out={images} is the input {images}" in text
    assert sorted(images.rglob("*")) == before


def test_fit_refuses_a_run_folder_inside_the_images_it_reads(trained, capsys):
    inside = trained["images"] / "train" / "runs"
    code, text = run(tiny_fit_args(inside, "--data=doran_lightning.data.vision.ImageFolderDataModule",
                                   f"--data.root={trained['images']}", "--data.batch_size=2"), capsys)
    assert code == 2 and "--trainer.default_root_dir" in text and "lies inside the input" in text
    assert not inside.exists()  # refused before anything was made: no new "class" folder in train/


def test_sweep_out_inside_a_data_root_is_refused(trained, capsys):
    from doran_lightning.sweep import main as sweep_main

    out = trained["images"] / "train" / "sweep"
    code = sweep_main(["--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions", "0.1", "--seeds", "0",
                       "--lrs", "0.01", "--out", str(out), "--dry-run", "--",
                       "--data=doran_lightning.data.vision.ImageFolderDataModule", f"--data.root={trained['images']}"])
    assert code == 2 and "lies inside the input" in capsys.readouterr().err and not out.exists()


def test_an_explicit_logger_version_never_writes_into_a_finished_run(trained, capsys):
    finished = trained["run"]
    before = sorted(finished.rglob("*"))
    code, text = run(tiny_fit_args(finished.parent.parent, "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                                   f"--trainer.logger.save_dir={finished.parent.parent}",
                                   f"--trainer.logger.version={finished.name.split('_')[1]}"), capsys)
    assert code == 2 and f"{finished} already holds the logs of another run" in text
    assert sorted(finished.rglob("*")) == before


# ------------------------------------------------------------------------------------------ one-line refusals
@pytest.mark.parametrize("extra, says", [
    (["--trainer.precision=16-true"], "trainer.precision=16-true on a CPU"),
    (["--trainer.limit_train_batches=0"], "--trainer.limit_train_batches=0 trains nothing"),
    (["--trainer.max_steps=0"], "--trainer.max_steps=0 trains nothing"),
    (['--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
      '"init_args": {"save_last": true}}'], "two ModelCheckpoint callbacks with the same settings"),
    (["--data.image_size=32"], "data.image_size=32 but the backbone vit_tiny_patch16_224 takes 16×16 images"),
], ids=["16-true on CPU", "limit_train_batches=0", "max_steps=0", "twin ModelCheckpoint", "image_size"])
def test_fits_that_cannot_run_faithfully_end_in_one_line_and_no_folder(tmp_path, capsys, extra, says):
    code, text = run(tiny_fit_args(tmp_path / "runs", *extra), capsys)
    assert code == 2 and says in text and "Traceback" not in text
    assert not (tmp_path / "runs" / "lightning_logs").exists() or not any((tmp_path / "runs" / "lightning_logs").iterdir())


def test_a_raw_pickle_checkpoint_is_named_without_torchs_unsafe_advice(tmp_path, capsys):
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": {"w": [1.0]}}))
    code, text = run(["test", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT_OVERRIDES}",
                      "--data.image_size=16", f"--ckpt_path={raw}"], capsys)
    assert code == 2 and f"Checkpoint {raw} is not a file written by torch.save" in text
    assert "weights_only" not in text


def test_backbone_weights_that_are_not_safetensors_are_named(tmp_path):
    from doran_lightning.models import BackboneConfig, BackboneLoadError, build_backbone

    renamed = tmp_path / "weights.safetensors"
    renamed.write_bytes(pickle.dumps({"w": 1}))
    config = BackboneConfig(source="timm", name="vit_tiny_patch16_224", checkpoint_path=str(renamed),
                            overrides=dict(TINY_VIT_OVERRIDES))
    with pytest.raises(BackboneLoadError, match=f"checkpoint_path={renamed} is not a safetensors file"):
        build_backbone(config, "image_classification", 2)
    no_weights = tmp_path / "config.pt"
    torch.save({"not": "a state dict"}, no_weights)  # timm trained from random weights on it, without a word
    with pytest.raises(BackboneLoadError, match=f"checkpoint_path={no_weights} holds no tensors"):
        build_backbone(dataclasses.replace(config, checkpoint_path=str(no_weights)), "image_classification", 2)


# ------------------------------------------------------------------------------------------ labels and text
def test_integer_labels_without_0_become_named_classes_and_say_so(tmp_path, caplog):
    train = csv_file(tmp_path / "train.csv", [("a", 1), ("b", 2), ("c", 1), ("d", 2)])
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        dm = text_module(train)
    assert (dm.num_classes, dm.label_names) == (2, ["1", "2"]) and "1→0, 2→1" in caplog.text
    dm.setup("fit")
    assert dm.datasets["train"].labels == [0, 1, 0, 1]
    ratings = text_module(csv_file(tmp_path / "ratings.csv", [(f"t{i}", 1 + i % 5) for i in range(10)]))
    assert ratings.label_names == ["1", "2", "3", "4", "5"]
    unseen = text_module(train, csv_file(tmp_path / "val.csv", [("a", 1), ("b", 3)]))
    with pytest.raises(DataError, match=r"val.csv:3: label 3 is not one of the train file's labels"):
        unseen.setup("fit")
    negative = text_module(csv_file(tmp_path / "neg.csv", [("a", -1), ("b", 0), ("c", 1)]))
    with pytest.raises(DataError, match=r"neg.csv:2: label -1 is outside"):  # negative ids stay refused
        negative.setup("fit")


def test_na_null_and_none_are_text_not_missing(tmp_path):
    dm = text_module(csv_file(tmp_path / "na.csv", [("null", "NA"), ("NA", "yes"), ("None", "NA"), ("nan", "yes")]))
    assert dm.label_names == ["NA", "yes"]
    dm.setup("fit")
    assert [row[0] for row in dm.datasets["train"].texts] == ["null", "NA", "None", "nan"]


def test_an_extra_field_in_the_first_row_is_named(tmp_path):
    train = tmp_path / "extra.csv"
    train.write_text("text,label\na,x,EXTRA\nb,y\nc,x\n")
    with pytest.raises(DataError, match=r"extra.csv:2: this row has 3 fields but the header names 2"):
        text_module(train)


def test_a_folder_given_as_a_file_is_called_a_folder(tmp_path):
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        text_module(tmp_path / "train.csv")


def test_max_length_must_leave_a_text_token_and_truncation_is_said(tmp_path, caplog):
    train = csv_file(tmp_path / "train.csv", [(f"{'many words here ' * 20}{i}", "ab"[i % 2]) for i in range(6)])
    for length in (1, 2):
        with pytest.raises(ValueError, match=f"data.max_length={length} leaves no token for the text: the tokenizer "
                                             "adds 2 special tokens"):
            text_module(train, max_length=length)
    with pytest.raises(ValueError, match="max_length=4 leaves no token.*adds 3 special tokens.*at least 5"):
        text_module(train, max_length=4, text_columns=["text", "text"])  # a pair: [CLS] a [SEP] b [SEP]
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        text_module(train, max_length=8).setup("fit")
    assert "data.max_length=8 truncates 6 of 6 train rows, by a median of" in caplog.text


def test_rows_shared_between_splits_are_warned_with_counts(tmp_path, caplog):
    rows = [(f"sentence {i}", "ab"[i % 2]) for i in range(8)]
    train = csv_file(tmp_path / "train.csv", rows)
    val = csv_file(tmp_path / "val.csv", rows[:3] + [("other", "a")])
    test = csv_file(tmp_path / "test.csv", [("sentence 7", "b"), ("new", "a")])
    with caplog.at_level(logging.INFO, logger="doran_lightning"):
        dm = text_module(train, val, test_file=str(test))
        dm.setup("fit")
    assert dm.split_overlaps == "train∩val 3, train∩test 1" and "warning: split overlap" in caplog.text
    clean = text_module(train, csv_file(tmp_path / "fresh.csv", [("x", "a"), ("y", "b")]))
    clean.setup("fit")
    assert clean.split_overlaps is None  # test defaults to val: the same split, no overlap


# ------------------------------------------------------------------------------------------ trust
def adapter_folder(tmp_path: Path, **changes) -> Path:
    import timm

    from doran_lightning.adapters import AdapterConfig, apply_adapters, save_adapters

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY_VIT_OVERRIDES)
    apply_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["qkv[q,v]"]))
    folder = save_adapters(model, tmp_path / "adapters")
    manifest = json.loads((folder / "adapter_config.json").read_text())
    manifest["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("changes, says", [({"r": 10**9}, "was changed after"), ({"alpha": 999.0}, "was changed after")])
def test_an_edited_adapter_config_is_refused_before_it_builds_anything(tmp_path, changes, says):
    import timm

    from doran_lightning.adapters import load_adapters

    folder = adapter_folder(tmp_path, **changes)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY_VIT_OVERRIDES)
    with pytest.raises(ValueError, match=f"adapter_config.json {says}"):
        load_adapters(model, folder)
    assert not any("adapters" in name for name, _ in model.named_modules())  # nothing was applied


def test_a_rank_no_tensor_has_is_refused_even_without_a_digest(tmp_path):
    """Files written before the config digest existed: the rank is still checked against the tensors' shapes."""
    import timm
    from safetensors.torch import load_file, save_file

    from doran_lightning.adapters import load_adapters

    folder = adapter_folder(tmp_path, r=10**9)
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "doran_lightning.adapters/1"})
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY_VIT_OVERRIDES)
    with pytest.raises(ValueError, match="says r=1000000000, but no tensor in adapter_model.safetensors"):
        load_adapters(model, folder)


def test_split_file_paths_may_not_leave_the_dataset_through_a_link(tmp_path):
    from doran_lightning.data.common import path_inside

    root = tmp_path / "dataset"
    image(root / "images" / "0.png")
    image(tmp_path / "outside" / "secret.png")
    (root / "images" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (root / "images" / "linked").symlink_to(tmp_path / "outside")
    os.symlink(root / "images" / "0.png", root / "images" / "inside.png")
    assert path_inside(root, "images/inside.png", "split.txt", 3) == root / "images" / "inside.png"  # stays inside
    for entry in ("images/link.png", "images/linked/secret.png"):
        with pytest.raises(DataError, match=r"split.txt:3: .* leaves the dataset folder .* through the symbolic link"):
            path_inside(root, entry, "split.txt", 3)
    with pytest.raises(DataError, match="NUL byte"):
        path_inside(root, "images/0\x00.png", "split.txt", 4)


def test_a_recovered_loss_spike_run_is_not_called_unstable():
    """The run summary: episodes counted beside 'stable, no alarms'."""
    from types import SimpleNamespace

    from doran_lightning.alarms import AlarmConfig, StabilityAlarms
    from doran_lightning.summary import RunSummary

    alarms = StabilityAlarms(AlarmConfig(min_history=5))
    trainer = SimpleNamespace(loggers=[], progress_bar_callback=None, callbacks=[alarms])
    for step, loss in enumerate([0.3, 0.28, 0.29, 0.27, 0.28, 1.22, 0.27, 0.26, 0.3, 0.25, 0.24]):
        alarms.check_loss(trainer, step, loss)
    module = SimpleNamespace(hparams=SimpleNamespace(metric="accuracy", num_classes=4))
    verdict = RunSummary.verdict(trainer, module, last=0.9)
    assert verdict.startswith("stable, no alarms; 1 recovered loss-spike episode(s), not alarms")


def test_a_staged_output_named_through_dotdot_is_replaced_whole(tmp_path, monkeypatch):
    from doran_lightning.outputs import staged_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with staged_folder(Path("out/../out"), overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial / .old left beside it
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_a_full_disk_without_a_file_name_is_still_one_clear_line():
    import errno

    from doran_lightning.safe_files import error_text

    message = error_text(OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith("No space left on device: the disk holding the run folder is full")
    assert error_text(OSError(errno.ENOSPC, "No space left on device", "/runs/x")) == "/runs/x: No space left on device"
