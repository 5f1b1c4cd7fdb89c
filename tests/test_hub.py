"""Weights from the hub: downloaded as the libraries do when it answers; one error line in seconds when it does not.

The network is simulated on 127.0.0.1 only: a closed port stands for an unreachable hub, a listening socket for a
reachable one (whose download itself is replaced by a stand-in; nothing leaves the machine).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import timm

from conftest import TINY_VIT_OVERRIDES
from doran_lightning import hub
from doran_lightning.cli import main
from doran_lightning.models import BackboneConfig, BackboneLoadError, build_backbone, validate_backbone


@pytest.fixture
def online_mode(monkeypatch):
    """No HF_HUB_OFFLINE (whatever the test environment sets), and a fresh reachability answer."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_answers", {})


@pytest.fixture
def unreachable_hub(online_mode, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once closed: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


@pytest.fixture
def reachable_hub(online_mode, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield


def test_unreachable_hub_fails_in_seconds_naming_the_flag(unreachable_hub):
    started = time.monotonic()
    with pytest.raises(BackboneLoadError) as raised:
        build_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=True, overrides=TINY_VIT_OVERRIDES),
                       "image_classification", 10)
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert "\n" not in message and "did not answer" in message and "--model.backbone.checkpoint_path=" in message
    assert hub_constants.HF_HUB_OFFLINE is False  # offline only for the block that read the cache

    with pytest.raises(BackboneLoadError, match=r"--model\.backbone\.name=/local/path"):
        validate_backbone(BackboneConfig(source="hf", name="doran-test/not-cached-anywhere"), "text_classification", 2)
    assert time.monotonic() - started < 15


def test_reachable_hub_lets_timm_download(reachable_hub, monkeypatch):
    calls = []
    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):  # stands in for timm's download from the hub
        calls.append((pretrained, hub_constants.HF_HUB_OFFLINE))
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    build_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=True, overrides=TINY_VIT_OVERRIDES),
                   "image_classification", 10)
    assert calls == [(True, False)]  # asked for pretrained weights with downloads allowed


def test_reachable_hub_lets_transformers_download(reachable_hub, monkeypatch):
    import transformers

    seen = []

    def from_pretrained(name, **kwargs):  # stands in for transformers' download of config.json
        seen.append((name, hub_constants.HF_HUB_OFFLINE))
        return transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    validate_backbone(BackboneConfig(source="hf", name="doran-test/on-the-hub"), "text_classification", 2)
    assert seen == [("doran-test/on-the-hub", False)]


def test_cli_on_an_unreachable_hub_prints_one_error_line_and_leaves_no_run(unreachable_hub, tmp_path: Path,
                                                                          monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    started = time.monotonic()
    code = main(["fit", "--config", "vit_tiny_digits.yaml", f"--trainer.default_root_dir={tmp_path}",
                 "--model.backbone.pretrained=true", "--trainer.enable_progress_bar=false"])
    assert time.monotonic() - started < 15
    err = capfd.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if "error:" in line or "Retrying" in line] == [
        next(line for line in err.splitlines() if line.startswith("doran_lightning: error: Could not load"))]
    assert "--model.backbone.checkpoint_path=" in err
    assert not (tmp_path / "lightning_logs").exists()  # no run folder, nor the root it would have gone in
