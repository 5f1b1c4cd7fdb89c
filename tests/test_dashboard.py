"""The TensorBoard dashboard, alarms, hp_metric and run summary, read back from a real run's event file."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import only_run_dir, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from doran_lightning import report, tags
from doran_lightning.cli import main
from doran_lightning.dashboard import (
    ALARMS, EVERY_LAYER, OPEN_CATEGORIES, STATISTICS, TRAINING, closed_categories, constant_statistics,
    dashboard_layout, every_layer_category, layout_summary, per_layer_category,
)

VIT_B = [f"blocks.{i}.attn.qkv.{s}" for i in range(12) for s in "qv"]
LLAMA_7B = [f"model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("q_proj", "v_proj")]


def charts_matching(layout: dict, tag: str) -> list[str]:
    return [title for category in layout.values() for title, (_, regexes) in category.items()
            if any(re.search(regex, tag) for regex in regexes)]


@pytest.mark.parametrize("projections", [VIT_B, LLAMA_7B], ids=["vit-b", "llama-7b"])
def test_per_layer_charts_hold_one_layer_across_runs(projections):
    layout = dashboard_layout(projections)
    for stat in tags.STATISTICS:
        charts = layout[per_layer_category(stat)]
        assert len(charts) == len(projections) + bool(stat.aggregate_tag)
        logged = [stat.tag(p) for p in projections] + ([stat.aggregate_tag] if stat.aggregate_tag else [])
        for chart, (_, regexes) in charts.items():  # exactly one logged tag per chart: a line per run
            assert len([tag for tag in logged if any(re.search(r, tag) for r in regexes)]) == 1, chart
    alarm_charts = layout[ALARMS]
    assert [charts_matching({"x": alarm_charts}, tags.alarm_tag(kind)) for kind in tags.ALARM_KINDS] == [
        [f"alarms: {kind}"] for kind in tags.ALARM_KINDS]
    assert not charts_matching({"x": layout["training"]}, tags.alarm_tag("loss_spike"))
    assert closed_categories(layout) == {ALARMS, EVERY_LAYER, next(title for title in layout if " vs " in title),
                                         *(per_layer_category(stat) for stat in tags.STATISTICS)}
    summary = layout_summary(layout)
    written = layout_pb2.Layout()
    written.ParseFromString(summary.value[0].tensor.string_val[0])
    assert {c.title for c in written.category if c.closed} == closed_categories(layout)


@pytest.mark.parametrize("projections", [VIT_B, LLAMA_7B], ids=["vit-b", "llama-7b"])
def test_every_layer_of_a_statistic_is_on_one_chart(projections):
    layout = dashboard_layout(projections)
    every_layer = layout[EVERY_LAYER]
    assert len(every_layer) == len(tags.STATISTICS) <= 10
    for stat in tags.STATISTICS:
        titles = {charts_matching({"x": every_layer}, stat.tag(p))[0] for p in projections}
        assert len(titles) == 1, f"{stat.prefix}: layers spread over {titles}"
    kinds = sorted({p.rpartition(".")[2] for p in projections})
    compared = layout[" vs ".join(dict.fromkeys(p.rpartition(".")[2] for p in projections)) + " (select one run)"]
    for kind in kinds:
        (title,) = [t for t in charts_matching({"x": compared}, f"sigma/{projections[0].rpartition('.')[0]}.{kind}")]
        matched = [p for p in projections if charts_matching({"x": {title: compared[title]}}, f"sigma/{p}")]
        assert matched == [p for p in projections if p.endswith(f".{kind}")]


def test_one_projection_kind_gets_no_comparison_section():
    assert list(dashboard_layout(["encoder.attn.qkv"])) == [
        TRAINING, STATISTICS, ALARMS, *(per_layer_category(stat) for stat in tags.STATISTICS), EVERY_LAYER]


def test_open_categories_hold_a_chart_per_statistic_and_per_layer_charts_wait_one_click_away():
    layout = dashboard_layout(VIT_B)
    opened = {title: layout[title] for title in OPEN_CATEGORIES}
    charts = [chart for category in opened.values() for chart in category]
    # One request per run and chart: 4 training + 5 statistics + every alarm kind + episodes, not 7 statistics x
    # 25 layers and a chart per alarm kind.
    assert len(charts) == 4 + 5 + 2
    assert all(len(regexes) == 1 for category in opened.values() for _, regexes in category.values())  # a request each
    training = {"x": layout[TRAINING]}
    assert charts_matching(training, tags.VAL_LOSS) == ["loss (train, val)"]
    assert charts_matching(training, "val/accuracy") == charts_matching(training, tags.HP_METRIC) == [
        "validation and test metric, hp_metric (best val)"]
    assert charts_matching(training, tags.TRAIN_NONFINITE_STEPS) == ["global grad norm, non-finite steps"]
    assert [charts_matching(opened, tags.alarm_tag(kind)) for kind in tags.ALARM_KINDS] == [
        ["alarms: every kind (running count)"]] * len(tags.ALARM_KINDS)
    for stat in tags.STATISTICS:
        assert not charts_matching(opened, stat.tag(VIT_B[0])), stat.prefix  # no per-layer chart opens at first
    assert list(layout)[:2] == list(OPEN_CATEGORIES) and next(iter(layout[TRAINING])) == "loss (train, val)"


def test_two_backbones_never_share_a_per_layer_chart():
    minilm = [f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    vit, text = dashboard_layout(VIT_B, "vit_base"), dashboard_layout(minilm, "all-MiniLM-L6-v2")
    per_layer = lambda layout: {t: c for t, c in layout.items() if t not in (*OPEN_CATEGORIES, ALARMS)}  # noqa: E731
    assert not set(per_layer(vit)) & set(per_layer(text))  # TensorBoard merges categories of one title
    for stat in tags.STATISTICS:
        assert not charts_matching(per_layer(vit), stat.tag(minilm[0]))
        assert not charts_matching(per_layer(text), stat.tag(VIT_B[0]))
    assert set(vit[STATISTICS]) == set(text[STATISTICS])  # aggregates: a line per run, whatever its backbone


def test_a_statistic_constant_by_construction_or_not_logged_gets_no_chart():
    assert constant_statistics(detach_norm=True, rescales=True) == ("radial_gain",)
    assert constant_statistics(detach_norm=False, rescales=True) == ()
    gain = tags.STATISTIC_BY_KEY["radial_gain"]
    assert not charts_matching(dashboard_layout(VIT_B, constant=("radial_gain",)), gain.tag(VIT_B[0]))
    assert charts_matching(dashboard_layout(VIT_B), gain.tag(VIT_B[0]))
    lora = dashboard_layout(VIT_B, logged={"update_ratio", "grad_norm"})  # LoRA logs no σ, ΔM, ΔD
    assert not charts_matching(lora, tags.STATISTIC_BY_KEY["sigma"].tag(VIT_B[0]))
    assert charts_matching(lora, tags.STATISTIC_BY_KEY["update_ratio"].tag(VIT_B[0]))


@pytest.fixture(scope="module")
def stability_run(tmp_path_factory):
    """A tiny DoRAN fit (6 steps) with thresholds that σ=0.01 and ‖V‖ ~ 0.3 must trip, then a test."""
    root = tmp_path_factory.mktemp("dashboard")
    argv = sys.argv
    sys.argv = ["doran_lightning"]  # LightningCLI(args=…) warns about pytest's own argv
    captured = io.StringIO()
    import logging

    handler = logging.StreamHandler(captured)
    logging.getLogger("doran_lightning").addHandler(handler)  # our lines: console.say
    try:
        code = main(tiny_fit_args(root, "--model.heatmap_every_n_stats=2", "--model.alarms.min_denominator=10",
                                  "--model.alarms.sigma_min=0.5", "--test_after_fit=true", steps_per_epoch=3, epochs=2))
    finally:
        logging.getLogger("doran_lightning").removeHandler(handler)
        sys.argv = argv
    assert code == 0
    run_dir = only_run_dir(root)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return run_dir, events, captured.getvalue()


@pytest.mark.slow
def test_layout_is_in_the_event_file(stability_run):
    _, events, _ = stability_run
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
    categories = {category.title: [chart.title for chart in category.chart] for category in layout.category}
    # The tiny fit is DoRAN with the norm detached: its radial gain is 1 by construction and gets no chart.
    backbone = "vit_tiny_patch16_224"
    assert len(categories[every_layer_category(backbone)]) == len(tags.STATISTICS) - 1
    compared = categories[f"q vs v of {backbone} (select one run)"]
    assert "σ: q" in compared and "σ: v" in compared
    assert not [title for charts in categories.values() for title in charts if "radial gain" in title]
    assert list(categories)[:2] == list(OPEN_CATEGORIES) and categories[TRAINING][0] == "loss (train, val)"
    closed = {category.title for category in layout.category if category.closed}
    assert closed == set(categories) - set(OPEN_CATEGORIES)
    sigma_chart = next(chart for category in layout.category for chart in category.chart
                       if chart.title.startswith("σ (sigma)"))
    logged_sigma = [tag for tag in events.Tags()["scalars"] if tag.startswith("sigma/blocks.")]
    assert len(logged_sigma) == 4
    assert all(re.search(sigma_chart.multiline.tag[0], tag) for tag in logged_sigma)


@pytest.mark.slow
def test_heatmaps_are_images_of_every_projection(stability_run):
    _, events, _ = stability_run
    from PIL import Image

    drawn = [prefix for prefix in tags.HEATMAP_STATISTICS if prefix != "radial_gain"]  # 1 by construction here
    assert tags.heatmap_tag("radial_gain") not in events.Tags()["images"]
    for prefix in drawn:
        images = events.Images(tags.heatmap_tag(prefix))
        assert len(images) >= 2, prefix  # every 2 statistics steps and at the end
        picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
        assert picture.ndim == 3 and picture.shape[0] > 50 and picture.std() > 0


@pytest.mark.slow
def test_alarms_hp_metric_and_summary(stability_run):
    run_dir, events, printed = stability_run
    counts = {kind: events.Scalars(tags.alarm_tag(kind))[-1].value for kind in tags.ALARM_KINDS}
    assert counts["denominator"] == 4 and counts["sigma_collapse"] == 4  # once per projection, not per step
    assert "ALARM denominator at step 0: blocks.0.attn.qkv.q" in printed
    val = [e.value for e in events.Scalars("val/accuracy")]
    hp_metric = [e.value for e in events.Scalars(tags.HP_METRIC)]
    assert -1 not in hp_metric and hp_metric[-1] == pytest.approx(max(val))
    summary = printed[printed.index("Run summary"):]
    test_accuracy = events.Scalars("test/accuracy")[-1].value
    assert f"test/accuracy      {test_accuracy:.4f}" in summary
    assert "8 alarm(s) (denominator ×4, sigma_collapse ×4)" in summary
    assert f"tensorboard --logdir {run_dir.parent}" in summary
    # Scalars opens on the loss: the summary's address pins the losses and the metric, tags this run logged.
    url = re.search(r"  loss first\s+(\S+)", summary).group(1)
    assert url.startswith("http://localhost:6006/?pinnedCards=") and url.endswith("#timeseries")
    pinned = [card["tag"] for card in json.loads(unquote(url.split("pinnedCards=")[1].split("#")[0]))]
    assert pinned == ["train/loss", "val/loss", "val/accuracy"] and set(pinned) <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_report_lists_the_alarms_with_relative_run_names(stability_run, tmp_path):
    run_dir, _, _ = stability_run
    out = tmp_path / "report"
    assert report.main([str(run_dir.parent), "--out", str(out)]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["runs"]
    assert row["run"] == run_dir.name
    assert row["alarms"] == {**dict.fromkeys(tags.ALARM_KINDS, 0), "denominator": 4, "sigma_collapse": 4}
    assert any("blocks.1.attn.qkv.v" in message and "sigma_collapse" in message for message in row["alarm_messages"])
    markdown = (out / "summary.md").read_text()
    assert "denominator 4, sigma_collapse 4" in markdown and str(tmp_path) not in markdown
    assert str(run_dir.parent) not in markdown


def test_heatmap_rows_drop_the_shared_prefix_and_a_constant_radial_gain_says_why(tmp_path):
    from doran_lightning.report.figures import constant_by_construction, short_labels
    from doran_lightning.report.runs import Run

    assert short_labels(VIT_B)[0] == "blocks." and short_labels(VIT_B)[1][:2] == ["0.attn.qkv.q", "0.attn.qkv.v"]
    assert short_labels(LLAMA_7B)[1][-1] == "31.self_attn.v_proj" and short_labels(["x.q"]) == ("", ["x.q"])
    gain = tags.STATISTIC_BY_KEY["radial_gain"]

    def run(detach_norm):
        return Run(path=tmp_path, variant="dora", hparams={"detach_norm": detach_norm}, scalars={})

    ones = np.ones((4, 9))
    assert "by construction: detach_norm=true" in constant_by_construction(run(True), gain, ones)
    assert constant_by_construction(run(False), gain, ones) == "constant 1 in this run"
    assert constant_by_construction(run(True), gain, ones * np.linspace(0.5, 1, 9)) is None


def test_heatmap_image_fits_a_tensorboard_card():
    from doran_lightning.dashboard import heatmap_image

    image = heatmap_image("σ (step 10)", VIT_B, list(range(10)), np.random.default_rng(0).random((len(VIT_B), 10)))
    assert image.shape[1] == 302  # TensorBoard's card width: shown at full size, 10-pt labels stay legible
    assert image.shape[0] > 0.2 * 72 * len(VIT_B)  # a row per projection at least 0.2 in tall
