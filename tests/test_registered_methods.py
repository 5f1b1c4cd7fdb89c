"""Every registered method is a variant everywhere (issue 41): `sweep --methods` accepts it, its runs get its
config switches, and `report` labels its folders by its name (a `pissa` run is not tabulated as `lora`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("label", ["lora", "dora", "doran", "doran-fixed", "pissa", "dora-pissa"])
@pytest.mark.parametrize("sigma_scale", ["absolute", "row_norm"])
def test_each_method_file_declares_every_tensor_its_slices_hold(label: str, sigma_scale: str) -> None:
    from tiny_models import tiny_bert

    from doran_lightning.adapters import adapted_modules, apply_adapters

    torch.manual_seed(0)
    cfg = AdapterConfig.from_variant(label, r=4, sigma_scale=sigma_scale)
    model = apply_adapters(tiny_bert(), cfg, bank=False)
    for layer in adapted_modules(model).values():
        declared = {spec.name: spec for spec in type(layer.method).tensors}
        trained = {spec.name: spec.role for spec in layer.method.trained_tensors()}
        for adapter in layer.adapters.values():
            held = [name for name, _ in adapter.named_parameters()] + [name for name, _ in adapter.named_buffers()]
            assert held and set(held) <= set(declared), (label, held)
            assert adapter.adapter_params() == trained


def test_a_method_that_accepts_the_noise_switch_must_build_a_sigma() -> None:
    from doran_lightning.adapters.methods import AdapterMethod

    with pytest.raises(TypeError, match="builds no σ"):
        type("Noisy", (AdapterMethod,), {"name": "noisy", "rescales": True, "switches": ("noise",)})


def test_the_old_module_paths_re_export_the_moved_methods() -> None:
    from doran_lightning.adapters import methods, noise, pissa

    assert noise.Noise is methods.doran.Noise and noise.initial_rho is methods.doran.initial_rho
    assert pissa.PiSSA is methods.PiSSA and pissa.DoRAPiSSA is methods.DoRAPiSSA
    assert {methods.LoRA.name, methods.DoRA.name, methods.DoRAN.name} <= set(method_names())
