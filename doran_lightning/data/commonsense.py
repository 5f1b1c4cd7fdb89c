"""Commonsense reasoning in the LLM-Adapters format: instruction prompts, answer extraction, the data module.

Batches are described on ``CommonsenseDataModule``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from doran_lightning.data.common import PLAIN_TEXT_SUFFIXES, BaseDataModule, data_error, read_lines, read_json, require_dir, require_file
from doran_lightning.data.suites import COMMONSENSE_SETS
from doran_lightning.data.tokenizers import load_tokenizer


PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_CHOICES_1_TO_5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": _CHOICES_1_TO_5,
    "ARC-Challenge": _CHOICES_1_TO_5,
    "openbookqa": _CHOICES_1_TO_5,
}
# Held-out training examples mix all formats, so they accept any of the answer forms.
HELDOUT = "heldout"
ANSWER_PATTERNS[HELDOUT] = "|".join(dict.fromkeys("|".join(ANSWER_PATTERNS.values()).split("|")))


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The DoRA / LLM-Adapters (Alpaca) prompt, up to and including "### Response:\\n"."""
    if input_text:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def extract_answer(subset: str, generated_text: str) -> str:
    """The first answer token of ``subset``'s form in the response, "" if none (LLM-Adapters' rule)."""
    if subset not in ANSWER_PATTERNS:
        raise ValueError(f"unknown commonsense subset {subset!r}; expected one of {sorted(ANSWER_PATTERNS)}")
    response = generated_text.split("### Response:")[-1].strip()
    found = re.findall(ANSWER_PATTERNS[subset], response)
    return found[0] if found else ""


def read_instruction_json(path: Path, need_answer: bool, need_output: bool = True) -> list[dict[str, str]]:
    """Read an LLM-Adapters JSON list of {instruction, input, output, answer} records."""
    records = read_json(path, list, "a JSON list of {instruction, input, output, answer} records")
    required = ("instruction", "answer") if need_answer else ("instruction", "output") if need_output else ("instruction",)
    for number, record in enumerate(records):
        missing = [k for k in required if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise data_error(path, f"record {number}: missing string field(s) {missing}")
    return records


class CommonsenseExamples(Dataset):
    """Instruction records tokenised on access (so 170k records cost nothing up front)."""

    def __init__(self, records: list[dict[str, str]], subsets: list[str], encode: Callable[[dict, str], dict]):
        self.records, self.subsets, self.encode = records, subsets, encode
        self.labels = [record.get("answer", "") for record in records]

    def __len__(self) -> int:
        return len(self.records)

    def input_texts(self, index: int) -> tuple[str, ...]:
        """The record's instruction (and its input, when it has one), for a person reading `predict`'s output."""
        record = self.records[index]
        return (record["instruction"], record["input"]) if record.get("input") else (record["instruction"],)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encode(self.records[index], self.subsets[index])


class CommonsenseDataModule(BaseDataModule):
    """Commonsense reasoning in the LLM-Adapters format, trained and scored as in DoRA.

    * ``train_file``: ``commonsense_170k.json``, a list of {instruction, input, output, answer};
      ``val_size`` records are held out (fixed draw) for validation.
    * ``eval_root``: ``<eval_root>/<set>/test.json`` for each of ``eval_sets`` (default: the eight
      sets); validation uses them too when nothing is held out. ``eval_limit`` caps each set.
    * ``predict_file``: prompts for `predict` (a JSON list of {instruction[, input]} records, or a
      plain-text file with one instruction per line); default: the eval sets.

    Train batches: ``input_ids``, ``attention_mask`` (right-padded) and ``labels`` (-100 on the
    prompt and padding: the loss covers the response only), truncated to ``cutoff_len``.
    Val/test batches add LEFT-padded ``prompt_input_ids``/``prompt_attention_mask`` for greedy
    generation, ``answers`` and ``subset``; score with ``extract_answer``.
    """

    SPLIT_SEED = 42
    extract_answer = staticmethod(extract_answer)

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        eval_root: str | None = None,
        eval_sets: list[str] | None = None,
        cutoff_len: int = 256,
        val_size: int = 120,
        eval_limit: int | None = None,
        predict_file: str | None = None,
        **loader_args,
    ):
        """``loader_args``: batch_size, eval_batch_size, num_workers, pin_memory,
        persistent_workers, fraction, seed (see BaseDataModule)."""
        super().__init__(**loader_args)
        self.task, self.num_classes, self.metric = "causal_lm", None, "generation_accuracy"
        self.eval_sets = list(eval_sets or COMMONSENSE_SETS)
        unknown = [name for name in self.eval_sets if name not in ANSWER_PATTERNS]
        if unknown:
            raise ValueError(f"unknown eval_sets {unknown}; expected names from {list(COMMONSENSE_SETS)}")
        self.train_file, self.eval_root = train_file, eval_root
        self.cutoff_len, self.val_size, self.eval_limit = cutoff_len, val_size, eval_limit
        self.predict_file = predict_file
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer.pad_token is None:
            # LLaMA tokenizers ship without a pad token; padding is masked out everywhere anyway.
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        self._suffix_specials = self._count_suffix_specials()
        self._train_records: tuple[list[dict], list[dict]] | None = None
        self.collate_fn = self.collate

    def _count_suffix_specials(self) -> int:
        """How many special tokens the tokenizer appends (BERT: [SEP]; LLaMA: none)."""
        plain = self.tokenizer("a b", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a b")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return len(full) - start - len(plain)
        return 0

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return ids[: len(ids) - self._suffix_specials]

    def encode(self, record: dict[str, str], subset: str, with_prompt: bool) -> dict[str, Any]:
        """Tokenise prompt + response (LLM-Adapters' recipe: eos appended when it fits)."""
        prompt = build_prompt(record["instruction"], record.get("input", ""))
        ids = self.tokenizer(prompt + record.get("output", ""), truncation=True, max_length=self.cutoff_len)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids[-1] != eos and len(ids) < self.cutoff_len:
            ids.append(eos)
        prompt_ids = self.prompt_ids(prompt)
        masked = min(len(prompt_ids), len(ids))
        example = {"input_ids": ids, "labels": [-100] * masked + ids[masked:]}
        if with_prompt:
            example.update(prompt_input_ids=prompt_ids, answer=record.get("answer", ""), subset=subset)
        return example

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id

        def padded(key: str, value: int, left: bool = False) -> torch.Tensor:
            rows = [e[key] for e in examples]
            width = max(len(row) for row in rows)
            return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])

        batch: dict[str, Any] = {"input_ids": padded("input_ids", pad), "labels": padded("labels", -100)}
        batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (batch["input_ids"].shape[1] - len(e["input_ids"])) for e in examples])
        if "prompt_input_ids" in examples[0]:
            batch["prompt_input_ids"] = padded("prompt_input_ids", pad, left=True)
            width = batch["prompt_input_ids"].shape[1]
            batch["prompt_attention_mask"] = torch.tensor([[0] * (width - len(e["prompt_input_ids"])) + [1] * len(e["prompt_input_ids"]) for e in examples])
            batch["answers"] = [e["answer"] for e in examples]
            batch["subset"] = [e["subset"] for e in examples]
        return batch

    def describe_split(self, split: str) -> str:
        if split == "train" or (split == "val" and self._holds_out()):
            return str(self.train_file)
        return f"{self.eval_root} ({', '.join(self.eval_sets)})"

    def _holds_out(self) -> bool:
        return self.train_file is not None and self.val_size > 0

    def _split_train(self) -> tuple[list[dict], list[dict]]:
        """(train, held-out) records of ``train_file``; the hold-out draw is fixed, not ``seed``."""
        if self._train_records is None:
            if self.train_file is None:
                raise ValueError("training needs --data.train_file (e.g. commonsense_170k.json)")
            path = require_file(self.train_file, "commonsense train", "set --data.train_file")
            records = read_instruction_json(path, need_answer=False)
            if self.val_size >= len(records):
                raise data_error(path, f"val_size={self.val_size} leaves no training records (file has {len(records)})")
            order = np.random.default_rng(self.SPLIT_SEED).permutation(len(records))
            held = set(order[: self.val_size].tolist())
            self._train_records = (
                [r for i, r in enumerate(records) if i not in held],
                [r for i, r in enumerate(records) if i in held],
            )
        return self._train_records

    def _eval_records(self) -> tuple[list[dict], list[str]]:
        if self.eval_root is None:
            raise ValueError("evaluation needs --data.eval_root (the folder holding <set>/test.json)")
        root = require_dir(self.eval_root, "commonsense eval", "set --data.eval_root")
        records, subsets = [], []
        for name in self.eval_sets:
            path = require_file(root / name / "test.json", f"commonsense {name}", f"expected {root}/{name}/test.json")
            chosen = read_instruction_json(path, need_answer=True)[: self.eval_limit]
            records += chosen
            subsets += [name] * len(chosen)
        return records, subsets

    def load_split(self, split: str) -> CommonsenseExamples:
        if split == "train":
            records = self._split_train()[0]
            return CommonsenseExamples(records, [HELDOUT] * len(records), partial(self.encode, with_prompt=False))
        if split == "val" and self._holds_out():
            records = self._split_train()[1]
            subsets = [HELDOUT] * len(records)
        else:
            records, subsets = self._eval_records()
        return CommonsenseExamples(records, subsets, partial(self.encode, with_prompt=True))

    def load_predict(self) -> CommonsenseExamples | None:
        if self.predict_file is None:
            return None
        path = require_file(self.predict_file, "predict", "check --data.predict_file")
        if path.suffix.lower() in PLAIN_TEXT_SUFFIXES:
            records = [{"instruction": text} for (text,) in read_lines(path, ("instruction",)).texts]
        else:
            records = read_instruction_json(path, need_answer=False, need_output=False)
        return CommonsenseExamples(records, [HELDOUT] * len(records), partial(self.encode, with_prompt=True))

    def train_strata(self, dataset: Dataset) -> Sequence[str]:
        return dataset.labels  # type: ignore[attr-defined]
