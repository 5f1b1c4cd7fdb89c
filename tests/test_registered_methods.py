"""Every registered method is a variant everywhere (issue 41): `sweep --methods` accepts it, its runs get its
config switches, and `report` labels its folders by its name (a `pissa` run is not tabulated as `lora`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from doran_lightning.adapters import method_names
from doran_lightning.adapters.config import VARIANT_LABELS, AdapterConfig, variant_labels, variant_switches
from doran_lightning.report.runs import variant_from_path
from doran_lightning.sweep import RunSpec, SweepError
from doran_lightning.sweep.cli import build_parser
from doran_lightning.sweep.plan import check_methods


def test_every_registered_method_is_a_variant_label() -> None:
    labels = variant_labels()
    assert set(method_names()) <= set(labels)
    assert labels[: len(VARIANT_LABELS)] == VARIANT_LABELS  # the shipped labels keep their order
    assert {"pissa", "dora-pissa"} <= set(labels) - set(VARIANT_LABELS)


@pytest.mark.parametrize("label", ["pissa", "dora-pissa", "doran-features", "lora"])
def test_a_variant_label_builds_a_config_of_that_label(label: str) -> None:
    assert AdapterConfig(**variant_switches(label)).variant == label


def test_sweep_accepts_every_registered_method_and_passes_its_switches() -> None:
    args = build_parser().parse_args(["--config", "c.yaml", "--methods", *method_names()])
    assert args.methods == list(method_names())
    check_methods(args.methods)  # no SweepError
    with pytest.raises(SweepError, match="unknown variant"):
        check_methods(["lora", "qlora"])
    argv = RunSpec("pissa", 0.1, 0, 1e-3, "c.yaml", "abc", 3).cli_args("fit", Path("out"))
    assert "--model.adapter.method=pissa" in argv and "--model.adapter.noise=null" in argv


@pytest.mark.parametrize(("folder", "label"), [
    ("runs/pissa/ab12/version_0", "pissa"), ("sweep/dora_pissa-f0.1/version_0", "dora-pissa"),
    ("sweep/dora-pissa/version_0", "dora-pissa"), ("runs/dora/version_0", "dora"), ("runs/lora/version_0", "lora"),
    ("doran_noise_fixed-f1/version_0", "doran-noise-fixed"), ("runs/doran-features-model/version_0", "doran-features-model"),
    ("runs/doran-paper/version_0", "doran-paper"),
])
def test_report_labels_folders_by_every_registered_method(folder: str, label: str) -> None:
    assert variant_from_path(Path(folder)) == label
