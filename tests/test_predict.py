"""`predict` for a user's own inputs, label names in exports, and a console that shows only our lines.

Unit tests read and write the real file formats; the end-to-end test runs the demo config
(`minilm_text.yaml`, the real offline MiniLM) through fit, test, predict and export in fresh processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from doran_lightning.checkpointing import CheckpointError, check_classes
from doran_lightning.cli import split_verbose
from doran_lightning.data.common import DataError
from doran_lightning.data.commonsense import CommonsenseExamples
from doran_lightning.data.language import TokenizedText, read_table
from doran_lightning.data.vision import UnlabelledImages, eval_transform
from doran_lightning.predictions import _flat, example_input, prediction_rows, write_predictions

NAMES = ["food", "sport", "technology", "weather"]
SENTENCES = [
    "The striker scored twice in the final minutes of the match.",
    "The new phone ships with a faster chip and more memory.",
    "Slow-cooked beef stew with carrots and thyme.",
    "Heavy rain and strong winds are expected tomorrow.",
    "The goalkeeper saved a penalty in extra time.",
]


def test_rows_name_the_label_and_write_both_files_whole(tmp_path: Path):
    probabilities = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    rows = prediction_rows("text_classification", NAMES, probabilities, ["a.txt", 7])
    assert [row["label"] for row in rows] == ["sport", "food"]
    csv_path, jsonl_path = write_predictions(rows, tmp_path / "out")
    with csv_path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["id", "label", "p_food", "p_sport", "p_technology", "p_weather"]
    assert [r["id"] for r in table] == ["a.txt", "7"] and float(table[0]["p_sport"]) == pytest.approx(0.6)
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert records[1] == {"id": 7, "label": "food", "probabilities": dict(zip(NAMES, probabilities[1].tolist()))}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv", "predictions.jsonl"]
    assert prediction_rows("text_classification", ["x"], torch.tensor([2.5]), [0]) == [{"id": 0, "value": 2.5}]
    assert prediction_rows("causal_lm", [], [" answer1 "], [3]) == [{"id": 3, "answer": "answer1"}]


def test_rows_carry_the_input_text_and_csv_columns_cover_every_row(tmp_path: Path):
    single = TokenizedText([(text,) for text in SENTENCES], None, tokenizer=None, max_length=8)
    pairs = TokenizedText([("A man sleeps.", "A person rests."), ("It rains.", "The sun shines.")], [0, 1], None, 8)
    prompts = CommonsenseExamples([{"instruction": "Pick one.", "input": "a or b"}, {"instruction": "Say yes."}],
                                  ["x", "x"], encode=lambda record, subset: {})
    assert example_input(single, 2) == {"input": SENTENCES[2]}
    assert example_input(Subset(single, [4, 0]), 0) == {"input": SENTENCES[4]}  # the subset's row, not row 0
    assert example_input(pairs, 1) == {"input": "It rains.", "input_2": "The sun shines."}
    assert example_input(prompts, 0) == {"input": "Pick one.", "input_2": "a or b"}
    assert example_input(prompts, 1) == {"input": "Say yes."}
    assert example_input(list(range(3)), 1) == {}  # no text (digits): the id alone, as before

    inputs = [example_input(prompts, index) for index in (0, 1)]
    rows = prediction_rows("causal_lm", [], [" a ", "yes"], [0, 1], inputs)
    assert rows[1] == {"id": 1, "input": "Say yes.", "answer": "yes"}
    csv_path, _ = write_predictions(rows, tmp_path)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["id", "input", "input_2", "answer"] and table[1]["input_2"] == ""
    probabilities = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    row = prediction_rows("text_classification", NAMES, probabilities, [0], [example_input(single, 0)])[0]
    assert list(_flat(row))[:3] == ["id", "input", "label"] and row["input"] == SENTENCES[0]


def test_unlabelled_text_files_in_every_format(tmp_path: Path):
    (tmp_path / "a.csv").write_text("text,other\nfirst,x\nsecond,y\n")
    (tmp_path / "a.tsv").write_text("text\nfirst\nsecond\n")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    for name in ("a.csv", "a.tsv", "a.jsonl", "a.txt"):
        assert read_table(tmp_path / name, ["text"], None).texts == [("first",), ("second",)], name
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'a.csv'}: missing column(s) ['sentence']")):
        read_table(tmp_path / "a.csv", ["sentence"], None)
    with pytest.raises(DataError, match="a plain-text file holds one text per line, but this data needs the columns"):
        read_table(tmp_path / "a.txt", ["sentence1", "sentence2"], None)
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'; use one of .csv, .tsv, .json, .jsonl, .parquet, .txt"):
        read_table(tmp_path / "a.xml", ["text"], None)


def test_image_folder_is_read_recursively_in_path_order(tmp_path: Path):
    for relative in ("b/2.png", "a/1.jpg", "z.jpeg"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), "red").save(tmp_path / relative)
    (tmp_path / "notes.txt").write_text("not an image")
    images = UnlabelledImages(tmp_path, eval_transform(16))
    assert images.ids == [str(tmp_path / "a/1.jpg"), str(tmp_path / "b/2.png"), str(tmp_path / "z.jpeg")]
    assert images[0]["pixel_values"].shape == (3, 16, 16) and "labels" not in images[0]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.png'}: cannot be read as an image")):
        UnlabelledImages(tmp_path, eval_transform(16))[2]  # a/1.jpg, b/2.png, bad.png, z.jpeg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        UnlabelledImages(tmp_path / "empty", eval_transform(16))


def test_checkpoint_classes_must_match_the_data_in_one_line():
    saved = {"num_classes": 4, "label_names": NAMES}
    assert check_classes(saved, 4, None) == NAMES  # the checkpoint names classes the data module cannot
    assert check_classes({"num_classes": 4}, 4, None) is None  # a checkpoint from before label names
    with pytest.raises(CheckpointError) as error:  # the CLI prints it as one error line
        check_classes(saved, 10, None)
    assert str(error.value) == ("the checkpoint was trained for 4 classes ['food', 'sport', 'technology', 'weather'] "
                                "but the data module has 10; use the data settings (--config) the checkpoint was "
                                "trained with")
    with pytest.raises(RuntimeError, match="data module has 4 \\['sport', 'food'"):
        check_classes(saved, 4, ["sport", "food", "technology", "weather"])


def test_verbose_switch_is_ours_only_when_bare():
    assert split_verbose(["fit", "--verbose", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], True)
    assert split_verbose(["test", "--verbose", "false"]) == (["test", "--verbose", "false"], False)
    assert split_verbose(["test", "--verbose=true"]) == (["test", "--verbose=true"], False)


# ------------------------------------------------------------------ end to end on the demo config
# Every line we print ourselves (progress bars, parameter counts, alarms, summaries, where files went)
# and the test-metric table; anything else on the console fails the test.
OURS = [
    r"", r".*━.*", r"\s*[\w/]+: [-+\d.e]+\s*",  # progress bars and their metrics
    r"\w+ on minilm: trainable [\d,]+ of [\d,]+ parameters \(adapters [\d,]+, aux [\d,]+, head [\d,]+\)",
    r"Adapter statistics took .*", r"ALARM \w+ at step \d+: .*",
    r"Run summary — \w+", r"  (best|last) val/accuracy .*", r"  test/accuracy .*", r"  stability .*",
    r"  run folder .*", r"  look at it .*", r"  loss first .*",
    r"Wrote \d+ predictions to .*", r"Exported to .*", r"note: .*", r"(test|validate|predict): writing to .*",
    r"test split: \d+ examples \(.*\); one test example is worth 100/\d+ = [\d.]+ accuracy points",
    r"[┏┃┡│└].*",  # Lightning's test-metric table: the test's result
]


def run_cli(cwd: Path, *args: str) -> list[str]:
    # A console of fixed width: at CI's default 80 columns Rich wraps the bar's metrics cell over two lines
    # whenever the time and speed columns grow (a slow machine), and the halves match no pattern.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "doran_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
    assert done.returncode == 0, "\n".join(lines[-30:])
    return lines


def foreign_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in OURS)]


@pytest.mark.slow
def test_demo_fit_test_predict_export_on_a_quiet_console(tmp_path: Path, monkeypatch, capfd):
    demo = ["--config", "minilm_text.yaml"]
    fit = run_cli(tmp_path, "fit", *demo, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                  "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=2", "--test_after_fit=true")
    ckpt = "--ckpt_path=lightning_logs/version_0/checkpoints/last.ckpt"
    (tmp_path / "new.csv").write_text("text\n" + "\n".join(SENTENCES) + "\n")
    predict = run_cli(tmp_path, "predict", *demo, ckpt, "--data.predict_file=new.csv")
    for verb, lines in (("fit", fit), ("predict", predict)):
        assert foreign_lines(lines) == [], f"{verb} printed lines that are not ours"
    assert any(line.startswith("Run summary") for line in fit)
    assert "Wrote 5 predictions to " in "\n".join(predict)

    with (tmp_path / "lightning_logs/version_0/predict/predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert [row["input"] for row in rows] == SENTENCES  # a person reads what was predicted
    for row in rows:
        assert row["label"] in NAMES
        assert math.isclose(sum(float(row[f"p_{name}"]) for name in NAMES), 1.0, rel_tol=1e-6)
        assert row["label"] == max(NAMES, key=lambda name: float(row[f"p_{name}"]))

    # `test` on the same five sentences, labelled with the predicted names: its argmax agrees on every one.
    # (In this process: the console of `test` was checked above, in fit --test_after_fit.)
    from doran_lightning.cli import main

    labelled = tmp_path / "labelled.csv"
    with labelled.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *zip(SENTENCES, (row["label"] for row in rows))])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    capfd.readouterr()
    assert main(["test", *demo, ckpt, "--data=doran_lightning.data.language.TextClassificationDataModule",
                 f"--data.train_file={labelled}", f"--data.val_file={labelled}",  # tokenizer: the checkpoint's
                 f"--data.label_names={json.dumps(NAMES)}"]) == 0
    assert re.search(r"test/accuracy\s+│\s+1\.0\s", capfd.readouterr().out)

    assert main(["export", *demo, ckpt, "--out=export"]) == 0
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export/merged")
    assert merged.config.id2label == dict(enumerate(NAMES))
    assert merged.config.label2id == {name: index for index, name in enumerate(NAMES)}
    classify = pipeline("text-classification", model=str(tmp_path / "export/merged"))
    assert [result["label"] for result in classify(SENTENCES)] == [row["label"] for row in rows]
    assert AutoConfig.from_pretrained(tmp_path / "export/peft").id2label == dict(enumerate(NAMES))

    # PEFT's auto class builds the base by itself (task_type, base/ with the 4-class head) and matches merged/.
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer

    adapter_config = json.loads((tmp_path / "export/peft/adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert Path(adapter_config["base_model_name_or_path"]) == (tmp_path / "export/base").resolve()
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "export/peft")).eval()
    tokens = AutoTokenizer.from_pretrained(tmp_path / "export/peft")(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits, merged_logits = auto(**tokens).logits, merged.eval()(**tokens).logits
    assert logits.shape == (len(SENTENCES), len(NAMES))
    assert (logits - merged_logits).abs().max() <= 1e-4


@pytest.mark.slow
def test_predict_on_an_image_folder_writes_paths_and_digit_names(tmp_path: Path, monkeypatch, capfd):
    from conftest import only_run_dir, tiny_fit_args

    from doran_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["doran_lightning"])
    assert main(tiny_fit_args(tmp_path)) == 0
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    photos = tmp_path / "photos"
    for relative in ("b/seven.png", "a/one.jpg"):
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), "white").save(photos / relative)
    args = [arg for arg in tiny_fit_args(tmp_path) if not arg.startswith("--trainer.max_epochs")]
    predict = ["predict", *args[1:], f"--ckpt_path={ckpt}", f"--data.predict_root={photos}", f"--out={tmp_path / 'p'}"]
    assert main([arg for arg in predict if not arg.startswith(("--trainer.limit_train", "--trainer.limit_val"))]) == 0
    records = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [str(photos / "a/one.jpg"), str(photos / "b/seven.png")]
    for record in records:
        assert list(record["probabilities"]) == [str(digit) for digit in range(10)]
        assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, rel=1e-6)
    capfd.readouterr()
    assert main([*predict[:-1], f"--data.predict_root={tmp_path / 'nothing'}"]) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"doran_lightning: error: predict images folder not found: {tmp_path / 'nothing'} "
        "(set --data.predict_root to a folder of images)")
    assert main([*predict, "--overwrite=true", "--data.classes=[0,1,2]"]) == 2  # a 10-class checkpoint, 3-class data
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "doran_lightning: error: the checkpoint was trained for 10 classes ['0', '1', '2', '3', '4', '5', '6', "
        "'7', '8', '9'] but the data module has 3 ['0', '1', '2']; use the data settings (--config) the "
        "checkpoint was trained with")


def test_text_data_modules_predict_on_their_predict_file(tmp_path: Path):
    from doran_lightning.data.language import (
        BuiltinTextDataModule,
        CommonsenseDataModule,
        GLUEDataModule,
        minilm_path,
    )

    (tmp_path / "new.txt").write_text("\n".join(SENTENCES[:3]) + "\n")
    builtin = BuiltinTextDataModule(predict_file=str(tmp_path / "new.txt"), batch_size=2)
    batch = next(iter(builtin.predict_dataloader()))
    assert "labels" not in batch and batch["input_ids"].shape[0] == 2 and len(builtin.datasets["predict"]) == 3
    assert builtin.label_names == NAMES
    default = BuiltinTextDataModule()  # no predict_file: the test split
    default.setup("predict")
    assert default.datasets["predict"].texts == default.load_split("test").texts

    (tmp_path / "pairs.jsonl").write_text('{"sentence1": "A man sings.", "sentence2": "Someone sings."}\n')
    rte = GLUEDataModule(task="rte", tokenizer=minilm_path(), predict_file=str(tmp_path / "pairs.jsonl"))
    encoded = rte.tokenizer.decode(next(iter(rte.predict_dataloader()))["input_ids"][0], skip_special_tokens=True)
    assert encoded == "a man sings. someone sings."
    (tmp_path / "one.csv").write_text("sentence1\nonly one\n")
    rte.predict_file = str(tmp_path / "one.csv")
    with pytest.raises(DataError, match=r"one.csv: missing column\(s\) \['sentence2'\]"):
        rte.load_predict()

    (tmp_path / "prompts.txt").write_text("Is the sky blue? Answer true or false.\n")
    commonsense = CommonsenseDataModule(tokenizer=minilm_path(), predict_file=str(tmp_path / "prompts.txt"))
    prompt = next(iter(commonsense.predict_dataloader()))
    assert commonsense.tokenizer.decode(prompt["prompt_input_ids"][0], skip_special_tokens=True).startswith(
        "below is an instruction")
    assert prompt["subset"] == ["heldout"]
