"""Language DataModules against the real SST-2 files and fixtures in GLUE / LLM-Adapters formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fit_then_test

from doran_lightning import hub
from doran_lightning.data.common import DataError
from doran_lightning.data.language import (
    BuiltinTextDataModule,
    CommonsenseDataModule,
    GLUEDataModule,
    TextClassificationDataModule,
    build_prompt,
    extract_answer,
    load_tokenizer,
    minilm_path,
)

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue" / "SST-2"
MINILM = minilm_path()


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    return MINILM


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Behave as a machine without network, whatever the environment says."""
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def write_glue_fixtures(root: Path) -> None:
    """CoLA (no header), MNLI (string labels, dev_matched.tsv) and STS-B (scores), GLUE's columns."""
    cola = [["gj04", str(i % 2), "*" if i % 2 == 0 else "", f"the cat sat number {i} ."] for i in range(8)]
    write_tsv(root / "CoLA" / "train.tsv", cola)
    write_tsv(root / "CoLA" / "dev.tsv", cola[:4])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    labels = ["entailment", "neutral", "contradiction"]
    mnli = [[str(i), "1", "1", "fiction", "", "", "", "", f"a man \"walks\" {i}", "someone moves", labels[i % 3], labels[i % 3]]
            for i in range(9)]
    write_tsv(root / "MNLI" / "train.tsv", [mnli_header] + mnli)
    write_tsv(root / "MNLI" / "dev_matched.tsv", [mnli_header] + mnli[:3])
    sts_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    sts = [[str(i), "main", "f", "2012", str(i), "none", "none", "a plane takes off", "an air plane is taking off", f"{i * 0.6:.3f}"]
           for i in range(9)]
    write_tsv(root / "STS-B" / "train.tsv", [sts_header] + sts)
    write_tsv(root / "STS-B" / "dev.tsv", [sts_header] + sts[:3])


# ------------------------------------------------------------------------------------------- GLUE
@pytest.mark.skipif(not SST2.is_dir(), reason=f"real SST-2 not found at {SST2}")
def test_glue_sst2_real_files(tokenizer_path):
    dm = GLUEDataModule(task="SST-2", tokenizer=tokenizer_path, root=str(SST2.parent), fraction=0.01, seed=3, batch_size=16)
    assert (dm.task, dm.num_classes, dm.metric) == ("text_classification", 2, "accuracy")
    dm.setup("fit")
    dm.setup("test")
    train = dm.datasets["train"]
    assert len(train) == pytest.approx(673, abs=2)
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 872
    full_labels = train.dataset.labels
    assert len(full_labels) == 67349 and set(full_labels) == {0, 1}
    positive_share = sum(full_labels[i] for i in train.indices) / len(train)
    assert positive_share == pytest.approx(sum(full_labels) / len(full_labels), abs=0.01)
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist()[:2] == [1, 0]  # dev.tsv's first two rows
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 16
    decoded = dm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert decoded.startswith("it ' s a charming and often affecting journey")


def test_glue_tsv_layouts(tmp_path, tokenizer_path):
    write_glue_fixtures(tmp_path)
    cola = GLUEDataModule(task="cola", tokenizer=tokenizer_path, root=str(tmp_path), batch_size=4)
    assert cola.metric == "matthews"
    cola.setup("fit")
    assert cola.datasets["train"].labels == [0, 1] * 4
    assert cola.datasets["train"].texts[1] == ("the cat sat number 1 .",)

    mnli = GLUEDataModule(task="mnli", tokenizer=tokenizer_path, root=str(tmp_path / "MNLI"), batch_size=4)
    assert mnli.num_classes == 3
    mnli.setup("fit")
    assert mnli.datasets["val"].labels == [0, 1, 2]
    assert mnli.datasets["train"].texts[0] == ('a man "walks" 0', "someone moves")
    batch = next(iter(mnli.train_dataloader()))
    assert "token_type_ids" in batch and batch["token_type_ids"].max() == 1  # a sentence pair

    stsb = GLUEDataModule(task="stsb", tokenizer=tokenizer_path, root=str(tmp_path), batch_size=4, fraction=0.5)
    assert (stsb.num_classes, stsb.metric) == (1, "pearson_spearman")
    stsb.setup("fit")
    assert next(iter(stsb.val_dataloader()))["labels"].dtype == torch.float32
    assert len(stsb.datasets["train"]) == 5  # one per integer score bin 0..4


def test_glue_errors(tmp_path, tokenizer_path):
    write_glue_fixtures(tmp_path)
    rows = (tmp_path / "MNLI" / "train.tsv").read_text().splitlines()
    rows[2] = rows[2].replace("\tneutral\tneutral", "\tneutral\tmaybe")
    (tmp_path / "MNLI" / "train.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"MNLI/train\.tsv:3: label 'maybe' is not one of"):
        GLUEDataModule(task="mnli", tokenizer=tokenizer_path, root=str(tmp_path)).setup("fit")
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [["gj04", "2", "", "bad label"]])
    with pytest.raises(DataError, match=r"CoLA/dev\.tsv:1: label 2 is outside the class range 0\.\.1"):
        GLUEDataModule(task="cola", tokenizer=tokenizer_path, root=str(tmp_path)).setup("validate")
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [])
    with pytest.raises(DataError, match=r"CoLA/dev\.tsv: the val split is empty"):
        GLUEDataModule(task="cola", tokenizer=tokenizer_path, root=str(tmp_path)).setup("validate")
    with pytest.raises(FileNotFoundError, match="GLUE RTE folder not found"):
        GLUEDataModule(task="rte", tokenizer=tokenizer_path, root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="unknown GLUE task 'sst5'"):
        GLUEDataModule(task="sst5", tokenizer=tokenizer_path)


def test_glue_hub_not_cached_offline_names_alternatives(tokenizer_path, hub_unreachable):
    dm = GLUEDataModule(task="sst2", tokenizer=tokenizer_path, hub_name="nyu-mll/glue-never-cached")
    with pytest.raises(OSError, match=r"glue-never-cached.*--data\.root .*SST-2/train\.tsv.*--data\.data_files"):
        dm.setup("fit")


def test_glue_data_files(tmp_path, tokenizer_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("sentence,label\ngreat film,1\nawful plot,0\nloved it,1\n")
    dev.write_text("sentence,label\nso boring,0\n")
    dm = GLUEDataModule(task="sst2", tokenizer=tokenizer_path, data_files={"train": str(train), "val": str(dev)})
    dm.setup("fit")
    assert dm.datasets["train"].labels == [1, 0, 1] and dm.datasets["val"].texts == [("so boring",)]


# ---------------------------------------------------------------------------- own labelled text
def test_text_classification_string_labels_csv(tmp_path, tokenizer_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nthe match was thrilling,sport\nbake for ten minutes,food\n"
                     "the striker scored,sport\nadd the salt,food\n")
    val = tmp_path / "val.tsv"
    val.write_text("text\tlabel\nthe goalkeeper saved it\tsport\n")
    dm = TextClassificationDataModule(train_file=str(train), val_file=str(val), tokenizer=tokenizer_path, batch_size=2)
    assert dm.num_classes == 2 and dm.label_names == ["food", "sport"]
    dm.setup("fit")
    dm.setup("test")
    assert dm.datasets["train"].labels == [1, 0, 1, 0] and dm.datasets["test"].labels == [1]


def test_text_classification_pairs_jsonl_and_errors(tmp_path, tokenizer_path):
    records = [{"q": f"question {i}", "a": f"answer {i}", "y": i % 3} for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = tmp_path / "val.jsonl"
    bad.write_text("".join(json.dumps({**r, "y": 7 if i == 1 else 0}) + "\n" for i, r in enumerate(records)))
    args = dict(train_file=str(train), tokenizer=tokenizer_path, text_columns=["q", "a"], label_column="y")
    dm = TextClassificationDataModule(val_file=str(train), **args)
    assert dm.num_classes == 3 and dm.label_names is None
    dm.setup("fit")
    assert dm.datasets["train"].texts[2] == ("question 2", "answer 2")
    with pytest.raises(DataError, match=r"val\.jsonl:2: label 7 is outside the class range 0\.\.2"):
        TextClassificationDataModule(val_file=str(bad), **args).setup("validate")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text', 'label'\]; the file has \['q', 'a', 'y'\]"):
        TextClassificationDataModule(train_file=str(train), val_file=str(train), tokenizer=tokenizer_path)
    with pytest.raises(FileNotFoundError, match="text data file not found: .*nope.csv"):
        TextClassificationDataModule(val_file=str(tmp_path / "nope.csv"), **args).setup("validate")


def test_tokenizer_errors_fail_fast(hub_unreachable):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found: ./no-such-model"):
        load_tokenizer("./no-such-model")
    with pytest.raises(OSError, match="not a local folder .*pass a local path"):
        load_tokenizer("someone/uncached-model-xyz")


# ------------------------------------------------------------------------------------- built-in
def test_builtin_text_set_splits_and_balance():
    dm = BuiltinTextDataModule(batch_size=8, fraction=0.25, seed=1)
    assert dm.label_names == ["food", "sport", "technology", "weather"] and dm.num_classes == 4
    dm.setup("fit")
    dm.setup("test")
    sizes = [len(dm.datasets["train"].dataset), len(dm.datasets["val"]), len(dm.datasets["test"])]
    assert sizes == [240, 60, 60]
    chosen = [dm.datasets["train"].dataset.labels[i] for i in dm.datasets["train"].indices]
    assert sorted(chosen) == sorted([0, 1, 2, 3] * 15)
    train_texts = set(dm.datasets["train"].dataset.texts)
    assert not train_texts & set(dm.datasets["test"].texts)  # fixed split, no leakage


# ------------------------------------------------------------------------------------ commonsense
def commonsense_record(kind: str, i: int) -> dict[str, str]:
    forms = {"boolq": ("true", "Answer format: true/false"), "piqa": ("solution2", "Answer format: solution1/solution2")}
    answer, fmt = forms[kind]
    return {"instruction": f"Please answer question {i} about {kind}. {fmt}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def write_commonsense(root: Path) -> Path:
    train = root / "commonsense_170k.json"
    train.write_text(json.dumps([commonsense_record("boolq" if i % 2 else "piqa", i) for i in range(20)]))
    for name in ("boolq", "piqa"):
        (root / name).mkdir()
        (root / name / "test.json").write_text(json.dumps([commonsense_record(name, i) for i in range(3)]))
    return train


def test_commonsense_train_masks_prompt_and_eval_left_pads(tmp_path, tokenizer_path):
    train = write_commonsense(tmp_path)
    dm = CommonsenseDataModule(tokenizer=tokenizer_path, train_file=str(train), eval_root=str(tmp_path),
                               eval_sets=["boolq", "piqa"], val_size=4, batch_size=4, fraction=0.5)
    assert (dm.task, dm.num_classes, dm.metric) == ("causal_lm", None, "generation_accuracy")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 4 and len(dm.datasets["test"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        supervised = dm.tokenizer.decode(ids[labels != -100], skip_special_tokens=True)
        assert supervised.startswith("the correct answer is")  # loss on the response only
        assert (labels[mask == 0] == -100).all() and mask[0] == 1  # right padding, ignored
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["subset"] == ["boolq"] * 3 + ["piqa"] and test_batch["answers"][0] == "true"
    prompts, prompt_mask = test_batch["prompt_input_ids"], test_batch["prompt_attention_mask"]
    assert (prompt_mask[:, -1] == 1).all() and (prompts[prompt_mask == 0] == dm.tokenizer.pad_token_id).all()
    text = dm.tokenizer.decode(prompts[0][prompt_mask[0] == 1], skip_special_tokens=True)
    assert text.endswith("# # # response :")  # uncased BERT tokenizer view of "### Response:"
    assert "labels" in test_batch and next(iter(dm.val_dataloader()))["subset"] == ["heldout"] * 4


def test_commonsense_prompt_and_answer_extraction():
    prompt = build_prompt("Is water wet?")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nIs water wet?\n\n### Response:\n")
    assert "### Input:\nctx" in build_prompt("q", "ctx")
    assert extract_answer("boolq", "the correct answer is false") == "false"
    assert extract_answer("piqa", prompt + "solution2 is right, not solution1") == "solution2"
    assert extract_answer("social_i_qa", "answer4 or answer2") == "answer2"
    assert extract_answer("ARC-Challenge", "answer4") == "answer4"
    assert extract_answer("hellaswag", "ending3") == "ending3" and extract_answer("winogrande", "none") == ""
    assert extract_answer("heldout", "the correct answer is option2") == "option2"
    with pytest.raises(ValueError, match="unknown commonsense subset 'siqa'"):
        extract_answer("siqa", "answer1")


def test_commonsense_errors(tmp_path, tokenizer_path):
    write_commonsense(tmp_path)
    (tmp_path / "piqa" / "test.json").write_text(json.dumps([{"instruction": "q", "output": "x"}]))
    dm = CommonsenseDataModule(tokenizer=tokenizer_path, eval_root=str(tmp_path), eval_sets=["boolq", "piqa"])
    with pytest.raises(DataError, match=r"piqa/test\.json: record 0: missing string field\(s\) \['answer'\]"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"commonsense hellaswag file not found: .*hellaswag/test\.json"):
        CommonsenseDataModule(tokenizer=tokenizer_path, eval_root=str(tmp_path), eval_sets=["hellaswag"]).setup("test")
    with pytest.raises(ValueError, match="unknown eval_sets"):
        CommonsenseDataModule(tokenizer=tokenizer_path, eval_sets=["squad"])


def test_end_to_end_fit_on_builtin_text(tmp_path):
    """A Lightning fit (MiniLM frozen, linear head on [CLS]) on the shipped topic set beats chance clearly."""
    import lightning as L
    from transformers import AutoModel

    class ProbeClassifier(L.LightningModule):
        def __init__(self, num_classes: int):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(MINILM).eval().requires_grad_(False)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)
            self.correct = self.seen = 0

        def logits(self, batch):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return self.head(self.encoder(**inputs).last_hidden_state[:, 0])

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.logits(batch), batch["labels"])

        def test_step(self, batch, _):
            self.correct += (self.logits(batch).argmax(-1) == batch["labels"]).sum().item()
            self.seen += len(batch["labels"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.head.parameters(), lr=2e-2)

    L.seed_everything(0, verbose=False)
    dm = BuiltinTextDataModule(batch_size=32, eval_batch_size=60)
    model = ProbeClassifier(dm.num_classes)
    fit_then_test(model, dm, max_epochs=2, root=tmp_path)
    assert model.seen == 60 and model.correct / model.seen > 0.8  # chance is 0.25
