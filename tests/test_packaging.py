"""A non-editable install carries the shipped configs and data assets (the wheel holds them)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_configs_and_assets(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("doran_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"doran_lightning/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    assert any(name.startswith("doran_lightning/data/assets/") for name in names)
    vendored = {f"doran_lightning/data/assets/banking77/{name}" for name in ("train.csv", "test.csv", "LICENSE", "README.md")}
    assert vendored <= names, sorted(vendored - names)  # a sub-folder of assets needs its own package-data glob
    assert "doran_lightning/adapters/layer.py" in names
