"""Which folder a command writes to, and what a failed command leaves (the end-to-end path: test_quickstart.py)."""

from __future__ import annotations

from pathlib import Path

from doran_lightning.run_folders import checkpoint_run, claim_sub_folder, holds_no_result


def test_an_evaluation_on_a_runs_checkpoint_goes_inside_that_run(tmp_path: Path):
    run = tmp_path / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "loose.ckpt").write_bytes(b"x")
    assert checkpoint_run(str(run / "checkpoints" / "last.ckpt")) == run
    assert checkpoint_run(tmp_path / "loose.ckpt") is None  # not in a run: a new version_N as before
    assert checkpoint_run("best") is None and checkpoint_run(None) is None
    assert [claim_sub_folder(run, "test").name for _ in range(3)] == ["test", "test_1", "test_2"]


def test_only_a_folder_without_results_counts_as_litter(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "events.out.tfevents.1.host.0").write_bytes(b"")
    assert holds_no_result(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not holds_no_result(tmp_path)
