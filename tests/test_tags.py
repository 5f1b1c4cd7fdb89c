"""The registry of logged names: the docs/LOGGING.md table is rendered from it, and shipped names never change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from doran_lightning import tags
from doran_lightning.adapters import AdapterConfig, adapter_statistics, apply_adapters

LOGGING_PAGE = Path(__file__).resolve().parents[1] / "docs" / "LOGGING.md"

# Names shipped before the registry existed: a public contract (dashboards, report, users' scripts).
SHIPPED = {
    "train/loss", "train/lr", "train/grad_norm", "train/nonfinite_steps", "val/loss", "val/<metric>",
    "test/<metric>", "sigma/<projection>", "delta_m/<projection>", "delta_d/<projection>",
    "denominator_min/<projection>", "update_ratio/<projection>", "adapter_grad_norm/<projection>",
    "sigma/mean", "delta_m/mean", "delta_d/mean", "denominator_min/min",
    "hist/magnitude/<projection>", "hist/denominator/<projection>",
}


def test_logging_page_table_is_the_registry():
    text = LOGGING_PAGE.read_text(encoding="utf-8")
    section = text[text.index("## What is logged"):]
    start = section.index("| tag | when | what |")
    table = section[start:section.index("\n\n", start)]
    assert table == tags.markdown_table(), (
        "docs/LOGGING.md's 'What is logged' table differs from doran_lightning/tags.py; paste the output of "
        "python -c 'from doran_lightning import tags; print(tags.markdown_table())'")


def test_every_shipped_name_is_still_registered():
    registered = {name for row in tags.LOGGED for name in row.names}
    assert SHIPPED <= registered, f"renamed or dropped: {sorted(SHIPPED - registered)}"


def test_registry_covers_every_statistic_the_adapters_compute():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.query(x)

    model = Block()
    apply_adapters(model, AdapterConfig(method="doran", r=2, target_modules=["query"]))
    model(torch.randn(3, 8)).sum().backward()
    (stats,) = adapter_statistics(model).values()
    assert set(stats) == set(tags.STATISTIC_BY_KEY)


def test_alarm_tag_refuses_unknown_kinds():
    assert tags.alarm_tag("loss_spike") == "alarm/loss_spike"
    with pytest.raises(ValueError, match="sigma_collapse"):
        tags.alarm_tag("sigma")
