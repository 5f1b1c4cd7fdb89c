"""Issue 19 without a CLI run: outputs that cannot eat their inputs, verified files, resume merging, labels, images."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from doran_lightning.adapters import AdapterConfig, apply_adapters, save_adapters
from doran_lightning.adapters.io import WEIGHTS_FILE, read_adapter_tensors
from doran_lightning.checkpointing import CheckpointError, read_checkpoint
from doran_lightning.data.language import integer_label
from doran_lightning.data.vision import check_images, to_rgb
from doran_lightning.safe_files import WriteError, atomic_write
from doran_lightning.outputs import OutputOverlapError, clean_stale_staging, refuse_overlap, staged_folder
from doran_lightning.resume import conflict_message, plan_resume
from doran_lightning.summary import RunSummary


# ---------------------------------------------------------------------- outputs never touch inputs
@pytest.mark.parametrize(("out", "relation"), [("runs", "is"), ("runs/v0/report", "lies inside"), (".", "contains")])
def test_an_output_overlapping_an_input_is_refused(tmp_path: Path, out: str, relation: str):
    (tmp_path / "runs" / "v0").mkdir(parents=True)
    with pytest.raises(OutputOverlapError, match=f"^--out={tmp_path / out} {relation} the input {tmp_path / 'runs'};"):
        refuse_overlap(tmp_path / out, [tmp_path / "runs"])
    refuse_overlap(tmp_path / "elsewhere", [tmp_path / "runs"])  # beside it is fine


def test_overwrite_cannot_delete_an_input(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last.ckpt").write_bytes(b"weights")
    with pytest.raises(OutputOverlapError):
        with staged_folder(tmp_path / "runs", overwrite=True, inputs=[tmp_path / "runs" / "last.ckpt"]):
            pass
    assert (tmp_path / "runs" / "last.ckpt").read_bytes() == b"weights"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_folders_of_dead_processes_are_removed_on_the_next_write(tmp_path: Path):
    from doran_lightning.safe_files import host_tag

    dead = tmp_path / f".export.{host_tag()}-{dead_pid()}.abcd1234.partial"
    live = tmp_path / f".export.{host_tag()}-{__import__('os').getpid()}.efgh5678.partial"
    legacy = tmp_path / ".export.k2j4h5g6.partial"
    for folder in (dead, live, legacy):
        (folder / "merged").mkdir(parents=True)
    notes: list[str] = []
    with staged_folder(tmp_path / "report", overwrite=False, note=notes.append) as staging:
        (staging / "summary.md").write_text("ok")
    assert not dead.exists() and live.exists() and legacy.exists()
    assert (tmp_path / "report" / "summary.md").read_text() == "ok"
    assert sorted(notes) == sorted([
        f"removed {dead}, the unfinished output of a process that no longer runs (pid {dead.name.split('-')[-1].split('.')[0]})",
        f"{legacy} looks like an unfinished output of an interrupted run; delete it if no export/report is running"])
    assert clean_stale_staging(tmp_path / "absent") == []


# ---------------------------------------------------------------------- files verified when read
def checkpoint_with_flipped_bytes(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.full((64,), 0.5)}}, path)
    data = bytearray(path.read_bytes())
    start = data.index(b"\x00\x00\x00\x3f" * 8)
    data[start + 3] ^= 0xFF  # one byte of one float: 0.5 -> another finite value, which torch.load would accept
    path.write_bytes(bytes(data))


def test_checkpoint_bytes_changed_after_saving_are_refused(tmp_path: Path):
    checkpoint_with_flipped_bytes(tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"member x/data/0 fails its CRC-32 check"):
        read_checkpoint(tmp_path / "x.ckpt")


def test_non_finite_and_empty_checkpoints_are_refused_by_name(tmp_path: Path):
    torch.save({"state_dict": {"head.bias": torch.tensor([0.0, math.inf])}}, tmp_path / "inf.ckpt")
    with pytest.raises(CheckpointError, match=r"tensor head.bias holds NaN or infinite values"):
        read_checkpoint(tmp_path / "inf.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        read_checkpoint(tmp_path / "empty.ckpt")


def adapted() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return apply_adapters(model, AdapterConfig(method="dora", r=2, target_modules=["0"]))


def test_adapter_files_carry_a_digest_and_finite_values(tmp_path: Path):
    save_adapters(adapted(), tmp_path / "a")
    assert set(read_adapter_tensors(tmp_path / "a" / WEIGHTS_FILE))  # a clean file loads
    data = bytearray((tmp_path / "a" / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes: safetensors itself would not notice
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt: its tensors do not match the SHA-256"):
        read_adapter_tensors(tmp_path / "a" / WEIGHTS_FILE)
    model = adapted()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("magnitude")).fill_(math.nan)
    save_adapters(model, tmp_path / "nan")
    with pytest.raises(ValueError, match=r"tensor .*magnitude holds NaN or infinite values"):
        read_adapter_tensors(tmp_path / "nan" / WEIGHTS_FILE)


def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def disk_full(temporary: str) -> None:
        Path(temporary).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nbasic_ios::clear")

    with pytest.raises(WriteError, match=rf"^cannot write {target}: RuntimeError: \[enforce fail .*; the previous file"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------- resume honours or refuses
SAVED = {"lr": 0.02, "scheduler": "cosine", "adapter": {"r": 8, "method": "dora"}, "num_classes": 10}
DEFAULTS = {"lr": 1e-3, "scheduler": "cosine", "adapter": {"r": 8, "method": "lora"}, "num_classes": None}


def test_resume_applies_safe_settings_and_keeps_the_rest_of_the_checkpoint():
    plan = plan_resume(SAVED, {**DEFAULTS, "lr": 1e-5}, DEFAULTS)
    assert plan.applied == ["lr=1e-05 (checkpoint: 0.02)"] and plan.refused == []
    assert plan.hparams == {"lr": 1e-5, "scheduler": "cosine", "adapter": {"r": 8, "method": "dora"}, "num_classes": 10}


def test_resume_refuses_shape_changing_settings_even_at_their_default():
    plan = plan_resume({**SAVED, "adapter": {"r": 4, "method": "dora"}}, DEFAULTS, DEFAULTS, named=["adapter.r"])
    assert plan.refused == ["adapter.r=8 (checkpoint: 4)"]
    assert conflict_message("x.ckpt", plan.refused) == (
        "--ckpt_path=x.ckpt was trained with other settings that shape its tensors: model.adapter.r=8 (checkpoint: 4). "
        "Drop these settings to use the checkpoint as trained, or start a new run without --ckpt_path")
    # Not named and at its default: the checkpoint's value is taken, as LightningCLI does.
    assert plan_resume({**SAVED, "adapter": {"r": 4, "method": "dora"}}, DEFAULTS, DEFAULTS).refused == []


# ---------------------------------------------------------------------- labels and images
@pytest.mark.parametrize(("raw", "expected"), [(3, 3), (2.0, 2), ("7", 7), (" 1 ", 1), (0.2, None), (math.nan, None),
                                               ("1.5", None), ("a", None), (np.int64(4), 4), (np.float32(1.7), None)])
def test_integer_labels(raw, expected):
    assert integer_label(raw) == expected


def test_bad_images_fail_or_are_skipped_and_counted(tmp_path: Path):
    good, truncated = tmp_path / "good.png", tmp_path / "cut.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    truncated.write_bytes(good.read_bytes()[:40])
    samples = [(good, 0), (truncated, 1)]
    with pytest.raises(ValueError, match=rf"^{truncated}: cannot be read as an image \(\w+Error: .*bad_images=skip to leave such files out$"):
        check_images(samples, "error", tmp_path / "train.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_images(samples, "skip", tmp_path / "train.txt") == [(good, 0)]
    assert any(f"skipped 1 of 2 images that cannot be decoded (data.bad_images=skip): {truncated}" in str(w.message)
               for w in caught)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path):
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        rgb = np.asarray(to_rgb(image, tmp_path / "deep.png"))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]  # convert("RGB") alone gives [0, 255, 255]


# ---------------------------------------------------------------------- the verdict
def test_a_run_that_ended_at_chance_is_never_called_stable():
    module = SimpleNamespace(hparams=SimpleNamespace(metric="accuracy", num_classes=4))
    trainer = SimpleNamespace(callbacks=[])
    assert RunSummary.verdict(trainer, module, 0.25).startswith("ended at chance (last val/accuracy 0.2500); 0 alarm(s)")
    assert RunSummary.verdict(trainer, module, 0.9).startswith("stable, no alarms")


def test_report_names_an_event_file_that_ends_early(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    from doran_lightning.report.runs import truncated_event_files

    with SummaryWriter(tmp_path / "run") as writer:
        for step in range(20):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    (event,) = (tmp_path / "run").glob("events.out.tfevents*")
    assert truncated_event_files([tmp_path / "run"]) == []
    event.write_bytes(event.read_bytes()[:-7])  # killed mid-record
    assert truncated_event_files([tmp_path / "run"]) == [event]


# ---------------------------------------------------------------------- the second hostile round
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_over_white(tmp_path: Path, mode: str):
    """convert("RGB") keeps the colour a transparent pixel stores (black here); a viewer shows white."""
    if mode == "P":
        image = Image.new("P", (2, 1), 0)
        image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
        image.putpixel((1, 0), 1)
        image.info["transparency"] = 0  # palette entry 0 (black) is transparent
    else:
        image = Image.new(mode, (2, 1), (0, 0) if mode == "LA" else (0, 0, 0, 0))
        image.putpixel((1, 0), (90, 255) if mode == "LA" else (10, 200, 10, 255))
    path = tmp_path / "t.png"
    image.save(path)
    with Image.open(path) as opened:
        rgb = to_rgb(opened, path)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == ((90, 90, 90) if mode == "LA" else (10, 200, 10))  # opaque pixels unchanged


def test_text_labels_are_one_class_per_name(tmp_path: Path):
    """" pos" and "pos" are one class; true/false become the names "True"/"False" in train and val alike."""
    from doran_lightning.data.language import read_table

    spaced = tmp_path / "spaced.csv"
    spaced.write_text("text,label\na,pos\nb, pos\nc,neg \nd,neg\n")
    assert read_table(spaced, ["text"], "label").labels == ["pos", "pos", "neg", "neg"]
    flags = tmp_path / "flags.csv"
    flags.write_text("text,label\na,true\nb,False\n")
    assert read_table(flags, ["text"], "label").labels == ["True", "False"]


def test_a_warm_up_longer_than_the_run_is_said(tmp_path: Path, caplog, monkeypatch):
    from conftest import tiny_fit_args

    from doran_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    with caplog.at_level("INFO", logger="doran_lightning"):
        assert main(tiny_fit_args(tmp_path, "--model.warmup_steps=50")) == 0
    assert "note: model.warmup_steps=50 is not shorter than this run (2 optimizer steps)" in caplog.text
